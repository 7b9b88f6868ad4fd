"""Every layout t5x's orbax CheckpointManager writes converts exactly like the legacy layout.

Checkpoints are written by orbax-checkpoint itself (tests/conversion/orbax_t5x.py), nested as
t5x nests them: a ``state`` item (``target`` + the Adafactor optimizer state + step) and a
``dataset`` item, with arrays in OCDBT or one folder per array, zarr v2 or v3. The converted
files must equal, byte for byte, both the spec's reference and the conversion of the same
parameters saved in the legacy msgpack + zarr layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conversion import t5x
from conversion.run import ConvertOptions, convert
from tests.conversion.conftest import MODELS
from tests.conversion.orbax_t5x import write_orbax_t5x
from tests.conversion.reference import reference_files
from tests.conversion.test_cli import REPO, _env, _last_json

# (use_ocdbt, use_zarr3) -> (Checkpoint.layout, how Checkpoint.detail describes the arrays)
STORES = {
    (True, False): ("ocdbt", "PyTree (OCDBT, zarr)"),
    (True, True): ("ocdbt", "PyTree (OCDBT, zarr3)"),
    (False, False): ("orbax", "PyTree (one zarr folder per array)"),
    (False, True): ("orbax", "PyTree (one zarr3 folder per array)"),
}
ITEMS = "orbax CheckpointManager step (items: dataset, state); item 'state': "


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()
            if p.name not in ("config.ini", "manifest.json")}


@pytest.fixture(scope="module")
def legacy_files(ray_local, t5x_checkpoint, tmp_path_factory):
    """(model, save dtype, tp, weight dtype) -> the files converted from the legacy layout."""
    cache: dict[tuple[str, str, int, str], dict[str, bytes]] = {}

    def get(model: str, dtype: str, t: int, wd: str) -> dict[str, bytes]:
        key = (model, dtype, t, wd)
        if key not in cache:
            src, _ = t5x_checkpoint(model, "legacy", dtype)
            dst = tmp_path_factory.mktemp("legacy-out")
            summary = convert(ConvertOptions(src=str(src), dst=str(dst), model_name="m",
                                             tensor_parallel=t, weight_dtype=wd,
                                             progress=False))
            assert summary["layout"] == "legacy"
            assert summary["layout_detail"].startswith("t5x legacy")
            cache[key] = _files(Path(summary["output"]))
        return cache[key]
    return get


@pytest.mark.parametrize(("ocdbt", "zarr3"), sorted(STORES))
def test_layout_is_read_from_orbax_metadata(t5x_checkpoint, tmp_path, ocdbt, zarr3):
    _, params = t5x_checkpoint("t5v1", "legacy", "float32")
    step_dir = write_orbax_t5x(tmp_path / "model", params, step=10, use_ocdbt=ocdbt,
                               use_zarr3=zarr3)
    # What orbax wrote is what the issue describes: named items, the tree's own metadata.
    assert {"_CHECKPOINT_METADATA", "state", "dataset"} <= {p.name for p in step_dir.iterdir()}
    assert ((step_dir / "state" / "manifest.ocdbt").exists()) == ocdbt
    meta = json.loads((step_dir / "state" / "_METADATA").read_text())
    assert (meta["use_ocdbt"], meta["use_zarr3"]) == (ocdbt, zarr3)

    layout, store = STORES[(ocdbt, zarr3)]
    for src in (tmp_path / "model", step_dir):  # the model folder or the step folder
        ckpt = t5x.open_checkpoint(str(src))
        assert (ckpt.path, ckpt.layout, ckpt.step) == (str(step_dir), layout, 10)
        assert ckpt.detail == ITEMS + store
        # Only the parameters: the optimizer slots and the step are not listed.
        assert set(ckpt.params) == set(params)
        for name, want in params.items():
            assert ckpt.params[name].shape == want.shape
            assert ckpt.params[name].dtype == "float32"
            np.testing.assert_array_equal(ckpt.read(name), want)

    # The item folder alone is a PyTree saved directly.
    ckpt = t5x.open_checkpoint(str(step_dir / "state"))
    assert (ckpt.layout, ckpt.detail) == (layout, f"orbax {store}")
    assert set(ckpt.params) == set(params)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(("ocdbt", "zarr3", "save_dtype", "t", "wd"), [
    (True, False, "bfloat16", 2, "fp32"),
    (True, True, "float32", 4, "fp16"),
    (False, False, "float32", 1, "bf16"),
    (False, True, "bfloat16", 2, "fp16"),
])
def test_step_folder_converts_byte_identical_to_legacy(t5x_checkpoint, legacy_files, tmp_path,
                                                       model, ocdbt, zarr3, save_dtype, t, wd):
    _, params = t5x_checkpoint(model, "legacy", save_dtype)
    # t5x trains in float32 and casts the parameters to save_dtype while saving (SaveArgs).
    write_orbax_t5x(tmp_path / "model", {n: a.astype(np.float32) for n, a in params.items()},
                    step=10, save_dtype=save_dtype, use_ocdbt=ocdbt, use_zarr3=zarr3)
    summary = convert(ConvertOptions(src=str(tmp_path / "model"), dst=str(tmp_path / "out"),
                                     model_name="m", tensor_parallel=t, weight_dtype=wd,
                                     progress=False))
    layout, store = STORES[(ocdbt, zarr3)]
    assert (summary["layout"], summary["layout_detail"], summary["step"]) == \
        (layout, ITEMS + store, 10)
    got = _files(Path(summary["output"]))
    assert got == reference_files(params, MODELS[model], t, wd)
    assert got == legacy_files(model, save_dtype, t, wd)


def test_newest_finished_step_wins(t5x_checkpoint, tmp_path):
    _, params = t5x_checkpoint("t5v1", "legacy", "float32")
    model = tmp_path / "model"
    write_orbax_t5x(model, params, step=10)
    write_orbax_t5x(model, params, step=20, use_ocdbt=False)
    # A step orbax has not finished: it writes into <step>.orbax-checkpoint-tmp-<timestamp>.
    shutil.copytree(model / "checkpoint_20", model / "checkpoint_30.orbax-checkpoint-tmp-17")
    ckpt = t5x.open_checkpoint(str(model))
    assert (ckpt.step, ckpt.layout) == (20, "orbax")


def test_default_step_names_and_single_item(t5x_checkpoint, tmp_path):
    """orbax's own defaults: steps named <step> (no step_prefix), one unnamed item (default)."""
    import orbax.checkpoint as ocp

    from tests.conversion.orbax_t5x import t5x_state_dict

    _, params = t5x_checkpoint("t5v1", "legacy", "float32")
    with ocp.CheckpointManager(tmp_path / "model") as manager:
        for step in (5, 7):
            manager.save(step, args=ocp.args.StandardSave(t5x_state_dict(params, step)))
        manager.wait_until_finished()
    ckpt = t5x.open_checkpoint(str(tmp_path / "model"))
    assert (ckpt.path, ckpt.step) == (str(tmp_path / "model" / "7"), 7)
    assert ckpt.detail == ("orbax CheckpointManager step (items: default); item 'default': "
                           "PyTree (OCDBT, zarr)")
    assert set(ckpt.params) == set(params)
    for name, want in params.items():
        np.testing.assert_array_equal(ckpt.read(name), want)


def test_step_without_checkpoint_metadata(t5x_checkpoint, tmp_path):
    """Orbax before _CHECKPOINT_METADATA: the items are the sub-folders with a tree _METADATA."""
    _, params = t5x_checkpoint("t5v1", "legacy", "float32")
    step_dir = write_orbax_t5x(tmp_path / "model", params, step=4, use_ocdbt=False)
    (step_dir / "_CHECKPOINT_METADATA").unlink()
    ckpt = t5x.open_checkpoint(str(tmp_path / "model"))
    assert (ckpt.step, ckpt.layout) == (4, "orbax")
    assert ckpt.detail == ITEMS.replace("dataset, ", "") + STORES[(False, False)][1]
    assert set(ckpt.params) == set(params)
    assert t5x.open_checkpoint(str(step_dir)).detail == ckpt.detail  # the step folder itself


def test_state_item_without_parameters_is_a_clear_error(tmp_path):
    import orbax.checkpoint as ocp

    handlers = {"state": ocp.PyTreeCheckpointHandler(), "dataset": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    with ocp.CheckpointManager(tmp_path, options=options, item_handlers=handlers) as manager:
        manager.save(3, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"note": "no arrays here"}),
            dataset=ocp.args.JsonSave({"step": 3})))
        manager.wait_until_finished()
    with pytest.raises(t5x.CheckpointError, match=r"item 'state' of .* holds no arrays"):
        t5x.open_checkpoint(str(tmp_path))


def test_cli_converts_checkpoint_manager_folder_like_legacy(t5x_checkpoint, tmp_path):
    """`python -m ray_jobs.convert` on a t5x orbax model folder == the legacy checkpoint's files."""
    legacy_src, params = t5x_checkpoint("ul2", "legacy", "float32")
    model = tmp_path / "model"
    write_orbax_t5x(model, params, step=10, use_ocdbt=True)
    shutil.copy(legacy_src / "config.gin", model / "config.gin")
    outputs = {}
    for name, src in (("orbax", model), ("legacy", legacy_src)):
        proc = subprocess.run(
            [sys.executable, "-m", "ray_jobs.convert", "--src", str(src),
             "--dst", str(tmp_path / name), "--tensor-parallel", "2", "--json"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = _last_json(proc.stdout)
        outputs[name] = (summary, _files(Path(summary["output"])))
    summary, files = outputs["orbax"]
    assert (summary["layout"], summary["layout_detail"]) == ("ocdbt", ITEMS + STORES[(True,
                                                                                      False)][1])
    assert summary["arch_sources"]["feed_forward_proj"] == "gin"
    assert files == outputs["legacy"][1]
    assert files == reference_files(params, MODELS["ul2"], 2, "fp32")
