"""Evaluation data: XSum from the hub or a local file -> ordered examples with stable ids.

Sources (``--dataset``):
  - ``xsum`` (or ``EdinburghNLP/xsum``): ``datasets.load_dataset("EdinburghNLP/xsum", split=...)``;
    ids come from the dataset's ``id`` field.
  - ``FILE.jsonl`` / ``FILE.json`` / ``FILE.parquet``: read with ``datasets``; ids from an ``id``
    field when the file has one, else the row index.
  - ``FILE.tsv``: the original evaluator's ``document<TAB>summary`` lines (no quoting; an optional
    header line naming the two fields is skipped); ids are the row index.

Local paths may also be ``gs://`` URLs (copied to a temporary file through ``core.storage``).
A row with a missing or empty document or reference is not dropped silently: it becomes a
:class:`RowError` that the runner writes to ``errors.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from core.errors import UserError

LOG = logging.getLogger(__name__)

HUB_XSUM = "EdinburghNLP/xsum"
# datasets >= 4 refuses script-based hub datasets with this RuntimeError (datasets/load.py);
# the hub keeps a parquet conversion of every public dataset at this revision, read instead.
SCRIPT_REFUSED = "Dataset scripts are no longer supported"
PARQUET_REVISION = "refs/convert/parquet"
_PARQUET_SOURCE = (HUB_XSUM, PARQUET_REVISION)
DEFAULT_TEMPLATE = "summarize: {document}"
FILE_FORMATS = (".jsonl", ".json", ".parquet", ".tsv")


class DataError(UserError, ValueError):
    """The dataset as a whole cannot be read (bad path, missing field, duplicate ids)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation example.

    Attributes:
      id: stable id (the dataset's ``id`` field, else the row index as a string).
      index: position of the row in the source (0-based); outputs are ordered by it.
      input_text: the model input (the template applied to the document).
      reference: the reference summary.
    """

    id: str
    index: int
    input_text: str
    reference: str


@dataclasses.dataclass(frozen=True)
class RowError:
    """A row that cannot be evaluated, with the reason (goes to errors.jsonl)."""

    id: str
    index: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The errors.jsonl record of this row (``stage`` "data": rejected before sending)."""
        return {"id": self.id, "index": self.index, "reason": self.reason, "stage": "data"}


@dataclasses.dataclass(frozen=True)
class LoadedData:
    """Examples in source order, and the rows that were rejected (also in source order)."""

    examples: list[Example]
    errors: list[RowError]

    @property
    def total(self) -> int:
        """Rows read, kept and rejected."""
        return len(self.examples) + len(self.errors)


def load_examples(
    dataset: str,
    *,
    split: str = "test",
    max_examples: int | None = None,
    document_field: str = "document",
    summary_field: str = "summary",
    input_template: str = DEFAULT_TEMPLATE,
    id_field: str = "id",
) -> LoadedData:
    """Read ``dataset`` and turn its first ``max_examples`` rows into examples.

    Raises:
      DataError: unreadable source, an unknown format, a field that is not in the data,
        a template that does not use ``{document}`` correctly, or duplicate ids.
    """
    if max_examples is not None and max_examples < 1:
        raise DataError(f"--max-examples must be >= 1, got {max_examples}")
    _check_template(input_template)
    rows = _iter_rows(dataset, split, document_field, summary_field, max_examples)
    examples: list[Example] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    for index, row in rows:
        raw_id = row.get(id_field)
        ex_id = str(index) if raw_id is None or str(raw_id) == "" else str(raw_id)
        if ex_id in seen:
            raise DataError(
                f"{dataset}: id {ex_id!r} occurs at rows {seen[ex_id]} and {index}; "
                "ids must be unique"
            )
        seen[ex_id] = index
        reason = _row_problem(row, document_field, summary_field)
        if reason:
            errors.append(RowError(ex_id, index, reason))
            continue
        examples.append(
            Example(
                id=ex_id,
                index=index,
                input_text=input_template.format(document=row[document_field]),
                reference=str(row[summary_field]),
            )
        )
    return LoadedData(examples, errors)


def _check_template(template: str) -> None:
    try:
        template.format(document="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"--input-template {template!r} is not a format string with only {{document}}: {exc!r}"
        ) from exc
    if "{document}" not in template:
        raise DataError(f"--input-template {template!r} does not contain {{document}}")


def _row_problem(row: Mapping[str, Any], document_field: str, summary_field: str) -> str:
    if row.get("_reason"):
        return str(row["_reason"])
    for field, what in ((document_field, "document"), (summary_field, "reference summary")):
        value = row.get(field)
        if value is None:
            return f"missing {what} (field {field!r})"
        if not isinstance(value, str):
            return f"{what} (field {field!r}) is a {type(value).__name__}, not text"
        if not value.strip():
            return f"empty {what} (field {field!r})"
    return ""


def _load_hub_xsum(split: str) -> Any:
    """XSum from the hub: its main branch, or, where that holds a loading script `datasets`
    no longer runs, the hub's parquet conversion (PARQUET_REVISION); says which on stderr."""
    import datasets

    try:
        return datasets.load_dataset(HUB_XSUM, split=split)
    except RuntimeError as exc:
        if SCRIPT_REFUSED not in str(exc):
            raise
        refused = " ".join(str(exc).split())
    except OSError as exc:
        # The hub out of reach (a cluster without egress: datasets raises ConnectionError,
        # "Couldn't reach ... on the Hub") or the dataset gone: the same way out as below.
        raise DataError(
            f"--dataset xsum: cannot read {HUB_XSUM} from the hub "
            f"({' '.join(str(exc).split()) or type(exc).__name__}); from a machine that can "
            f"reach it, copy it to the bucket as parquet and pass --dataset "
            f"gs://BUCKET/data/xsum-test.parquet (docs/gke.md, \"XSum as parquet\")") from exc
    repo, revision = _PARQUET_SOURCE
    LOG.info("%s: %s; reading the hub's parquet conversion (revision %s)", HUB_XSUM, refused,
             revision)
    try:
        ds = datasets.load_dataset(repo, revision=revision, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure of the retry gets the same way out
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"--dataset xsum: {HUB_XSUM} holds a loading script that datasets "
            f"{datasets.__version__} refuses, and its parquet conversion (revision "
            f"{revision}) failed too ({first}); pass --dataset a parquet copy, e.g. "
            f"gs://BUCKET/data/xsum-test.parquet (docs/gke.md, \"XSum as parquet\")") from exc
    LOG.info("%s: read revision %s", HUB_XSUM, revision)
    return ds


def _iter_rows(
    dataset: str, split: str, document_field: str, summary_field: str, limit: int | None
) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if dataset in ("xsum", HUB_XSUM):
        ds = _load_hub_xsum(split)
        yield from _from_hf(ds, dataset, document_field, summary_field, limit)
        return
    suffix = _suffix(dataset)
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"--dataset {dataset!r}: expected 'xsum' or a file ending in {', '.join(FILE_FORMATS)}"
        )
    with _local_copy(dataset) as path:
        _check_text(path, dataset, suffix)
        if suffix == ".tsv":
            yield from _from_tsv(path, dataset, document_field, summary_field, limit)
            return
        import datasets

        datasets.disable_progress_bars()  # the driver shows its own progress
        try:
            if suffix == ".parquet":
                ds = datasets.Dataset.from_parquet(path, keep_in_memory=True)
            else:
                ds = datasets.Dataset.from_json(path, keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the file
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"--dataset {dataset}: cannot read it: {why}") from exc
        yield from _from_hf(ds, dataset, document_field, summary_field, limit)


def _check_text(path: str, name: str, suffix: str) -> None:
    """Name the file and line of what ``datasets`` would report obscurely: an empty file,
    bytes that are not UTF-8, a JSON Lines line that is not one JSON object."""
    if suffix == ".parquet":
        return
    if os.path.getsize(path) == 0:
        raise DataError(f"--dataset {name}: the file is empty")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"--dataset {name} line {lineno}: not UTF-8 text (byte "
                                f"0x{raw[exc.start]:02x} at offset {exc.start})") from None
            if suffix == ".jsonl" and line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"--dataset {name} line {lineno}: not JSON ({exc})"
                                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"--dataset {name} line {lineno}: a JSON "
                                    f"{type(row).__name__}, not an object") from None


def _from_hf(ds, name: str, document_field: str, summary_field: str, limit: int | None):
    missing = [f for f in (document_field, summary_field) if f not in ds.column_names]
    if missing:
        raise DataError(
            f"--dataset {name}: no field {', '.join(map(repr, missing))}; "
            f"its fields are {ds.column_names} (see --document-field / --summary-field)"
        )
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    yield from enumerate(ds)


def _from_tsv(path: str, name: str, document_field: str, summary_field: str, limit: int | None):
    """The original evaluator's format: one ``document<TAB>summary`` per line."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines: Iterable[str] = f
        index = 0
        for lineno, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line == f"{document_field}\t{summary_field}":
                continue  # header
            if limit is not None and index >= limit:
                return
            fields = line.split("\t")
            if len(fields) == 2:
                row: dict[str, Any] = {document_field: fields[0], summary_field: fields[1]}
            else:
                # Still an example (it keeps its index), reported with the line number.
                row = {document_field: None, summary_field: None}
                row["_reason"] = f"{name} line {lineno}: {len(fields)} tab-separated fields, need 2"
            yield index, row
            index += 1
    if index == 0:
        raise DataError(f"--dataset {name}: no rows")


def _suffix(path: str) -> str:
    return os.path.splitext(path.rstrip("/"))[1].lower()


class _local_copy:  # noqa: N801 - used as a context manager, reads like a function
    """A local path for ``path``: itself, or a temporary copy of a ``gs://`` object."""

    def __init__(self, path: str):
        self.path = path
        self._tmp: str | None = None

    def __enter__(self) -> str:
        if not self.path.startswith("gs://"):
            if not os.path.isfile(self.path):
                raise DataError(f"--dataset {self.path}: no such file")
            return self.path
        from core import storage

        data = storage.read_bytes(self.path)
        fd, self._tmp = tempfile.mkstemp(suffix=_suffix(self.path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self._tmp

    def __exit__(self, *exc) -> None:
        if self._tmp:
            os.unlink(self._tmp)
