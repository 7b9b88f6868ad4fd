"""conversion.t5x reads T5X checkpoints that live on gs://, through tensorstore's gcs driver.

Ways a checkpoint reaches a bucket: t5x saving to gs:// itself (gcs specs with the
"t5x-dummy-bucket" placeholder), a local legacy checkpoint copied up (file specs, relative
paths), an orbax OCDBT checkpoint copied up, and t5x orbax CheckpointManager steps copied up.
"""

from __future__ import annotations

import numpy as np
import pytest

from conversion import t5x
from core.t5config import T5Config
from demo.t5x_writer import random_t5x_params, write_t5x_checkpoint
from testing.t5x_gcs import write_t5x_checkpoint_gcs
from tests.conversion.orbax_t5x import write_orbax_t5x

CFG = T5Config(d_model=32, num_heads=2, d_kv=8, d_ff=64, vocab_size=96,
               num_encoder_layers=2, num_decoder_layers=1)


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    return random_t5x_params(CFG, seed=3)


def _assert_reads_back(ckpt: t5x.Checkpoint, params: dict[str, np.ndarray]) -> None:
    assert set(ckpt.params) == set(params)
    for name, want in params.items():
        assert ckpt.params[name].shape == want.shape
        np.testing.assert_array_equal(ckpt.read(name), want)
    emb = "token_embedder.embedding"
    region = (slice(10, 50), slice(3, 17))
    np.testing.assert_array_equal(ckpt.read(emb, region), params[emb][region])


def test_checkpoint_saved_by_t5x_to_gcs(gcs, gcs_prefix, params):
    url = f"gs://{gcs.bucket}/{gcs_prefix}/model"
    # An older, incomplete step must lose to the newest complete one.
    write_t5x_checkpoint_gcs(url, params, step=100, chunk_bytes=2048)
    write_t5x_checkpoint_gcs(url, params, step=200, chunk_bytes=2048)
    gcs.client.bucket(gcs.bucket).blob(f"{gcs_prefix}/model/checkpoint_300/x/.zarray") \
        .upload_from_string("{}")
    ckpt = t5x.open_checkpoint(url)
    assert (ckpt.layout, ckpt.step) == ("legacy", 200)
    # The placeholder bucket must have been replaced by ours.
    kv = ckpt.specs["token_embedder.embedding"]["kvstore"]
    assert kv["driver"] == "gcs" and kv["bucket"] == gcs.bucket
    assert ckpt.chunk_shape("token_embedder.embedding") != (CFG.vocab_size, CFG.d_model)
    _assert_reads_back(ckpt, params)


def test_local_checkpoints_copied_to_gcs(gcs, gcs_prefix, params, tmp_path):
    legacy = write_t5x_checkpoint(tmp_path / "legacy", params, step=7)
    ocdbt = write_t5x_checkpoint(tmp_path / "ocdbt", params, step=8, layout="ocdbt")
    legacy_url = gcs.upload_tree(legacy, f"{gcs_prefix}/legacy/checkpoint_7")
    ocdbt_url = gcs.upload_tree(ocdbt, f"{gcs_prefix}/ocdbt/checkpoint_8")

    ckpt = t5x.open_checkpoint(legacy_url)
    assert ckpt.layout == "legacy"
    assert ckpt.specs["encoder.encoder_norm.scale"]["kvstore"]["driver"] == "gcs"
    _assert_reads_back(ckpt, params)

    ckpt = t5x.open_checkpoint(ocdbt_url.rsplit("/", 1)[0])  # the folder of steps
    assert (ckpt.layout, ckpt.step) == ("ocdbt", 8)
    _assert_reads_back(ckpt, params)


def test_checkpoint_manager_steps_on_gcs(gcs, gcs_prefix, params, tmp_path):
    # Step 10: one zarr3 folder per array; step 20: OCDBT (t5x's choice).
    write_orbax_t5x(tmp_path / "model", params, step=10, use_ocdbt=False, use_zarr3=True)
    write_orbax_t5x(tmp_path / "model", params, step=20, use_ocdbt=True)
    url = gcs.upload_tree(tmp_path / "model", f"{gcs_prefix}/model")

    ckpt = t5x.open_checkpoint(url)
    assert (ckpt.path, ckpt.layout, ckpt.step) == (f"{url}/checkpoint_20", "ocdbt", 20)
    assert ckpt.detail.endswith("item 'state': PyTree (OCDBT, zarr)")
    _assert_reads_back(ckpt, params)

    # On gs:// orbax writes a step in place and adds commit_success.txt last: without it the
    # step is unfinished and the previous one is used.
    gcs.blobs(f"{gcs_prefix}/model/checkpoint_20")["commit_success.txt"].delete()
    ckpt = t5x.open_checkpoint(url)
    assert (ckpt.layout, ckpt.step) == ("orbax", 10)
    assert ckpt.specs["encoder.encoder_norm.scale"]["kvstore"]["driver"] == "gcs"
    _assert_reads_back(ckpt, params)


def test_missing_gcs_checkpoint_is_a_clear_error(gcs, gcs_prefix):
    with pytest.raises(t5x.CheckpointError, match="is not a T5X checkpoint"):
        t5x.open_checkpoint(f"gs://{gcs.bucket}/{gcs_prefix}/nothing-here")


def test_gcs_source_fingerprints_and_a_missing_chunk(gcs, gcs_prefix, params, tmp_path):
    """On gs:// too: one listing fingerprints each zarr array (sizes and generations), a
    rewritten object changes its array's fingerprint only, and a chunk missing from a
    fill_value-null array (a partly copied checkpoint) is named before anything is read."""
    from conversion.source_id import read_state

    legacy = write_t5x_checkpoint(tmp_path / "legacy", params, step=7)
    url = gcs.upload_tree(legacy, f"{gcs_prefix}/legacy/checkpoint_7")
    ckpt = t5x.open_checkpoint(url)
    before = read_state(ckpt).fingerprints
    assert set(before) == {*ckpt.specs, "*"}
    name = "encoder.layers_0.mlp.wo.kernel"
    chunk = f"{gcs_prefix}/legacy/checkpoint_7/target.{name}/0.0"
    blob = gcs.client.bucket(gcs.bucket).blob(chunk)
    blob.upload_from_string(blob.download_as_bytes())  # same bytes, a new generation
    after = read_state(ckpt).fingerprints
    assert [k for k in before if before[k] != after[k]] == [name]
    blob.delete()
    with pytest.raises(t5x.CheckpointError, match=f"array '{name}' is missing 1 of .*0.0"):
        read_state(ckpt)
