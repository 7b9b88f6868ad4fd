"""core.storage on local paths: atomic writes, listing, deletion.

(gs:// behind the same interface is exercised against the GCS emulator in tests/gcs.)
"""

from __future__ import annotations

import pytest

from core import storage


def test_writes_are_atomic_and_leave_no_scratch_files(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(url, b"12345")
    assert storage.read_bytes(url) == b"12345" and storage.size(url) == 5
    with pytest.raises(RuntimeError), storage.open_write(url) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert storage.read_bytes(url) == b"12345"  # the old content, untouched
    with pytest.raises(RuntimeError), storage.staged_file(str(tmp_path / "c.bin")) as tmp:
        open(tmp, "wb").write(b"x")
        raise RuntimeError("task died")
    assert not storage.exists(str(tmp_path / "c.bin"))
    with storage.open_write(url) as f:
        f.write(b"new")
    assert storage.read_text(url) == "new"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]


def test_listing_and_deleting(tmp_path):
    for name in ("m/1/1-gpu/x.bin", "m/1/1-gpu/y.bin", "m/config.pbtxt"):
        storage.write_text(storage.join(str(tmp_path), name), name)
    root = str(tmp_path / "m")
    assert storage.list_files(root) == ["1/1-gpu/x.bin", "1/1-gpu/y.bin", "config.pbtxt"]
    assert storage.list_dirs(root) == ["1"]
    assert storage.is_dir(root) and not storage.is_dir(str(tmp_path / "none"))
    assert storage.size(str(tmp_path / "none")) is None
    storage.delete(storage.join(root, "config.pbtxt"))
    storage.delete(storage.join(root, "config.pbtxt"))  # missing is fine
    assert storage.list_files(root) == ["1/1-gpu/x.bin", "1/1-gpu/y.bin"]
    storage.delete_tree(root)
    assert storage.list_files(root) == []
    assert storage.join("gs://b/p/", "/q", "r.bin") == "gs://b/p/q/r.bin"


def test_one_backend_per_scheme_and_no_copy_from_local(tmp_path):
    from core.storage import _backend

    assert type(_backend(str(tmp_path))).__name__ == "_Local"
    assert type(_backend("gs://bucket/x")).__name__ == "_Gcs"
    assert not hasattr(storage, "copy_from_local")
    url = storage.join(str(tmp_path), "a", "b.bin")
    with storage.open_write(url) as f:
        f.write(b"xyz")
    with storage.open_read(url) as f:
        assert f.read() == b"xyz"
    assert storage.list_dirs(str(tmp_path)) == ["a"]
    storage.delete_tree(storage.join(str(tmp_path), "a"))
    assert not storage.is_dir(storage.join(str(tmp_path), "a"))


def test_list_sizes_matches_list_files_and_size(tmp_path):
    for name, data in (("m/1/1-gpu/x.bin", b"12345"), ("m/config.pbtxt", b""), ("n.bin", b"1")):
        storage.write_bytes(storage.join(str(tmp_path), name), data)
    root = str(tmp_path / "m")
    assert storage.list_sizes(root) == {"1/1-gpu/x.bin": 5, "config.pbtxt": 0}
    assert list(storage.list_sizes(root)) == storage.list_files(root)
    assert storage.list_sizes(str(tmp_path / "none")) == {}
