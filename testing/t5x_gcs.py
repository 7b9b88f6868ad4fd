"""Write a legacy T5X checkpoint straight to gs:// the way t5x does on GCS.

t5x's ``checkpoints._get_spec`` gives arrays written under gs:// a ``gcs`` kvstore with the
placeholder bucket ``t5x-dummy-bucket`` and the array folder in a top-level ``path`` (not
``kvstore.path``); the reader must put the real bucket and the checkpoint prefix back. Arrays
are written with tensorstore's gcs driver, the msgpack with google-cloud-storage.
"""

from __future__ import annotations

import msgpack
import numpy as np
import tensorstore as ts

from core import gcs_env
from demo.t5x_writer import (
    _DESIRED_CHUNK_SIZE_BYTES,
    _NP_DTYPES,
    VERSION,
    _msgpack_default,
    _nest,
    choose_chunk_shape,
)

DUMMY_BUCKET = "t5x-dummy-bucket"


def write_t5x_checkpoint_gcs(url: str, params: dict[str, np.ndarray], step: int,
                             dtype: str = "float32",
                             chunk_bytes: int = _DESIRED_CHUNK_SIZE_BYTES) -> str:
    """Write ``params`` as ``url/checkpoint_<step>`` in t5x's GCS layout; returns its URL.

    ``chunk_bytes`` lowers t5x's 64 MiB chunk target so that small test arrays are multi-chunk.
    """
    bucket, prefix = gcs_env.split_gs_url(url)
    ckpt = f"{prefix}/checkpoint_{step}".strip("/")
    leaves: dict[str, object] = {}
    for name, array in params.items():
        array = np.asarray(array).astype(_NP_DTYPES[dtype])
        chunks = choose_chunk_shape(array.shape, chunk_bytes // array.dtype.itemsize)
        metadata = {"compressor": {"id": "gzip"}, "shape": list(array.shape), "chunks": chunks}
        folder = f"target.{name}"
        store = ts.open({
            "driver": "zarr", "dtype": dtype, "metadata": metadata, "create": True,
            "kvstore": {"driver": "gcs", "bucket": bucket, "path": f"{ckpt}/{folder}/"},
        }).result()
        store.write(array).result()
        leaves[name] = {"driver": "zarr", "dtype": dtype,
                        "kvstore": {"driver": "gcs", "bucket": DUMMY_BUCKET},
                        "path": folder, "metadata": metadata}
    state = {"version": VERSION,
             "optimizer": {"target": _nest(leaves),
                           "state": {"step": np.asarray(step, np.int32), "param_states": {}}}}
    blob = gcs_env.storage_client().bucket(bucket).blob(f"{ckpt}/checkpoint")
    blob.upload_from_string(msgpack.packb(state, default=_msgpack_default, use_bin_type=True))
    return f"gs://{bucket}/{ckpt}"
