"""Conversion benchmark: our Ray conversion against the floor, on a UL2-20B-wide checkpoint.

    .venv/bin/python bench/convert.py [--workdir /tmp/t5ft-bench-convert] [--tensor-parallel 1]

The checkpoint has UL2 20B's widths (D 4096, 16 heads x 256, d_ff 16384, vocab 32128,
gated-silu, untied LM head) and one encoder and one decoder layer: ~865M parameters, fp32,
written as t5x writes them (gzip zarr, chunks of at most 64 MiB), ~3 GB. It is generated once
under --workdir (never in the repository) and reused.

Measured in the same run, on the same files:
- copy floor: a plain copy of every checkpoint file (what moving the bytes costs);
- decompress floor: gunzip every chunk on all cores, the faster of a Python zlib process pool
  and tensorstore reading every array (what reading the arrays costs);
- ours: ``conversion.run.convert`` on a local Ray with one worker per core (workers started
  before timing, as on a running cluster): read, cast, split, write, sha256, manifest;
- peak RSS of each Ray worker process against the largest tensor (NVIDIA's converter holds
  about 2.2x of it).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.ft_format import T5Config  # noqa: E402
from demo.t5x_writer import gin_config, t5x_param_shapes, write_t5x_checkpoint  # noqa: E402

UL2_WIDTHS = T5Config(d_model=4096, num_heads=16, d_kv=256, d_ff=16384, vocab_size=32128,
                      num_encoder_layers=1, num_decoder_layers=1,
                      feed_forward_proj="gated-silu", tie_word_embeddings=False)


class LazyParams(Mapping):
    """Random fp32 parameters generated one at a time (the whole set is ~3.5 GB)."""

    def __init__(self, cfg: T5Config, seed: int = 0) -> None:
        self.shapes = t5x_param_shapes(cfg)
        self.seed = seed

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = np.random.default_rng([self.seed, sorted(self.shapes).index(name)])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def ensure_checkpoint(workdir: Path) -> Path:
    model_dir = workdir / "ul2-widths"
    ckpt = model_dir / "checkpoint_1"
    if (ckpt / "checkpoint").exists():
        return ckpt
    print(f"generating the checkpoint in {model_dir} (once)...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    write_t5x_checkpoint(model_dir, LazyParams(UL2_WIDTHS), step=1,
                         gin=gin_config(UL2_WIDTHS))
    print(f"generated in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return ckpt


def checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file())


def chunk_files(ckpt: Path) -> list[Path]:
    return [p for p in checkpoint_files(ckpt) if p.parent != ckpt and not p.name.startswith(".")]


def copy_floor(ckpt: Path, workdir: Path) -> float:
    dst = workdir / "copy"
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.monotonic()
    for src in checkpoint_files(ckpt):
        target = dst / src.relative_to(ckpt)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    seconds = time.monotonic() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def _gunzip(path: str) -> int:
    return len(zlib.decompress(Path(path).read_bytes(), 16 + zlib.MAX_WBITS))


def decompress_floor(ckpt: Path, processes: int) -> tuple[float, int]:
    files = [str(p) for p in chunk_files(ckpt)]
    # Biggest first, so that the last straggler is small.
    files.sort(key=lambda p: -os.path.getsize(p))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        t0 = time.monotonic()
        total = sum(pool.imap_unordered(_gunzip, files))
        seconds = time.monotonic() - t0
    return seconds, total


def tensorstore_floor(ckpt: Path) -> float:
    """Read every array whole through tensorstore (its own threads, one per core), a few
    arrays in flight at once so that single-chunk arrays also decode in parallel."""
    import tensorstore as ts

    arrays = sorted(p for p in ckpt.iterdir() if p.is_dir())
    stores = [ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(a)}}).result()
              for a in arrays]
    t0 = time.monotonic()
    window: list = []
    for store in stores:
        window.append(store.read())
        if len(window) >= 4:
            window.pop(0).result()
    for fut in window:
        fut.result()
    return time.monotonic() - t0


def _worker_rss() -> tuple[int, int]:
    import resource

    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return os.getpid(), max(rss_now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def ours(ckpt: Path, workdir: Path, cpus: int, tensor_parallel: int) -> dict:
    import ray

    from conversion.run import ConvertOptions, convert

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        # Start as many workers as tasks can run at once (ConvertOptions.task_cpus each) and
        # import the conversion code in each, as on a running cluster; record their resident
        # size before any conversion work.
        per_task = ConvertOptions.task_cpus
        warm = ray.remote(num_cpus=per_task)(
            lambda: (__import__("conversion.run"), _worker_rss())[1])
        idle = dict(ray.get([warm.remote() for _ in range(int(cpus / per_task))]))
        out = workdir / "out"
        opts = ConvertOptions(src=str(ckpt), dst=str(out), tensor_parallel=tensor_parallel,
                              overwrite=True, progress=False)
        t0 = time.monotonic()
        summary = convert(opts)
        seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
    shutil.rmtree(workdir / "out", ignore_errors=True)
    return {"seconds": seconds, "summary": summary, "idle_rss": idle}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/t5ft-bench-convert")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(workdir)
    files = checkpoint_files(ckpt)
    on_disk = sum(f.stat().st_size for f in files)
    largest = max(int(np.prod(s)) * 4 for s in t5x_param_shapes(UL2_WIDTHS).values())

    # Warm the page cache for every measurement alike.
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    t_copy = copy_floor(ckpt, workdir)
    t_gunzip, raw = decompress_floor(ckpt, args.cpus)
    t_ts = tensorstore_floor(ckpt)
    run = ours(ckpt, workdir, args.cpus, args.tensor_parallel)
    # Each task reports its worker's lifetime peak RSS (ru_maxrss) when it ends.
    peak = run["summary"]["peak_worker_rss_bytes"]
    # The floor: the slower of moving the bytes and decompressing them (the faster of the two
    # ways to decompress: Python's zlib on a process pool, or tensorstore's own decoder).
    t_decompress = min(t_gunzip, t_ts)
    floor = max(t_copy, t_decompress)
    result = {
        "params": UL2_WIDTHS.num_parameters(),
        "checkpoint_bytes": on_disk,
        "decompressed_bytes": raw,
        "output_bytes": run["summary"]["bytes"],
        "output_files": run["summary"]["files"],
        "tensor_parallel": args.tensor_parallel,
        "cpus": args.cpus,
        "copy_floor_s": round(t_copy, 2),
        "gunzip_pool_s": round(t_gunzip, 2),
        "tensorstore_read_all_s": round(t_ts, 2),
        "decompress_floor_s": round(t_decompress, 2),
        "floor_s": round(floor, 2),
        "ours_s": round(run["seconds"], 2),
        "ratio_vs_floor": round(run["seconds"] / floor, 2),
        "ratio_vs_copy_plus_decompress": round(run["seconds"] / (t_copy + t_decompress), 2),
        "largest_tensor_bytes": largest,
        "worker_idle_rss_bytes": max(run["idle_rss"].values()),
        "worker_peak_rss_bytes": peak,
        "peak_rss_over_largest_tensor": round(peak / largest, 2),
        "peak_growth_over_largest_tensor": round(
            (peak - max(run["idle_rss"].values())) / largest, 2),
    }
    print(f"checkpoint: {on_disk / 1e9:.2f} GB on disk, {result['params'] / 1e6:.0f}M params; "
          f"copy {t_copy:.1f}s, decompress on {args.cpus} cores {t_decompress:.1f}s, ours "
          f"{run['seconds']:.1f}s ({result['ratio_vs_floor']}x the floor); worker peak RSS "
          f"{peak / 2**20:.0f} MiB = {result['peak_rss_over_largest_tensor']}x the largest "
          f"tensor ({largest / 2**20:.0f} MiB)", file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
