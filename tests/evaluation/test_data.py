"""evaluation.data on real files in every local format (no hub download)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.data import DataError, load_examples
from tests.evaluation.conftest import sample_rows


@pytest.fixture(scope="module")
def rows_with_holes(xsum_sample) -> list[dict]:
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(sample_rows(xsum_sample))]
    rows[3]["document"] = "   "  # empty after stripping
    del rows[5]["document"]  # missing
    rows[7]["summary"] = None  # missing reference
    return rows


def _write(tmp_path, fmt: str, rows: list[dict]):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_file_formats_keep_ids_order_and_report_bad_rows(tmp_path, rows_with_holes, fmt):
    data = load_examples(str(_write(tmp_path, fmt, rows_with_holes)))
    good = [r for i, r in enumerate(rows_with_holes) if i not in (3, 5, 7)]
    assert [e.id for e in data.examples] == [r["id"] for r in good]
    assert [e.index for e in data.examples] == [0, 1, 2, 4, 6, 8, 9]
    assert data.examples[0].input_text == "summarize: " + good[0]["document"]
    assert data.examples[0].reference == good[0]["summary"]
    reasons = {e.id: e.reason for e in data.errors}
    assert set(reasons) == {"r3", "r5", "r7"}
    assert "empty document" in reasons["r3"]
    assert "missing document" in reasons["r5"]
    assert "missing reference" in reasons["r7"]
    assert data.total == len(rows_with_holes)


def test_ids_default_to_row_index_and_template_and_fields(tmp_path, xsum_sample):
    rows = [{"text": r["document"], "gold": r["summary"]} for r in sample_rows(xsum_sample)]
    path = _write(tmp_path, "jsonl", rows)
    data = load_examples(str(path), document_field="text", summary_field="gold",
                         input_template="Summarise this BBC article: {document}",
                         max_examples=4)
    assert [e.id for e in data.examples] == ["0", "1", "2", "3"]
    assert data.examples[2].input_text == "Summarise this BBC article: " + rows[2]["text"]
    assert data.examples[2].reference == rows[2]["gold"]


def test_tsv_of_the_original_evaluator(tmp_path, xsum_sample):
    rows = sample_rows(xsum_sample)
    lines = ["document\tsummary"]  # optional header
    lines += [r["document"].replace("\n", " ") + "\t" + r["summary"] for r in rows[:3]]
    lines += ["a line without a tab", "\tempty document"]
    path = tmp_path / "eval.tsv"
    path.write_text("\n".join(lines) + "\n")
    data = load_examples(str(path))
    assert [e.id for e in data.examples] == ["0", "1", "2"]
    assert data.examples[1].reference == rows[1]["summary"]
    errors = {e.id: e.reason for e in data.errors}
    assert "line 5: 1 tab-separated fields" in errors["3"]
    assert "empty document" in errors["4"]


def test_bad_inputs_are_named(tmp_path, xsum_sample):
    path = _write(tmp_path, "jsonl", sample_rows(xsum_sample))
    with pytest.raises(DataError, match="no field 'article'"):
        load_examples(str(path), document_field="article")
    with pytest.raises(DataError, match="only {document}: KeyError"):
        load_examples(str(path), input_template="summarize: {text}")
    with pytest.raises(DataError, match="does not contain"):
        load_examples(str(path), input_template="summarize:")
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="expected 'xsum' or a file"):
        load_examples(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="--max-examples"):
        load_examples(str(path), max_examples=0)
    dup = _write(tmp_path, "json", [{"id": "a", "document": "x", "summary": "y"}] * 2)
    with pytest.raises(DataError, match="id 'a' occurs at rows 0 and 1"):
        load_examples(str(dup))
