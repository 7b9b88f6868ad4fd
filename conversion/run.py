"""Execute a conversion plan on Ray: one task per layer, a manifest, config files.

Data flow: :mod:`conversion.t5x` (read) -> :mod:`conversion.arch` -> :mod:`conversion.plan`
(pure) -> this module (Ray tasks) -> :mod:`core.storage` (atomic writes).

Each task converts one :class:`conversion.plan.LayerTask` (the globals, one encoder layer or one
decoder layer): it reads only its own source tensors, chunk by chunk as they are stored (t5x
writes chunks of at most 64 MiB), places each chunk's values into every rank file it belongs to,
and publishes each file atomically. Memory per task is therefore a few chunks, not a tensor.
Any task error stops the run with the error's first line; the manifest then still says
``"complete": false`` and no config.pbtxt is written, so nothing claims to be complete.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from conversion.arch import ArchError, T5Arch, infer_arch
from conversion.gin_config import GinConfig, GinError, read_gin
from conversion.options import ConvertOptions  # noqa: F401 - re-exported (tests, ray_jobs)
from conversion.plan import ConversionPlan, LayerTask, OutputTensor, PlanError, make_plan
from conversion.t5x import Checkpoint, CheckpointError, open_checkpoint
from core import ft_format, repository, scratch, storage
from core.errors import first_line
from core.ft_format import ManifestEntry
from core.gcs_env import forwarded_env

_HASH_PIECE = 16 * 1024 * 1024


class ConversionError(RuntimeError):
    """A conversion task failed, or the destination refuses the conversion."""


# Errors caused by the input or the options: entry points report them as one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, ArchError, PlanError,
                                            ConversionError)


# --- the per-layer task ------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux: the worker process's peak over its lifetime.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Stored chunks being fetched and decompressed (on tensorstore's threads) while the task casts,
# places, writes and hashes the current one: decompression, the dominant cost, then overlaps
# the rest and uses every core even when fewer tasks than cores remain. Each adds one decoded
# chunk (<= 64 MiB for t5x) to a worker's memory.
_READ_AHEAD = 2


def _blocks(ckpt: Checkpoint, ref) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """A source tensor in pieces aligned to its stored chunks: (region, values) pairs.

    The region is in the source's own coordinates with the layer axis (scanned sources)
    removed, and in its ``view``'s coordinates when it has one; each stored chunk is
    decompressed once.
    """
    shape = list(ckpt.params[ref.param].shape)
    chunk = list(ckpt.chunk_shape(ref.param))
    if ref.layer_axis is not None:
        del shape[ref.layer_axis]
        del chunk[ref.layer_axis]
    if not shape:
        yield (), np.asarray(ckpt.read(ref.param))
        return
    if ref.view is not None:
        yield from _viewed(_blocks(ckpt, dataclasses.replace(ref, view=None)), shape, ref.view)
        return
    grid = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    ahead: collections.deque = collections.deque()
    for starts in itertools.product(*grid):
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, shape,
                                                                  strict=True))
        read_region: tuple = region
        if ref.layer_axis is not None:
            read_region = region[:ref.layer_axis] + (ref.layer,) + region[ref.layer_axis:]
        ahead.append((region, ckpt.read_async(ref.param, read_region)))
        if len(ahead) > _READ_AHEAD:
            done, values = ahead.popleft()
            yield done, values()
    while ahead:
        done, values = ahead.popleft()
        yield done, values()


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


class _OutFile:
    """A staged output file written by positional writes, hashed as it goes.

    sha256 needs the bytes in file order; runs that arrive in order (most tensors, whose
    chunks span whole rows) are hashed on the way, the rest is read back once at the end.
    """

    def __init__(self, path: str, nbytes: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, nbytes)
        self.nbytes = nbytes
        self.hash = hashlib.sha256()
        self.hashed = 0

    def write(self, offset: int, data: memoryview) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        if offset == self.hashed:
            self.hash.update(data)
            self.hashed += len(data)

    def sha256(self) -> str:
        while self.hashed < self.nbytes:
            piece = os.pread(self.fd, min(_HASH_PIECE, self.nbytes - self.hashed), self.hashed)
            if not piece:
                raise ConversionError("staged output file is shorter than planned")
            self.hash.update(piece)
            self.hashed += len(piece)
        return self.hash.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def _write_box(out: _OutFile, file_shape: tuple[int, ...], lo: list[int],
               values: np.ndarray) -> None:
    """Write ``values`` (a box of the file's array starting at index ``lo``) into a row-major
    file of ``file_shape``, as few contiguous runs as the box allows."""
    shape = values.shape
    ndim = len(file_shape)
    itemsize = values.dtype.itemsize
    # k: the first axis from which the box spans whole rows of everything after it.
    k = ndim - 1
    while k > 0 and all(lo[d] == 0 and shape[d] == file_shape[d] for d in range(k, ndim)):
        k -= 1
    strides = [int(np.prod(file_shape[d + 1:], dtype=np.int64)) for d in range(ndim)]
    run = int(np.prod(shape[k:], dtype=np.int64))
    if run == 0:
        return
    # Raw bytes: memoryview cannot export bfloat16 (ml_dtypes) buffers directly.
    flat = np.ascontiguousarray(values).reshape(-1, run).view(np.uint8)
    base = sum(lo[d] * strides[d] for d in range(k, ndim))
    for n, idx in enumerate(np.ndindex(*shape[:k])):
        offset = base + sum((lo[d] + idx[d]) * strides[d] for d in range(k))
        out.write(offset * itemsize, memoryview(flat[n]))


def _place(block: np.ndarray, box_lo: list[int], tensor: OutputTensor,
           outs: list[_OutFile]) -> None:
    """Write a block of the full FT tensor into the rank files it overlaps."""
    file_shape = tensor.file_shape()
    if tensor.split == "none":
        _write_box(outs[0], file_shape, box_lo, block)
        return
    axis = 0 if tensor.split == "first" else len(file_shape) - 1
    part = file_shape[axis]
    lo, hi = box_lo[axis], box_lo[axis] + block.shape[axis]
    for r in range(lo // part, (hi - 1) // part + 1):
        a, b = max(lo, r * part), min(hi, (r + 1) * part)
        index = [slice(None)] * block.ndim
        index[axis] = slice(a - lo, b - lo)
        local = list(box_lo)
        local[axis] = a - r * part
        _write_box(outs[r], file_shape, local, block[tuple(index)])


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        while piece := f.read(_HASH_PIECE):
            h.update(piece)
    return h.hexdigest()


def _check_identical(ckpt: Checkpoint, tensor: OutputTensor) -> None:
    """Refuse (one line) a scanned side whose per-layer relative-position tables differ."""
    first = ckpt.read(tensor.sources[0].param, _layer_index(tensor.sources[0]))
    for ref in tensor.sources[1:]:
        other = ckpt.read(ref.param, _layer_index(ref))
        if first.tobytes() != other.tobytes():
            raise ConversionError(
                f"scanned checkpoint: the per-layer relative-position tables differ "
                f"({ref.param} differs between layer 0 and layer {ref.layer}); FasterTransformer "
                "holds one table per stack, so it cannot serve this model exactly: convert with "
                "--engine jax, which keeps each layer's table"
            )


def _layer_index(ref) -> tuple | None:
    if ref.layer_axis is None:
        return None
    return (slice(None),) * ref.layer_axis + (ref.layer,)


def _write_tensor(ckpt: Checkpoint, tensor: OutputTensor, out_dir: str) -> list[ManifestEntry]:
    """Convert one FT tensor into its rank files; returns their manifest entries."""
    dtype = ft_format.WEIGHT_DTYPES[tensor.weight_dtype]
    urls = [storage.join(out_dir, f.name) for f in tensor.files]
    nbytes = tensor.file_bytes()
    if tensor.transform == "copy_identical":
        _check_identical(ckpt, tensor)
    entries = []
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(storage.staged_file(u)) for u in urls]
        outs = []
        for p in paths:
            out = _OutFile(p, nbytes)
            stack.callback(out.close)
            outs.append(out)
        refs = tensor.sources[:1] if tensor.transform == "copy_identical" else tensor.sources
        for j, ref in enumerate(refs):
            for region, values in _blocks(ckpt, ref):
                lo = [s.start for s in region]
                if tensor.transform == "transpose":
                    values, lo = values.T, lo[::-1]
                elif tensor.transform == "fuse_qkv":
                    values, lo = values[:, None, :], [lo[0], j, lo[1]]
                _place(values.astype(dtype, copy=False), lo, tensor, outs)
        for spec, out in zip(tensor.files, outs, strict=True):
            entries.append(ManifestEntry(spec.name, nbytes, out.sha256(),
                                         tensor.weight_dtype, tensor.file_shape()))
    return entries


def _entry_checks_out(entry: ManifestEntry | None, tensor: OutputTensor, url: str) -> bool:
    """Whether an existing file matches its manifest entry and what this plan would write."""
    if entry is None or entry.dtype != tensor.weight_dtype:
        return False
    if tuple(entry.shape) != tensor.file_shape() or entry.bytes != tensor.file_bytes():
        return False
    if storage.size(url) != entry.bytes:
        return False
    return _sha256_file(url) == entry.sha256


def _return_freed_memory() -> None:
    """Serve allocations of 1 MiB or more by mmap, so that freed chunk buffers leave the process.

    glibc raises its mmap threshold after the first large free (up to 32 MiB) and then keeps
    freed chunk-sized buffers in tensorstore's per-thread arenas: with 16 MiB chunks a worker
    kept about one whole tensor resident after converting it. Fixing the threshold keeps a
    worker's memory at a few chunks whatever the tensor size (bench/convert_gcs.py).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD


def convert_layer(ckpt: Checkpoint, task: LayerTask, out_dir: str,
                  previous: dict[str, ManifestEntry] | None = None) -> dict[str, Any]:
    """Convert one layer's files (what each Ray task runs); returns its manifest entries.

    Files whose entry in ``previous`` (a resumed run's manifest) checks out are kept.
    """
    _return_freed_memory()
    previous = previous or {}
    entries: list[ManifestEntry] = []
    skipped = 0
    for tensor in task.tensors:
        urls = [storage.join(out_dir, f.name) for f in tensor.files]
        old = [previous.get(f.name) for f in tensor.files]
        if previous and all(_entry_checks_out(e, tensor, u) for e, u in
                            zip(old, urls, strict=True)):
            entries += [e for e in old if e is not None]
            skipped += len(urls)
            continue
        entries += _write_tensor(ckpt, tensor, out_dir)
    return {"group": task.group, "entries": entries, "skipped": skipped,
            "peak_rss": _peak_rss_bytes(), "pid": os.getpid()}


def verify_layer(task: LayerTask, out_dir: str,
                 manifest: dict[str, ManifestEntry]) -> dict[str, Any]:
    """Re-read every file of a layer and check size and sha256 against the manifest."""
    for tensor in task.tensors:
        for spec in tensor.files:
            url = storage.join(out_dir, spec.name)
            entry = manifest.get(spec.name)
            if entry is None:
                raise ConversionError(f"verify: {spec.name} is not in the manifest")
            got = storage.size(url)
            if got != entry.bytes:
                raise ConversionError(f"verify: {url} holds {got} bytes, manifest says "
                                      f"{entry.bytes}")
            if _sha256_file(url) != entry.sha256:
                raise ConversionError(f"verify: {url} does not match its manifest sha256")
    return {"group": task.group, "files": len(task.file_names())}


# --- the driver --------------------------------------------------------------------------------


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError, when there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc



class _Progress:
    """A tqdm bar on a terminal, otherwise a plain line per finished task on stdout; and the
    Ray dashboard's view: ``t5ft_convert_tasks_done`` / ``t5ft_convert_tasks_total`` and
    ``t5ft_convert_bytes_done`` counters, tagged by model and step ("convert" or "verify")."""

    def __init__(self, total_bytes: int, tasks: int, label: str, enabled: bool,
                 model: str = "") -> None:
        self.enabled, self.label, self.tasks, self.done = enabled, label, tasks, 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label,
                            file=sys.stderr)
        self.metrics: dict[str, Any] = {}
        try:
            from ray.util import metrics as rm

            tags = ("model", "step")
            self.metrics = {
                "tasks": rm.Counter("t5ft_convert_tasks_done", "Layer tasks finished",
                                    tag_keys=tags),
                "bytes": rm.Counter("t5ft_convert_bytes_done",
                                    "Bytes of FT weight files written (or verified)",
                                    tag_keys=tags),
                "total": rm.Gauge("t5ft_convert_tasks_total", "Layer tasks planned",
                                  tag_keys=tags),
            }
            for m in self.metrics.values():
                m.set_default_tags({"model": model, "step": label})
            self.metrics["total"].set(tasks)
        except Exception:  # noqa: BLE001 - metrics are a view, never a reason to fail
            self.metrics = {}

    def update(self, group: str, nbytes: int) -> None:
        self.done += 1
        if self.metrics:
            self.metrics["tasks"].inc(1)
            if nbytes:
                self.metrics["bytes"].inc(nbytes)
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.enabled:
            print(f"{self.label}: {group} done ({self.done}/{self.tasks})", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_tasks(fn, calls: list[tuple[LayerTask, tuple]], opts: ConvertOptions,
               label: str, on_result: Callable[[list[dict[str, Any]]], None] | None = None
               ) -> list[dict[str, Any]]:
    """Run ``fn(*args)`` as one Ray task per layer; fail on the first error.

    ``on_result`` sees the results so far after each task (to record progress durably).
    """
    import ray

    remote = ray.remote(fn).options(
        num_cpus=opts.task_cpus, num_gpus=opts.task_gpus,
        # Lost workers or nodes are retried (tasks are idempotent: files publish atomically);
        # errors raised by the conversion itself are not, they are deterministic.
        max_retries=2, retry_exceptions=False, scheduling_strategy="SPREAD",
        runtime_env=_task_env(),
    )
    pending = {remote.remote(*args): task for task, args in calls}
    progress = _Progress(sum(t.bytes() for t, _ in calls), len(calls), label, opts.progress,
                         model=opts.model_name)
    results = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other)
                    # Let cancelled tasks unwind (their staged files are removed as they do),
                    # so that nothing is still being written once the error is reported.
                    if pending:
                        ray.wait(list(pending), num_returns=len(pending), timeout=60)
                    cause = _cause(exc)
                    raise ConversionError(
                        f"{label} of {task.group} failed: {first_line(cause)}") from cause
                progress.update(task.group, task.bytes())
                if on_result is not None:
                    on_result(results)
    finally:
        progress.close()
    return results


def _identity(ckpt: Checkpoint, plan: ConversionPlan) -> dict[str, Any]:
    """What makes two conversions the same model: compared before writing into DST."""
    return {
        "source": ckpt.path,
        "step": ckpt.step,
        "config": dataclasses.asdict(plan.config),
        "tensor_parallel": plan.tensor_parallel,
        "weight_dtype": plan.weight_dtype,
    }


def _read_manifest(url: str) -> tuple[dict, dict[str, ManifestEntry]] | None:
    if not storage.exists(url):
        return None
    try:
        return ft_format.parse_manifest(storage.read_text(url))
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"{url} is not a readable manifest: {first_line(exc)}") from exc


def _check_destination(model_dir: str, manifest_url: str, identity: dict[str, Any],
                       opts: ConvertOptions) -> dict[str, ManifestEntry]:
    """Refuse to mix models in one folder; returns the entries a resumed run may keep."""
    existing = storage.list_files(model_dir) if storage.is_dir(model_dir) else []
    # What is still scratch here belongs to a live writer: neither foreign nor to delete.
    existing = [f for f in existing if not scratch.is_scratch(f)]
    if not existing:
        return {}
    if opts.overwrite:
        for name in existing:
            storage.delete(storage.join(model_dir, name))
        return {}
    ours = manifest_url[len(model_dir.rstrip("/")) + 1:]
    manifests = sorted(f for f in existing if f.startswith("1/") and
                       f.endswith(f"/{ft_format.MANIFEST}") and f.count("/") == 2)
    if not manifests:
        raise ConversionError(
            f"{model_dir} already holds files that are not this conversion (no manifest at "
            f"{manifest_url}); pass --overwrite to replace them")
    for name in [ours] if ours in manifests else manifests[:1]:
        model, entries = _read_manifest(storage.join(model_dir, name)) or ({}, {})
        old = {k: model.get(k) for k in identity}
        diff = [k for k in identity if _jsonable(old[k]) != _jsonable(identity[k])]
        if diff:
            k = diff[0]
            raise ConversionError(
                f"{model_dir} already holds a different model ({k} {old[k]!r}, not "
                f"{identity[k]!r}); pass --overwrite to replace it")
    weights_prefix = ours.rsplit("/", 1)[0] + "/"
    others = [f for f in existing if "/" in f and not f.startswith(weights_prefix)
              and f != "1/model.py"]
    if others:
        raise ConversionError(f"{model_dir} also holds {others[0]}, not part of this "
                              "conversion; pass --overwrite to replace it")
    return entries if opts.resume else {}


def _sweep_here(model_dir: str) -> scratch.Removed:
    """Scratch left in a local model folder by writers that are gone (see conversion/scratch)."""
    return scratch.Removed() if storage.is_gcs(model_dir) else scratch.sweep_tree(model_dir)


def _sweep_node(model_dir: str) -> dict[str, int]:
    """What one node's sweep task runs: its gs:// staging folder and a local model folder."""
    return scratch.sweep_node().add(_sweep_here(model_dir)).as_dict()


def _task_env() -> dict[str, Any] | None:
    env = {**forwarded_env(), **scratch.forwarded_env()}
    return {"env_vars": env} if env else None


# A node's sweep lists one folder or two: a node that takes longer is busy or unwell, and the
# conversion need not wait for it (it only means scratch stays there until the next run).
_SWEEP_TIMEOUT_S = 120.0


def _sweep_nodes(model_dir: str) -> scratch.Removed:
    """Run :func:`_sweep_node` once on every alive node, where conversion tasks may have staged.

    A task pinned to each node (zero CPUs, so a busy or CPU-less head still runs it); nodes that
    die meanwhile are skipped: their scratch went with them or waits for the next run.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(_sweep_node)
    refs = [remote.options(num_cpus=0, max_retries=0, runtime_env=_task_env(),
                           scheduling_strategy=NodeAffinitySchedulingStrategy(
                               node["NodeID"], soft=False)).remote(model_dir)
            for node in ray.nodes() if node.get("Alive")]
    if not refs:
        return scratch.Removed()
    done, late = ray.wait(refs, num_returns=len(refs), timeout=_SWEEP_TIMEOUT_S)
    for ref in late:
        ray.cancel(ref, force=True)
    if late:
        print(f"convert: {len(late)} node(s) did not clear their scratch folder within "
              f"{_SWEEP_TIMEOUT_S:.0f} s; the next run will", file=sys.stderr, flush=True)
    removed = scratch.Removed()
    for ref in done:
        with contextlib.suppress(ray.exceptions.RayError):
            removed.add(scratch.Removed(**ray.get(ref)))
    return removed


def _unaccounted(out_dir: str, manifest: dict[str, ManifestEntry]) -> list[str]:
    """Files in the weights folder that neither the manifest nor the FT format names."""
    known = set(manifest) | {ft_format.CONFIG_INI, ft_format.MANIFEST}
    return [name for name in storage.list_files(out_dir) if name not in known]


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def find_gin(ckpt_path: str) -> str | None:
    """config.gin beside the checkpoint, or in one of the two folders above it (t5x writes it in
    the model directory, the parent of checkpoint_<step>)."""
    path = ckpt_path.rstrip("/")
    for _ in range(3):
        url = storage.join(path, "config.gin")
        if storage.exists(url):
            return url
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if not parent or parent == path or parent.endswith(":/") or parent == "gs:/":
            break
        path = parent
    return None


def prepare(opts: ConvertOptions
            ) -> tuple[Checkpoint, T5Arch, ConversionPlan, GinConfig | None]:
    """Open the checkpoint, read its config.gin (``--gin`` or :func:`find_gin`; None when there
    is none), infer the architecture and plan the conversion (no Ray, no writes)."""
    ckpt = open_checkpoint(opts.src)
    gin_url = opts.gin or find_gin(ckpt.path)
    gin = None
    if gin_url:
        if not storage.exists(gin_url):
            raise ConversionError(f"gin file {gin_url} does not exist")
        try:
            gin = read_gin(storage.read_text(gin_url), gin_url)
        except GinError as exc:
            raise ConversionError(f"gin file {exc}") from None
    shapes = {name: p.shape for name, p in ckpt.params.items()}
    arch = infer_arch(shapes, gin.t5_values() if gin else None, opts.activation,
                      opts.param_scan_axis)
    # The JAX engine serves per-layer relative-position tables exactly; FT holds one per stack.
    plan = make_plan(ckpt.params, arch, opts.tensor_parallel, opts.weight_dtype,
                     layer_tables=opts.engine == "jax")
    return ckpt, arch, plan, gin


def choose_vocab(flag: str | None, gin: GinConfig | None
                 ) -> tuple[str | None, str | None, list[str]]:
    """(vocabulary to copy, "flag" or "gin" or None, gin problems to report).

    ``--vocab`` wins; without it, the SentencePiece model config.gin names
    (``seqio.SentencePieceVocabulary.sentencepiece_model_file``) is used when it can be read.
    Neither an unreachable one nor an absent include stops the conversion: they are reported.
    """
    warnings = list(gin.warnings) if gin else []
    if flag:
        return flag, "flag", warnings
    named = gin.vocab_file if gin else None
    if not named:
        return None, None, warnings
    try:
        reachable, why = storage.exists(named), "does not exist"
    except Exception as exc:  # e.g. no credentials for its bucket: report, do not fail
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        reachable, why = False, f"cannot be read ({first})"
    if reachable:
        return named, "gin", warnings
    warnings.append(f"vocabulary {named} named by config.gin {why}: no spiece.model written")
    return None, None, warnings


def convert(opts: ConvertOptions, connect: Callable[[], None] | None = None) -> dict[str, Any]:
    """Convert ``opts.src`` into the Triton model repository ``opts.dst``; returns the summary.

    ``connect`` starts or joins Ray (``ray_jobs._cli.init_ray``); it is called only once the
    checkpoint, the plan and the destination have been checked, so bad input fails fast.
    Without it, Ray must already be initialised.
    """
    t0 = time.monotonic()
    if opts.engine not in repository.ENGINES:
        raise ConversionError(f"engine {opts.engine!r} is not one of {repository.ENGINES}")
    if opts.pipeline_parallel < 1:
        raise ConversionError(f"pipeline-parallel size must be >= 1, got {opts.pipeline_parallel}")
    if opts.vocab and not storage.exists(opts.vocab):
        raise ConversionError(f"vocabulary {opts.vocab} does not exist")
    ckpt, arch, plan, gin = prepare(opts)
    gin_url = gin.url if gin else None
    vocab, vocab_source, gin_warnings = choose_vocab(opts.vocab, gin)
    t = plan.tensor_parallel
    model_dir = storage.join(opts.dst, opts.model_name)
    out_dir = storage.join(model_dir, "1", ft_format.weights_dir_name(t))
    manifest_url = storage.join(out_dir, ft_format.MANIFEST)
    config_url = storage.join(model_dir, "config.pbtxt")
    identity = _identity(ckpt, plan)
    # Scanned checkpoints convert exactly only if each side's per-layer relative-bias tables
    # are identical: check the (small) tables before anything is written.
    for task in plan.tasks:
        for tensor in task.tensors:
            if tensor.transform == "copy_identical":
                _check_identical(ckpt, tensor)
    # Scratch of writers that are gone goes first, so that it counts neither as foreign files
    # here nor as disk used on the nodes; a live writer's is left alone (conversion/scratch).
    removed = _sweep_here(model_dir)
    previous = _check_destination(model_dir, manifest_url, identity, opts)
    if connect is not None:
        connect()
    removed.add(_sweep_nodes(model_dir))
    if removed.files:
        print(f"convert: removed {removed.files} scratch file(s) ({removed.bytes} bytes) left by "
              "runs that are gone", file=sys.stderr, flush=True)

    # Until the last step the folder says it is incomplete: no config.pbtxt (Triton would try to
    # load it) and a manifest with "complete": false.
    storage.delete(config_url)
    header = {**identity, "layout": ckpt.layout, "engine": opts.engine,
              "arch_sources": arch.sources, "gin": gin_url}
    storage.write_text(manifest_url, ft_format.manifest_json(
        {**header, "complete": False}, list(previous.values())))

    def record(results: list[dict[str, Any]]) -> None:
        # After each layer, the manifest lists what is done, so --resume after a failure or an
        # interruption keeps it; "complete" stays false until every file is there.
        done = {e.name: e for r in results for e in r["entries"]}
        kept = [e for name, e in previous.items() if name not in done]
        storage.write_text(manifest_url, ft_format.manifest_json(
            {**header, "complete": False}, kept + list(done.values())))

    try:
        results = _run_tasks(convert_layer, [(task, (ckpt, task, out_dir, previous))
                                             for task in plan.tasks], opts, "convert", record)
    except ConversionError:
        _sweep_here(model_dir)  # what tasks killed by the failure left
        raise
    entries = [e for r in results for e in r["entries"]]
    expected = {f.name for f in plan.files()}
    got = {e.name for e in entries}
    if got != expected:  # a plan/executor mismatch must never pass silently
        missing = sorted(expected - got)[:3]
        raise ConversionError(f"conversion wrote {len(got)} of {len(expected)} files; missing "
                              f"{missing}")

    storage.write_text(storage.join(out_dir, ft_format.CONFIG_INI),
                       ft_format.config_ini(plan.config, plan.weight_dtype, t))
    if vocab:
        storage.write_bytes(storage.join(model_dir, "spiece.model"), storage.read_bytes(vocab))
    if opts.engine == "jax":
        storage.write_text(storage.join(model_dir, "1", "model.py"), repository.JAX_MODEL_PY)
    manifest_text = ft_format.manifest_json({**header, "complete": True}, entries)
    storage.write_text(manifest_url, manifest_text)
    verified = False
    unaccounted = None
    if opts.verify:
        _, by_name = ft_format.parse_manifest(manifest_text)
        _run_tasks(verify_layer, [(task, (task, out_dir, by_name)) for task in plan.tasks],
                   opts, "verify")
        verified = True
        # Reported, not fatal: every file the model needs checked out, and Triton loads files
        # by name, so an extra one changes nothing served; the user decides what it is.
        unaccounted = _unaccounted(out_dir, by_name)
        if unaccounted:
            print(f"convert: verify: {len(unaccounted)} file(s) in {out_dir} that neither the "
                  f"manifest nor the FT format accounts for: {', '.join(unaccounted[:5])}",
                  file=sys.stderr, flush=True)
    config = repository.model_config(opts.model_name, opts.engine, t, opts.pipeline_parallel,
                                        opts.inference_dtype)
    storage.write_text(config_url, repository.to_pbtxt(config))

    peak = max(r.get("peak_rss", 0) for r in results)
    return {
        "output": out_dir,
        "model_repository": opts.dst,
        "model_name": opts.model_name,
        "files": len(entries),
        "bytes": sum(e.bytes for e in entries),
        "skipped_files": sum(r["skipped"] for r in results),
        "seconds": round(time.monotonic() - t0, 3),
        "source": ckpt.path,
        "layout": ckpt.layout,
        "layout_detail": ckpt.detail,
        "step": ckpt.step,
        "engine": opts.engine,
        "tensor_parallel": t,
        "pipeline_parallel": opts.pipeline_parallel,
        "weight_dtype": plan.weight_dtype,
        "inference_dtype": opts.inference_dtype,
        "model": dataclasses.asdict(plan.config),
        "arch_sources": arch.sources,
        "inferred": arch.inferred(),
        "read_from_gin": sorted(k for k, v in arch.sources.items() if v == "gin"),
        "gin": gin_url,
        "gin_warnings": gin_warnings,
        "vocab": vocab,
        "vocab_source": vocab_source,
        "scanned": arch.scanned,
        # Where the scan axis came from is arch_sources["param_scan_axis"] (gin, flag, shapes).
        "param_scan_axis": arch.scan_axis if arch.scanned else None,
        "layer_relative_bias": list(plan.layer_tables),
        "verified": verified,
        "unaccounted": unaccounted,
        "scratch_removed": removed.as_dict(),
        "tasks": len(plan.tasks),
        "peak_worker_rss_bytes": peak,
    }
