"""Save a T5X train state the way t5x's OrbaxCheckpointManagerInterface does, with orbax itself.

t5x (t5x/checkpoints.py) builds an ``ocp.CheckpointManager`` over the model directory with
``step_prefix="checkpoint"`` and two items: ``state``, a ``PyTreeCheckpointHandler`` given the
train state's ``state_dict()`` (flax optimizer naming: ``target`` = the parameters,
``state`` = ``{"step", "param_states"}``; Adafactor keeps ``v_row``/``v_col``/``v``/``m`` per
parameter), saved with ``SaveArgs(dtype=save_dtype)`` on ``target`` leaves only; and
``dataset``, the data iterator's state (t5x's own tf.data handler; here orbax's JSON handler,
so the step really holds a second item). Arrays are jax.Arrays, as in training, so orbax also
writes their sharding and array metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from demo.t5x_writer import _nest

STATE_ITEM = "state"  # t5x.checkpoints._STATE_KEY
DATASET_ITEM = "dataset"  # t5x.checkpoints._DATASET_KEY


def _adafactor_state(param: np.ndarray) -> dict[str, np.ndarray]:
    # t5x's Adafactor: factored second moments for matrices, the full one for vectors; the
    # unused slots are zeros of shape [1] (no momentum).
    one = np.zeros((1,), np.float32)
    if param.ndim >= 2:
        return {"v_row": np.zeros(param.shape[:-1], np.float32),
                "v_col": np.zeros(param.shape[-1:], np.float32), "v": one, "m": one}
    return {"v_row": one, "v_col": one, "v": np.zeros(param.shape, np.float32), "m": one}


def t5x_state_dict(params: Mapping[str, np.ndarray], step: int) -> dict:
    """FlaxOptimTrainState.state_dict() for ``params`` (flat dotted names), as jax.Arrays."""
    tree = {
        "target": _nest(dict(params)),
        "state": {"step": np.asarray(step, np.int32),
                  "param_states": _nest({n: _adafactor_state(np.asarray(p))
                                         for n, p in params.items()})},
    }
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _save_args(state_dict: dict, save_dtype: str) -> dict:
    # t5x's _construct_save_args: only the parameters are cast to save_dtype.
    return {key: jax.tree_util.tree_map(
        lambda _, cast=key == "target": ocp.SaveArgs(dtype=jnp.dtype(save_dtype) if cast
                                                     else None), sub)
        for key, sub in state_dict.items()}


def write_orbax_t5x(model_dir: str | Path, params: Mapping[str, np.ndarray], step: int,
                    save_dtype: str = "float32", use_ocdbt: bool = True,
                    use_zarr3: bool = False) -> Path:
    """Save ``params`` as step ``step`` of a t5x orbax CheckpointManager in ``model_dir``;
    returns the step folder ``model_dir/checkpoint_<step>``."""
    state_dict = t5x_state_dict(params, step)
    handlers = {
        STATE_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3),
        DATASET_ITEM: ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint",
                                           cleanup_tmp_directories=True)
    with ocp.CheckpointManager(Path(model_dir).absolute(), options=options,
                               item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeSave(state_dict,
                                            save_args=_save_args(state_dict, save_dtype)),
            DATASET_ITEM: ocp.args.JsonSave({"iterator": "train_ds-000-of-001", "step": step}),
        }), force=True)
        manager.wait_until_finished()
    return Path(model_dir) / f"checkpoint_{step}"
