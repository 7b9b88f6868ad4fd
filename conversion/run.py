"""Convert a T5X checkpoint into a Triton model repository: orchestration only.

Data flow: :mod:`conversion.t5x` (read) -> :mod:`conversion.arch` -> :mod:`conversion.plan`
(pure) -> :mod:`conversion.execute` (one Ray task per layer) -> :mod:`conversion.placement`
(bytes into files) -> :mod:`core.storage` (atomic writes); :mod:`conversion.resume` checks the
destination first and :mod:`core.manifest` records what was written.

Each task converts one :class:`conversion.plan.LayerTask` (the globals, one encoder layer or one
decoder layer): it reads only its own source tensors, chunk by chunk as they are stored (t5x
writes chunks of at most 64 MiB), places each chunk's values into every rank file it belongs to,
and publishes each file atomically. Memory per task is therefore a few chunks, not a tensor.
Any task error stops the run with the error's first line; the manifest then still says
``"complete": false`` and no config.pbtxt is written, so nothing claims to be complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from conversion import hf_files, resume, source_id
from conversion.arch import T5Arch, infer_arch
from conversion.errors import ConversionError, ConversionRefused
from conversion.execute import check_fits, convert_layer, run_tasks, verify_layer
from conversion.gin_config import GinConfig, GinError, read_gin
from conversion.hf_plan import make_hf_plan
from conversion.options import ConvertOptions
from conversion.plan import ConversionPlan, make_plan
from conversion.t5x import Checkpoint, open_checkpoint
from core import ft_format, hf_format, repository, scratch, storage
from core.manifest import ManifestEntry, manifest_json, parse_manifest, write_manifest

__all__ = ["ConversionError", "ConversionRefused", "ConvertOptions", "Converted", "choose_vocab",
           "convert",
           "convert_layer", "find_gin", "prepare", "verify_layer"]

LOG = logging.getLogger(__name__)

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
            raise ConversionRefused(f"gin file {gin_url} does not exist")
        try:
            gin = read_gin(storage.read_text(gin_url), gin_url)
        except GinError as exc:
            raise ConversionRefused(f"gin file {exc}") from None
    shapes = {name: p.shape for name, p in ckpt.params.items()}
    arch = infer_arch(shapes, gin.t5_values() if gin else None, opts.activation,
                      opts.param_scan_axis)
    if opts.format == "hf":
        plan = make_hf_plan(ckpt.params, arch, opts.weight_dtype)
        return ckpt, arch, plan, gin
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


@dataclasses.dataclass(frozen=True)
class _Paths:
    """Where one conversion writes: ``<dst>/<name>/{config.pbtxt,1/<T>-gpu/manifest.json}``;
    for --format hf ``<dst>/<name>/{config.json,manifest.json,*.safetensors,...}``. The config
    file is written last: until it is there, nothing loads a half-written folder."""

    model_dir: str
    out_dir: str
    manifest_url: str
    config_url: str

    @classmethod
    def of(cls, opts: ConvertOptions, tensor_parallel: int, folder: str | None = None
           ) -> _Paths:
        """The paths of DST/<model>, or of DST/FOLDER (a write-aside folder) laid out alike."""
        name = folder or opts.model_name
        model_dir = repository.model_dir(opts.dst, name)
        if opts.format == "hf":
            return cls(model_dir, model_dir, storage.join(model_dir, hf_format.MANIFEST),
                       storage.join(model_dir, hf_format.CONFIG))
        out_dir = repository.weights_url(opts.dst, name, tensor_parallel)
        return cls(model_dir, out_dir, storage.join(out_dir, ft_format.MANIFEST),
                   repository.config_url(opts.dst, name))


def check_model_name(name: str) -> None:
    """Refuse a model name that is not one folder name: every delete of a conversion is
    confined to DST/<name>, which ``..``, ``""`` or a ``/`` would make DST, its parent or
    somewhere else."""
    bad = (not name or name in (".", "..") or any(c in name for c in "/\\\0")
           or name != name.strip() or any(ord(c) < 32 for c in name))
    if bad:
        raise ConversionRefused(f"model name {name!r} is not one folder name (no '/', '\\', "
                              "'..', '.', control characters, surrounding spaces or empty): it "
                              "names the folder DST/<model> that is written and replaced")


def _check_options(opts: ConvertOptions) -> None:
    """Refuse (one line) options that no checkpoint could make right."""
    # engine (a Literal), pipeline_parallel and resume/overwrite: ConvertOptions checks them.
    check_model_name(opts.model_name)
    if not storage.is_gcs(opts.dst) and os.path.exists(opts.dst) and \
            not os.path.isdir(opts.dst):
        raise ConversionRefused(f"--dst {opts.dst} is a file, not a folder")
    for flag, value in (("--task-cpus", opts.task_cpus), ("--task-gpus", opts.task_gpus)):
        if value < 0:
            raise ConversionRefused(f"{flag} must be >= 0, got {value:g}")
    if opts.format == "hf" and opts.tensor_parallel != 1:
        raise ConversionRefused("--tensor-parallel does not apply to --format hf (a Hugging Face "
                                "checkpoint holds whole tensors; engines split them at load)")
    if opts.vocab and not storage.exists(opts.vocab):
        raise ConversionRefused(f"vocabulary {opts.vocab} does not exist")
    if opts.vocab:
        _check_vocab(opts.vocab)


# Any file that is not a SentencePiece model (a config.gin, say) copied as spiece.model would
# only fail when evaluation loads it, after the whole conversion: sentencepiece itself judges.
def _check_vocab(url: str) -> None:
    """Refuse a --vocab that sentencepiece cannot load, naming it (before anything is written)."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=storage.read_bytes(url))
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConversionRefused(f"vocabulary {url} is not a SentencePiece model "
                              f"(sentencepiece: {str(exc).splitlines()[0] if str(exc) else exc})"
                              ) from None


def _within(inner: str, outer: str) -> bool:
    """Whether path/URL ``inner`` is ``outer`` or lies inside it (local paths resolved)."""
    if storage.is_gcs(inner) != storage.is_gcs(outer):
        return False
    if not storage.is_gcs(inner):
        inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    inner, outer = inner.rstrip("/") + "/", outer.rstrip("/") + "/"
    return inner.startswith(outer)


def _check_overlap(ckpt: Checkpoint, paths: _Paths) -> None:
    """Refuse a destination model folder that holds, or is inside, the checkpoint it reads
    (replacing it would delete the source before the conversion failed)."""
    if _within(ckpt.path, paths.model_dir) or _within(paths.model_dir, ckpt.path):
        raise ConversionRefused(f"the model folder {paths.model_dir} overlaps the checkpoint "
                              f"{ckpt.path} it converts: choose another --dst or --model-name")


def _check_pipeline(opts: ConvertOptions, arch: T5Arch) -> None:
    """Refuse a pipeline-parallel size FT cannot split the layers into."""
    cfg = arch.config
    for side, layers in (("encoder", cfg.num_encoder_layers),
                         ("decoder", cfg.num_decoder_layers)):
        if layers % opts.pipeline_parallel:
            raise ConversionRefused(f"pipeline-parallel size {opts.pipeline_parallel} does not "
                                  f"divide the {layers} {side} layers")


def _check_tables(ckpt: Checkpoint, plan: ConversionPlan) -> None:
    """Scanned checkpoints convert exactly only if each side's per-layer relative-bias tables
    are identical: check the (small) tables before anything is written."""
    from conversion.placement import check_identical

    for task in plan.tasks:
        for tensor in task.tensors:
            if tensor.transform in ("copy_identical", "transpose_identical"):
                check_identical(ckpt, tensor)


def _clear_destination(opts: ConvertOptions, paths: _Paths, identity: dict[str, Any],
                       connect: Callable[[], None] | None
                       ) -> tuple[scratch.Removed, dict[str, ManifestEntry]]:
    """Sweep dead writers' scratch, check the destination, then join Ray and sweep the nodes.

    Returns what was swept and the entries a resumed run may keep.
    """
    # Scratch of writers that are gone goes first, so that it counts neither as foreign files
    # here nor as disk used on the nodes; a live writer's is left alone (core.scratch).
    removed = resume.sweep_here(paths.model_dir)
    previous = resume.check_destination(paths.model_dir, paths.manifest_url, identity, opts)
    if connect is not None:
        connect()
    check_fits(opts)  # before anything is written
    if opts.overwrite:
        resume.clear(paths.model_dir)
    removed.add(resume.sweep_nodes(paths.model_dir))
    if removed.files:
        LOG.info("convert: removed %d scratch file(s) (%d bytes) left by runs that are gone",
                 removed.files, removed.bytes)
    return removed, previous


def _drop_changed(paths: _Paths, plan: ConversionPlan, source: source_id.SourceState,
                  previous: dict[str, ManifestEntry]
                  ) -> tuple[dict[str, ManifestEntry], list[str]]:
    """The resumable entries less those of layers whose source content changed since they were
    written (the manifest's ``source_files``), and those layers' groups."""
    if not previous:
        return previous, []
    header, _ = parse_manifest(storage.read_text(paths.manifest_url))
    recorded = header.get("source_files")
    groups, changed = source_id.changed_tasks(
        plan, source, recorded if isinstance(recorded, dict) else None)
    if not groups:
        return previous, []
    why = ("its manifest records no source fingerprints" if not isinstance(recorded, dict)
           else f"the source changed since it was written: {source_id.describe_change(changed)}")
    LOG.info("convert: --resume: %s; redoing %d of %d layer task(s) (%s%s)", why, len(groups),
             len(plan.tasks), ", ".join(groups[:4]), ", ..." if len(groups) > 4 else "")
    stale = {name for t in plan.tasks if t.group in groups for name in t.file_names()}
    return {k: v for k, v in previous.items() if k not in stale}, groups


def _convert_layers(opts: ConvertOptions, ckpt: Checkpoint, plan: ConversionPlan,
                    paths: _Paths, header: dict[str, Any],
                    previous: dict[str, ManifestEntry]) -> list[dict[str, Any]]:
    """Run every layer task, recording progress in an incomplete manifest after each."""
    # Until the last step the folder says it is incomplete: no config.pbtxt (Triton would try to
    # load it) and a manifest with "complete": false.
    storage.delete(paths.config_url)
    incomplete = {**header, "complete": False}
    write_manifest(paths.manifest_url, incomplete, list(previous.values()))

    def record(results: list[dict[str, Any]]) -> None:
        # After each layer, the manifest lists what is done, so --resume after a failure or an
        # interruption keeps it; "complete" stays false until every file is there.
        done = {e.name: e for r in results for e in r["entries"]}
        kept = [e for name, e in previous.items() if name not in done]
        write_manifest(paths.manifest_url, incomplete, kept + list(done.values()))

    # Largest first: the last task to start is then a small one, so the cores finish together
    # (with a 1 + 1 layer model the decoder layer, not the globals, is the largest).
    order = sorted(plan.tasks, key=lambda t: -t.bytes())
    calls = [(task, (ckpt, task, paths.out_dir, previous, opts.digest)) for task in order]
    try:
        results = run_tasks(convert_layer, calls, opts, "convert", record)
    except ConversionError:
        resume.sweep_here(paths.model_dir)  # what tasks killed by the failure left
        raise
    expected = plan.file_names()
    got = {e.name for r in results for e in r["entries"]}
    if got != expected:  # a plan/executor mismatch must never pass silently
        missing = sorted(expected - got)[:3]
        raise ConversionError(f"conversion wrote {len(got)} of {len(expected)} files; missing "
                              f"{missing}")
    return results


def _write_model_files(opts: ConvertOptions, plan: ConversionPlan, paths: _Paths,
                       vocab: str | None) -> None:
    """config.ini, the vocabulary and (JAX engine) the Triton Python model; for --format hf
    the shard index, generation_config.json and the tokenizer files."""
    if plan.output_format == "hf":
        hf_files.write_model_files(plan, paths.out_dir, vocab)
        return
    storage.write_text(storage.join(paths.out_dir, ft_format.CONFIG_INI),
                       ft_format.config_ini(plan.config, plan.weight_dtype, plan.tensor_parallel))
    if vocab:
        storage.write_bytes(repository.vocab_url(opts.dst, opts.model_name),
                            storage.read_bytes(vocab))
    if opts.engine == "jax":
        storage.write_text(storage.join(paths.model_dir, repository.VERSION, "model.py"),
                           repository.JAX_MODEL_PY)


def _verify(opts: ConvertOptions, plan: ConversionPlan, paths: _Paths,
            manifest_text: str) -> list[str]:
    """Re-read every file against the manifest (Ray tasks); returns the unaccounted files."""
    _, by_name = parse_manifest(manifest_text)
    run_tasks(verify_layer, [(task, (task, paths.out_dir, by_name)) for task in plan.tasks],
              opts, "verify")
    # Reported, not fatal: every file the model needs checked out, and Triton loads files
    # by name, so an extra one changes nothing served; the user decides what it is.
    known = hf_files.known_files() if plan.output_format == "hf" else ()
    unaccounted = resume.unaccounted(paths.out_dir, by_name, known)
    if unaccounted:
        LOG.warning("convert: verify: %d file(s) in %s that neither the manifest nor the FT "
                    "format accounts for: %s", len(unaccounted), paths.out_dir,
                    ", ".join(unaccounted[:5]))
    return unaccounted


def _aside(opts: ConvertOptions, plan: ConversionPlan, final: _Paths,
           identity: dict[str, Any]) -> _Paths:
    """Where this run writes: FINAL, or, when it replaces a local model folder that holds
    files (--overwrite, or a rerun without --resume), a folder beside it that is swapped in
    once complete, so a failed run leaves the repository it found as it was.

    gs:// has no folder rename: there a replaced folder is emptied first (after every check).
    """
    if opts.resume or storage.is_gcs(final.model_dir) or not storage.is_dir(final.model_dir):
        return final
    if not [f for f in storage.list_files(final.model_dir) if not scratch.is_scratch(f)]:
        return final
    if not opts.overwrite:  # refuses a different model, deletes nothing (no --overwrite)
        resume.check_destination(final.model_dir, final.manifest_url, identity, opts)
    staging = _Paths.of(opts, plan.tensor_parallel, f".{opts.model_name}.t5ft-new")
    storage.delete_tree(staging.model_dir)  # a failed earlier run's: ours by its name
    return staging


@contextlib.contextmanager
def _discarded_on_failure(paths: _Paths, final: _Paths) -> Iterator[None]:
    """A write-aside folder that will not be swapped in is deleted (the original stays)."""
    try:
        yield
    except BaseException:
        if paths != final:
            storage.delete_tree(paths.model_dir)
        raise


def _swap(staging: str, model_dir: str, config_url: str) -> None:
    """Put the complete STAGING folder's files in MODEL_DIR's place, then drop the old ones.

    File by file (``os.replace`` is atomic per file), not by renaming the folder: a live
    writer's scratch in MODEL_DIR (core.scratch) is never touched. The config file
    (config.pbtxt, or config.json for --format hf) goes first and comes back last, so a crash
    midway leaves a folder that does not claim to be a model.
    """
    staged = storage.list_files(staging)
    config = os.path.relpath(config_url, model_dir)
    storage.delete(config_url)
    for name in sorted(staged, key=lambda n: n == config):
        target = os.path.join(model_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, name), target)
    for name in storage.list_files(model_dir):
        if name not in staged and not scratch.is_scratch(name):
            storage.delete(storage.join(model_dir, name))
    for folder, _, _ in sorted(os.walk(model_dir), reverse=True):  # folders left empty
        with contextlib.suppress(OSError):
            if folder != model_dir:
                os.rmdir(folder)
    shutil.rmtree(staging, ignore_errors=True)


class Converted(dict):
    """What :func:`convert` returns: the JSON summary (a dict, as printed) and ``model``, the
    converted model's handle (core.repository.ConvertedModel) that serve and evaluate take;
    None for ``--format hf``, which writes no Triton repository."""

    def __init__(self, summary: dict[str, Any],
                 model: repository.ConvertedModel | None) -> None:
        super().__init__(summary)
        self.model = model


def convert(opts: ConvertOptions, connect: Callable[[], None] | None = None) -> Converted:
    """Convert ``opts.src`` into the Triton model repository ``opts.dst``; returns the summary
    with the converted model's handle (:class:`Converted`).

    ``connect`` starts or joins Ray (``ray_jobs._cli.init_ray``); it is called only once the
    checkpoint, the plan and the destination have been checked, so bad input fails fast.
    Without it, Ray must already be initialised.
    """
    t0 = time.monotonic()
    _check_options(opts)
    ckpt, arch, plan, gin = prepare(opts)
    vocab, vocab_source, gin_warnings = choose_vocab(opts.vocab, gin)
    _check_pipeline(opts, arch)
    final = _Paths.of(opts, plan.tensor_parallel)
    _check_overlap(ckpt, final)
    identity = resume.identity(ckpt, plan)
    source = source_id.read_state(ckpt)  # before anything is written: no missing chunk
    _check_tables(ckpt, plan)
    paths = _aside(opts, plan, final, identity)
    model = None
    with _discarded_on_failure(paths, final):
        removed, previous = _clear_destination(opts, paths, identity, connect)
        previous, redone = _drop_changed(paths, plan, source, previous)
        header = {**identity, "layout": ckpt.layout, "engine": opts.engine,
                  "arch_sources": arch.sources, "gin": gin.url if gin else None,
                  "source_files": source.fingerprints,
                  # What evaluate warns against (--max-input-len beyond what it was trained on).
                  "task_feature_lengths": gin.feature_lengths if gin else None}
        results = _convert_layers(opts, ckpt, plan, paths, header, previous)
        entries = [e for r in results for e in r["entries"]]
        _write_model_files(opts, plan, paths, vocab)
        manifest_text = manifest_json({**header, "complete": True}, entries)
        storage.write_text(paths.manifest_url, manifest_text)
        unaccounted = _verify(opts, plan, paths, manifest_text) if opts.verify else None
        if plan.output_format == "hf":
            storage.write_text(paths.config_url, hf_format.config_json(plan.config,
                                                                       plan.weight_dtype))
        else:
            config = repository.model_config(opts.model_name, opts.engine, plan.tensor_parallel,
                                             opts.pipeline_parallel, opts.inference_dtype,
                                             batch_invariant=opts.batch_invariant)
            storage.write_text(paths.config_url, repository.to_pbtxt(config))
            model = repository.ConvertedModel(opts.dst, opts.model_name, config)
    if paths != final:
        _swap(paths.model_dir, final.model_dir, final.config_url)
        paths = final
    vocab_info = {"gin": header["gin"], "gin_warnings": gin_warnings, "vocab": vocab,
                  "vocab_source": vocab_source}
    summary = _summary(opts, ckpt, arch, plan, paths, results, vocab_info,
                       {"verified": opts.verify, "unaccounted": unaccounted,
                        "scratch_removed": removed.as_dict(), "redone_source_changed": redone,
                        "chunks_read_as_fill": source.fill_chunks}, time.monotonic() - t0)
    return Converted(summary, model)
    return Converted(summary, model)


def _summary(opts: ConvertOptions, ckpt: Checkpoint, arch: T5Arch, plan: ConversionPlan,
             paths: _Paths, results: list[dict[str, Any]], vocab_info: dict[str, Any],
             checks: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The JSON summary ``ray_jobs.convert`` prints (docs/interfaces.md: its keys; --json
    prints them sorted)."""
    entries = [e for r in results for e in r["entries"]]
    return {
        "output": paths.out_dir,
        "model_repository": opts.dst,
        "model_name": opts.model_name,
        "files": len(entries),
        "bytes": sum(e.bytes for e in entries),
        "skipped_files": sum(r["skipped"] for r in results),
        "seconds": round(seconds, 3),
        "source": ckpt.path,
        "layout": ckpt.layout,
        "layout_detail": ckpt.detail,
        "step": ckpt.step,
        "format": plan.output_format,
        "engine": opts.engine,
        "tensor_parallel": plan.tensor_parallel,
        "pipeline_parallel": opts.pipeline_parallel,
        "weight_dtype": plan.weight_dtype,
        "inference_dtype": opts.inference_dtype,
        "model": dataclasses.asdict(plan.config),
        "arch_sources": arch.sources,
        "inferred": arch.inferred(),
        "read_from_gin": sorted(k for k, v in arch.sources.items() if v == "gin"),
        **vocab_info,
        "scanned": arch.scanned,
        # Where the scan axis came from is arch_sources["param_scan_axis"] (gin, flag, shapes).
        "param_scan_axis": arch.scan_axis if arch.scanned else None,
        "layer_relative_bias": list(plan.layer_tables),
        **checks,
        "tasks": len(plan.tasks),
        "peak_worker_rss_bytes": max(r.get("peak_rss", 0) for r in results),
    }
