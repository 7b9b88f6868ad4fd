"""Bytes into files: one FT tensor's rank files, written from its stored source chunks.

A source tensor is read chunk by chunk as t5x stored it (:func:`blocks`); each chunk is cast,
transposed or fused as the plan says and written at its place in every rank file it overlaps
(:func:`_place`, :func:`_write_box`), so a task holds a few chunks, never a whole tensor. Files
are staged (core.storage.staged_file) and published whole; their digest (crc32c by default,
core.manifest) is computed on the way for the manifest.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator

import numpy as np

from conversion.errors import ConversionError, ConversionRefused
from conversion.plan import LayerTask, OutputTensor, SourceRef
from conversion.t5x import Checkpoint
from core import ft_format, storage
from core.manifest import DEFAULT_DIGEST, Digest, ManifestEntry, new_hasher

# Pieces in which _OutFile reads back what arrived out of order, to digest it.
_HASH_PIECE = 8 * 1024 * 1024

# Stored chunks being fetched and inflated (on conversion.inflate's threads, or tensorstore's)
# while the task casts, places, writes and hashes the current one: inflation, the dominant
# cost, then overlaps the rest and uses every core even when fewer tasks than cores remain.
# The reads run ahead across tensor boundaries (:class:`ReadAhead`), so a layer of one-chunk
# tensors overlaps too. Each adds one decoded chunk (<= 64 MiB for t5x) to a worker's memory.
_READ_AHEAD = 2


def _chunk_reads(ckpt: Checkpoint, ref: SourceRef) -> Iterator[tuple[tuple, tuple]]:
    """(region, region to read) of each stored chunk of ``ref``, in order; the region has the
    layer axis (scanned sources) removed, the region to read selects the layer."""
    shape = list(ckpt.params[ref.param].shape)
    chunk = list(ckpt.chunk_shape(ref.param))
    if ref.layer_axis is not None:
        del shape[ref.layer_axis]
        del chunk[ref.layer_axis]
    if not shape:
        yield (), ((ref.layer,) if ref.layer_axis is not None else ())
        return
    grid = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    for starts in itertools.product(*grid):
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, shape,
                                                                  strict=True))
        read_region: tuple = region
        if ref.layer_axis is not None:
            read_region = region[:ref.layer_axis] + (ref.layer,) + region[ref.layer_axis:]
        yield region, read_region


# Decoded-chunk buffers of finished read-aheads, kept for the next one in this process:
# inflating into memory the process already touched avoids the fresh-page cost (see _SCRATCH).
_BUFFERS: list[np.ndarray] = []


class ReadAhead:
    """The stored chunks of a list of sources, read in order, ``_READ_AHEAD`` ahead of the
    one being written, across the sources' boundaries.

    gzip chunks are inflated into a ring of ``_READ_AHEAD + 1`` buffers: the values
    :meth:`next` returns are valid until the following call (the buffer of chunk i is reused
    for chunk i + _READ_AHEAD + 1, read once chunk i + 1 is asked for). Close it (``with``)
    to hand the buffers to the next read-ahead of this process.
    """

    def __init__(self, ckpt: Checkpoint, refs: list[SourceRef]) -> None:
        self.ckpt = ckpt
        self.todo = ((ref, region, read) for ref in refs
                     for region, read in _chunk_reads(ckpt, ref))
        self.ahead: collections.deque = collections.deque()
        self.ring = [_BUFFERS.pop() if _BUFFERS else np.empty(0, dtype=np.uint8)
                     for _ in range(_READ_AHEAD + 1)]
        self.started = 0

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, src: SourceRef, region: tuple, read: tuple) -> None:
        slot = self.started % len(self.ring)
        nbytes = self.ckpt.inflated_chunk_bytes(src.param)  # 0: tensorstore decodes it
        values = self.ckpt.read_async(src.param, read or None,
                                      out=_grown(self.ring, slot, nbytes))
        self.ahead.append((src, region, values))
        self.started += 1

    def next(self, ref: SourceRef) -> tuple[tuple, np.ndarray]:
        """(region, values) of the next chunk, which must belong to ``ref``; the values are
        valid until the next call."""
        while len(self.ahead) <= _READ_AHEAD:
            item = next(self.todo, None)
            if item is None:
                break
            self._start(*item)
        if not self.ahead:
            raise ConversionError(f"read-ahead out of step: nothing left to read, {ref} wanted")
        src, region, values = self.ahead.popleft()
        if src != ref:  # the caller consumes sources in another order than announced
            raise ConversionError(f"read-ahead out of step: {src} read, {ref} wanted")
        return region, values()

    def close(self) -> None:
        """Wait for the reads still running (they write into the ring), then give the ring
        to the next read-ahead."""
        while self.ahead:
            _, _, values = self.ahead.popleft()
            with contextlib.suppress(Exception):  # the error, if any, is someone else's
                values()
        _BUFFERS.extend(self.ring)
        self.ring = []


def blocks(ckpt: Checkpoint, ref: SourceRef, reads: ReadAhead | None = None
           ) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """A source tensor in pieces aligned to its stored chunks: (region, values) pairs.

    The region is in the source's own coordinates with the layer axis (scanned sources)
    removed, and in its ``view``'s coordinates when it has one; each stored chunk is
    decompressed once. ``reads``: the task's read-ahead, announced with ``ref`` (viewless)
    among its sources; default: one for this source alone.
    """
    if ref.view is not None:
        shape = list(ckpt.params[ref.param].shape)
        if ref.layer_axis is not None:
            del shape[ref.layer_axis]
        yield from _viewed(blocks(ckpt, dataclasses.replace(ref, view=None), reads), shape,
                           ref.view)
        return
    if reads is None:
        with ReadAhead(ckpt, [ref]) as own:
            yield from blocks(ckpt, ref, own)
        return
    for _ in _chunk_reads(ckpt, ref):
        # Yielded without a local name: a chunk read into a new buffer (not a gzip chunk) is
        # freed as soon as its consumer drops it, before the next read starts.
        yield reads.next(ref)


def _viewed(blocks: Iterator[tuple[tuple[slice, ...], np.ndarray]], shape: list[int],
            view: tuple[int, ...]) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Blocks of an array of ``shape`` as blocks of its row-major reshape to ``view``, which
    merges consecutive axes ([D, H, K] -> [D, H*K]).

    A box is contiguous in a merged axis when, within the merged group, the axes after its
    last short one are whole and those before it have length 1: a block is cut into such
    boxes (stored chunks usually span K, so usually it is one box).
    """
    groups, axis = [], 0
    for n in view:  # the consecutive source axes each view axis merges
        group = [axis]
        while int(np.prod([shape[a] for a in group])) < n:
            axis += 1
            group.append(axis)
        groups.append(group)
        axis += 1
    for region, values in blocks:
        cut = []  # axes taken one index at a time
        for g in groups:
            short = [j for j, a in enumerate(g) if values.shape[a] != shape[a]]
            if short:
                cut += g[:short[-1]]
        for idx in itertools.product(*(range(values.shape[a]) for a in cut)):
            lo = [r.start for r in region]
            index = [slice(None)] * values.ndim
            for a, i in zip(cut, idx, strict=True):
                index[a], lo[a] = slice(i, i + 1), lo[a] + i
            box = values[tuple(index)]
            out = []
            for g in groups:
                start = int(np.ravel_multi_index([lo[a] for a in g], [shape[a] for a in g]))
                out.append(slice(start, start + int(np.prod([box.shape[a] for a in g]))))
            yield tuple(out), box.reshape([r.stop - r.start for r in out])
        box = values = None  # free this chunk before the next one is read (see blocks)


# One byte buffer per worker process, reused for every copy a write needs (a slab of a
# transposed or cast block, a digest's read-back): on the VMs we measure, first-touched pages
# cost about 1 GB/s to fault in against 25 GB/s for reused ones (docs/benchmarks.md,
# Conversion), so a fresh array per 64 MiB chunk cost more than the copy itself. Copies go
# through it in slabs of at most _SLAB bytes, so it stays that small; it is only used on the
# task's own thread.
_SCRATCH: list[np.ndarray] = [np.empty(0, dtype=np.uint8)]
_SLAB = 8 * 1024 * 1024

# Columns per band of a blocked copy: a transposed chunk is copied band by band so that reads
# and writes both stay within cache (about 3x numpy's whole-array transposing copy). 64, not
# 256: a 512-row slab of a transposed [4096, 4096] fp32 chunk copies in 22 ms at 64 against
# 112 ms at 256 (bench/transpose_band.py, docs/benchmarks.md); --format hf transposes every
# kernel, FT only the LM head.
_BAND = 64


def _grown(bufs: list[np.ndarray], i: int, nbytes: int) -> np.ndarray:
    """``bufs[i]`` (a uint8 buffer), replaced by one of ``nbytes`` when smaller: the smaller
    one is freed first, so the two never coexist."""
    if bufs[i].size < nbytes:
        bufs[i] = np.empty(0, dtype=np.uint8)
        bufs[i] = np.empty(nbytes, dtype=np.uint8)
    return bufs[i]


def _scratch(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array of ``shape`` and ``dtype`` over this process's reused buffer."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return _grown(_SCRATCH, 0, nbytes)[:nbytes].view(dtype).reshape(shape)


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (cast as ``astype`` casts), in column bands when ``src`` is a 2-D
    array whose rows are not contiguous (a transpose)."""
    if src.ndim != 2 or src.strides[1] == src.itemsize:
        np.copyto(dst, src, casting="unsafe")
        return
    for j in range(0, src.shape[1], _BAND):
        np.copyto(dst[:, j:j + _BAND], src[:, j:j + _BAND], casting="unsafe")


class _OutFile:
    """A staged output file written by positional writes, digested as it goes.

    Digests need the bytes in file order; runs that arrive in order (most tensors, whose
    chunks span whole rows) are digested on the way, the rest is read back once at the end.
    """

    def __init__(self, path: str, nbytes: int, digest: Digest = DEFAULT_DIGEST) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, nbytes)
        self.nbytes = nbytes
        self.hash = new_hasher(digest)
        self.hashed = 0

    def write(self, offset: int, data: np.ndarray) -> None:
        """Write ``data`` (contiguous bytes) at byte ``offset`` with one positional write
        straight from its buffer; hashed now if it continues the hashed prefix."""
        view = memoryview(data)
        written = 0
        while written < len(view):  # pwrite may write less than asked (signals, huge runs)
            written += os.pwrite(self.fd, view[written:], offset + written)
        if offset == self.hashed:
            self.hash.update(data)
            self.hashed += len(view)

    def digest(self) -> str:
        """The file's digest, as the manifest holds it (reads back what arrived out of order)."""
        while self.hashed < self.nbytes:
            piece = _scratch((min(_HASH_PIECE, self.nbytes - self.hashed),), np.uint8)
            got = os.preadv(self.fd, [piece], self.hashed)
            if not got:
                raise ConversionError("staged output file is shorter than planned")
            self.hash.update(piece[:got])
            self.hashed += got
        return self.hash.text()

    def close(self) -> None:
        """Close the file descriptor (the staged file stays)."""
        os.close(self.fd)


def _write_box(out: _OutFile, file_shape: tuple[int, ...], lo: list[int],
               values: np.ndarray, dtype: np.dtype) -> None:
    """Write ``values`` (a box of the file's array starting at index ``lo``), cast to
    ``dtype``, into a row-major file of ``file_shape``: one positional write per contiguous
    run of the file, straight from the decoded buffer when the run is contiguous there, else
    (a cast, a transpose, a rank's columns of a chunk) from a copy in the scratch buffer,
    slab by slab of the box's first axis (a copy into reused memory costs less than a write
    per row: docs/benchmarks.md)."""
    shape = values.shape
    ndim = len(file_shape)
    itemsize = np.dtype(dtype).itemsize
    # k: the first axis from which the box spans whole rows of everything after it.
    k = ndim - 1
    while k > 0 and all(lo[d] == 0 and shape[d] == file_shape[d] for d in range(k, ndim)):
        k -= 1
    if values.size == 0:
        return
    if values.dtype != dtype or not values[(0,) * k].flags.c_contiguous:
        rows = max(1, _SLAB // max(1, values[:1].size * itemsize))
        if rows < shape[0]:
            for s in range(0, shape[0], rows):
                _write_box(out, file_shape, [lo[0] + s, *lo[1:]], values[s:s + rows], dtype)
            return
        copy = _scratch(shape, dtype)
        _copy(copy, values)
        values = copy
    strides = [int(np.prod(file_shape[d + 1:], dtype=np.int64)) for d in range(ndim)]
    base = sum(lo[d] * strides[d] for d in range(k, ndim))
    for idx in np.ndindex(*shape[:k]):
        offset = base + sum((lo[d] + idx[d]) * strides[d] for d in range(k))
        # Raw bytes: memoryview cannot export bfloat16 (ml_dtypes) buffers directly.
        out.write(offset * itemsize, values[idx].reshape(-1).view(np.uint8))


def _place(block: np.ndarray, box_lo: list[int], tensor: OutputTensor,
           outs: list[_OutFile]) -> None:
    """Write a block of the full FT tensor into the rank files it overlaps."""
    file_shape = tensor.file_shape()
    dtype = ft_format.WEIGHT_DTYPES[tensor.weight_dtype]
    axis = ft_format.split_axis(tensor.split, len(file_shape))
    if axis is None:
        _write_box(outs[0], file_shape, box_lo, block, dtype)
        return
    part = file_shape[axis]
    lo, hi = box_lo[axis], box_lo[axis] + block.shape[axis]
    for r in range(lo // part, (hi - 1) // part + 1):
        a, b = max(lo, r * part), min(hi, (r + 1) * part)
        index = [slice(None)] * block.ndim
        index[axis] = slice(a - lo, b - lo)
        local = list(box_lo)
        local[axis] = a - r * part
        _write_box(outs[r], file_shape, local, block[tuple(index)], dtype)


_IDENTICAL = ("copy_identical", "transpose_identical")


def check_identical(ckpt: Checkpoint, tensor: OutputTensor) -> None:
    """Refuse (one line) a scanned side whose per-layer relative-position tables differ."""
    first = ckpt.read(tensor.sources[0].param, _layer_index(tensor.sources[0]))
    for ref in tensor.sources[1:]:
        other = ckpt.read(ref.param, _layer_index(ref))
        if first.tobytes() != other.tobytes() and tensor.transform == "transpose_identical":
            raise ConversionRefused(
                f"scanned checkpoint: the per-layer relative-position tables differ "
                f"({ref.param} differs between layer 0 and layer {ref.layer}); transformers' T5 "
                "holds one table per stack (block 0's), so no Hugging Face T5 checkpoint can "
                "hold this model: convert to --format ft --engine jax, which keeps each layer's"
                " table"
            )
        if first.tobytes() != other.tobytes():
            raise ConversionRefused(
                f"scanned checkpoint: the per-layer relative-position tables differ "
                f"({ref.param} differs between layer 0 and layer {ref.layer}); FasterTransformer "
                "holds one table per stack, so it cannot serve this model exactly: convert with "
                "--engine jax, which keeps each layer's table"
            )


def _layer_index(ref: SourceRef) -> tuple | None:
    """The index that selects one layer of a scanned source (None: not scanned)."""
    if ref.layer_axis is None:
        return None
    return (slice(None),) * ref.layer_axis + (ref.layer,)


def read_refs(tensor: OutputTensor) -> list[SourceRef]:
    """The sources :func:`write_tensor` reads for ``tensor``, in order, as a
    :class:`ReadAhead` is announced them (viewless: a view only reshapes what is read)."""
    return [dataclasses.replace(ref, view=None) for ref in _sources(tensor)]


def _sources(tensor: OutputTensor) -> list[SourceRef]:
    """The sources a tensor is written from: one layer's for a scanned side's shared table
    (copy_identical: the others are only compared), else all of them."""
    return tensor.sources[:1] if tensor.transform in _IDENTICAL else tensor.sources


class _At:
    """A file seen from byte ``base`` on: one tensor's region of a shard."""

    def __init__(self, out: _OutFile, base: int) -> None:
        self.out, self.base = out, base

    def write(self, offset: int, data: np.ndarray) -> None:
        """Write ``data`` at ``offset`` bytes into the region."""
        self.out.write(self.base + offset, data)


def _fill(ckpt: Checkpoint, tensor: OutputTensor, outs: list, reads: ReadAhead) -> None:
    """Write every block of ``tensor``'s sources, transformed, into its rank files ``outs``."""
    if tensor.transform in _IDENTICAL:
        check_identical(ckpt, tensor)
    for j, ref in enumerate(_sources(tensor)):
        for region, values in blocks(ckpt, ref, reads):
            lo = [s.start for s in region]
            if tensor.transform in ("transpose", "transpose_identical"):
                values, lo = values.T, lo[::-1]
            elif tensor.transform == "fuse_qkv":
                values, lo = values[:, None, :], [lo[0], j, lo[1]]
            _place(values, lo, tensor, outs)
            del values  # free this chunk before the next one is read (see blocks)


def write_tensor(ckpt: Checkpoint, tensor: OutputTensor, out_dir: str,
                 digest: Digest = DEFAULT_DIGEST, reads: ReadAhead | None = None
                 ) -> list[ManifestEntry]:
    """Convert one FT tensor into its rank files; returns their manifest entries (with
    ``digest``). ``reads``: the task's read-ahead, announced this tensor's
    :func:`read_refs` next (default: one for this tensor alone)."""
    urls = [storage.join(out_dir, f.name) for f in tensor.files]
    nbytes = tensor.file_bytes()
    entries = []
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(storage.staged_file(u)) for u in urls]
        outs = []
        for p in paths:
            out = _OutFile(p, nbytes, digest)
            stack.callback(out.close)
            outs.append(out)
        if reads is None:
            reads = stack.enter_context(ReadAhead(ckpt, read_refs(tensor)))
        _fill(ckpt, tensor, outs, reads)
        for spec, out in zip(tensor.files, outs, strict=True):
            entries.append(ManifestEntry.of(spec.name, nbytes, digest, out.digest(),
                                            tensor.weight_dtype, tensor.file_shape()))
    return entries


def write_shard(ckpt: Checkpoint, task: LayerTask, out_dir: str,
                digest: Digest = DEFAULT_DIGEST, reads: ReadAhead | None = None
                ) -> ManifestEntry:
    """Write a task's shard (``task.shard``): its header, then each tensor at its offset, chunk
    by chunk as for FT files; returns its manifest entry (shape ``()``: a shard is no array).
    ``reads``: the task's read-ahead, announced every tensor's :func:`read_refs` in order."""
    shard = task.shard
    assert shard is not None, "write_shard needs a task with a shard"
    with contextlib.ExitStack() as stack:
        out = _OutFile(stack.enter_context(storage.staged_file(storage.join(out_dir,
                                                                            shard.name))),
                       shard.nbytes, digest)
        stack.callback(out.close)
        if reads is None:
            reads = stack.enter_context(ReadAhead(
                ckpt, [ref for t in task.tensors for ref in read_refs(t)]))
        out.write(0, np.frombuffer(shard.header, dtype=np.uint8))
        for tensor, offset in zip(task.tensors, shard.offsets, strict=True):
            _fill(ckpt, tensor, [_At(out, offset)], reads)
        entry = ManifestEntry.of(shard.name, shard.nbytes, digest, out.digest(),
                                 task.tensors[0].weight_dtype, ())
        _check_shard(out.path, task)
        return entry


def _check_shard(path: str, task: LayerTask) -> None:
    """Open the staged shard with safetensors' own reader (header, offsets against the file's
    size) and compare its names and shapes with the plan's, before it is published."""
    from safetensors import safe_open

    want = {t.files[0].name: list(t.full_shape) for t in task.tensors}
    try:
        with safe_open(path, framework="numpy") as f:
            got = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - whatever the reader refuses, say it in one line
        raise ConversionError(f"safetensors cannot read the shard written for {task.group}: "
                              f"{exc}") from exc
    if got != want:
        raise ConversionError(f"the shard written for {task.group} holds {sorted(got)[:3]}..., "
                              f"not the planned tensors")
