"""Recognise the folder layouts orbax-checkpoint writes, from their metadata files alone.

Two ways orbax stores a T5X train state (docs/checkpoint-layouts.md):

- a PyTree saved directly (``ocp.StandardCheckpointer`` / ``PyTreeCheckpointer``): the step
  folder itself holds the tree's ``_METADATA``;
- a ``CheckpointManager`` step (what t5x's ``OrbaxCheckpointManagerInterface`` writes): the step
  folder's ``_CHECKPOINT_METADATA`` names its items (``item_handlers``), each in its own
  sub-folder; t5x keeps the train state in the PyTree item ``state`` and the data iterator in
  ``dataset``.

A PyTree item's ``_METADATA`` lists every leaf (key path, value type) and says how the arrays
are stored: ``use_ocdbt`` (one OCDBT key-value store, ``manifest.ocdbt``) or one folder per
array, and ``use_zarr3`` (zarr v3 or v2 arrays).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any

from core import storage
from core.errors import UserError
from core.gcs_env import is_gcs, tensorstore_kvstore

CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"  # one per saved step (any orbax checkpointer)
TREE_METADATA = "_METADATA"  # PyTreeCheckpointHandler: the tree and its storage options
OCDBT_MANIFEST = "manifest.ocdbt"
COMMIT_SUCCESS = "commit_success.txt"  # on gs://, orbax's mark that a step is complete
MARKERS = (TREE_METADATA, OCDBT_MANIFEST, CHECKPOINT_METADATA)
T5X_STATE_ITEM = "state"  # t5x.checkpoints._STATE_KEY: the train state's item
# Value types (orbax type handlers' typestr) of leaves that hold an array; None, strings and
# empty containers are recorded in the tree too, but have nothing to read.
_ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")


class OrbaxLayoutError(UserError, ValueError):
    """The folder's orbax metadata does not describe a readable PyTree of arrays."""


@dataclasses.dataclass(frozen=True)
class OrbaxTree:
    """One orbax PyTree of arrays and how it is stored.

    Attributes:
      path: the folder holding the tree's ``_METADATA`` (the item folder of a step).
      item: the CheckpointManager item name, or None when the tree was saved directly.
      items: every item of the step (empty when the tree was saved directly).
      ocdbt: arrays live in one OCDBT store; otherwise one folder per array.
      zarr3: arrays are zarr v3 (else zarr v2).
      keys: the dotted key path of every array leaf.
    """

    path: str
    item: str | None
    items: tuple[str, ...]
    ocdbt: bool
    zarr3: bool
    keys: tuple[str, ...]

    @property
    def layout(self) -> str:
        """"ocdbt" (arrays in an OCDBT store) or "orbax" (one array folder per leaf)."""
        return "ocdbt" if self.ocdbt else "orbax"

    def describe(self) -> str:
        """A one-line account of the layout found, for the conversion summary."""
        arrays = "zarr3" if self.zarr3 else "zarr"
        store = f"OCDBT, {arrays}" if self.ocdbt else f"one {arrays} folder per array"
        if self.item is None:
            return f"orbax PyTree ({store})"
        return (f"orbax CheckpointManager step (items: {', '.join(self.items)}); "
                f"item '{self.item}': PyTree ({store})")

    def spec(self, key: str) -> dict[str, Any]:
        """The tensorstore spec that opens the array at ``key``."""
        driver = "zarr3" if self.zarr3 else "zarr"
        if self.ocdbt:
            return {"driver": driver,
                    "kvstore": {"driver": "ocdbt", "base": _ocdbt_base(self.path),
                                "path": key + "/"}}
        return {"driver": driver, "kvstore": tensorstore_kvstore(storage.join(self.path, key))}


def _ocdbt_base(path: str) -> str:
    if is_gcs(path):
        return path.rstrip("/") + "/"
    return "file://" + os.path.abspath(path).rstrip("/") + "/"


def is_orbax(names: set[str]) -> bool:
    """Whether a folder holding the files/folders ``names`` has orbax metadata."""
    return any(m in names for m in MARKERS)


def has_items(path: str) -> bool:
    """Whether ``path`` holds items (sub-folders with a tree _METADATA): a step written by an
    orbax CheckpointManager older than ``_CHECKPOINT_METADATA``."""
    return bool(_tree_subfolders(path))


def is_finalized(path: str, names: set[str]) -> bool:
    """Whether orbax finished writing the step at ``path`` (files ``names`` beneath it).

    Locally orbax writes into ``<name>.orbax-checkpoint-tmp-*`` and renames when done, so a
    ``checkpoint_<step>`` folder is complete; on gs:// it writes in place and adds
    ``commit_success.txt`` last.
    """
    return not is_gcs(path) or CHECKPOINT_METADATA not in names or COMMIT_SUCCESS in names


def _read_json(url: str) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_text(url))
    except ValueError as exc:
        raise OrbaxLayoutError(f"{url} is not orbax JSON metadata: {exc}") from exc
    if not isinstance(data, dict):
        raise OrbaxLayoutError(f"{url} is not orbax metadata: not a JSON object")
    return data


def _item_names(path: str, names: set[str]) -> list[str] | None:
    """The step's item names from ``_CHECKPOINT_METADATA``, or None if the step has no items.

    When the metadata names no items (older orbax wrote no ``_CHECKPOINT_METADATA``, or no
    ``item_handlers`` in it) and the folder is not a tree itself: every sub-folder holding a
    ``_METADATA``.
    """
    if CHECKPOINT_METADATA in names:
        handlers = _read_json(storage.join(path, CHECKPOINT_METADATA)).get("item_handlers")
        # A dict {item: handler} for a CheckpointManager step; one handler name (a string) for
        # a tree saved directly.
        if isinstance(handlers, dict):
            return sorted(handlers)
    if TREE_METADATA in names or OCDBT_MANIFEST in names:
        return None
    return _tree_subfolders(path) or None


def _tree_subfolders(path: str) -> list[str]:
    return [d for d in storage.list_dirs(path)
            if storage.exists(storage.join(path, d, TREE_METADATA))]


def _choose_item(path: str, items: list[str]) -> str:
    """The item holding the train state: t5x's ``state``, else the one PyTree item."""
    trees = [i for i in items if storage.exists(storage.join(path, i, TREE_METADATA))]
    if T5X_STATE_ITEM in trees:
        return T5X_STATE_ITEM
    if len(trees) == 1:
        return trees[0]
    if not trees:
        raise OrbaxLayoutError(f"{path}: none of its orbax items ({', '.join(items)}) is a "
                               f"PyTree (no {TREE_METADATA} file)")
    raise OrbaxLayoutError(f"{path}: several orbax PyTree items ({', '.join(trees)}) and none "
                           f"named '{T5X_STATE_ITEM}'; pass the item's folder instead")


def _leaf_key(tree_key: str, entry: dict[str, Any]) -> str:
    parts = [k["key"] for k in entry.get("key_metadata", [])]
    if not parts:  # older orbax: only the stringified tuple of keys
        parts = list(ast.literal_eval(tree_key))
    return ".".join(str(p) for p in parts)


def _is_array(entry: dict[str, Any]) -> bool:
    value = entry.get("value_metadata")
    if not isinstance(value, dict):  # older orbax recorded no value types
        return True
    return value.get("value_type") in _ARRAY_TYPES and not value.get("skip_deserialize", False)


def _listed_ocdbt_keys(path: str) -> tuple[list[str], bool]:
    """(array keys, zarr3) listed from an OCDBT store that has no tree metadata."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": _ocdbt_base(path)}).result()
    listed = [k.decode() for k in kv.list().result()]
    keys = sorted({k.rsplit("/", 1)[0] for k in listed
                   if k.endswith("/.zarray") or k.endswith("/zarr.json")})
    return keys, any(k.endswith("/zarr.json") for k in listed)


def read_tree(path: str, item: str | None = None, items: tuple[str, ...] = ()) -> OrbaxTree:
    """The PyTree whose ``_METADATA`` (or, lacking one, ``manifest.ocdbt``) is in ``path``."""
    url = storage.join(path, TREE_METADATA)
    if not storage.exists(url):
        if not storage.exists(storage.join(path, OCDBT_MANIFEST)):
            raise OrbaxLayoutError(f"{path} holds no orbax tree metadata ({TREE_METADATA}) "
                                   f"and no {OCDBT_MANIFEST}")
        keys, zarr3 = _listed_ocdbt_keys(path)
        return OrbaxTree(path, item, items, True, zarr3, tuple(keys))
    meta = _read_json(url)
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict):
        raise OrbaxLayoutError(f"{url} has no tree_metadata")
    keys = tuple(_leaf_key(k, e) for k, e in tree.items() if _is_array(e))
    ocdbt = meta.get("use_ocdbt")
    if ocdbt is None:  # older orbax did not record it: the store's manifest says
        ocdbt = storage.exists(storage.join(path, OCDBT_MANIFEST))
    return OrbaxTree(path, item, items, bool(ocdbt), bool(meta.get("use_zarr3", False)), keys)


def find_tree(path: str, names: set[str]) -> OrbaxTree:
    """The train state's PyTree in the orbax checkpoint ``path`` (files ``names`` beneath it):
    the folder itself, or the chosen item of a CheckpointManager step."""
    items = _item_names(path, names)
    if items is None:
        return read_tree(path)
    item = _choose_item(path, items)
    return read_tree(storage.join(path, item), item, tuple(items))
