"""Local paths and ``gs://`` URLs behind one small interface.

Every write is atomic: a local file is written under a temporary name in the same folder and
renamed into place; a GCS object is uploaded in one (resumable) upload and only becomes visible
once whole. A reader therefore never sees half a file, and a retried writer (a Ray task retry)
just writes again. GCS goes through google-cloud-storage (``core.gcs_env`` points it at an
emulator when one is configured). Used by conversion for model repositories and by evaluation
for its outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core import scratch
from core.gcs_env import is_gcs, split_gs_url, storage_client

# Resumable-upload and ranged-download chunk size (a multiple of 256 KiB). Every GCS transfer
# holds about one chunk in memory; google-cloud-storage's own default is 100 MiB per upload.
# 64 MiB is t5x's own bound on a stored chunk, which a conversion worker holds anyway to read;
# 16 MiB halved upload speed on fake-gcs-server (7.1 s against 3.2 s for 256 MiB) for no
# memory gained (docs/benchmarks.md, GCS streaming).
_GCS_CHUNK = 64 * 1024 * 1024


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a gs:// URL (no normalisation beyond slashes)."""
    out = str(base).rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def _blob(url: str, chunked: bool = True):
    """The object at ``url``; chunked: transfers in _GCS_CHUNK pieces (bounded memory)."""
    bucket, name = split_gs_url(url)
    if not name:
        raise ValueError(f"gs:// URL names a bucket, not an object: {url!r}")
    return storage_client().bucket(bucket).blob(name, chunk_size=_GCS_CHUNK if chunked else None)


def exists(url: str | os.PathLike) -> bool:
    """Whether the file / object exists (a folder or prefix is not a file)."""
    url = str(url)
    if is_gcs(url):
        return _blob(url).exists()
    return os.path.isfile(url)


def size(url: str | os.PathLike) -> int | None:
    """Size in bytes, or None when the file / object does not exist."""
    url = str(url)
    if is_gcs(url):
        bucket, name = split_gs_url(url)
        blob = storage_client().bucket(bucket).get_blob(name)
        return None if blob is None else blob.size
    try:
        return os.stat(url).st_size
    except FileNotFoundError:
        return None


def read_bytes(url: str | os.PathLike) -> bytes:
    url = str(url)
    if is_gcs(url):
        # One plain GET: a whole read gains nothing from chunks, and a chunked (ranged)
        # download of an empty object is answered 416 Range Not Satisfiable.
        return _blob(url, chunked=False).download_as_bytes()
    return Path(url).read_bytes()


def read_text(url: str | os.PathLike) -> str:
    return read_bytes(url).decode("utf-8")


@contextlib.contextmanager
def open_read(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream over the file / object, for reading large files in pieces."""
    url = str(url)
    if is_gcs(url):
        with _blob(url).open("rb", chunk_size=_GCS_CHUNK) as f:
            yield f
    else:
        with open(url, "rb") as f:
            yield f


@contextlib.contextmanager
def open_write(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream whose content appears at ``url`` only if the block exits cleanly."""
    url = str(url)
    if is_gcs(url):
        # BlobWriter finalises the resumable upload on close and cancels it on an exception.
        with _blob(url).open("wb", chunk_size=_GCS_CHUNK, ignore_flush=True) as f:
            yield f
        return
    with staged_file(url) as tmp, open(tmp, "wb") as f:
        yield f


@contextlib.contextmanager
def staged_file(url: str | os.PathLike) -> Iterator[str]:
    """A local scratch path to fill freely (random-access writes); published to ``url`` on a
    clean exit, deleted otherwise.

    Local: the scratch file lies beside the target and is renamed over it. GCS: it lies in the
    node's scratch folder and is uploaded whole. Either way it is named after, and leased by,
    this process (core.scratch), so a run that is killed mid-write leaves scratch that
    the next run can tell from a live writer's and remove.
    """
    url = str(url)
    gcs = is_gcs(url)
    if not gcs:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
    with scratch.scratch_file(None if gcs else url, name="t5ft.part") as tmp:
        yield tmp
        if gcs:
            _blob(url).upload_from_filename(tmp)
        else:
            os.replace(tmp, url)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    url = str(url)
    if is_gcs(url):
        _blob(url).upload_from_string(data)
        return
    with staged_file(url) as tmp:
        Path(tmp).write_bytes(data)


def write_text(url: str | os.PathLike, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def copy_from_local(local_path: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a local file to ``url`` atomically."""
    url = str(url)
    if is_gcs(url):
        _blob(url).upload_from_filename(str(local_path))
        return
    with staged_file(url) as tmp:
        shutil.copyfile(local_path, tmp)


def list_files(prefix: str | os.PathLike) -> list[str]:
    """Names of every file under the folder / prefix, relative to it, sorted."""
    prefix = str(prefix).rstrip("/")
    if is_gcs(prefix):
        bucket, name = split_gs_url(prefix)
        start = f"{name}/" if name else ""
        blobs = storage_client().list_blobs(bucket, prefix=start)
        return sorted(b.name[len(start):] for b in blobs)
    root = Path(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def list_dirs(prefix: str | os.PathLike) -> list[str]:
    """Immediate sub-folder names of a folder / prefix, sorted."""
    prefix = str(prefix).rstrip("/")
    if is_gcs(prefix):
        bucket, name = split_gs_url(prefix)
        start = f"{name}/" if name else ""
        it = storage_client().list_blobs(bucket, prefix=start, delimiter="/")
        list(it)  # prefixes are filled in as pages are read
        return sorted(p[len(start):].rstrip("/") for p in it.prefixes)
    root = Path(prefix)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def is_dir(prefix: str | os.PathLike) -> bool:
    """Whether a local folder exists / a gs:// prefix holds any object."""
    prefix = str(prefix).rstrip("/")
    if is_gcs(prefix):
        bucket, name = split_gs_url(prefix)
        start = f"{name}/" if name else ""
        return any(True for _ in storage_client().list_blobs(bucket, prefix=start, max_results=1))
    return os.path.isdir(prefix)


def delete(url: str | os.PathLike) -> None:
    """Delete one file / object; missing is fine."""
    url = str(url)
    if is_gcs(url):
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            _blob(url).delete()
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(url)


def delete_tree(prefix: str | os.PathLike) -> None:
    """Delete every file under a folder / prefix."""
    prefix = str(prefix).rstrip("/")
    if is_gcs(prefix):
        for name in list_files(prefix):
            delete(join(prefix, name))
        return
    shutil.rmtree(prefix, ignore_errors=True)
