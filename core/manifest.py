"""manifest.json: the record of what a conversion wrote, and every check made against it.

A conversion writes one ``manifest.json`` beside the FT weight files (``<model>/1/<T>-gpu/``).
Its ``model`` header says what the files are (source, step, config, tensor-parallel size,
weight dtype, ``complete``) and its ``files`` list gives each file's size, sha256, dtype and
shape. Writing, resuming, verifying after a conversion and checking a repository before serving
it (the pipeline) all read it through this module, so they agree on what "intact" means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json

from core import ft_format, storage
from core.errors import first_line

MANIFEST = ft_format.MANIFEST

# Hashing every file of a large model takes minutes: verify_repository hashes local models up
# to this total and checks sizes only above it (and on gs://, where a hash is a full download).
HASH_LIMIT_BYTES = 2 << 30


class ManifestError(ValueError):
    """A manifest exists but cannot be read (bad JSON or a malformed entry)."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One written file: what a reader can check without trusting the writer.

    Attributes:
      name: file name inside the ``<T>-gpu`` folder.
      bytes: file size in bytes.
      sha256: hex digest of the file's bytes.
      dtype: weight dtype name ("fp32", "fp16", "bf16").
      shape: the shape of this rank's part, as stored (row-major, no header).
    """

    name: str
    bytes: int
    sha256: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        """This entry as a JSON object (shape as a list)."""
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256,
                "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: dict) -> ManifestEntry:
        """The entry :meth:`to_json` wrote; raises KeyError/ValueError on a malformed one."""
        return cls(obj["name"], int(obj["bytes"]), obj["sha256"], obj["dtype"],
                   tuple(obj["shape"]))


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
    with storage.open_read(url) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_mismatch(url: str, entry: ManifestEntry, *, hash_file: bool = True
                  ) -> tuple[str, int | None] | None:
    """How the file at ``url`` differs from its entry: None when it matches.

    Returns ("bytes", size on disk or None when missing) or ("sha256", size); the size is
    checked first because it is free and a short file can never hash right.
    """
    got = storage.size(url)
    if got != entry.bytes:
        return "bytes", got
    if hash_file and file_sha256(url) != entry.sha256:
        return "sha256", got
    return None


def entry_matches(entry: ManifestEntry | None, url: str, *, dtype: str,
                  shape: tuple[int, ...], nbytes: int) -> bool:
    """Whether a file a resumed run finds may be kept: its entry describes what this run would
    write (dtype, shape, size) and the file still matches the entry (size, sha256)."""
    if entry is None or entry.dtype != dtype:
        return False
    if tuple(entry.shape) != tuple(shape) or entry.bytes != nbytes:
        return False
    return file_mismatch(url, entry) is None


def manifest_digest(model_repository: str, model_name: str,
                    tensor_parallel: int | None = None) -> str | None:
    """sha256 of the served model's manifest (its identity), or None when it has none.

    Without ``tensor_parallel`` the first ``<T>-gpu`` folder found is taken.
    """
    base = storage.join(model_repository, model_name, "1")
    with contextlib.suppress(FileNotFoundError, OSError, ValueError):
        subs = ([ft_format.weights_dir_name(tensor_parallel)] if tensor_parallel
                else sorted(storage.list_dirs(base)))
        for sub in subs:
            url = storage.join(base, sub, MANIFEST)
            if storage.exists(url):
                return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return None


def verify_repository(model_repository: str, model_name: str, tensor_parallel: int = 1,
                      weight_dtype: str = "fp32", need_vocab: bool = False,
                      hash_limit_bytes: int = HASH_LIMIT_BYTES) -> str | None:
    """None when the converted model is complete and intact, else a one-line reason.

    Complete: config.pbtxt, config.ini and a manifest marked complete whose files are every
    file FT opens for that config at that tensor-parallel size (and spiece.model when
    ``need_vocab``); intact: each file's size (and, for local models up to
    ``hash_limit_bytes`` in total, its sha256) matches the manifest.
    """
    model_dir = storage.join(model_repository, model_name)
    out = storage.join(model_dir, "1", ft_format.weights_dir_name(tensor_parallel))
    t = tensor_parallel
    try:
        if not storage.exists(storage.join(model_dir, "config.pbtxt")):
            return f"{model_dir}/config.pbtxt is missing"
        header, entries = parse_manifest(storage.read_text(storage.join(out, MANIFEST)))
        cfg, dtype = ft_format.parse_config_ini(
            storage.read_text(storage.join(out, ft_format.CONFIG_INI)))
    except FileNotFoundError as exc:
        return f"missing {exc.filename or exc}"
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest or config.ini in {out}: {exc}"
    if not header.get("complete"):
        return f"{out}/manifest.json says the conversion is incomplete"
    if dtype != weight_dtype or int(header.get("tensor_parallel", t)) != t:
        return f"{out} holds {dtype} at T={header.get('tensor_parallel')}, not {weight_dtype}"
    if need_vocab and not storage.exists(storage.join(model_dir, "spiece.model")):
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
        return f"{name}: sha256 differs from the manifest"
    return None
