"""T5's relative-position buckets: one rule for the engine that serves and the demo that trains.

t5x (layers.RelativePositionBiases._relative_position_bucket) and Mesh-TF put the distance
``key - query`` into one of ``num_buckets`` buckets: exact for short distances, logarithmic up
to ``max_distance``, the far half of the buckets for keys after the query when bidirectional.
tests/conversion/t5x_forward.py keeps an independent copy on purpose (it is the reference).
"""

from __future__ import annotations

import math

import numpy as np


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
    """t5x/Mesh-TF bucketing of (key position - query position); numpy int32, same shape."""
    ret = np.zeros_like(relative_position, dtype=np.int32)
    n = -relative_position.astype(np.int64)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 like HF (torch .float()) and t5x (jnp.float32); n = 0 is "small", so the
    # clamp to 1 only avoids log(0) in a value that is discarded.
    ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact))
    large = max_exact + (ratio * np.float32(num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(is_small, n, large).astype(np.int32)
