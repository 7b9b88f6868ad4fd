"""What is already at the destination: identity, refusal, resume, and scratch sweeping.

Before a conversion writes, the destination folder is checked (:func:`check_destination`): an
empty folder is fine; one holding this same model (same :func:`identity`) may be resumed or
overwritten; anything else is refused with one line. Scratch files left by writers that are
gone are swept first, here and on every node (core.scratch), so they count neither as
foreign files nor as used disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

from conversion.errors import ConversionRefused
from conversion.execute import task_env
from conversion.plan import ConversionPlan
from conversion.t5x import Checkpoint
from core import ft_format, scratch, storage
from core import manifest as manifest_lib
from core.manifest import ManifestEntry

if TYPE_CHECKING:
    from conversion.options import ConvertOptions

LOG = logging.getLogger(__name__)


def identity(ckpt: Checkpoint, plan: ConversionPlan) -> dict[str, Any]:
    """What makes two conversions the same model: compared before writing into DST."""
    out = {
        "source": ckpt.path,
        "step": ckpt.step,
        "config": dataclasses.asdict(plan.config),
        "tensor_parallel": plan.tensor_parallel,
        "weight_dtype": plan.weight_dtype,
    }
    if plan.output_format != "ft":  # absent for FT, so manifests written before it still match
        out["format"] = plan.output_format
    return out


def _read_manifest(url: str) -> tuple[dict, dict[str, ManifestEntry]] | None:
    try:
        return manifest_lib.read_manifest(url)
    except manifest_lib.ManifestError as exc:
        raise ConversionRefused(str(exc)) from exc


def check_destination(model_dir: str, manifest_url: str, identity: dict[str, Any],
                       opts: ConvertOptions) -> dict[str, ManifestEntry]:
    """Refuse to mix models in one folder; returns the entries a resumed run may keep."""
    existing = storage.list_files(model_dir) if storage.is_dir(model_dir) else []
    # What is still scratch here belongs to a live writer: neither foreign nor to delete.
    # Python's bytecode cache is what serving 1/model.py (Triton's Python backend) leaves.
    existing = [f for f in existing if not scratch.is_scratch(f)
                and "__pycache__" not in f.split("/")]
    if not existing:
        return {}
    if opts.overwrite:
        return {}  # emptied by clear() once every check has passed
    ours = manifest_url[len(model_dir.rstrip("/")) + 1:]
    manifests = sorted(f for f in existing if f == ours or (
        f.startswith("1/") and f.endswith(f"/{ft_format.MANIFEST}") and f.count("/") == 2))
    if not manifests:
        raise ConversionRefused(
            f"{model_dir} already holds files that are not this conversion (no manifest at "
            f"{manifest_url}); pass --overwrite to replace them")
    for name in [ours] if ours in manifests else manifests[:1]:
        model, entries = _read_manifest(storage.join(model_dir, name)) or ({}, {})
        # A manifest without "format" is an FT conversion's (identity() writes it only for hf).
        old = {k: model.get(k, "ft" if k == "format" else None) for k in identity}
        diff = [k for k in identity if _jsonable(old[k]) != _jsonable(identity[k])]
        if diff:
            k = diff[0]
            was, now = _jsonable(old[k]), _jsonable(identity[k])
            if isinstance(was, dict) and isinstance(now, dict):  # name the fields that differ
                sub = [f for f in sorted({*was, *now}) if was.get(f) != now.get(f)]
                k = f"{k}.{sub[0]}" if sub else k
                was, now = (was.get(sub[0]), now.get(sub[0])) if sub else (was, now)
            raise ConversionRefused(
                f"{model_dir} already holds a different model ({k} {was!r}, not "
                f"{now!r}); pass --overwrite to replace it")
    weights_prefix = ours.rsplit("/", 1)[0] + "/"
    others = [f for f in existing if "/" in f and not f.startswith(weights_prefix)
              and f != "1/model.py"]
    if others:
        raise ConversionRefused(f"{model_dir} also holds {others[0]}, not part of this "
                              "conversion; pass --overwrite to replace it")
    return entries if opts.resume else {}


def clear(model_dir: str) -> None:
    """Delete what --overwrite replaces: the files in MODEL_DIR (a live writer's scratch
    stays), nothing outside it."""
    if not storage.is_dir(model_dir):
        return
    for name in storage.list_files(model_dir):
        if not scratch.is_scratch(name):
            storage.delete(storage.join(model_dir, name))


def sweep_here(model_dir: str) -> scratch.Removed:
    """Scratch left in a local model folder by writers that are gone (see conversion/scratch)."""
    return scratch.Removed() if storage.is_gcs(model_dir) else scratch.sweep_tree(model_dir)


def _sweep_node(model_dir: str) -> dict[str, int]:
    """What one node's sweep task runs: its gs:// staging folder and a local model folder."""
    return scratch.sweep_node().add(sweep_here(model_dir)).as_dict()


# A node's sweep lists one folder or two: a node that takes longer is busy or unwell, and the
# conversion need not wait for it (it only means scratch stays there until the next run).
_SWEEP_TIMEOUT_S = 120.0


def sweep_nodes(model_dir: str) -> scratch.Removed:
    """Run :func:`_sweep_node` once on every alive node, where conversion tasks may have staged.

    A task pinned to each node (zero CPUs, so a busy or CPU-less head still runs it); nodes that
    die meanwhile are skipped: their scratch went with them or waits for the next run.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(_sweep_node)
    refs = [remote.options(num_cpus=0, max_retries=0, runtime_env=task_env(),
                           scheduling_strategy=NodeAffinitySchedulingStrategy(
                               node["NodeID"], soft=False)).remote(model_dir)
            for node in ray.nodes() if node.get("Alive")]
    if not refs:
        return scratch.Removed()
    done, late = ray.wait(refs, num_returns=len(refs), timeout=_SWEEP_TIMEOUT_S)
    for ref in late:
        ray.cancel(ref, force=True)
    if late:
        LOG.warning("convert: %d node(s) did not clear their scratch folder within %.0f s; the "
                    "next run will", len(late), _SWEEP_TIMEOUT_S)
    removed = scratch.Removed()
    for ref in done:
        with contextlib.suppress(ray.exceptions.RayError):
            removed.add(scratch.Removed(**ray.get(ref)))
    return removed


def unaccounted(out_dir: str, manifest: dict[str, ManifestEntry],
                known_files: tuple[str, ...] = ()) -> list[str]:
    """Files in the weights folder that neither the manifest nor the format (FT's, or
    ``known_files``) names."""
    known = set(manifest) | {ft_format.CONFIG_INI, ft_format.MANIFEST, *known_files}
    return [name for name in storage.list_files(out_dir) if name not in known]


def _jsonable(value: Any) -> Any:
    # Identities compare as they read back from JSON (tuples are lists, paths are strings).
    return json.loads(json.dumps(value, default=str))
