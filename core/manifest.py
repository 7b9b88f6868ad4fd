"""manifest.json: the record of what a conversion wrote, and every check made against it.

A conversion writes one ``manifest.json`` beside the FT weight files (``<model>/1/<T>-gpu/``).
Its ``model`` header says what the files are (source, step, config, tensor-parallel size,
weight dtype, ``complete``) and its ``files`` list gives each file's size, digest, dtype and
shape. The digest is crc32c by default (hardware accelerated, and the value GCS keeps for every
object, so a gs:// file is checked from its metadata without downloading it) or sha256
(``--digest sha256``, and every manifest written before crc32c existed). Writing, resuming, verifying after a conversion and checking a repository before serving
it (the pipeline) all read it through this module, so they agree on what "intact" means.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
from typing import Literal, Protocol

import google_crc32c
import numpy as np

from core import ft_format, repository, storage
from core.errors import UserError, first_line

MANIFEST = ft_format.MANIFEST

# Hashing every file of a large model takes minutes: verify_repository hashes local models up
# to this total and checks sizes only above it (and on gs://, where a hash is a full download).
HASH_LIMIT_BYTES = 2 << 30


# The digests a manifest entry may carry; crc32c is written unless --digest sha256 asks otherwise.
Digest = Literal["crc32c", "sha256"]
DIGESTS: tuple[Digest, ...] = ("crc32c", "sha256")
DEFAULT_DIGEST: Digest = "crc32c"
# Streamed reads of a file being hashed.
_PIECE = 16 * 1024 * 1024


class Hasher(Protocol):
    """What :func:`new_hasher` returns: hashlib's update, and the manifest's text form."""

    def update(self, data: bytes | memoryview | np.ndarray) -> None: ...

    def text(self) -> str: ...


class _Crc32c:
    """crc32c as GCS writes it in object metadata: base64 of the 4 big-endian bytes."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview | np.ndarray) -> None:
        # The C extension parses its argument as a read-only buffer ("y#"): it refuses a
        # memoryview but takes bytes or a numpy array, so other buffers are passed as a uint8
        # array over the same memory (no copy, whatever their size).
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        elif not isinstance(data, bytes):
            data = np.frombuffer(data, dtype=np.uint8)
        self._crc = google_crc32c.extend(self._crc, data)

    def text(self) -> str:
        return base64.b64encode(self._crc.to_bytes(4, "big")).decode()


class _Sha256:
    """sha256 as hex, as manifests have always held it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def text(self) -> str:
        return self._hash.hexdigest()


def new_hasher(digest: Digest) -> Hasher:
    """A running digest of ``digest`` ("crc32c" or "sha256") in the manifest's text form."""
    return _Crc32c() if digest == "crc32c" else _Sha256()


class ManifestError(UserError, ValueError):
    """A manifest exists but cannot be read (bad JSON or a malformed entry)."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One written file: what a reader can check without trusting the writer.

    Attributes:
      name: file name inside the ``<T>-gpu`` folder.
      bytes: file size in bytes.
      sha256: hex sha256 of the file's bytes, or None (a crc32c entry).
      dtype: weight dtype name ("fp32", "fp16", "bf16").
      shape: the shape of this rank's part, as stored (row-major, no header).
      crc32c: the file's crc32c as GCS keeps it (base64, big-endian), or None (sha256 entry).
    """

    name: str
    bytes: int
    sha256: str | None
    dtype: str
    shape: tuple[int, ...]
    crc32c: str | None = None

    @property
    def digest(self) -> tuple[Digest, str]:
        """(algorithm, value) this entry is checked by: crc32c when it has one."""
        if self.crc32c is not None:
            return "crc32c", self.crc32c
        if self.sha256 is not None:
            return "sha256", self.sha256
        raise ValueError(f"manifest entry {self.name!r} has no digest")

    def to_json(self) -> dict:
        """This entry as a JSON object (shape as a list; only the digests it has)."""
        digests = {k: v for k, v in (("crc32c", self.crc32c), ("sha256", self.sha256)) if v}
        return {"name": self.name, "bytes": self.bytes, **digests,
                "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: dict) -> ManifestEntry:
        """The entry :meth:`to_json` wrote (or an older sha256-only one); raises
        KeyError/ValueError on a malformed one."""
        entry = cls(obj["name"], int(obj["bytes"]), obj.get("sha256"), obj["dtype"],
                    tuple(obj["shape"]), obj.get("crc32c"))
        entry.digest  # noqa: B018 - raises ValueError when it has none
        return entry

    @classmethod
    def of(cls, name: str, nbytes: int, digest: Digest, value: str, dtype: str,
           shape: tuple[int, ...]) -> ManifestEntry:
        """An entry carrying the one digest ``digest`` = ``value``."""
        return cls(name, nbytes, value if digest == "sha256" else None, dtype, tuple(shape),
                   value if digest == "crc32c" else None)


def manifest_json(model: dict, entries: list[ManifestEntry]) -> str:
    """Serialise a manifest: ``model`` describes the run, ``files`` lists every file by name."""
    entries = sorted(entries, key=lambda e: e.name)
    return json.dumps({"model": model, "files": [e.to_json() for e in entries]}, indent=1)


def parse_manifest(text: str) -> tuple[dict, dict[str, ManifestEntry]]:
    """(model header, entries by file name) from :func:`manifest_json`'s text."""
    obj = json.loads(text)
    return obj.get("model", {}), {
        e["name"]: ManifestEntry.from_json(e) for e in obj.get("files", [])
    }


def write_manifest(url: str, model: dict, entries: list[ManifestEntry]) -> None:
    """Write a manifest atomically (a reader sees the old one or the new one, never half)."""
    storage.write_text(url, manifest_json(model, entries))


def read_manifest(url: str) -> tuple[dict, dict[str, ManifestEntry]] | None:
    """The manifest at ``url``; None when there is none, ManifestError when it is unreadable."""
    if not storage.exists(url):
        return None
    try:
        return parse_manifest(storage.read_text(url))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{url} is not a readable manifest: {first_line(exc)}") from exc


def file_sha256(url: str) -> str:
    """Hex sha256 of a local file or gs:// object, streamed (bounded memory)."""
    return file_digest(url, "sha256")


def file_digest(url: str, digest: Digest) -> str:
    """The ``digest`` of a local file or gs:// object in the manifest's text form, streamed
    (bounded memory); read once."""
    hasher = new_hasher(digest)
    with storage.open_read(url) as f:
        while piece := f.read(_PIECE):
            hasher.update(piece)
    return hasher.text()


def file_mismatch(url: str, entry: ManifestEntry, *, hash_file: bool = True
                  ) -> tuple[str, int | None] | None:
    """How the file at ``url`` differs from its entry: None when it matches.

    Returns ("bytes", size on disk or None when missing) or (the digest's name, size); the
    size is checked first because it is free and a short file can never hash right. A crc32c
    entry of a gs:// object is compared with the crc32c GCS keeps in the object's metadata
    (the same call that gives its size), so it is always checked and nothing is downloaded;
    ``hash_file=False`` skips the digests that would need reading the file.
    """
    got, stored_crc32c = storage.stat(url)
    if got != entry.bytes:
        return "bytes", got
    algo, want = entry.digest
    if algo == "crc32c" and stored_crc32c is not None:
        return None if stored_crc32c == want else ("crc32c", got)
    if hash_file and file_digest(url, algo) != want:
        return algo, got
    return None


def entry_matches(entry: ManifestEntry | None, url: str, *, dtype: str,
                  shape: tuple[int, ...], nbytes: int) -> bool:
    """Whether a file a resumed run finds may be kept: its entry describes what this run would
    write (dtype, shape, size) and the file still matches the entry (size, digest)."""
    if entry is None or entry.dtype != dtype:
        return False
    if tuple(entry.shape) != tuple(shape) or entry.bytes != nbytes:
        return False
    return file_mismatch(url, entry) is None


def manifest_digest(model_repository: str, model_name: str,
                    tensor_parallel: int | None = None) -> str | None:
    """sha256 of the served model's manifest file (its identity), or None when it has none.

    Without ``tensor_parallel`` the first ``<T>-gpu`` folder found is taken.
    """
    base = storage.join(model_repository, model_name, repository.VERSION)
    with contextlib.suppress(FileNotFoundError, OSError, ValueError):
        folders = ([repository.weights_url(model_repository, model_name, tensor_parallel)]
                   if tensor_parallel else
                   [storage.join(base, sub) for sub in sorted(storage.list_dirs(base))])
        for folder in folders:
            url = storage.join(folder, MANIFEST)
            if storage.exists(url):
                return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return None


def verify_repository(model_repository: str, model_name: str, tensor_parallel: int = 1,
                      weight_dtype: str = "fp32", need_vocab: bool = False,
                      hash_limit_bytes: int = HASH_LIMIT_BYTES) -> str | None:
    """None when the converted model is complete and intact, else a one-line reason.

    Complete: config.pbtxt, config.ini and a manifest marked complete whose files are every
    file FT opens for that config at that tensor-parallel size (and spiece.model when
    ``need_vocab``); intact: each file's size and digest match the manifest (local files'
    digests only up to ``hash_limit_bytes`` in total; gs:// crc32c entries from metadata,
    sha256 ones not at all, as that is a full download).
    """
    model_dir = repository.model_dir(model_repository, model_name)
    out = repository.weights_url(model_repository, model_name, tensor_parallel)
    t = tensor_parallel
    try:
        if not storage.exists(repository.config_url(model_repository, model_name)):
            return f"{model_dir}/config.pbtxt is missing"
        header, entries = parse_manifest(storage.read_text(storage.join(out, MANIFEST)))
        cfg, dtype = repository.read_config_ini(out)
    except FileNotFoundError as exc:
        return f"missing {exc.filename or exc}"
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest or config.ini in {out}: {exc}"
    if not header.get("complete"):
        return f"{out}/manifest.json says the conversion is incomplete"
    if dtype != weight_dtype or int(header.get("tensor_parallel", t)) != t:
        return f"{out} holds {dtype} at T={header.get('tensor_parallel')}, not {weight_dtype}"
    if need_vocab and not storage.exists(repository.vocab_url(model_repository, model_name)):
        return f"{model_dir}/spiece.model is missing"
    expected = {f.name for f in ft_format.all_files(cfg, t)}
    missing = sorted(expected - set(entries))
    if missing:
        return f"the manifest lacks {len(missing)} file(s), e.g. {missing[0]}"
    total = sum(entries[n].bytes for n in expected)
    hash_files = not storage.is_gcs(out) and total <= hash_limit_bytes
    for name in sorted(expected):
        problem = file_mismatch(storage.join(out, name), entries[name], hash_file=hash_files)
        if problem is None:
            continue
        if problem[0] == "bytes":
            return f"{name}: {problem[1]} bytes on disk, {entries[name].bytes} in the manifest"
        return f"{name}: {problem[0]} differs from the manifest"
    return None
