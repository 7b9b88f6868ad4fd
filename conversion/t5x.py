"""Open a T5X checkpoint, legacy (msgpack + zarr) or any orbax layout, local or gs://.

Lists the parameters under ``target`` (name, shape, dtype) and reads any parameter, or any
sub-region of one, through tensorstore (docs/t5x-checkpoint-format.md). Parameter names are the
dotted tree paths without the ``target.`` prefix: ``encoder.layers_0.attention.query.kernel``.

A :class:`Checkpoint` is plain data (strings and dicts), so it pickles into Ray tasks; each
process opens the arrays it reads lazily and keeps them open. The orbax layouts (a PyTree saved
directly or a CheckpointManager step; OCDBT or one folder per array) are recognised by
conversion.orbax_layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any, Literal

import msgpack
import numpy as np

from conversion import inflate, orbax_layout
from core import storage
from core.errors import UserError, first_line
from core.gcs_env import is_gcs, tensorstore_kvstore

# "legacy": t5x's msgpack + zarr; "ocdbt": orbax, arrays in an OCDBT store; "orbax": orbax with
# one array folder per parameter (use_ocdbt=False). Checkpoint.detail says more.
Layout = Literal["legacy", "ocdbt", "orbax"]
# t5x names steps checkpoint_<step>; an orbax CheckpointManager without a step_prefix, <step>.
_STEP_DIR = re.compile(r"^(?:checkpoint_)?(\d+)$")
_LEGACY_DETAIL = "t5x legacy (msgpack 'checkpoint', one zarr folder per array)"
# Prefixes under which trainers keep the model parameters (t5x: target; orbax trainers: params).
_PARAM_ROOTS = ("target.", "params.")


class CheckpointError(UserError, ValueError):
    """The source is not a readable T5X checkpoint, or a parameter cannot be read."""


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter: its name under ``target``, shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: where it is, its layout and every parameter.

    Attributes:
      path: the ``checkpoint_<step>`` folder (local path or gs:// URL).
      layout: "legacy", "ocdbt" or "orbax" (see ``Layout``).
      step: the step from the folder name, when it has one.
      params: name -> ParamInfo for every array parameter.
      specs: name -> tensorstore spec (JSON) that opens it, or None for inline arrays.
      inline: name -> small array stored inside the msgpack file (legacy scalars).
      detail: the layout found, in words (e.g. which CheckpointManager item, zarr or zarr3).
    """

    path: str
    layout: Layout
    step: int | None
    params: dict[str, ParamInfo]
    specs: dict[str, dict[str, Any]]
    inline: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    detail: str = ""

    def chunk_shape(self, name: str) -> tuple[int, ...]:
        """The stored chunk shape of a parameter (its whole shape when inline)."""
        if name in self.inline:
            return tuple(self.inline[name].shape)
        store = _open(self._spec(name), name)
        return tuple(int(c) for c in store.chunk_layout.read_chunk.shape)

    def inflated_chunk_bytes(self, name: str) -> int:
        """The bytes of one decoded chunk of a parameter that :mod:`conversion.inflate` reads
        (a zarr v2 gzip array), which ``read_async(out=...)`` inflates into; 0 for the rest."""
        if name in self.inline:
            return 0
        gzip = _open_gzip(self._spec(name), name)
        return 0 if gzip is None else gzip.nbytes()

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """Read a parameter, or the sub-region ``region`` of it, as a numpy array.

        Only the chunks the region touches are fetched and decompressed.
        """
        return self.read_async(name, region)()

    def read_async(self, name: str, region: tuple[slice, ...] | None = None,
                   out: np.ndarray | None = None) -> Callable[[], np.ndarray]:
        """Start reading (on conversion.inflate's threads, or tensorstore's); the returned
        function waits for the values, raising CheckpointError as read() does. ``out``: a
        uint8 buffer a region within one gzip chunk is inflated into (then the values are a
        view of it, valid while the caller does not reuse it); ignored otherwise."""
        if name in self.inline:
            a = self.inline[name]
            values = a if region is None else a[region]
            return lambda: values
        gzip = _open_gzip(self._spec(name), name)
        if gzip is not None:
            future = gzip.read_async(region, out)
        else:
            store = _open(self._spec(name), name)
            future = (store if region is None else store[region]).read()

        def result() -> np.ndarray:
            try:
                return future.result()
            except Exception as exc:  # tensorstore reports decode errors as ValueError etc.
                where = "" if region is None else f" {_fmt_region(region)}"
                raise CheckpointError(f"cannot read parameter {name!r}{where} from "
                                      f"{self.path}: {first_line(exc)}") from exc
        return result

    def _spec(self, name: str) -> dict[str, Any]:
        try:
            return self.specs[name]
        except KeyError:
            raise CheckpointError(f"parameter {name!r} is not in checkpoint {self.path}") from None


# tensorstore handles, per process: opening re-reads metadata, reading does not.
_OPEN: dict[str, Any] = {}


def _open(spec: dict[str, Any], name: str):
    import tensorstore as ts

    key = json.dumps(spec, sort_keys=True)
    store = _OPEN.get(key)
    if store is None:
        try:
            store = ts.open(spec, read=True).result()
        except Exception as exc:
            raise CheckpointError(f"cannot open parameter {name!r}: {first_line(exc)}") from exc
        _OPEN[key] = store
    return store



# Per process: the libdeflate reader of each zarr v2 gzip array (conversion.inflate), or None
# where tensorstore decodes.
_GZIP: dict[str, inflate.GzipZarr | None] = {}


def _open_gzip(spec: dict[str, Any], name: str) -> inflate.GzipZarr | None:
    key = json.dumps(spec, sort_keys=True)
    if key not in _GZIP:
        try:
            _GZIP[key] = inflate.open_gzip(spec)
        except Exception as exc:
            raise CheckpointError(f"cannot open parameter {name!r}: {first_line(exc)}") from exc
    return _GZIP[key]


def _fmt_region(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start or 0}:{'' if s.stop is None else s.stop}" for s in region) + "]"


# --- finding the checkpoint folder -------------------------------------------------------------


def _looks_like_checkpoint(names: set[str]) -> Literal["legacy", "orbax"] | None:
    if "checkpoint" in names:
        return "legacy"
    if orbax_layout.is_orbax(names):
        return "orbax"
    return None


def _top_names(path: str) -> set[str]:
    if is_gcs(path):
        files = storage.list_files(path)
        return {f.split("/", 1)[0] for f in files}
    try:
        return set(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _step_of(path: str) -> int | None:
    m = _STEP_DIR.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def _newest_step(src: str, names: set[str]
                 ) -> tuple[str, Literal["legacy", "orbax"], int, set[str]] | None:
    """The newest finished step folder in SRC, if any."""
    # Orbax's unfinished steps are named checkpoint_<step>.orbax-checkpoint-tmp-*, so the
    # pattern skips them; on gs:// an unfinished orbax step lacks commit_success.txt.
    steps = sorted(((step, n) for n in names if (step := _step_of(n)) is not None), reverse=True)
    for step, name in steps:
        path = storage.join(src, name)
        step_names = _top_names(path)
        layout = _looks_like_checkpoint(step_names) or (
            "orbax" if orbax_layout.has_items(path) else None)
        if layout and orbax_layout.is_finalized(path, step_names):
            return path, layout, step, step_names
    return None


def resolve(src: str) -> tuple[str, Literal["legacy", "orbax"], int | None, set[str]]:
    """(checkpoint folder, "legacy" or "orbax", step, names in the folder) for SRC: a
    checkpoint, or a folder of several (the newest complete step wins)."""
    if str(src).startswith("gs:") and not str(src)[len("gs:"):].strip("/"):
        raise CheckpointError(f"source {src} names no bucket: use "
                              "gs://BUCKET/PATH/checkpoint_<step>")
    src = str(src).rstrip("/")
    if not is_gcs(src) and not os.path.exists(src):
        raise CheckpointError(f"source {src} does not exist")
    names = _top_names(src)
    layout = _looks_like_checkpoint(names)
    if layout:
        return src, layout, _step_of(src), names
    newest = _newest_step(src, names)
    if newest:
        return newest
    # Last, as its sub-folders could also be PyTrees saved directly as steps: an older orbax
    # CheckpointManager step, whose items are not listed in any metadata file.
    if orbax_layout.has_items(src):
        return src, "orbax", _step_of(src), names
    raise CheckpointError(
        f"{src} is not a T5X checkpoint: it holds no 'checkpoint' msgpack file, no orbax "
        f"metadata ({', '.join(orbax_layout.MARKERS)}) and no complete checkpoint_<step> "
        f"(or <step>) folder"
    )


def open_checkpoint(src: str) -> Checkpoint:
    """Open SRC (see :func:`resolve`) and list its parameters."""
    path, layout, step, names = resolve(src)
    if layout == "legacy":
        return _open_legacy(path, step)
    try:
        tree = orbax_layout.find_tree(path, names)
    except orbax_layout.OrbaxLayoutError as exc:
        raise CheckpointError(f"{path} is not a T5X checkpoint: {exc}") from exc
    return _open_orbax(path, step, tree)


# --- legacy: msgpack + zarr --------------------------------------------------------------------


def _ext_hook(code: int, data: bytes):
    # flax: ext 1 = ndarray (shape, dtype, bytes); 3 = numpy scalar (dtype, bytes); 2 = complex.
    if code == 1:
        shape, dtype, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=_np_dtype(dtype)).reshape(shape)
    if code == 3:
        dtype, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=_np_dtype(dtype))[0]
    if code == 2:
        re_, im = msgpack.unpackb(data, raw=False)
        return complex(re_, im)
    return msgpack.ExtType(code, data)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and not _is_ts_spec(tree):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _is_ts_spec(node: dict) -> bool:
    return "driver" in node and isinstance(node.get("driver"), str)


def _open_legacy(path: str, step: int | None) -> Checkpoint:
    url = storage.join(path, "checkpoint")
    try:
        state = msgpack.unpackb(storage.read_bytes(url), ext_hook=_ext_hook, raw=False,
                                strict_map_key=False)
    except Exception as exc:
        raise CheckpointError(f"{url} is not a T5X msgpack checkpoint: {first_line(exc)}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
        raise CheckpointError(f"{url} is not a T5X checkpoint: no 'optimizer' state in it")
    target = state["optimizer"].get("target")
    if not isinstance(target, dict) or not target:
        raise CheckpointError(f"{url} is not a T5X checkpoint: no 'optimizer.target' parameters")
    params: dict[str, ParamInfo] = {}
    specs: dict[str, dict[str, Any]] = {}
    inline: dict[str, np.ndarray] = {}
    for name, leaf in _flatten(target).items():
        if isinstance(leaf, np.ndarray | np.generic):
            arr = np.asarray(leaf)
            inline[name] = arr
            params[name] = ParamInfo(name, tuple(arr.shape), arr.dtype.name)
            continue
        if not isinstance(leaf, dict):
            continue  # None or other non-array leaves (e.g. empty optimizer slots)
        # t5x writes the folder relative to the checkpoint: kvstore.path (file) or path (gcs,
        # whose bucket is the placeholder "t5x-dummy-bucket"); resolve it against our own path.
        rel = leaf.get("kvstore", {}).get("path") or leaf.get("path")
        if not rel:
            raise CheckpointError(f"{url}: parameter {name!r} has no array path in its spec")
        spec = {"driver": leaf.get("driver", "zarr"),
                "kvstore": tensorstore_kvstore(storage.join(path, rel))}
        meta = leaf.get("metadata") or {}
        shape = meta.get("shape")
        dtype = leaf.get("dtype")
        if shape is None or dtype is None:
            store = _open(spec, name)
            shape, dtype = store.shape, store.dtype.numpy_dtype.name
        specs[name] = spec
        params[name] = ParamInfo(name, tuple(int(s) for s in shape), str(dtype))
    if not specs:
        raise CheckpointError(f"{url} is not a T5X checkpoint: no tensorstore arrays in it")
    return Checkpoint(path, "legacy", step, params, specs, inline, _LEGACY_DETAIL)


# --- orbax: a PyTree saved directly or a CheckpointManager step, OCDBT or not -----------------


def _open_orbax(path: str, step: int | None, tree: orbax_layout.OrbaxTree) -> Checkpoint:
    keys = tree.keys
    roots = [r for r in _PARAM_ROOTS if any(k.startswith(r) for k in keys)]
    root = roots[0] if roots else ""
    params: dict[str, ParamInfo] = {}
    specs: dict[str, dict[str, Any]] = {}
    for key in keys:
        if not key.startswith(root):
            continue  # the optimizer state, the step, flax mutables
        name = key[len(root):]
        spec = tree.spec(key)
        store = _open(spec, name)
        specs[name] = spec
        params[name] = ParamInfo(name, tuple(int(s) for s in store.shape),
                                 store.dtype.numpy_dtype.name)
    if not specs:
        where = tree.path if tree.item is None else f"item '{tree.item}' of {path}"
        raise CheckpointError(f"{path} is not a T5X checkpoint: {where} holds no arrays "
                              f"({tree.describe()})")
    return Checkpoint(path, tree.layout, step, params, specs, detail=tree.describe())
