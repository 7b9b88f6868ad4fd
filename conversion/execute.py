"""Running layer tasks on Ray: the task bodies, the driver loop, progress and metrics.

One Ray task per :class:`conversion.plan.LayerTask` (the globals, one encoder layer or one
decoder layer). Any task error stops the run with the error's first line; lost workers are
retried, because tasks are idempotent (every file publishes atomically).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conversion.errors import ConversionError, ConversionRefused
from conversion.placement import ReadAhead, read_refs, write_shard, write_tensor
from conversion.plan import LayerTask, OutputTensor
from conversion.t5x import Checkpoint
from core import manifest as manifest_lib
from core import scratch, storage
from core.errors import UserError, first_line
from core.gcs_env import forwarded_env
from core.manifest import DEFAULT_DIGEST, Digest, ManifestEntry

if TYPE_CHECKING:
    from conversion.options import ConvertOptions

LOG = logging.getLogger(__name__)


def task_env() -> dict[str, Any] | None:
    """The runtime_env of every conversion task: the GCS emulator and scratch settings of the
    driver, so that workers write where the driver reads."""
    env = {**forwarded_env(), **scratch.forwarded_env()}
    return {"env_vars": env} if env else None


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux: the worker process's peak over its lifetime.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kept(entry: ManifestEntry | None, tensor: OutputTensor, url: str) -> bool:
    """Whether a resumed run may keep an existing file: it matches its manifest entry and what
    this plan would write."""
    return manifest_lib.entry_matches(entry, url, dtype=tensor.weight_dtype,
                                      shape=tensor.file_shape(), nbytes=tensor.file_bytes())


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
                  previous: dict[str, ManifestEntry] | None = None,
                  digest: Digest = DEFAULT_DIGEST) -> dict[str, Any]:
    """Convert one layer's files (what each Ray task runs); returns its manifest entries.

    Files whose entry in ``previous`` (a resumed run's manifest, crc32c or sha256) checks out
    are kept; new files get a ``digest`` entry.
    """
    _return_freed_memory()
    previous = previous or {}
    if task.shard is not None:
        return _convert_shard(ckpt, task, out_dir, previous, digest)
    entries: list[ManifestEntry] = []
    skipped = 0
    todo = []
    for tensor in task.tensors:
        urls = [storage.join(out_dir, f.name) for f in tensor.files]
        old = [previous.get(f.name) for f in tensor.files]
        if previous and all(_kept(e, tensor, u) for e, u in zip(old, urls, strict=True)):
            entries += [e for e in old if e is not None]
            skipped += len(urls)
        else:
            todo.append(tensor)
    # One read-ahead for the whole layer: the next tensor's chunks inflate while this one's
    # last chunk is written.
    with ReadAhead(ckpt, [ref for tensor in todo for ref in read_refs(tensor)]) as reads:
        for tensor in todo:
            entries += write_tensor(ckpt, tensor, out_dir, digest, reads)
    return {"group": task.group, "entries": entries, "skipped": skipped,
            "peak_rss": _peak_rss_bytes(), "pid": os.getpid()}


def _convert_shard(ckpt: Checkpoint, task: LayerTask, out_dir: str,
                   previous: dict[str, ManifestEntry], digest: Digest) -> dict[str, Any]:
    """:func:`convert_layer` for a task written as one shard (Hugging Face safetensors)."""
    shard = task.shard
    assert shard is not None
    url = storage.join(out_dir, shard.name)
    entry = previous.get(shard.name)
    dtype = task.tensors[0].weight_dtype
    if previous and manifest_lib.entry_matches(entry, url, dtype=dtype, shape=(),
                                               nbytes=shard.nbytes):
        entries, skipped = [entry], 1
    else:
        with ReadAhead(ckpt, [ref for t in task.tensors for ref in read_refs(t)]) as reads:
            entries, skipped = [write_shard(ckpt, task, out_dir, digest, reads)], 0
    return {"group": task.group, "entries": entries, "skipped": skipped,
            "peak_rss": _peak_rss_bytes(), "pid": os.getpid()}


def verify_layer(task: LayerTask, out_dir: str,
                 manifest: dict[str, ManifestEntry]) -> dict[str, Any]:
    """Check every file of a layer against the manifest: size and digest (a local file is read
    once; a gs:// crc32c entry is compared with the object's metadata, nothing downloaded)."""
    for name in task.file_names():
        url = storage.join(out_dir, name)
        entry = manifest.get(name)
        if entry is None:
            raise ConversionRefused(f"verify: {name} is not in the manifest")
        problem = manifest_lib.file_mismatch(url, entry)
        if problem is not None and problem[0] == "bytes":
            raise ConversionRefused(f"verify: {url} holds {problem[1]} bytes, manifest says "
                                    f"{entry.bytes}")
        if problem is not None:
            raise ConversionRefused(f"verify: {url} does not match its manifest {problem[0]}")
    return {"group": task.group, "files": len(task.file_names())}


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError, when there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc



class _Progress:
    """A tqdm bar on a terminal, otherwise a plain line per finished task on stderr; and the
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
        """Count one finished task of ``nbytes`` bytes."""
        self.done += 1
        if self.metrics:
            self.metrics["tasks"].inc(1)
            if nbytes:
                self.metrics["bytes"].inc(nbytes)
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.enabled:
            LOG.info("%s: %s done (%d/%d)", self.label, group, self.done, self.tasks)

    def close(self) -> None:
        """Close the terminal bar, if any."""
        if self.bar is not None:
            self.bar.close()


def check_fits(opts: ConvertOptions) -> None:
    """Refuse task resources that no alive node of the Ray cluster has (Ray would wait for
    such a node forever, without a word). A cluster that autoscales to larger nodes must have
    one up first."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= opts.task_cpus and r.get("GPU", 0) >= opts.task_gpus
           for r in nodes):
        return
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    raise ConversionRefused(
        f"--task-cpus {opts.task_cpus:g} --task-gpus {opts.task_gpus:g} fit no node of the Ray "
        f"cluster (the largest has {cpus:g} CPUs, {gpus:g} GPUs): no task could ever start")


def run_tasks(fn: Callable[..., dict[str, Any]], calls: list[tuple[LayerTask, tuple]],
              opts: ConvertOptions, label: str, on_result: Callable[[list[dict[str, Any]]], None] | None = None
               ) -> list[dict[str, Any]]:
    """Run ``fn(*args)`` as one Ray task per layer; fail on the first error.

    ``on_result`` sees the results so far after each task (to record progress durably).
    """
    import ray

    check_fits(opts)
    remote = ray.remote(fn).options(
        num_cpus=opts.task_cpus, num_gpus=opts.task_gpus,
        # Lost workers or nodes are retried (tasks are idempotent: files publish atomically);
        # errors raised by the conversion itself are not, they are deterministic.
        max_retries=2, retry_exceptions=False, scheduling_strategy="SPREAD",
        runtime_env=task_env(),
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
                    # A refusal inside a task (bad chunk, full disk, a file that does not
                    # verify) stays one; anything else is a bug and keeps its traceback.
                    error = ConversionRefused if isinstance(cause, (UserError, OSError)) \
                        else ConversionError
                    raise error(f"{label} of {task.group} failed: {first_line(cause)}") from cause
                progress.update(task.group, task.bytes())
                if on_result is not None:
                    on_result(results)
    finally:
        progress.close()
    return results
