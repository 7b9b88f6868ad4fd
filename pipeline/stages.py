"""The pipeline's stages as library calls in its own process, on its own Ray.

convert = :func:`conversion.run.convert`, serve = :func:`serving.api.open_servers`, evaluate =
:func:`evaluation.runner.evaluate`. Each takes its stage's options model, built once from a
run's section of the config (pipeline.config.RunSpec; the keys are the stage's flags,
interfaces.md) and copied with the pipeline's own settings (resume, url). A stage that raises
becomes a :class:`StageError` whose message is one line, ``<stage> failed: <reason>``. Their
Ray tasks, actors and metrics run on the pipeline's cluster, so they show on its dashboard.

Also here: whether a stage's outputs already exist and verify, so a rerun can skip it
(core.manifest holds the checks).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from core import repository, storage
from core.errors import UserError, first_line
from core.manifest import MANIFEST, parse_manifest, verify_repository

if TYPE_CHECKING:
    from conversion.options import ConvertOptions
    from evaluation.options import EvalOptions
    from serving.options import ServeOptions


class StageError(RuntimeError):
    """A stage failed; the message is its one-line reason, ``<stage> failed: ...``."""


@contextlib.contextmanager
def reported(stage: str) -> Iterator[None]:
    """Turn any exception raised inside into one StageError line naming ``stage``.

    A refusal (core.errors.UserError) is that line alone; anything else is a bug and also
    gets its traceback on stderr.
    """
    try:
        yield
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any stage failure becomes that stage's line
        if not isinstance(exc, UserError):
            traceback.print_exc(file=sys.stderr)
        raise StageError(f"{stage} failed: {first_line(exc)}") from exc


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Run the conversion (``ray_jobs.convert``'s work); returns its JSON summary (with the
    converted model's handle, ``.model``).

    Ray must already be initialised. Raises StageError (``convert failed: ...``).
    """
    with reported("convert"):
        from conversion.run import convert as run_convert

        return run_convert(opts)


def open_servers(opts: ServeOptions) -> Any:
    """The serve stage's servers, not started yet (``serving.api.Servers``).

    Raises StageError (``serve failed: ...``) when the settings or the repository are wrong.
    """
    with reported("serve"):
        from serving.api import open_servers as open_serving

        return open_serving(opts)


# The evaluate result's paths; the rest of it is metrics.json's content.
_EVAL_PATHS = ("output", "predictions", "report")


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run one evaluation (``ray_jobs.evaluate``'s work); returns its metrics.

    Ray must already be initialised. Raises StageError (``evaluate failed: ...``).
    """
    with reported("evaluate"):
        from evaluation.runner import evaluate as run_evaluate

        result = run_evaluate(opts)
    return {k: v for k, v in result.items() if k not in _EVAL_PATHS}


# --- outputs that verify -------------------------------------------------------------------


def weights_dir(opts: ConvertOptions) -> str:
    """The weights folder a conversion writes: DST/<model>/1/<T>-gpu (core.repository)."""
    return repository.weights_url(opts.dst, opts.model_name, opts.tensor_parallel)


def verify_conversion(opts: ConvertOptions) -> str | None:
    """None when the model a conversion writes is complete and intact and was converted from
    the source's present content (not only its path), else what is wrong."""
    problem = verify_repository(opts.dst, opts.model_name, tensor_parallel=opts.tensor_parallel,
                                weight_dtype=opts.weight_dtype, need_vocab=bool(opts.vocab))
    if problem is not None:
        return problem
    from conversion.source_id import same_source

    try:
        header, _ = parse_manifest(storage.read_text(storage.join(weights_dir(opts),
                                                                  MANIFEST)))
        return same_source(header, opts.src)
    except (OSError, ValueError, UserError) as exc:  # the convert stage will say it
        return first_line(exc)


def read_metrics(output: str) -> dict[str, Any] | None:
    """An evaluation's metrics.json, or None when it is not there."""
    try:
        return json.loads(storage.read_text(storage.join(output, "metrics.json")))
    except (FileNotFoundError, ValueError):
        return None
