"""Reading zarr v2 gzip arrays (t5x's legacy layout) with libdeflate instead of tensorstore's zlib.

T5X legacy arrays are zarr v2 folders whose chunks are independent gzip streams (numcodecs'
GZip). Tensorstore opens the store and fetches the raw chunk bytes of gs:// arrays (its
kvstore); a local array's chunk files are read straight into a buffer each inflating thread
reuses (tensorstore's read of a local 60 MiB chunk costs about 110 ms of CPU against 12 ms for
``readinto``: it hands back freshly allocated memory twice, and first-touched pages are what
costs on our VMs; docs/benchmarks.md, Conversion). libdeflate (``imagecodecs.gzip_decode``,
which checks the stream's CRC-32 and releases the GIL) inflates each chunk into a buffer the
caller owns and reuses (:class:`conversion.placement.ReadAhead`), or a new one; numpy then
views it as the array's dtype (no copy). On this machine that is 140 ms of CPU per 64 MiB chunk
against 208 ms for ISA-L's igzip (python-isal), which can only return a new ``bytes`` object.
A chunk missing from the store is the array's fill value, as zarr defines, and an error
where the array has none (fill_value null, as t5x writes).

Any other array (zarr3, OCDBT, other compressors, filters) returns None from :func:`open_gzip`
and keeps tensorstore's own decoding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import threading
from typing import Any

import numpy as np

# Inflating runs here, off the caller's thread: libdeflate releases the GIL, so the reads a
# task starts ahead (conversion/placement.py) inflate while it writes. One thread per process
# (a Ray worker runs one task at a time): with one task per core, two tasks' inflating and
# writing threads already fill two cores, and a second thread would add a second buffer of
# compressed bytes (worker memory, bench/convert.py). gs:// chunks download on tensorstore's
# own threads, all the reads ahead at once (read_async).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflate")

# The inflating thread's buffer for a local chunk file's compressed bytes, grown to the
# largest chunk read and reused (one stored chunk, <= 64 MiB for t5x).
_RAW = threading.local()


def _read_local(path: str) -> memoryview | None:
    """The bytes of the local file ``path`` in this thread's reused buffer; None if missing."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, after sizing
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        buf = getattr(_RAW, "buf", None)
        if buf is None or len(buf) < size:
            _RAW.buf = None  # free the smaller one before growing
            buf = _RAW.buf = bytearray(size)
        view = memoryview(buf)[:size]
        got = 0
        while got < size and (n := f.readinto(view[got:])):
            got += n
        return view[:got]


@dataclasses.dataclass(frozen=True)
class GzipZarr:
    """One zarr v2 array whose chunks are gzip streams, read chunk by chunk.

    Attributes:
      kvstore: the tensorstore KvStore of the array's folder.
      shape, chunks: the array's shape and stored chunk shape.
      dtype: the stored numpy dtype (byte order included).
      order: "C" or "F", the element order inside a chunk.
      fill: the value of a chunk that is not stored; None (zarr's null) when every chunk must
        be stored.
      separator: the chunk key's dimension separator ("." or "/").
      local_dir: the array's folder when it is on this machine (its chunk files are read
        directly), None for gs://.
    """

    kvstore: Any
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    order: str
    fill: Any
    separator: str
    local_dir: str | None = None

    def key(self, index: tuple[int, ...]) -> str:
        """The store key of the chunk at grid ``index``."""
        return self.separator.join(str(i) for i in index) if index else "0"

    def chunk(self, index: tuple[int, ...], out: np.ndarray | None = None,
              fetched: dict[str, Any] | None = None) -> np.ndarray:
        """The stored chunk at grid ``index``, whole (edge chunks keep their padding),
        inflated into ``out`` (a uint8 buffer) when it is large enough; ``fetched``: kvstore
        reads already started, by key."""
        key = self.key(index)
        if self.local_dir is not None:
            raw = _read_local(os.path.join(self.local_dir, key))
        else:
            started = fetched.get(key) if fetched else None
            raw = (started if started is not None else self.kvstore.read(key)).result().value
        if not raw:  # zarr: a chunk never written holds the fill value everywhere
            if self.fill is None:  # ... unless there is none: then it must have been written
                raise ValueError(f"chunk {key} is missing and the array's fill_value is null "
                                 "(an incomplete checkpoint?)")
            return np.full(self.chunks, self.fill, dtype=self.dtype)
        return self.decode(raw, out)

    def nbytes(self) -> int:
        """The size of one decoded chunk."""
        return int(np.prod(self.chunks, dtype=np.int64)) * self.dtype.itemsize

    def decode(self, raw: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """Inflate one chunk's gzip stream into an array of the chunk's shape, in ``out`` (a
        uint8 buffer) when it is large enough, else in a new one."""
        import imagecodecs

        nbytes = self.nbytes()
        dst = out[:nbytes] if out is not None and out.size >= nbytes else np.empty(
            nbytes, dtype=np.uint8)
        try:
            data = imagecodecs.gzip_decode(raw, out=dst)
        except imagecodecs.DeflateError as exc:  # corrupt, or larger than the chunk
            raise ValueError(f"chunk does not inflate to its {nbytes} bytes: {exc}") from None
        if data.size != nbytes:
            raise ValueError(f"chunk inflates to {data.size} bytes, expected {nbytes}")
        return data.view(self.dtype).reshape(self.chunks, order=self.order)

    def _chunks_of(self, region: tuple | None
                   ) -> tuple[list[int], list[int], tuple, list[tuple[int, ...]]]:
        """(start, stop, the axes to drop, grid indexes of the chunks) of a region."""
        sel = _normalise(region, self.shape)
        lo = [a for a, _, _ in sel]
        hi = [b for _, b, _ in sel]
        drop = tuple(0 if is_int else slice(None) for _, _, is_int in sel)
        grid = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
                for a, b, c in zip(lo, hi, self.chunks, strict=True)]
        return lo, hi, drop, list(itertools.product(*grid))

    def read(self, region: tuple | None, out: np.ndarray | None = None,
             fetched: dict[str, Any] | None = None) -> np.ndarray:
        """The values at ``region`` (slices with step 1 or ints, as numpy indexes), native
        byte order, from the chunks it touches; a region within one chunk is a view of that
        chunk inflated into ``out`` (a uint8 buffer) when it is large enough. ``fetched``:
        kvstore reads already started, by key."""
        lo, hi, drop, indexes = self._chunks_of(region)
        if len(indexes) == 1 and self.dtype == _native(self.dtype):
            # One chunk (how conversion/placement.py reads): a view of the inflated buffer,
            # no second copy.
            src, _ = _overlap(indexes[0], self.chunks, lo, hi)
            return self.chunk(indexes[0], out, fetched)[src][drop]
        values = np.empty([b - a for a, b in zip(lo, hi, strict=True)],
                          dtype=_native(self.dtype))
        for index in indexes:
            src, dst = _overlap(index, self.chunks, lo, hi)
            values[dst] = self.chunk(index, fetched=fetched)[src]
        return values[drop]

    def read_async(self, region: tuple | None, out: np.ndarray | None = None
                   ) -> concurrent.futures.Future:
        """Start :meth:`read` on the inflate pool (a future of its values); a gs:// array's
        chunks start downloading now, on tensorstore's threads."""
        fetched = None
        if self.local_dir is None:
            fetched = {self.key(i): self.kvstore.read(self.key(i))
                       for i in self._chunks_of(region)[3]}
        return _POOL.submit(self.read, region, out, fetched)


def _overlap(index: tuple[int, ...], chunks: tuple[int, ...], lo: list[int], hi: list[int]
             ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(within the chunk at ``index``, within the region [lo, hi)) of their overlap."""
    src, dst = [], []
    for i, c, a, b in zip(index, chunks, lo, hi, strict=True):
        s, e = max(a, i * c), min(b, (i + 1) * c)
        src.append(slice(s - i * c, e - i * c))
        dst.append(slice(s - a, e - a))
    return tuple(src), tuple(dst)


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def _normalise(region: tuple | None, shape: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """(start, stop, was an int) per axis for a numpy-style region of ints and unit slices."""
    region = tuple(region or ())
    region = region + (slice(None),) * (len(shape) - len(region))
    sel = []
    for r, n in zip(region, shape, strict=True):
        if isinstance(r, slice):
            start, stop, step = r.indices(n)
            if step != 1:
                raise ValueError("strided regions are not supported")
            sel.append((start, max(start, stop), False))
        else:
            i = int(r) + (n if int(r) < 0 else 0)
            sel.append((i, i + 1, True))
    return sel


def _zarr_dtype(meta: dict) -> np.dtype | None:
    name = meta.get("dtype")
    if not isinstance(name, str):
        return None  # structured dtypes: tensorstore's business
    if name == "bfloat16":  # tensorstore's extension, as t5x writes bf16 arrays
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def open_gzip(spec: dict[str, Any]) -> GzipZarr | None:
    """A :class:`GzipZarr` for a tensorstore zarr (v2) spec whose compressor is gzip with no
    filters; None for anything else (then tensorstore decodes)."""
    if spec.get("driver") != "zarr" or not isinstance(spec.get("kvstore"), dict):
        return None
    import tensorstore as ts

    kvstore = dict(spec["kvstore"])
    if isinstance(kvstore.get("path"), str) and not kvstore["path"].endswith("/"):
        kvstore["path"] += "/"  # chunk keys are relative to the array's folder
    kv = ts.KvStore.open(kvstore).result()
    raw = kv.read(".zarray").result().value
    if not raw:
        return None
    meta = json.loads(raw)
    compressor = meta.get("compressor") or {}
    if meta.get("zarr_format") != 2 or compressor.get("id") != "gzip" or meta.get("filters"):
        return None
    dtype = _zarr_dtype(meta)
    if dtype is None:
        return None
    fill = meta.get("fill_value")
    # zarr writes non-finite fill values as strings. null means "unspecified": tensorstore
    # reads such missing chunks as zeros, but t5x writes every chunk of its null-fill arrays,
    # so a missing one is an incomplete checkpoint, an error (conversion/source_id.py).
    fill = float(fill) if isinstance(fill, str) else fill
    local = kvstore["path"] if kvstore.get("driver") == "file" else None
    return GzipZarr(kv, tuple(meta["shape"]), tuple(meta["chunks"]), dtype,
                    meta.get("order", "C"), fill, meta.get("dimension_separator", "."), local)
