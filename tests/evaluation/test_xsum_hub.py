"""`--dataset xsum` when the hub's main branch holds a loading script: datasets >= 4 raises
RuntimeError("Dataset scripts are no longer supported, but found xsum.py"); we retry with the
hub's parquet conversion. Exercised with the real error (a local dataset folder holding
`xsum.py`, no network) and a real parquet dataset folder laid out as the conversion is
(`default/test/0000.parquet`) standing in for the hub repository at that revision."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import data
from evaluation.data import DataError, load_examples
from tests.evaluation.conftest import sample_rows


@pytest.fixture
def script_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "xsum"
    folder.mkdir()
    # A loading script, as EdinburghNLP/xsum's main branch held one.
    (folder / "xsum.py").write_text("import datasets\n\nclass Xsum(datasets.GeneratorBasedBuilder):\n"
                                    "    pass\n")
    monkeypatch.setattr(data, "HUB_XSUM", str(folder))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return folder


def test_script_dataset_falls_back_to_the_parquet_conversion(script_dataset, tmp_path,
                                                             monkeypatch, xsum_sample, capsys):
    import datasets

    with pytest.raises(RuntimeError, match=data.SCRIPT_REFUSED):  # the real error, first
        datasets.load_dataset(str(script_dataset), split="test")
    # XSum's columns: document, summary, id (a string).
    rows = [{**r, "id": str(35232140 + i)} for i, r in enumerate(sample_rows(xsum_sample)[:5])]
    converted = tmp_path / "converted" / "default" / "test"
    converted.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), converted / "0000.parquet")
    monkeypatch.setattr(data, "_PARQUET_SOURCE",
                        (str(tmp_path / "converted"), data.PARQUET_REVISION))
    loaded = load_examples("xsum", split="test")
    assert [e.id for e in loaded.examples] == [str(r["id"]) for r in rows]
    assert loaded.examples[0].reference == rows[0]["summary"]
    err = capsys.readouterr().err
    assert "Dataset scripts are no longer supported, but found xsum.py" in err
    assert f"read revision {data.PARQUET_REVISION}" in err


def _one_line_error() -> str:
    """The DataError of `load_examples("xsum")`, checked to be one line."""
    with pytest.raises(DataError) as info:
        load_examples("xsum", split="test")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_when_the_retry_fails_too_one_line_names_both_ways_out(script_dataset, monkeypatch):
    # The retry hits a script folder again: datasets refuses it with the same RuntimeError.
    monkeypatch.setattr(data, "_PARQUET_SOURCE", (str(script_dataset), data.PARQUET_REVISION))
    message = _one_line_error()
    assert message.startswith(f"--dataset xsum: {script_dataset} holds a loading script that "
                              f"datasets ")
    assert "parquet conversion (revision refs/convert/parquet) failed too" in message
    assert "pass --dataset a parquet copy, e.g. gs://BUCKET/data/xsum-test.parquet" in message


def test_hub_out_of_reach_is_one_line_naming_the_parquet_copy(tmp_path, monkeypatch):
    # No egress (a private cluster): datasets' own error for a hub it cannot reach, made here
    # at once with its offline mode and an empty cache (without it, the same ConnectionError
    # comes after huggingface_hub's retries).
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConnectionError, match="Couldn't reach"):  # the real error, first
        datasets.load_dataset(data.HUB_XSUM, split="test")
    message = _one_line_error()
    assert message.startswith(f"--dataset xsum: cannot read {data.HUB_XSUM} from the hub "
                              f"(Couldn't reach")
    assert "pass --dataset gs://BUCKET/data/xsum-test.parquet" in message
