"""core.manifest on real files: write/read, file checks, verify_repository, manifest_digest."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c
import numpy as np
import pytest

from core import ft_format, repository, storage
from core.manifest import (
    ManifestEntry,
    ManifestError,
    entry_matches,
    file_digest,
    file_mismatch,
    file_sha256,
    manifest_digest,
    manifest_json,
    new_hasher,
    parse_manifest,
    read_manifest,
    verify_repository,
    write_manifest,
)
from core.t5config import T5Config

TINY = T5Config(d_model=8, num_heads=2, d_kv=4, d_ff=16, vocab_size=32, num_encoder_layers=1,
                num_decoder_layers=1)


def _write_model(repo, complete=True, t=1):
    """A small, complete FT model folder with a manifest (random bytes, real sizes)."""
    model_dir = repo / "t5"
    out = model_dir / "1" / ft_format.weights_dir_name(t)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for spec in ft_format.all_files(TINY, t):
        shape = spec.shape(t)
        data = rng.standard_normal(shape).astype(np.float32).tobytes()
        (out / spec.name).write_bytes(data)
        entries.append(ManifestEntry(spec.name, len(data), hashlib.sha256(data).hexdigest(),
                                     "fp32", shape))
    (out / ft_format.CONFIG_INI).write_text(ft_format.config_ini(TINY, "fp32", t))
    write_manifest(str(out / ft_format.MANIFEST), {"tensor_parallel": t, "complete": complete},
                   entries)
    cfg = repository.model_config("t5", "fastertransformer", t, 1, "fp32")
    (model_dir / "config.pbtxt").write_text(repository.to_pbtxt(cfg))
    return out, {e.name: e for e in entries}


def test_roundtrip_and_sha256(tmp_path):
    out, entries = _write_model(tmp_path)
    header, read = read_manifest(str(out / "manifest.json"))
    assert header == {"tensor_parallel": 1, "complete": True}
    assert read == entries
    name = sorted(entries)[0]
    data = (out / name).read_bytes()
    assert file_sha256(str(out / name)) == hashlib.sha256(data).hexdigest()


def test_read_manifest_missing_and_unreadable(tmp_path):
    assert read_manifest(str(tmp_path / "manifest.json")) is None
    (tmp_path / "manifest.json").write_text('{"files": [{"name": "x"}]}')
    with pytest.raises(ManifestError, match="is not a readable manifest"):
        read_manifest(str(tmp_path / "manifest.json"))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError):
        read_manifest(str(tmp_path / "manifest.json"))


def test_short_and_corrupted_files(tmp_path):
    out, entries = _write_model(tmp_path)
    name = "encoder.block.0.layer.0.SelfAttention.q.weight.0.bin"
    url, entry = str(out / name), entries[name]
    assert file_mismatch(url, entry) is None
    assert entry_matches(entry, url, dtype="fp32", shape=entry.shape, nbytes=entry.bytes)
    assert not entry_matches(entry, url, dtype="fp16", shape=entry.shape, nbytes=entry.bytes)
    data = bytearray((out / name).read_bytes())
    data[0] ^= 0xFF
    (out / name).write_bytes(bytes(data))
    assert file_mismatch(url, entry) == ("sha256", entry.bytes)
    assert file_mismatch(url, entry, hash_file=False) is None
    assert not entry_matches(entry, url, dtype="fp32", shape=entry.shape, nbytes=entry.bytes)
    (out / name).write_bytes(bytes(data[:-4]))
    assert file_mismatch(url, entry) == ("bytes", entry.bytes - 4)
    assert "sha256 differs" not in (verify_repository(str(tmp_path), "t5") or "")
    assert "bytes on disk" in verify_repository(str(tmp_path), "t5")
    (out / name).unlink()
    assert file_mismatch(url, entry) == ("bytes", None)


def test_verify_repository(tmp_path):
    out, entries = _write_model(tmp_path)
    assert verify_repository(str(tmp_path), "t5") is None
    assert "not fp16" in verify_repository(str(tmp_path), "t5", weight_dtype="fp16")
    assert "spiece.model is missing" in verify_repository(str(tmp_path), "t5", need_vocab=True)
    name = sorted(entries)[-1]
    data = bytearray((out / name).read_bytes())
    data[-1] ^= 1
    (out / name).write_bytes(bytes(data))
    assert "sha256 differs" in verify_repository(str(tmp_path), "t5")
    # Above the hash limit only sizes are checked.
    assert verify_repository(str(tmp_path), "t5", hash_limit_bytes=0) is None
    (tmp_path / "t5" / "config.pbtxt").unlink()
    assert "config.pbtxt is missing" in verify_repository(str(tmp_path), "t5")


def test_incomplete_manifest(tmp_path):
    out, entries = _write_model(tmp_path, complete=False)
    assert "says the conversion is incomplete" in verify_repository(str(tmp_path), "t5")
    kept = [e for n, e in entries.items() if "decoder" not in n]
    write_manifest(str(out / "manifest.json"), {"tensor_parallel": 1, "complete": True}, kept)
    assert "the manifest lacks" in verify_repository(str(tmp_path), "t5")
    (out / "manifest.json").unlink()
    assert verify_repository(str(tmp_path), "t5").startswith("missing ")


def test_manifest_digest(tmp_path):
    assert manifest_digest(str(tmp_path), "t5") is None
    out, _ = _write_model(tmp_path, t=2)
    want = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert manifest_digest(str(tmp_path), "t5") == want
    assert manifest_digest(str(tmp_path), "t5", 2) == want
    assert manifest_digest(str(tmp_path), "t5", 1) is None
    assert parse_manifest(storage.read_text(str(out / "manifest.json")))[0]["complete"]


def test_split_axis_and_join_ranks():
    assert ft_format.split_axis("none", 2) is None
    assert ft_format.split_axis("first", 3) == 0
    assert ft_format.split_axis("last", 3) == 2
    full = np.arange(24).reshape(2, 3, 4)
    parts = np.split(full, 2, axis=2)
    np.testing.assert_array_equal(ft_format.join_ranks(parts, "last"), full)
    spec = ft_format.FileSpec("x.0.bin", (2, 3, 4), "last")
    assert spec.shape(2) == (2, 3, 2)


def test_crc32c_entries(tmp_path):
    """crc32c entries: GCS's form (base64, big-endian), round trip, local mismatch, and a
    manifest mixing old sha256 entries with crc32c ones."""
    data = np.random.default_rng(1).standard_normal(5000).astype(np.float32).tobytes()
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    want = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    assert file_digest(str(path), "crc32c") == want
    hasher = new_hasher("crc32c")
    hasher.update(memoryview(np.frombuffer(data, np.uint8).copy()))  # a writable buffer
    assert hasher.text() == want
    entry = ManifestEntry.of("w.bin", len(data), "crc32c", want, "fp32", (5000,))
    old = ManifestEntry("o.bin", 1, "ab" * 32, "fp32", (1,))
    _, back = parse_manifest(manifest_json({}, [entry, old]))
    assert back == {"w.bin": entry, "o.bin": old}
    assert "sha256" not in entry.to_json() and "crc32c" not in old.to_json()
    assert file_mismatch(str(path), entry) is None
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_mismatch(str(path), entry) == ("crc32c", len(data))
    with pytest.raises(ValueError, match="has no digest"):
        ManifestEntry.from_json({"name": "x", "bytes": 1, "dtype": "fp32", "shape": [1]})
