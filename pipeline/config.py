"""PIPELINE.yaml: the convert, serve and evaluate settings of one or several runs.

Each stage's keys are its CLI's flags with dashes as underscores (interfaces.md), so a config
can say anything the jobs can, and a flag added to a job is usable here at once::

    output: out/ul2                  # per-run outputs and the comparison table go here
    convert: {src: gs://.../checkpoint_1000000, dst: gs://.../repo, model_name: ul2,
              tensor_parallel: 8, weight_dtype: bf16, engine: fastertransformer}
    serve: {backend: kubernetes, replicas: 2}
    evaluate: {dataset: xsum, max_examples: 1000, num_actors: 8}
    runs:                            # optional: several models / decoding settings
      - name: step-1000000
      - name: step-900000
        convert: {src: gs://.../checkpoint_900000, model_name: ul2_900k}
      - name: beam-4
        evaluate: {beam_width: 4}

A run inherits the top-level stage sections and overrides them key by key. Keys are checked
against each stage's options model (conversion/, serving/, evaluation/options.py), the same
models the jobs' flags are built from, so a misspelt key is an error naming the key, the stage
and what the job accepts. Without a ``convert`` section (or with ``convert: null`` in a
run), ``serve`` must name an existing ``model_repository`` and ``model_name`` (evaluate a model
that is already converted).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import storage
from core.errors import UserError
from core.options import FlagSpec, StageOptions, flag_specs, from_keys, specs_to_argv
from core.yaml_file import read_yaml

if TYPE_CHECKING:
    from conversion.options import ConvertOptions
    from evaluation.options import EvalOptions
    from serving.options import ServeOptions

STAGES = ("convert", "serve", "evaluate")
# Flags the pipeline sets itself: a config may not give them.
_MANAGED = {
    # format: the pipeline serves what it converts, so it always writes FT shards (--format ft).
    "convert": {"json", "address", "resume", "overwrite", "format"},
    "serve": {"json", "address"},
    "evaluate": {"json", "address", "url", "output", "resume"},
}
_TOP_LEVEL = {"output", "name", *STAGES, "runs"}
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(UserError, ValueError):
    """The pipeline config is malformed; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One model + decoding setting to evaluate.

    The stages get the options models, built and checked once when the config is read (the
    same models, and so the same checks, as the commands' flags); the settings as written stay
    beside them: they are the run's identity in pipeline_state.json and its summary.

    Attributes:
      name: folder name of the run's outputs under the pipeline output.
      convert: convert flags (dashes as underscores), or None to serve an existing repository.
      serve: serve flags, with ``model_repository`` and ``model_name`` always filled in.
      evaluate: evaluate flags, with ``model_name`` and a vocabulary source filled in.
      convert_options / serve_options / evaluate_options: those settings as the stages'
        options models (evaluate's with its output folder; the pipeline adds url and resume).
    """

    name: str
    convert: dict[str, Any] | None
    serve: dict[str, Any]
    evaluate: dict[str, Any]
    convert_options: ConvertOptions | None = None
    serve_options: ServeOptions | None = None
    evaluate_options: EvalOptions | None = None

    def convert_key(self) -> str:
        return json.dumps(self.convert, sort_keys=True, default=str)

    def serve_key(self) -> str:
        return json.dumps([self.convert, self.serve], sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    output: str
    runs: list[RunSpec]


def _models() -> dict[str, type[StageOptions]]:
    from conversion.options import ConvertOptions
    from evaluation.options import EvalOptions
    from serving.options import ServeOptions

    return {"convert": ConvertOptions, "serve": ServeOptions, "evaluate": EvalOptions}


def stage_flags(stage: str) -> dict[str, FlagSpec]:
    """The stage's flags keyed as a config writes them (``--max-input-len`` ->
    ``max_input_len``, ``--no-progress`` -> ``no_progress``)."""
    return {spec.key: spec for spec in flag_specs(_models()[stage]).values()}


def to_argv(stage: str, settings: dict[str, Any]) -> list[str]:
    """A stage's settings as its command line. True flags are given, False ones left out."""
    return specs_to_argv(flag_specs(_models()[stage]), settings)


def options_for(stage: str, settings: dict[str, Any]) -> StageOptions:
    """A stage's settings (YAML keys, or field names) as its options model; None values mean
    the default.

    ``options_for("evaluate", {**run.evaluate, "url": url, "output": out})`` is what
    ``ray_jobs.evaluate`` would have built from ``to_argv`` of the same settings.
    """
    model = _models()[stage]
    return model.model_validate(
        from_keys(model, {k: v for k, v in settings.items() if v is not None}))


def _check_value(spec: FlagSpec, value: Any, where: str) -> None:
    """A YAML value against its flag's type and choices (what argparse would reject)."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")
    if value is None or spec.type is bool:
        return
    if spec.type in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number") from None
        # int(1.5) is 1: a count given as a fraction must be refused, not rounded.
        if spec.type is int and (isinstance(value, bool) or not number.is_integer()):
            raise ConfigError(f"{where}: {value!r} is not a whole number")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(spec.choices)}")


def _check_section(stage: str, section: Any, where: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}{stage}: expected a mapping of flags, got "
                          f"{type(section).__name__}")
    flags = stage_flags(stage)
    out = {}
    for key, value in section.items():
        key = str(key).replace("-", "_")
        if key in _MANAGED[stage]:
            raise ConfigError(f"{where}{stage}.{key}: set by the pipeline itself, remove it")
        if key not in flags:
            known = ", ".join(sorted(k for k in flags if k not in _MANAGED[stage]))
            raise ConfigError(f"{where}{stage}.{key}: not a flag of ray_jobs.{stage} "
                              f"(it takes: {known})")
        _check_value(flags[key], value, f"{where}{stage}.{key}")
        out[key] = value
    return out


def _complete(name: str, convert: dict | None, serve: dict, evaluate: dict,
              output: str) -> RunSpec:
    """Fill in what one stage tells the next (repository, model name, vocabulary); build the
    stages' options (the run's evaluation writes OUTPUT/<name>)."""
    where = f"run {name}: "
    serve, evaluate = dict(serve), dict(evaluate)
    convert_options = None
    if convert is not None:
        convert = dict(convert)
        for key in ("src", "dst"):
            if not convert.get(key):
                raise ConfigError(f"{where}convert.{key} is required")
        convert_options = _options(where, "convert", convert)
        # The model name the conversion writes, ConvertOptions' default when not given.
        convert.setdefault("model_name", convert_options.model_name)
        for key, value in (("model_repository", convert_options.dst),
                           ("model_name", convert_options.model_name)):
            if serve.get(key) not in (None, value):
                raise ConfigError(f"{where}serve.{key} {serve[key]!r} differs from what "
                                  f"convert writes ({value!r}); leave it out")
            serve[key] = value
    else:
        for key in ("model_repository", "model_name"):
            if not serve.get(key):
                raise ConfigError(f"{where}without a convert section, serve.{key} is required")
    if evaluate.get("model_name") not in (None, serve["model_name"]):
        raise ConfigError(f"{where}evaluate.model_name differs from the served model "
                          f"{serve['model_name']!r}; leave it out")
    evaluate["model_name"] = serve["model_name"]
    # Always the served repository: it gives the vocabulary (unless evaluate.vocab says
    # otherwise) and the model's vocab_size, which evaluate checks the vocabulary against.
    evaluate.setdefault("model_repository", serve["model_repository"])
    return RunSpec(
        name, convert, serve, evaluate, convert_options=convert_options,
        serve_options=_options(where, "serve", serve),
        evaluate_options=_options(where, "evaluate",
                                  {**evaluate, "output": storage.join(output, name)}))


def _options(where: str, stage: str, settings: dict[str, Any]) -> Any:
    """:func:`options_for`, its refusal (the options models' checks) naming the run."""
    try:
        return options_for(stage, settings)
    except UserError as exc:
        raise ConfigError(f"{where}{stage}: {exc}") from None


def parse(obj: Any, output: str | None = None) -> PipelineConfig:
    """Validate a loaded config and expand it into runs; ``output`` overrides the config's."""
    if not isinstance(obj, dict):
        raise ConfigError("the pipeline config must be a mapping with convert, serve, "
                          "evaluate (and optionally output, runs)")
    unknown = sorted(set(obj) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_LEVEL)}")
    output = output or obj.get("output")
    if not output:
        raise ConfigError("no output folder: set 'output' in the config or pass --output")
    base = {s: _check_section(s, obj.get(s), "") for s in STAGES}
    has_convert = obj.get("convert") is not None
    default_name = _models()["convert"].model_fields["model_name"].default
    run_list = obj.get("runs") or [{"name": obj.get("name") or base["convert"].get(
        "model_name") or base["serve"].get("model_name") or default_name}]
    if not isinstance(run_list, list):
        raise ConfigError("runs: expected a list of runs")
    runs, names = [], set()
    for n, run in enumerate(run_list):
        if not isinstance(run, dict):
            raise ConfigError(f"runs[{n}]: expected a mapping")
        extra = sorted(set(run) - {"name", *STAGES})
        if extra:
            raise ConfigError(f"runs[{n}]: unknown key(s) {extra}")
        name = str(run.get("name") or f"run{n}")
        if not _RUN_NAME.match(name):
            raise ConfigError(f"runs[{n}].name {name!r}: use letters, digits, '.', '_', '-'")
        if name in names:
            raise ConfigError(f"runs[{n}].name {name!r} is used twice")
        names.add(name)
        where = f"runs[{n}] ({name}): "
        merged = {s: {**base[s], **_check_section(s, run.get(s), where)}
                  for s in STAGES}
        # ``convert: null`` in a run: serve an existing repository (given in its serve).
        opted_out = "convert" in run and run["convert"] is None
        convert = merged["convert"] if (has_convert or run.get("convert")) and not opted_out \
            else None
        runs.append(_complete(name, convert, merged["serve"], merged["evaluate"], str(output)))
    _check_destinations(runs)
    return PipelineConfig(str(output), runs)


def _check_destinations(runs: list[RunSpec]) -> None:
    """Two different conversions must not write the same model folder."""
    seen: dict[tuple[str, str], RunSpec] = {}
    for run in runs:
        if run.convert is None:
            continue
        where = (str(run.convert["dst"]).rstrip("/"), run.convert["model_name"])
        other = seen.setdefault(where, run)
        if other is not run and other.convert_key() != run.convert_key():
            raise ConfigError(
                f"runs {other.name} and {run.name} convert different settings into the same "
                f"{where[0]}/{where[1]}; give one of them another convert.model_name")


# Inputs a run reads from this machine, checked before Ray starts: (stage, key).
_LOCAL_INPUTS = (("convert", "src"), ("convert", "vocab"), ("convert", "gin"),
                 ("evaluate", "dataset"), ("evaluate", "vocab"))


def check_inputs(cfg: PipelineConfig, where: str = "") -> None:
    """Refuse a local input path that does not exist (``convert.src`` left at an example's
    placeholder, say), naming the run and the key, before anything starts."""
    for run in cfg.runs:
        for stage, key in _LOCAL_INPUTS:
            section = getattr(run, stage) or {}
            value = section.get(key)
            if not value or str(value).startswith("gs://") or \
                    (stage == "evaluate" and key == "dataset" and "." not in Path(value).name):
                continue  # gs:// is read by the stage; a dataset name is the hub's
            if not Path(value).exists():
                raise ConfigError(f"{where}run {run.name}: {stage}.{key} {value} does not exist "
                                  f"(relative to {Path.cwd()}); point it at your own")


def load(path: str | Path, output: str | None = None) -> PipelineConfig:
    """Read and validate PIPELINE.yaml: a local path or a gs:// URL (read through core.storage)."""
    path = str(path)
    obj = read_yaml(path, "pipeline config", ConfigError)
    try:
        return parse(obj, output)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
