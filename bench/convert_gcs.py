"""GCS streaming benchmark: gs:// -> gs:// conversion against copy-convert-copy.

    .venv/bin/python bench/convert_gcs.py [--chunk-mib 64] [--cpus N] [--workdir /tmp/...]

Everything runs against one fake-gcs-server (the real binary, filesystem backend) started here,
on one checkpoint written to it the way t5x writes on GCS (gzip zarr arrays through tensorstore's
gcs driver, chunks of at most --chunk-mib, "t5x-dummy-bucket" specs). The model is a
T5-1.1-style encoder-decoder with a 32128 x 2048 embedding and LM head (251 MiB each, larger
than the chunk bound) and one layer per side: ~182M fp32 parameters, ~730 MB.

Measured in the same run, on the same emulator and checkpoint, each on a fresh local Ray with
one worker per CPU, started and warmed before timing:
- ours: ``conversion.run.convert`` gs:// -> gs://: each task reads its own tensors chunk by
  chunk with tensorstore and uploads its own files;
- three-step (the seed's way, gsutil-like, parallel like ``gsutil -m cp``): download the whole
  checkpoint to local disk with google-cloud-storage's transfer_manager, convert local ->
  local, upload every output file;
- the peak RSS of each conversion worker (ru_maxrss, fresh workers per method) against its idle
  size, the chunk bound and the largest tensor.
Both outputs must be byte-identical (the manifests' sha256). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import gcs_env, storage  # noqa: E402
from core.ft_format import T5Config  # noqa: E402
from demo.t5x_writer import gin_config, t5x_param_shapes  # noqa: E402
from testing import gcs_emulator  # noqa: E402

BUCKET = "t5ft-bench"
CFG = T5Config(d_model=2048, num_heads=16, d_kv=64, d_ff=2048, vocab_size=32128,
               num_encoder_layers=1, num_decoder_layers=1, feed_forward_proj="gated-gelu")
MiB = 1 << 20


def write_source(url: str, chunk_bytes: int) -> int:
    """Random fp32 parameters, one at a time, as t5x saves to gs://; returns bytes stored."""
    from testing.t5x_gcs import write_t5x_checkpoint_gcs

    shapes = t5x_param_shapes(CFG)
    rng = np.random.default_rng(0)
    params = {name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
              for name, shape in shapes.items()}
    write_t5x_checkpoint_gcs(url, params, step=1, chunk_bytes=chunk_bytes)
    storage.write_text(storage.join(url, "config.gin"), gin_config(CFG))
    bucket, prefix = gcs_env.split_gs_url(url)
    return sum(b.size for b in gcs_env.storage_client().list_blobs(bucket, prefix=prefix + "/"))


def _worker_rss() -> tuple[int, int]:
    import resource

    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fresh_ray(cpus: int) -> dict[int, int]:
    """A new local Ray whose workers have imported the conversion code; their idle peak RSS."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    from conversion.run import ConvertOptions

    # Same runtime_env and CPU request as conversion.run's tasks, and as many workers as can
    # run at once, so these very workers run the conversion.
    per_task = ConvertOptions.model_fields["task_cpus"].default
    warm = ray.remote(num_cpus=per_task)(
        lambda: (__import__("conversion.run"), __import__("tensorstore"), _worker_rss())[2]
    ).options(runtime_env={"env_vars": gcs_env.forwarded_env()})
    return dict(ray.get([warm.remote() for _ in range(int(cpus / per_task))]))


def convert(src: str, dst: str) -> dict:
    from conversion.run import ConvertOptions, convert

    return convert(ConvertOptions(src=src, dst=dst, progress=False))


def ours(src: str, dst: str, cpus: int) -> dict:
    import ray

    idle = fresh_ray(cpus)
    try:
        t0 = time.monotonic()
        summary = convert(src, dst)
        seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
    return {"seconds": seconds, "summary": summary, "idle_rss": max(idle.values())}


def three_step(src: str, dst: str, cpus: int, workdir: Path) -> dict:
    """Download everything, convert locally, upload everything (the seed's flow)."""
    import ray
    from google.cloud.storage import transfer_manager

    client = gcs_env.storage_client()
    bucket = client.bucket(BUCKET)
    local_src = workdir / "src"
    local_dst = workdir / "dst"
    for d in (local_src, local_dst):
        shutil.rmtree(d, ignore_errors=True)
    _, src_prefix = gcs_env.split_gs_url(src)
    _, dst_prefix = gcs_env.split_gs_url(dst)
    idle = fresh_ray(cpus)
    try:
        t0 = time.monotonic()
        names = [b.name for b in client.list_blobs(BUCKET, prefix=src_prefix + "/")]
        results = transfer_manager.download_many_to_path(
            bucket, [n[len(src_prefix) + 1:] for n in names], destination_directory=str(local_src),
            blob_name_prefix=src_prefix + "/", max_workers=8, raise_exception=True,
            worker_type=transfer_manager.THREAD)
        assert all(r is None for r in results)
        t1 = time.monotonic()
        summary = convert(str(local_src), str(local_dst))
        t2 = time.monotonic()
        files = [str(p.relative_to(local_dst)) for p in local_dst.rglob("*") if p.is_file()]
        results = transfer_manager.upload_many_from_filenames(
            bucket, files, source_directory=str(local_dst), blob_name_prefix=dst_prefix + "/",
            max_workers=8, raise_exception=True, worker_type=transfer_manager.THREAD)
        assert all(r is None for r in results)
        t3 = time.monotonic()
    finally:
        ray.shutdown()
    disk = sum(p.stat().st_size for d in (local_src, local_dst) for p in d.rglob("*")
               if p.is_file())
    for d in (local_src, local_dst):
        shutil.rmtree(d, ignore_errors=True)
    return {"seconds": t3 - t0, "download_s": t1 - t0, "convert_s": t2 - t1,
            "upload_s": t3 - t2, "summary": summary, "idle_rss": max(idle.values()),
            "local_disk_bytes": disk}


def manifest_files(url: str) -> list[dict]:
    return json.loads(storage.read_text(url))["files"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk-mib", type=float, default=64.0,
                   help="zarr chunk bound of the source (t5x's is 64 MiB)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="Ray CPUs, i.e. conversion workers (default: cores)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="t5ft-bench-gcs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chunk_bytes = int(args.chunk_mib * MiB)

    proc, url = gcs_emulator.start_emulator(backend="filesystem", root=workdir / "emulator")
    os.environ.update(gcs_env.emulator_env(url))
    try:
        gcs_env.storage_client().create_bucket(BUCKET)
        src = f"gs://{BUCKET}/model"
        t0 = time.monotonic()
        stored = write_source(src, chunk_bytes)
        print(f"source: {stored / 1e6:.0f} MB written to the emulator in "
              f"{time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
        run_ours = ours(src, f"gs://{BUCKET}/ours", args.cpus)
        print(f"ours: {run_ours['seconds']:.1f}s", file=sys.stderr, flush=True)
        run_base = three_step(src, f"gs://{BUCKET}/three-step", args.cpus, workdir)
        print(f"three-step: {run_base['seconds']:.1f}s", file=sys.stderr, flush=True)
        weights = "t5/1/1-gpu/manifest.json"
        same = (manifest_files(f"gs://{BUCKET}/ours/{weights}")
                == manifest_files(f"gs://{BUCKET}/three-step/{weights}"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    largest = max(int(np.prod(s)) * 4 for s in t5x_param_shapes(CFG).values())
    peak_ours = run_ours["summary"]["peak_worker_rss_bytes"]
    peak_base = run_base["summary"]["peak_worker_rss_bytes"]
    result = {
        "params": CFG.num_parameters(),
        "source_bytes": stored,
        "output_bytes": run_ours["summary"]["bytes"],
        "output_files": run_ours["summary"]["files"],
        "cpus": args.cpus,
        "chunk_bound_bytes": chunk_bytes,
        "largest_tensor_bytes": largest,
        "identical_outputs": same,
        "ours_s": round(run_ours["seconds"], 2),
        "three_step_s": round(run_base["seconds"], 2),
        "three_step_download_s": round(run_base["download_s"], 2),
        "three_step_convert_s": round(run_base["convert_s"], 2),
        "three_step_upload_s": round(run_base["upload_s"], 2),
        "speedup": round(run_base["seconds"] / run_ours["seconds"], 2),
        "three_step_local_disk_bytes": run_base["local_disk_bytes"],
        "ours_worker_idle_rss_bytes": run_ours["idle_rss"],
        "ours_worker_peak_rss_bytes": peak_ours,
        "ours_peak_growth_bytes": peak_ours - run_ours["idle_rss"],
        "three_step_worker_peak_rss_bytes": peak_base,
        "three_step_peak_growth_bytes": peak_base - run_base["idle_rss"],
    }
    print(f"ours gs->gs {result['ours_s']}s vs three-step {result['three_step_s']}s "
          f"(download {result['three_step_download_s']}s + convert "
          f"{result['three_step_convert_s']}s + upload {result['three_step_upload_s']}s); "
          f"worker peak RSS {peak_ours / MiB:.0f} MiB (idle {run_ours['idle_rss'] / MiB:.0f}) "
          f"with chunks <= {chunk_bytes / MiB:.0f} MiB and a {largest / MiB:.0f} MiB tensor; "
          f"identical outputs: {same}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    if not same:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
