"""The output folder: predictions.jsonl written as results arrive, resume, final ordering.

A run without ``--resume`` replaces what it finds only once its first prediction arrives.
``predictions.jsonl`` gets one line per finished example, flushed at once, so a run killed at any
moment keeps every line it wrote (at worst the last line is cut short; resume drops that stub).
``--resume`` keeps every complete line whose id belongs to the current evaluation and sends only
the rest. At the end both files are rewritten in example order, so a resumed run's files are
byte-identical to an uninterrupted run's.

A ``gs://`` output is staged in a local folder: lines are appended there and the file is copied
to the bucket every ``sync_seconds`` and at the end (GCS objects cannot be appended to). That
folder is scratch with an owner (core.scratch): a run first removes what runs that are
gone left, in the node's scratch folder (gs://) or beside its outputs (local), never a live
run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core import scratch, storage
from core.errors import UserError

LOG = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
ERRORS = "errors.jsonl"
METRICS = "metrics.json"
REPORT = "report.html"
# The settings the predictions were made with: a resume with other ones is refused.
SETTINGS = "run_settings.json"


class ResumeError(UserError, ValueError):
    """The existing predictions do not belong to this evaluation."""


def prediction_line(record: Mapping[str, Any]) -> str:
    """One JSON line; the same record always gives the same bytes."""
    return json.dumps(record, ensure_ascii=False) + "\n"


class OutputDir:
    """The files of one evaluation under ``output`` (a folder or a ``gs://`` prefix)."""

    def __init__(self, output: str, resume: bool, sync_seconds: float = 30.0,
                 settings: Mapping[str, Any] | None = None):
        """Sweep scratch left by dead runs, then open the local copy of the outputs.

        A run without ``resume`` leaves the outputs it finds as they are until its first
        prediction arrives (:meth:`_start`): a run that fails before (a server that is down,
        a wrong --url) loses nothing.

        Args:
          output: a local folder or a ``gs://`` prefix (then files are staged in scratch and
            predictions.jsonl is uploaded at most every ``sync_seconds``).
          resume: keep predictions.jsonl's complete lines instead of starting empty.
          settings: what the predictions depend on (recorded in run_settings.json; a resume
            whose settings differ from the recorded ones is refused, naming both values).
        """
        self.output = output
        self.resume = resume
        self.settings = dict(settings or {})
        self._started = False
        self._held_errors: list[Mapping[str, Any]] = []
        self.sync_seconds = sync_seconds
        self._last_sync = time.monotonic()
        self._scratch = contextlib.ExitStack()
        self._staged = storage.is_gcs(output)
        self.scratch_removed = scratch.sweep_node() if self._staged else scratch.sweep(output)
        if self.scratch_removed.files:
            LOG.info("evaluate: removed %d scratch file(s) (%d bytes) left by runs that are gone",
                     self.scratch_removed.files, self.scratch_removed.bytes)
        if self._staged:
            self.local = self._scratch.enter_context(scratch.scratch_dir("t5ft-eval"))
        else:
            self.local = Path(output)
        self.local.mkdir(parents=True, exist_ok=True)
        self._pred_path = self.local / PREDICTIONS
        self._err_path = self.local / ERRORS
        self._pred = None
        self._err = None
        if resume:
            self._check_settings()
            if self._staged and storage.exists(self.remote(PREDICTIONS)):
                self._pred_path.write_bytes(storage.read_bytes(self.remote(PREDICTIONS)))
            self._start()

    def _check_settings(self) -> None:
        """Refuse to resume predictions made with other settings (naming both values)."""
        url = self.remote(SETTINGS)
        try:
            recorded = json.loads(storage.read_text(url)) if storage.exists(url) else None
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            return  # nothing recorded (a first run, or one before run_settings.json)
        for key, value in self.settings.items():
            if key in recorded and recorded[key] != value:
                flag = "--" + key.replace("_", "-")
                raise ResumeError(
                    f"--resume: {flag} {value!r} differs from {recorded[key]!r}, which the "
                    f"predictions in {self.output} were made with; pass {flag} "
                    f"{recorded[key]!r}, use another --output, or drop --resume")

    def _start(self) -> None:
        """This run's outputs begin: a fresh run empties predictions.jsonl and removes the
        metrics and report that described the lines now gone; the settings are recorded."""
        if self._started:
            return
        self._started = True
        if not self.resume:
            self._pred_path.write_bytes(b"")
            for name in (METRICS, REPORT):
                storage.delete(self.remote(name))
        # Failures are not final: a resumed run tries them again, so errors start empty.
        self._err_path.write_bytes(b"")
        if self.settings:
            storage.write_text(self.remote(SETTINGS),
                               json.dumps(self.settings, indent=2, sort_keys=True) + "\n")
        held, self._held_errors = self._held_errors, []
        for record in held:
            self.append_error(record)

    @property
    def has_earlier_predictions(self) -> bool:
        """Whether predictions.jsonl holds lines a fresh run has not replaced yet."""
        if self._started:
            return False
        url = self._pred_path if not self._staged else None
        if url is not None:
            return url.exists() and url.stat().st_size > 0
        return bool(storage.size(self.remote(PREDICTIONS)))

    def remote(self, name: str) -> str:
        """Where file ``name`` ends up: under ``output``, local or gs://."""
        return storage.join(self.output, name)

    def load_done(self, references: Mapping[str, str]) -> dict[str, str]:
        """Complete lines already in predictions.jsonl, by id, for ids in ``references``.

        Args:
          references: id -> reference summary of every example of this evaluation.

        Returns:
          id -> the line as written (kept verbatim so the final file is unchanged).

        Raises:
          ResumeError: a line's reference differs from the dataset's (another dataset or
            another --summary-field), which would silently mix two evaluations.
        """
        if not self.resume or not self._pred_path.exists():
            return {}  # a fresh run keeps nothing (it replaces the file at its first line)
        raw = self._pred_path.read_bytes()
        done: dict[str, str] = {}
        good_end = 0
        for chunk in raw.splitlines(keepends=True):
            if not chunk.endswith(b"\n"):
                break  # cut short by a kill: the example is sent again
            try:
                record = json.loads(chunk)
                ex_id = str(record["id"])
            except (ValueError, KeyError, TypeError):
                break
            good_end += len(chunk)
            if ex_id in references and ex_id not in done:
                if record.get("reference") != references[ex_id]:
                    raise ResumeError(
                        f"{self.remote(PREDICTIONS)}: example {ex_id!r} has another reference "
                        "than the dataset's; use another --output or drop --resume"
                    )
                done[ex_id] = chunk.decode("utf-8")
        if good_end != len(raw):
            with open(self._pred_path, "r+b") as f:
                f.truncate(good_end)
        return done

    def append_prediction(self, record: Mapping[str, Any]) -> None:
        """Append one predictions.jsonl line and flush it, so a killed run keeps it."""
        self._start()
        if self._pred is None:
            self._pred = open(self._pred_path, "a", encoding="utf-8")  # noqa: SIM115
        self._pred.write(prediction_line(record))
        self._pred.flush()
        self._maybe_sync()

    def append_error(self, record: Mapping[str, Any]) -> None:
        """Append one errors.jsonl line and flush it (held back until this run starts)."""
        if not self._started:
            self._held_errors.append(record)
            return
        if self._err is None:
            self._err = open(self._err_path, "a", encoding="utf-8")  # noqa: SIM115
        self._err.write(prediction_line(record))
        self._err.flush()

    def finalize(
        self, order: Mapping[str, int], predictions: Mapping[str, str], errors: Iterable[dict]
    ) -> None:
        """Rewrite both files in example order (``order``: id -> index).

        Raises ResumeError when this run got no prediction at all while predictions.jsonl
        still holds an earlier run's: those are kept, with the metrics that describe them.
        """
        if self.has_earlier_predictions:
            errs = list(errors)
            why = f", e.g. {errs[0].get('reason')}" if errs else ""
            raise ResumeError(f"no example got a prediction ({len(errs)} failed{why}); the "
                              f"earlier outputs in {self.output} are left as they were")
        self._start()
        self.close()
        lines = sorted(predictions.items(), key=lambda kv: order[kv[0]])
        self._write_local(PREDICTIONS, "".join(line for _, line in lines))
        errs = sorted(errors, key=lambda e: (e["index"], e["id"]))
        self._write_local(ERRORS, "".join(prediction_line(e) for e in errs))
        if self._staged:
            for name in (PREDICTIONS, ERRORS):
                storage.write_bytes(self.remote(name), (self.local / name).read_bytes())

    def write_file(self, name: str, text: str) -> None:
        """A whole file (metrics.json, report.html), written atomically."""
        storage.write_text(self.remote(name), text)

    def close(self) -> None:
        """Close the two append handles (they reopen on the next append)."""
        for f in (self._pred, self._err):
            if f is not None:
                f.close()
        self._pred = self._err = None

    def cleanup(self) -> None:
        """Close the files and delete the local staging folder of a gs:// output."""
        self.close()
        self._scratch.close()

    def _write_local(self, name: str, text: str) -> None:
        storage.write_text(str(self.local / name), text)

    def _maybe_sync(self) -> None:
        if not self._staged or time.monotonic() - self._last_sync < self.sync_seconds:
            return
        self._last_sync = time.monotonic()
        storage.write_bytes(self.remote(PREDICTIONS), self._pred_path.read_bytes())
