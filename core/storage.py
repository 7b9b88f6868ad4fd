"""Local paths and ``gs://`` URLs behind one small interface.

Every write is atomic: a local file is written under a temporary name in the same folder and
renamed into place; a GCS object is uploaded in one (resumable) upload and only becomes visible
once whole. A reader therefore never sees half a file, and a retried writer (a Ray task retry)
just writes again. Used by conversion for model repositories and by evaluation for its outputs.

Each public function picks a backend once from the URL (:func:`_backend`): ``_Local`` (the
OS) or ``_Gcs`` (google-cloud-storage; ``core.gcs_env`` points it at an emulator when one is
configured). fsspec + gcsfs would do the same, but gcsfs pins fsspec to its own version and
installing it would downgrade the fsspec the rest of the environment uses (docs/gcs.md).
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

__all__ = ["delete", "delete_tree", "exists", "is_dir", "is_gcs", "join", "list_dirs",
           "list_files", "list_sizes", "list_stamps", "open_read", "open_write", "read_bytes", "read_text", "size",
           "staged_file", "write_bytes", "write_text"]

# Resumable-upload and ranged-download chunk size (a multiple of 256 KiB). Every GCS transfer
# holds about one chunk in memory; google-cloud-storage's own default is 100 MiB per upload.
# 64 MiB is t5x's own bound on a stored chunk, which a conversion worker holds anyway to read;
# 16 MiB halved upload speed on fake-gcs-server (7.1 s against 3.2 s for 256 MiB) for no
# memory gained (docs/benchmarks.md, GCS streaming).
_GCS_CHUNK = 64 * 1024 * 1024


class _Local:
    """Files on this machine's file system (a path, not a URL)."""

    def exists(self, url: str) -> bool:
        return os.path.isfile(url)

    def size(self, url: str) -> int | None:
        try:
            return os.stat(url).st_size
        except FileNotFoundError:
            return None

    def stat(self, url: str) -> tuple[int | None, str | None]:
        return self.size(url), None  # a file system keeps no checksum

    def read_bytes(self, url: str) -> bytes:
        return Path(url).read_bytes()

    @contextlib.contextmanager
    def open_read(self, url: str) -> Iterator[BinaryIO]:
        with open(url, "rb") as f:
            yield f

    @contextlib.contextmanager
    def open_write(self, url: str) -> Iterator[BinaryIO]:
        with staged_file(url) as tmp, open(tmp, "wb") as f:
            yield f

    def scratch_beside(self, url: str) -> str | None:
        # Scratch lies beside the target, so the final rename stays on one file system.
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return url

    def publish(self, tmp: str, url: str) -> None:
        os.replace(tmp, url)

    def write_bytes(self, url: str, data: bytes) -> None:
        with staged_file(url) as tmp:
            Path(tmp).write_bytes(data)

    def list_files(self, prefix: str) -> list[str]:
        return list(self.list_sizes(prefix))

    def list_sizes(self, prefix: str) -> dict[str, int]:
        root = Path(prefix)
        if not root.is_dir():
            return {}
        files = sorted((str(p.relative_to(root)), p) for p in root.rglob("*") if p.is_file())
        return {rel: p.stat().st_size for rel, p in files}

    def list_stamps(self, prefix: str) -> dict[str, tuple[int, int]]:
        root = Path(prefix)
        if not root.is_dir():
            return {}
        stats = ((str(p.relative_to(root)), p.stat()) for p in root.rglob("*") if p.is_file())
        return {rel: (st.st_size, st.st_mtime_ns) for rel, st in sorted(stats)}

    def list_dirs(self, prefix: str) -> list[str]:
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    def is_dir(self, prefix: str) -> bool:
        return os.path.isdir(prefix)

    def delete(self, url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(prefix, ignore_errors=True)


class _Gcs:
    """Objects in a GCS bucket (or the emulator ``core.gcs_env`` points at)."""

    def _blob(self, url: str, chunked: bool = True):
        """The object at ``url``; chunked: transfers in _GCS_CHUNK pieces (bounded memory)."""
        bucket, name = split_gs_url(url)
        if not name:
            raise ValueError(f"gs:// URL names a bucket, not an object: {url!r}")
        return storage_client().bucket(bucket).blob(
            name, chunk_size=_GCS_CHUNK if chunked else None)

    def _prefix(self, prefix: str) -> tuple[str, str]:
        """(bucket, object-name prefix ending in "/" or empty for the whole bucket)."""
        bucket, name = split_gs_url(prefix)
        return bucket, f"{name}/" if name else ""

    def exists(self, url: str) -> bool:
        return self._blob(url).exists()

    def size(self, url: str) -> int | None:
        bucket, name = split_gs_url(url)
        blob = storage_client().bucket(bucket).get_blob(name)
        return None if blob is None else blob.size

    def stat(self, url: str) -> tuple[int | None, str | None]:
        # One metadata GET: the object's size and the crc32c GCS computed, no media.
        bucket, name = split_gs_url(url)
        blob = storage_client().bucket(bucket).get_blob(name)
        return (None, None) if blob is None else (blob.size, blob.crc32c)

    def read_bytes(self, url: str) -> bytes:
        # One plain GET: a whole read gains nothing from chunks, and a chunked (ranged)
        # download of an empty object is answered 416 Range Not Satisfiable.
        return self._blob(url, chunked=False).download_as_bytes()

    @contextlib.contextmanager
    def open_read(self, url: str) -> Iterator[BinaryIO]:
        with self._blob(url).open("rb", chunk_size=_GCS_CHUNK) as f:
            yield f

    @contextlib.contextmanager
    def open_write(self, url: str) -> Iterator[BinaryIO]:
        # BlobWriter finalises the resumable upload on close and cancels it on an exception.
        with self._blob(url).open("wb", chunk_size=_GCS_CHUNK, ignore_flush=True) as f:
            yield f

    def scratch_beside(self, url: str) -> str | None:
        return None  # the node's scratch folder: there is no "beside" an object

    def publish(self, tmp: str, url: str) -> None:
        self._blob(url).upload_from_filename(tmp)

    def write_bytes(self, url: str, data: bytes) -> None:
        self._blob(url).upload_from_string(data)

    def list_files(self, prefix: str) -> list[str]:
        return list(self.list_sizes(prefix))

    def list_sizes(self, prefix: str) -> dict[str, int]:
        # The listing carries every object's size: no per-object metadata GET.
        bucket, start = self._prefix(prefix)
        blobs = storage_client().list_blobs(bucket, prefix=start)
        return dict(sorted((b.name[len(start):], b.size) for b in blobs))

    def list_stamps(self, prefix: str) -> dict[str, tuple[int, int]]:
        # The listing carries each object's generation, which changes whenever it is rewritten.
        bucket, start = self._prefix(prefix)
        blobs = storage_client().list_blobs(bucket, prefix=start)
        return dict(sorted((b.name[len(start):], (b.size, int(b.generation or 0)))
                           for b in blobs))

    def list_dirs(self, prefix: str) -> list[str]:
        bucket, start = self._prefix(prefix)
        it = storage_client().list_blobs(bucket, prefix=start, delimiter="/")
        list(it)  # prefixes are filled in as pages are read
        return sorted(p[len(start):].rstrip("/") for p in it.prefixes)

    def is_dir(self, prefix: str) -> bool:
        bucket, start = self._prefix(prefix)
        return any(True for _ in storage_client().list_blobs(bucket, prefix=start,
                                                              max_results=1))

    def delete(self, url: str) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._blob(url).delete()

    def delete_tree(self, prefix: str) -> None:
        for name in self.list_files(prefix):
            self.delete(join(prefix, name))


_LOCAL, _GCS = _Local(), _Gcs()


def _backend(url: str) -> _Local | _Gcs:
    """The backend for a path or URL, chosen once per call from its scheme."""
    return _GCS if is_gcs(url) else _LOCAL


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a gs:// URL (no normalisation beyond slashes)."""
    out = str(base).rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def exists(url: str | os.PathLike) -> bool:
    """Whether the file / object exists (a folder or prefix is not a file)."""
    return _backend(str(url)).exists(str(url))


def size(url: str | os.PathLike) -> int | None:
    """Size in bytes, or None when the file / object does not exist."""
    return _backend(str(url)).size(str(url))


def stat(url: str | os.PathLike) -> tuple[int | None, str | None]:
    """(size or None when missing, the stored crc32c as GCS writes it (base64 of the big-endian
    value) or None where the backend keeps none: local files)."""
    return _backend(str(url)).stat(str(url))


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole file / object (for small files: configs, manifests, vocabularies)."""
    return _backend(str(url)).read_bytes(str(url))


def read_text(url: str | os.PathLike) -> str:
    """The whole file / object decoded as UTF-8."""
    return read_bytes(url).decode("utf-8")


@contextlib.contextmanager
def open_read(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream over the file / object, for reading large files in pieces (GCS: ranged
    reads of 64 MiB, so memory stays bounded)."""
    with _backend(str(url)).open_read(str(url)) as f:
        yield f


@contextlib.contextmanager
def open_write(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary stream whose content appears at ``url`` only if the block exits cleanly."""
    with _backend(str(url)).open_write(str(url)) as f:
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
    backend = _backend(url)
    with scratch.scratch_file(backend.scratch_beside(url), name="t5ft.part") as tmp:
        yield tmp
        backend.publish(tmp, url)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (all of it or nothing becomes visible)."""
    _backend(str(url)).write_bytes(str(url), data)


def write_text(url: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8, atomically."""
    write_bytes(url, text.encode("utf-8"))


def list_files(prefix: str | os.PathLike) -> list[str]:
    """Names of every file under the folder / prefix, relative to it, sorted."""
    prefix = str(prefix).rstrip("/")
    return _backend(prefix).list_files(prefix)


def list_sizes(prefix: str | os.PathLike) -> dict[str, int]:
    """Every file under the folder / prefix: its name relative to it -> its size in bytes, in
    list_files' order (GCS: from the one listing, no request per object)."""
    prefix = str(prefix).rstrip("/")
    return _backend(prefix).list_sizes(prefix)


def list_stamps(prefix: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Every file under the folder / prefix -> (size, stamp), where the stamp changes whenever
    the file is rewritten: a local file's mtime in ns, a GCS object's generation (from the one
    listing). Cheap to take again: what identifies a source's content between two runs."""
    prefix = str(prefix).rstrip("/")
    return _backend(prefix).list_stamps(prefix)


def list_dirs(prefix: str | os.PathLike) -> list[str]:
    """Immediate sub-folder names of a folder / prefix, sorted."""
    prefix = str(prefix).rstrip("/")
    return _backend(prefix).list_dirs(prefix)


def is_dir(prefix: str | os.PathLike) -> bool:
    """Whether a local folder exists / a gs:// prefix holds any object."""
    prefix = str(prefix).rstrip("/")
    return _backend(prefix).is_dir(prefix)


def delete(url: str | os.PathLike) -> None:
    """Delete one file / object; missing is fine."""
    _backend(str(url)).delete(str(url))


def delete_tree(prefix: str | os.PathLike) -> None:
    """Delete every file under a folder / prefix."""
    prefix = str(prefix).rstrip("/")
    _backend(prefix).delete_tree(prefix)
