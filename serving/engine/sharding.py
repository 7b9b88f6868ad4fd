"""Tensor parallelism over local devices with FT's split: heads for attention, d_ff for the MLP.

FT splits q/k/v (and the fused decoder qkv) on their output columns, o on its rows, wi/wi2 on
columns, wo on rows, and the relative-bias tables on heads (ft-t5-format.md section 2). In the
engine's tree (weights.py) those are the H and F axes, so one mesh axis "tp" over those axes
reproduces FT's layout; XLA inserts the two all-reduces per layer FT does by hand. Embedding,
LM head and norms are replicated, as in FT.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "tp"

# leaf name -> spec of one layer's arrays (weights.py shapes)
_LAYER_SPECS: dict[str, PartitionSpec] = {
    **{n: PartitionSpec(None, AXIS, None) for n in ("q", "k", "v", "cq", "ck", "cv")},
    **{n: PartitionSpec(AXIS, None, None) for n in ("o", "co")},
    "wi": PartitionSpec(None, AXIS),
    "wi2": PartitionSpec(None, AXIS),
    "wo": PartitionSpec(AXIS, None),
    "rel_bias": PartitionSpec(AXIS, None),  # a layer's own table [H, B], on heads
    # attention.fuse_weights: q|k|v [D, 3, H, K] and wi|wi2 [D, 2, F], split on H and F as
    # the separate matrices are, so each device holds its own heads' q, k and v
    "qkv": PartitionSpec(None, None, AXIS, None),
    "wi12": PartitionSpec(None, None, AXIS),
}


def make_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh over the first `num_devices` local devices."""
    devices = jax.local_devices()
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"asked to shard over {num_devices} devices, {len(devices)} available")
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


def partition_specs(params: dict) -> dict:
    """The PartitionSpec of every leaf of a weights.py tree."""
    specs: dict = {}
    for key, value in params.items():
        if key in ("encoder", "decoder"):
            specs[key] = [{n: _LAYER_SPECS.get(n, PartitionSpec()) for n in layer}
                          for layer in value]
        elif key.endswith("rel_bias"):
            specs[key] = PartitionSpec(AXIS, None)  # [H, B] on heads
        else:
            specs[key] = PartitionSpec()
    return specs


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Place each leaf on the mesh with its spec (checks H and F divide evenly)."""
    n = mesh.shape[AXIS]
    specs = partition_specs(params)

    def place(x, spec: PartitionSpec):
        for dim, name in zip(x.shape, spec, strict=False):
            if name == AXIS and dim % n:
                raise ValueError(f"axis of size {dim} does not split over {n} devices")
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, params, specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))
