"""Both GCS libraries round-trip against the fake-gcs-server fixture.

These pin down the emulator behaviour the rest of tests/gcs relies on: resumable uploads in
several chunks, an unfinished upload leaving no object behind, and tensorstore reading and
writing zarr arrays (whole and by region) under gs://.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tensorstore as ts

from core import gcs_env, storage

MiB = 1 << 20


def test_resumable_upload_in_chunks_round_trips(gcs, gcs_prefix):
    bucket = gcs.client.bucket(gcs.bucket)
    data = np.random.default_rng(0).bytes(9 * MiB)  # above the 8 MiB one-shot limit
    blob = bucket.blob(f"{gcs_prefix}/big.bin", chunk_size=MiB)  # forces 9 resumable chunks
    blob.upload_from_string(data)
    back = bucket.blob(f"{gcs_prefix}/big.bin").download_as_bytes()
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # A ranged read is what a streaming reader does.
    part = bucket.blob(f"{gcs_prefix}/big.bin").download_as_bytes(start=5 * MiB, end=6 * MiB - 1)
    assert part == data[5 * MiB:6 * MiB]


def test_storage_reads_empty_and_chunk_sized_objects(gcs, gcs_prefix):
    # An empty errors.jsonl is a normal evaluation output; a ranged (chunked) download of a
    # zero-byte object is answered 416, so storage.read_bytes must not ask for a range.
    base = f"gs://{gcs.bucket}/{gcs_prefix}"
    storage.write_bytes(f"{base}/empty.jsonl", b"")
    assert storage.read_bytes(f"{base}/empty.jsonl") == b""
    assert storage.read_text(f"{base}/empty.jsonl") == ""
    assert storage.size(f"{base}/empty.jsonl") == 0
    # The listing's sizes, without a metadata GET per object (serving/kubernetes.py sums them).
    assert storage.list_sizes(base) == {"empty.jsonl": 0}
    data = np.random.default_rng(1).bytes(17 * MiB)  # more than one 16 MiB transfer chunk
    storage.write_bytes(f"{base}/big.bin", data)
    assert storage.read_bytes(f"{base}/big.bin") == data


def test_failed_resumable_upload_leaves_no_object(gcs, gcs_prefix):
    bucket = gcs.client.bucket(gcs.bucket)
    blob = bucket.blob(f"{gcs_prefix}/partial.bin")
    with pytest.raises(RuntimeError, match="worker failed"):
        with blob.open("wb", chunk_size=MiB) as writer:
            writer.write(b"x" * (3 * MiB))  # two full chunks are on the server already
            assert writer._upload_and_transport[0].bytes_uploaded >= 2 * MiB
            assert not blob.exists()  # a session in progress is not an object
            raise RuntimeError("worker failed")
    # The context manager cancels the session on error: nothing was published.
    assert not blob.exists()

    with bucket.blob(f"{gcs_prefix}/done.bin").open("wb", chunk_size=MiB) as w:
        w.write(b"y" * (3 * MiB + 5))
    assert bucket.blob(f"{gcs_prefix}/done.bin").download_as_bytes() == b"y" * (3 * MiB + 5)


def test_tensorstore_zarr_on_gcs(gcs, gcs_prefix):
    url = f"gs://{gcs.bucket}/{gcs_prefix}/arr"
    kv = gcs_env.tensorstore_kvstore(url)
    assert kv == {"driver": "gcs", "bucket": gcs.bucket, "path": f"{gcs_prefix}/arr/"}
    a = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    arr = ts.open({"driver": "zarr", "kvstore": kv, "create": True,
                   "metadata": {"shape": [64, 48], "chunks": [16, 48], "dtype": "<f4",
                                "compressor": {"id": "gzip"}}}).result()
    arr.write(a).result()
    # The chunk files are ordinary objects, visible to google-cloud-storage.
    names = set(gcs.blobs(f"{gcs_prefix}/arr"))
    assert {".zarray", "0.0", "1.0", "2.0", "3.0"} <= names
    again = ts.open({"driver": "zarr", "kvstore": f"{url}/"}).result()
    np.testing.assert_array_equal(again[20:40, 5:9].read().result(), a[20:40, 5:9])


def test_split_gs_url_rejects_bad_urls():
    assert gcs_env.split_gs_url("gs://b/x/y/") == ("b", "x/y")
    with pytest.raises(ValueError, match="not a gs:// URL"):
        gcs_env.split_gs_url("/local/path")
    with pytest.raises(ValueError, match="no bucket"):
        gcs_env.split_gs_url("gs:///x")
