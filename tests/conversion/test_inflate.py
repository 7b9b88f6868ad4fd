"""ISA-L reading of zarr v2 gzip arrays agrees with tensorstore's own decoding, element for
element, on arrays tensorstore itself wrote (edge chunks, missing chunks, bf16, "/" keys)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from conversion import inflate
from core.gcs_env import tensorstore_kvstore


def _write(path, array, chunks, *, compressor=None, fill=None, separator=None,
           driver="zarr", write=True) -> dict:
    spec = {"driver": driver, "kvstore": tensorstore_kvstore(str(path))}
    meta = {"shape": list(array.shape), "chunks": list(chunks),
            "compressor": compressor if compressor is not None else {"id": "gzip"}}
    if fill is not None:
        meta["fill_value"] = fill
    if separator:
        meta["dimension_separator"] = separator
    meta["dtype"] = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str
    store = ts.open({**spec, "metadata": meta}, create=True).result()
    if write:
        store.write(array).result()
    return spec


def _tensorstore(spec, region):
    store = ts.open(spec, read=True).result()
    return (store if region is None else store[region]).read().result()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("separator", [None, "/"])
def test_matches_tensorstore(tmp_path, dtype, separator):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((37, 5, 23)).astype(dtype)
    spec = _write(tmp_path / "a", array, (16, 5, 8), separator=separator)
    reader = inflate.open_gzip(spec)
    assert reader is not None
    for region in [None, (slice(16, 32), slice(0, 5), slice(8, 16)),
                   (slice(3, 37), 2, slice(5, 23)), (7,)]:
        got = reader.read(region)
        want = _tensorstore(spec, region)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_missing_chunk_is_fill_value(tmp_path):
    array = np.zeros((8, 8), np.float32)
    spec = _write(tmp_path / "a", array, (4, 4), fill=1.5, write=False)
    store = ts.open(spec, read=True, write=True).result()
    store[0:4, 0:4].write(np.full((4, 4), 2.0, np.float32)).result()  # one chunk of four
    got = inflate.open_gzip(spec).read(None)
    assert got.tobytes() == _tensorstore(spec, None).tobytes()
    assert got[0, 0] == 2.0 and got[7, 7] == 1.5


@pytest.mark.parametrize("compressor", [{"id": "zstd", "level": 1},
                                        {"id": "blosc", "cname": "lz4", "clevel": 5,
                                         "shuffle": 1}])
def test_other_codecs_stay_with_tensorstore(tmp_path, compressor):
    spec = _write(tmp_path / "a", np.ones((4, 4), np.float32), (2, 2), compressor=compressor)
    assert inflate.open_gzip(spec) is None


def test_zarr3_stays_with_tensorstore(tmp_path):
    spec = {"driver": "zarr3", "kvstore": tensorstore_kvstore(str(tmp_path / "a"))}
    ts.open({**spec, "metadata": {"shape": [4], "data_type": "float32"}}, create=True).result()
    assert inflate.open_gzip(spec) is None


def test_inflates_into_the_callers_buffer(tmp_path):
    """A one-chunk region is inflated into the buffer given (a view of it, what the
    read-ahead's ring relies on); a buffer too small is left alone."""
    rng = np.random.default_rng(1)
    array = rng.standard_normal((12, 10)).astype(np.float32)
    spec = _write(tmp_path / "a", array, (6, 10))
    reader = inflate.open_gzip(spec)
    buf = np.zeros(6 * 10 * 4 + 16, np.uint8)
    got = reader.read_async((slice(6, 12), slice(2, 9)), buf).result()
    assert np.shares_memory(got, buf)
    assert got.tobytes() == array[6:12, 2:9].tobytes()
    small = np.zeros(8, np.uint8)
    got = reader.read((slice(0, 6),), small)
    assert not np.shares_memory(got, small) and got.tobytes() == array[:6].tobytes()


def test_corrupt_chunk_is_one_line_error(tmp_path):
    spec = _write(tmp_path / "a", np.ones((4, 4), np.float32), (4, 4))
    chunk = tmp_path / "a" / "0.0"
    data = bytearray(chunk.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not inflate to its 64 bytes"):
        inflate.open_gzip(spec).read(None)
