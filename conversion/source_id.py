"""What identifies a checkpoint's content, cheap to take again; and that none of it is missing.

``--resume`` (and the pipeline's skip) must not trust a path: a checkpoint replaced at the same
path by another one (same shapes, other weights) would otherwise keep every stale file. One
listing of the checkpoint folder gives each file's size and stamp (a local file's mtime, a GCS
object's generation: both change whenever the file is rewritten). A legacy (msgpack + zarr)
array owns its folder, so it gets a fingerprint of its own and only the layers reading a
changed array are redone; everything else (the msgpack file and its inline arrays, orbax and
OCDBT stores, where arrays share files) is one fingerprint, ``"*"``, that every layer reading
from it depends on. Copying a checkpoint anew changes the stamps: resume then redoes work it
could have kept, never the reverse.

The same listing shows missing chunks. t5x writes its zarr v2 arrays with ``"fill_value":
null`` (docs/t5x-checkpoint-format.md), so each chunk of the grid must exist: tensorstore and
zarr would read an absent one as zeros, which is how a partly copied checkpoint (an
interrupted ``gcloud storage cp``) used to convert into zero weights with exit 0. Only an
array that declares a fill value may omit a chunk (tensorstore skips writing chunks equal to
it); those are counted and reported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import os
from typing import Any

from conversion.plan import ConversionPlan
from conversion.t5x import Checkpoint, CheckpointError
from core import storage
from core.errors import first_line

# The key of what is not one array's own folder (see the module docstring).
SHARED = "*"
# How many .zarray files are read at once (gs://: one GET each; hundreds of arrays).
_READERS = 16


@dataclasses.dataclass(frozen=True)
class SourceState:
    """Fingerprints of a checkpoint's content and what its chunk check found.

    Attributes:
      fingerprints: array name (legacy zarr arrays) or SHARED -> a digest of its files'
        names, sizes and stamps.
      fill_chunks: chunks absent from arrays that declare a fill value (read as that value).
    """

    fingerprints: dict[str, str]
    fill_chunks: int = 0

    def key_of(self, param: str) -> str:
        """The fingerprint a parameter's values depend on."""
        return param if param in self.fingerprints else SHARED


def _digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:20]


def _array_folder(ckpt: Checkpoint, name: str) -> str | None:
    """A legacy zarr array's folder relative to the checkpoint, or None when it has none."""
    spec = ckpt.specs.get(name)
    if ckpt.layout != "legacy" or not spec or spec.get("driver") != "zarr":
        return None
    kv = spec.get("kvstore") or {}
    if kv.get("driver") == "file":
        full = os.path.abspath(str(kv.get("path", "")))
    elif kv.get("driver") == "gcs":
        full = f"gs://{kv.get('bucket')}/{str(kv.get('path', '')).strip('/')}"
    else:
        return None
    base = (ckpt.path if storage.is_gcs(ckpt.path) else os.path.abspath(ckpt.path)).rstrip("/")
    base += "/"
    rel = full[len(base):] if full.startswith(base) else None
    return rel if rel and ".." not in rel.split("/") else None


def _chunk_keys(meta: dict[str, Any]) -> set[str]:
    """Every chunk key of a zarr v2 array's grid."""
    shape, chunks = meta.get("shape") or [], meta.get("chunks") or []
    if not shape:
        return {"0"}
    sep = meta.get("dimension_separator") or "."
    grid = [range(math.ceil(n / c)) if n else range(0) for n, c in zip(shape, chunks,
                                                                        strict=True)]
    return {sep.join(str(i) for i in index) for index in itertools.product(*grid)}


def _check_chunks(ckpt: Checkpoint, name: str, folder: str, files: set[str]) -> int:
    """Refuse an array missing a chunk it must have; the count of chunks read as fill."""
    if ".zarray" not in files:
        if "zarr.json" in files:
            return 0  # zarr v3: fill_value is mandatory, so an absent chunk is that value
        raise CheckpointError(f"checkpoint {ckpt.path}: array {name!r} has no .zarray in "
                              f"{folder}/: the checkpoint is incomplete (an interrupted copy?)")
    url = storage.join(ckpt.path, folder, ".zarray")
    try:
        meta = json.loads(storage.read_bytes(url))
        expected = _chunk_keys(meta)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{url} is not zarr metadata: {first_line(exc)}") from None
    missing = sorted(expected - files)
    if missing and meta.get("fill_value") is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: array {name!r} is missing {len(missing)} of "
            f"{len(expected)} chunk file(s), e.g. {folder}/{missing[0]}; its .zarray has "
            "fill_value null, so every chunk must exist: the checkpoint is incomplete (an "
            "interrupted copy?)")
    return len(missing)


def read_state(ckpt: Checkpoint) -> SourceState:
    """The checkpoint's :class:`SourceState` (one listing, plus each legacy array's .zarray);
    CheckpointError names an array missing a chunk, or its metadata."""
    try:
        listing = storage.list_stamps(ckpt.path)
    except OSError as exc:
        raise CheckpointError(f"cannot list checkpoint {ckpt.path}: {first_line(exc)}") from exc
    folders = {name: f for name in ckpt.specs if (f := _array_folder(ckpt, name))}
    by_folder: dict[str, dict[str, Any]] = {f: {} for f in folders.values()}
    shared: dict[str, Any] = {}
    for rel, stamp in listing.items():
        parts = rel.split("/")
        owner = next((f for i in range(1, len(parts))
                      if (f := "/".join(parts[:i])) in by_folder), None)
        if owner is None:
            shared[rel] = stamp
        else:
            by_folder[owner][rel[len(owner) + 1:]] = stamp
    with concurrent.futures.ThreadPoolExecutor(_READERS) as pool:
        fills = list(pool.map(lambda item: _check_chunks(ckpt, item[0], item[1],
                                                           set(by_folder[item[1]])),
                              sorted(folders.items())))
    prints = {name: _digest(by_folder[folder]) for name, folder in folders.items()}
    prints[SHARED] = _digest(shared)
    return SourceState(prints, sum(fills))


def changed_tasks(plan: ConversionPlan, state: SourceState,
                  recorded: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(groups of the tasks whose sources changed since ``recorded``, the changed keys).

    ``recorded`` None (a manifest from before source fingerprints): every task counts as
    changed, as nothing says the files came from this content.
    """
    if recorded is None:
        return [t.group for t in plan.tasks], [SHARED]
    changed = sorted(k for k, v in state.fingerprints.items() if recorded.get(k) != v)
    keys = set(changed)
    groups = [t.group for t in plan.tasks if keys & {state.key_of(p) for p in t.params()}]
    return groups, changed


def describe_change(changed: list[str]) -> str:
    """A few words on which sources changed (for one line)."""
    if changed == [SHARED]:
        return "its msgpack/orbax files"
    names = [c for c in changed if c != SHARED]
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"array {names[0]!r}{more}" if names else "its msgpack/orbax files"


def same_source(manifest_header: dict[str, Any], src: str) -> str | None:
    """None when SRC's content is what the manifest's conversion read, else why not (a
    pipeline skips a conversion only when its output verifies and this is None)."""
    from conversion.t5x import open_checkpoint

    recorded = manifest_header.get("source_files")
    if not isinstance(recorded, dict):
        return "its manifest records no source fingerprints"
    state = read_state(open_checkpoint(src))
    changed = sorted(k for k, v in state.fingerprints.items() if recorded.get(k) != v)
    if changed:
        return f"the source changed since it was converted ({describe_change(changed)})"
    return None


__all__ = ["SHARED", "SourceState", "changed_tasks", "describe_change", "read_state",
           "same_source"]
