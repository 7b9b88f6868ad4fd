"""The writer's copy paths, in this process (no Ray): slabs of transposed and cast blocks, the
digest's read-back, and one read-ahead running across a layer's tensors.

The fixture's chunks are tiny, so the conversion normally never slabs a block; here the slab
and read-back sizes are set to a few elements so that every copied block is cut into several
slabs and every out-of-order file is read back in several pieces. The expected bytes come
from tests/conversion/reference.py (plain numpy from the spec tables).
"""

from __future__ import annotations

import base64

import google_crc32c
import numpy as np
import pytest

from conversion import placement
from conversion.execute import convert_layer
from conversion.run import ConvertOptions, prepare
from tests.conversion.conftest import MODELS
from tests.conversion.reference import reference_files


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize(("model", "t", "wd"), [("ul2", 1, "fp32"), ("ul2", 2, "bf16"),
                                                ("t5v1", 4, "fp16")])
@pytest.mark.parametrize("slab", [8, 1 << 20])
def test_slabs_and_read_ahead_write_the_reference_bytes(t5x_checkpoint, tmp_path, monkeypatch,
                                                        model, t, wd, slab):
    src, params = t5x_checkpoint(model, "legacy", "float32")
    monkeypatch.setattr(placement, "_SLAB", slab)  # bytes per copied slab: 2 fp32 values
    monkeypatch.setattr(placement, "_HASH_PIECE", 12)  # read-back pieces of 12 bytes
    ckpt, _, plan, _ = prepare(ConvertOptions(src=str(src), dst=str(tmp_path), tensor_parallel=t,
                                              weight_dtype=wd, progress=False))
    out = tmp_path / "w"
    entries = {}
    for task in plan.tasks:
        result = convert_layer(ckpt, task, str(out))
        entries.update({e.name: e for e in result["entries"]})

    expected = reference_files(params, MODELS[model], t, wd)
    assert {p.name for p in out.iterdir()} == set(expected)
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
        assert entries[name].crc32c == _crc32c(data), name


def test_read_ahead_refuses_sources_out_of_order(t5x_checkpoint):
    src, _ = t5x_checkpoint("ul2", "legacy", "float32")
    ckpt, _, plan, _ = prepare(ConvertOptions(src=str(src), dst="unused", progress=False))
    first, second = (placement.read_refs(t)[0] for t in plan.tasks[1].tensors[:2])
    reads = placement.ReadAhead(ckpt, [first, second])
    with pytest.raises(placement.ConversionError, match="read-ahead out of step"):
        reads.next(second)
    reads.close()
    with placement.ReadAhead(ckpt, []) as empty, \
            pytest.raises(placement.ConversionError, match="nothing left to read"):
        empty.next(first)


@pytest.mark.parametrize("slab", [32, 8 * 1024 * 1024])
def test_rank_columns_of_a_chunk_written_and_hashed_in_order(tmp_path, monkeypatch, slab):
    """A rank's columns of a chunk that spans whole rows of the rank file are copied into the
    scratch buffer slab by slab (here two rows a slab, or all at once) and written and hashed
    in file order."""
    monkeypatch.setattr(placement, "_SLAB", slab)
    chunk = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    path = tmp_path / "rank1.bin"
    out = placement._OutFile(str(path), 6 * 4 * 4)
    try:
        placement._write_box(out, (6, 4), [0, 0], chunk[:, 4:8], np.dtype(np.float32))
        digest = out.digest()
    finally:
        out.close()
    want = np.ascontiguousarray(chunk[:, 4:8]).tobytes()
    assert path.read_bytes() == want
    assert digest == _crc32c(want)
