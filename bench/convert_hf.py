"""--format hf beside FT on bench/convert.py's UL2-width checkpoint: seconds and worker peak
memory.

    .venv/bin/python bench/convert_hf.py [--workdir /tmp/t5ft-bench-convert] [--runs 3]

The checkpoint is bench/convert.py's (UL2 20B's widths, one encoder and one decoder layer,
~865M fp32 parameters, gzip zarr chunks of at most 64 MiB; generated once under --workdir).
Both conversions read the same files and write the same tensor bytes (fp32; HF adds one
safetensors header per shard): FT at TP 1 (one file per tensor) and HF (one shard per task).
Each run starts a fresh local Ray, so a worker's peak RSS (ru_maxrss, reported by every task)
is that run's alone, and starts its workers before timing (as on a running cluster); FT and HF
alternate run by run, so a change of the machine's load favours neither. Prints one JSON
object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.convert import (  # noqa: E402
    UL2_WIDTHS,
    _load,
    _stats,
    _worker_rss,
    checkpoint_files,
    ensure_checkpoint,
    warm,
)
from demo.t5x_writer import t5x_param_shapes  # noqa: E402


def one_run(ckpt: Path, out: Path, cpus: int, fmt: str, files: list[Path]) -> dict:
    """One conversion in ``fmt`` on a fresh local Ray with warm workers: seconds, peak RSS."""
    import ray

    from conversion.run import ConvertOptions, convert

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        per_task = ConvertOptions.model_fields["task_cpus"].default
        warm_up = ray.remote(num_cpus=per_task)(
            lambda: (__import__("conversion.run"), _worker_rss())[1])
        idle = max(dict(ray.get([warm_up.remote() for _ in range(int(cpus / per_task))]))
                   .values())
        shutil.rmtree(out, ignore_errors=True)
        warm(files)
        t0 = time.monotonic()
        summary = convert(ConvertOptions(src=str(ckpt), dst=str(out), format=fmt,
                                         progress=False))
        seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak": summary["peak_worker_rss_bytes"], "idle": idle,
            "bytes": summary["bytes"], "files": summary["files"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/t5ft-bench-convert")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", type=int, default=3, help="runs per format (default 3)")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(workdir)
    files = checkpoint_files(ckpt)
    largest = max(int(np.prod(s)) * 4 for s in t5x_param_shapes(UL2_WIDTHS).values())
    load_before = _load()
    runs: dict[str, list[dict]] = {"ft": [], "hf": []}
    for i in range(args.runs):
        for fmt in ("ft", "hf") if i % 2 == 0 else ("hf", "ft"):
            runs[fmt].append(one_run(ckpt, workdir / f"out-{fmt}", args.cpus, fmt, files))
            print(f"{fmt} run {i + 1}: {runs[fmt][-1]}; load {_load()}", file=sys.stderr,
                  flush=True)
    result: dict = {"params": UL2_WIDTHS.num_parameters(), "cpus": args.cpus,
                    "runs": args.runs, "load_before": load_before,
                    "largest_tensor_bytes": largest}
    for fmt, rs in runs.items():
        peak = max(r["peak"] for r in rs)
        result[fmt] = {"seconds": _stats([r["seconds"] for r in rs]), "files": rs[0]["files"],
                       "bytes": rs[0]["bytes"], "worker_peak_rss_bytes": peak,
                       "worker_idle_rss_bytes": max(r["idle"] for r in rs),
                       "peak_rss_over_largest_tensor": round(peak / largest, 2)}
    result["hf_over_ft_seconds"] = round(result["hf"]["seconds"]["median"]
                                         / result["ft"]["seconds"]["median"], 2)
    result["hf_over_ft_peak_rss"] = round(result["hf"]["worker_peak_rss_bytes"]
                                          / result["ft"]["worker_peak_rss_bytes"], 2)
    result["load_after"] = _load()
    mib = {fmt: round(result[fmt]["worker_peak_rss_bytes"] / 2**20) for fmt in runs}
    medians = {fmt: result[fmt]["seconds"]["median"] for fmt in runs}
    print(f"median s {medians}, worker peak MiB {mib}, HF/FT {result['hf_over_ft_seconds']}x"
          f" time {result['hf_over_ft_peak_rss']}x memory, load {load_before} -> "
          f"{result['load_after']}", file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
