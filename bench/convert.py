"""Conversion benchmark: inflaters, our Ray conversion and NVIDIA's converter, on a UL2-20B-wide
checkpoint.

    .venv/bin/python bench/convert.py [--workdir /tmp/t5ft-bench-convert] [--runs 3]
        [--nvidia-converter PATH/jax_t5_ckpt_convert.py --nvidia-python VENV/bin/python]

The checkpoint has UL2 20B's widths (D 4096, 16 heads x 256, d_ff 16384, vocab 32128,
gated-silu, untied LM head) and one encoder and one decoder layer: ~865M parameters, fp32,
written as t5x writes them (gzip zarr, chunks of at most 64 MiB), ~3 GB. It is generated once
under --workdir (never in the repository) and reused.

Measured in the same run, on the same files, each step ``--runs`` times (median, min and max
reported), the page cache warmed the same way (every checkpoint file read) before each:
- copy floor: a plain copy of every checkpoint file (what moving the bytes costs);
- per codec: every stored chunk inflated on a process pool of one process per core, with zlib,
  ISA-L (python-isal, new output each chunk) and libdeflate (imagecodecs, into a reused buffer:
  what conversion/inflate.py does), in MB/s of decoded bytes;
- ours at TP 1 and TP 2: ``conversion.run.convert`` on a local Ray with its workers started
  before timing (as on a running cluster): read, inflate, cast, split, write, crc32c, manifest;
- with ``--nvidia-converter``: NVIDIA's ``jax_t5_ckpt_convert.py -t 2 -j CPUS`` on the same
  checkpoint (a local copy of the script with its ``ul2_config.template`` beside it, never
  vendored; run with ``--nvidia-python``, an interpreter that has its needs: zarr<3, msgpack,
  numpy), in the same rounds as ours at TP 2, alternating run by run;
- peak RSS of each Ray worker process against the largest tensor.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
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


def warm(files: list[Path]) -> None:
    """Read every file once, so each timed step starts from the same (warm) page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _stats(seconds: list[float]) -> dict:
    return {"median": round(statistics.median(seconds), 2), "min": round(min(seconds), 2),
            "max": round(max(seconds), 2), "all": [round(x, 2) for x in seconds]}


def timed_rounds(runs: int, files: list[Path], steps: dict[str, tuple]) -> dict[str, tuple]:
    """``runs`` rounds; each runs every step of ``steps`` (name -> (function, args, folder to
    clear or None)) once, in order, after removing its folder (the previous run's output:
    deleting it is not the step's work) and warming the cache. Alternating the steps within a
    round keeps a change of the machine's load from favouring one of them. Returns name ->
    (seconds as {median, min, max, all}, the last result)."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    results: dict[str, object] = {}
    for _ in range(runs):
        for name, (step, args, clear) in steps.items():
            if clear is not None:
                shutil.rmtree(clear, ignore_errors=True)
            warm(files)
            t0 = time.monotonic()
            results[name] = step(*args)
            seconds[name].append(time.monotonic() - t0)
    return {name: (_stats(seconds[name]), results[name]) for name in steps}


def timed(runs: int, files: list[Path], step, *args, clear: Path | None = None
          ) -> tuple[dict, object]:
    """One step of :func:`timed_rounds`: its seconds and last result."""
    return timed_rounds(runs, files, {"step": (step, args, clear)})["step"]


# libdeflate's output buffer, one per pool process, reused as conversion/inflate.py does.
_OUT: list[np.ndarray] = []


def _inflate(job: tuple[str, str]) -> int:
    path, codec = job
    raw = Path(path).read_bytes()
    if codec == "isal":
        from isal import igzip_lib

        return len(igzip_lib.decompress(raw, flag=igzip_lib.DECOMP_GZIP))
    if codec == "libdeflate":
        import imagecodecs

        if not _OUT:
            _OUT.append(np.empty(128 << 20, dtype=np.uint8))  # > any t5x chunk (64 MiB)
        return imagecodecs.gzip_decode(raw, out=_OUT[0]).size
    return len(zlib.decompress(raw, 16 + zlib.MAX_WBITS))


def inflate_all(ckpt: Path, processes: int, codec: str) -> int:
    """Inflate every stored chunk with ``codec`` on a pool; returns the decoded bytes."""
    files = [str(p) for p in chunk_files(ckpt)]
    # Biggest first, so that the last straggler is small.
    files.sort(key=lambda p: -os.path.getsize(p))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.imap_unordered(_inflate, [(f, codec) for f in files]))


def _worker_rss() -> tuple[int, int]:
    import resource

    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return os.getpid(), max(rss_now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def ours(ckpt: Path, workdir: Path, cpus: int, runs: int, files: list[Path],
         tensor_parallels: tuple[int, ...], beside: dict[int, dict[str, tuple]]) -> dict:
    """Our conversion at each tensor-parallel size, ``runs`` times, on one warm local Ray;
    ``beside[t]``: other steps (timed_rounds' form) run in the same rounds as ours at TP t."""
    import ray

    from conversion.run import ConvertOptions, convert

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    out = workdir / "out"
    try:
        # Start as many workers as tasks can run at once (ConvertOptions.task_cpus each) and
        # import the conversion code in each, as on a running cluster; record their resident
        # size before any conversion work.
        per_task = ConvertOptions.model_fields["task_cpus"].default
        warm_up = ray.remote(num_cpus=per_task)(
            lambda: (__import__("conversion.run"), _worker_rss())[1])
        idle = dict(ray.get([warm_up.remote() for _ in range(int(cpus / per_task))]))
        result: dict = {"idle_rss": max(idle.values())}
        for t in tensor_parallels:
            opts = ConvertOptions(src=str(ckpt), dst=str(out), tensor_parallel=t,
                                  overwrite=True, progress=False)
            steps = {f"ours TP {t}": (convert, (opts,), out), **beside.get(t, {})}
            for name, (seconds, got) in timed_rounds(runs, files, steps).items():
                result[name] = {"seconds": seconds, "result": got}
                print(f"{name}: {seconds}; load {_load()}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return result


def nvidia(script: str, python: str, ckpt: Path, workdir: Path, cpus: int) -> int:
    """NVIDIA's converter, TP 2, CPUS jobs, into a fresh folder; returns the files it wrote
    (raises RuntimeError with its last stderr line if it fails)."""
    out = workdir / "nvidia-out"
    try:
        # Its checkpoint-dir is the model folder (config.gin beside checkpoint_<step>; it takes
        # the first checkpoint_* inside), and it reads ul2_config.template beside itself.
        done = subprocess.run([python, script, str(ckpt.parent), str(out), "-t", "2",
                               "-j", str(cpus)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise RuntimeError(f"NVIDIA's converter failed: {last}")
        return sum(1 for p in out.rglob("*") if p.is_file())
    except OSError as exc:
        raise RuntimeError(f"NVIDIA's converter failed to start: {exc}") from exc


def nvidia_steps(args: argparse.Namespace, ckpt: Path, workdir: Path) -> dict[str, tuple]:
    """NVIDIA's converter as a step of timed_rounds (none without --nvidia-converter)."""
    if not args.nvidia_converter:
        return {}
    return {"NVIDIA TP 2": (nvidia, (args.nvidia_converter, args.nvidia_python, ckpt, workdir,
                                     args.cpus), workdir / "nvidia-out")}


def nvidia_problem(args: argparse.Namespace) -> str | None:
    """Why NVIDIA's converter cannot run as given, or None."""
    script = Path(args.nvidia_converter)
    template = script.with_name("ul2_config.template")
    if not script.exists():
        return f"{script} does not exist"
    if not template.exists():
        return f"{template.name} must lie beside {script.name} (it reads it there)"
    return None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/t5ft-bench-convert")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", type=int, default=3, help="runs per timed step (default 3)")
    p.add_argument("--nvidia-converter", metavar="PATH",
                   help="a local copy of NVIDIA's jax_t5_ckpt_convert.py, run on the same files")
    p.add_argument("--nvidia-python", default=sys.executable,
                   help="interpreter for it, with zarr<3, msgpack, numpy (default: this one)")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(workdir)
    files = checkpoint_files(ckpt)
    on_disk = sum(f.stat().st_size for f in files)
    largest = max(int(np.prod(s)) * 4 for s in t5x_param_shapes(UL2_WIDTHS).values())
    load_before = _load()

    t_copy, _ = timed(args.runs, files, copy_floor, ckpt, workdir)
    print(f"copy: {t_copy}; load {_load()}", file=sys.stderr, flush=True)
    codecs = {}
    for codec in ("zlib", "isal", "libdeflate"):
        t, raw = timed(args.runs, files, inflate_all, ckpt, args.cpus, codec)
        codecs[codec] = {"seconds": t, "decoded_MB_per_s": round(raw / 1e6 / t["median"], 1)}
        print(f"inflate {codec}: {codecs[codec]}; load {_load()}", file=sys.stderr, flush=True)
    nv_error = nvidia_problem(args) if args.nvidia_converter else None
    beside = {} if nv_error else {2: nvidia_steps(args, ckpt, workdir)}
    try:
        run = ours(ckpt, workdir, args.cpus, args.runs, files, (1, 2), beside)
    except RuntimeError as exc:  # NVIDIA's converter failed: ours again, alone
        nv_error, beside = str(exc), {}
        print(nv_error, file=sys.stderr, flush=True)
        run = ours(ckpt, workdir, args.cpus, args.runs, files, (1, 2), beside)
    finally:
        shutil.rmtree(workdir / "nvidia-out", ignore_errors=True)
    nv = run.get("NVIDIA TP 2")
    nv_s = nv["seconds"] if nv else None
    ours_s = {t: run[f"ours TP {t}"]["seconds"] for t in (1, 2)}
    summaries = {t: run[f"ours TP {t}"]["result"] for t in (1, 2)}
    # Each task reports its worker's lifetime peak RSS (ru_maxrss) when it ends.
    peak = max(summaries[t]["peak_worker_rss_bytes"] for t in (1, 2))
    result = {
        "params": UL2_WIDTHS.num_parameters(),
        "checkpoint_bytes": on_disk,
        "decompressed_bytes": raw,
        "output_bytes_tp2": summaries[2]["bytes"],
        "cpus": args.cpus,
        "runs": args.runs,
        "load_before": load_before,
        "copy_floor_s": t_copy,
        "codecs": codecs,
        "ours_tp1_s": ours_s[1],
        "ours_tp2_s": ours_s[2],
        "nvidia_tp2_s": nv_s,
        "nvidia_files": nv["result"] if nv else None,
        "nvidia_error": nv_error,
        "nvidia_over_ours_tp2": (round(nv_s["median"] / ours_s[2]["median"], 2)
                                 if nv_s else None),
        "largest_tensor_bytes": largest,
        "worker_idle_rss_bytes": run["idle_rss"],
        "worker_peak_rss_bytes": peak,
        "peak_rss_over_largest_tensor": round(peak / largest, 2),
        "peak_growth_over_largest_tensor": round((peak - run["idle_rss"]) / largest, 2),
        "load_after": _load(),
    }
    print(f"checkpoint: {on_disk / 1e9:.2f} GB on disk; inflate zlib "
          f"{codecs['zlib']['decoded_MB_per_s']} MB/s, isal {codecs['isal']['decoded_MB_per_s']}"
          f" MB/s, libdeflate {codecs['libdeflate']['decoded_MB_per_s']} MB/s on {args.cpus} "
          f"cores; ours TP1 {ours_s[1]['median']}s, TP2 "
          f"{ours_s[2]['median']}s; NVIDIA TP2 {nv_s and nv_s['median']}s; worker peak "
          f"{peak / 2**20:.0f} MiB = {result['peak_rss_over_largest_tensor']}x the largest "
          f"tensor; load {load_before} -> {result['load_after']}", file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
