"""The whole workflow as one job: convert, serve, evaluate, stop the servers, keep the outputs.

    python -m ray_jobs.pipeline --config PIPELINE.yaml [--output OUT] [--address ADDR] [--json]
    python -m ray_jobs.pipeline --demo [--output OUT] [--tensor-parallel N] [--json]

The config's convert / serve / evaluate sections hold the flags of ray_jobs.convert / serve /
evaluate (dashes as underscores); ``runs`` lists several models or decoding settings to compare
(see pipeline/config.py and examples/). Each stage is its package's library call, run in this
process on this job's Ray cluster; stages whose outputs already exist and verify are skipped,
so a rerun continues.
``--demo`` builds (or loads from .demo-cache/) a small UL2-architecture model trained on the
bundled XSum sample and runs it through the same path.
"""

from __future__ import annotations

import argparse
import os
import sys

from ray_jobs._cli import UserError, emit_summary, init_ray, run_main, stage_parser

DESCRIPTION = (
    "Convert a T5X checkpoint, serve it with Triton, evaluate it on XSum with "
    "ROUGE, stop the servers, keep the outputs; one or several runs from a YAML config, "
    "or the self-contained --demo."
)


def _add_own(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="PIPELINE.yaml: convert, serve, evaluate sections "
                      "(their jobs' flags) and optionally output and runs")
    what.add_argument("--demo", action="store_true",
                      help="build a small UL2-architecture model trained on the bundled XSum "
                      "sample (cached in .demo-cache/) and run it through the pipeline")
    p.add_argument("--output", default=None,
                   help="output folder or gs:// prefix (overrides the config's 'output'; "
                   "--demo default: out/demo)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="--demo: tensor-parallel size to convert and serve at (1, 2 or 4; "
                   "default 1)")
    p.add_argument("--min-rouge-l", type=float, default=None, metavar="X",
                   help="exit non-zero (after writing every output) when a run's ROUGE-L "
                   "(mid) is below X; --demo default 0.9, the demo's correctness bar")


def build_parser() -> argparse.ArgumentParser:
    """The command line: what to run (--config or --demo), --output, the bar, common flags."""
    return stage_parser("pipeline", DESCRIPTION, add_own=_add_own)


DEMO_MIN_ROUGE_L = 0.9  # a correct pipeline reproduces the demo's summaries almost exactly


def _start_ray(address: str | None) -> str | None:
    """Connect (or start a local Ray); returns the address the stage jobs should use."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address, log_to_driver=False)
        return address  # None: the stage jobs inherit RAY_ADDRESS like this one did
    # A local Ray with more logical CPUs than cores: the servers, the evaluation actors and
    # the conversion tasks each hold one, and on a 2-core laptop they must all fit.
    ctx = init_ray(None, num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False)
    del ctx
    gcs = ray.get_runtime_context().gcs_address
    return gcs


def _print_human(summary: dict) -> None:
    for run in summary["runs"]:
        m = run.get("metrics")
        if m:
            rl = m["rougeL"]
            print(f"{run['run']}: ROUGE-L {rl['mid']:.4f} [{rl['low']:.4f}, {rl['high']:.4f}] "
                  f"ROUGE-1 {m['rouge1']['mid']:.4f} ROUGE-2 {m['rouge2']['mid']:.4f} on "
                  f"{m['examples']} examples ({m['failed']} failed), "
                  f"{m['examples_per_second']:.2f} examples/s -> {run['output']}")
        else:
            print(f"{run['run']}: FAILED: {run.get('error')}")
    if summary.get("comparison"):
        print(f"comparison: {summary['comparison']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline import config as pconfig
    from pipeline.run import Pipeline

    if args.demo:
        if args.tensor_parallel not in (1, 2, 4):
            raise UserError(f"--tensor-parallel {args.tensor_parallel}: the demo model has 4 "
                            "heads and d_ff 256, so use 1, 2 or 4")
        from pipeline.demo import build_model, demo_config

        model = build_model()
        obj = demo_config(model, args.output or "out/demo", args.tensor_parallel)
        try:
            cfg = pconfig.parse(obj)
        except pconfig.ConfigError as exc:
            raise UserError(f"demo config: {exc}") from exc
        name = "demo"
    else:
        cfg = pconfig.load(args.config, args.output)  # a ConfigError is a UserError
        pconfig.check_inputs(cfg, f"{args.config}: ")  # before Ray: an example's placeholders
        name = os.path.splitext(os.path.basename(args.config))[0]

    address = _start_ray(args.address)
    _dashboard_hint()
    print(f"[pipeline] {len(cfg.runs)} run(s); outputs go to {cfg.output}", file=sys.stderr,
          flush=True)
    summary = Pipeline(cfg, address, name=name).run()
    print(f"[pipeline] summary: {cfg.output}/pipeline.json", file=sys.stderr, flush=True)
    if args.json:
        emit_summary(summary, True)
    else:
        _print_human(summary)
    if summary["failed_runs"]:
        first = next(r for r in summary["runs"] if r["error"])
        raise UserError(f"{len(summary['failed_runs'])} of {len(summary['runs'])} run(s) "
                        f"failed; {first['run']}: {first['error']}")
    bar = args.min_rouge_l if args.min_rouge_l is not None else (
        DEMO_MIN_ROUGE_L if args.demo else None)
    low = [] if bar is None else [
        (r["run"], r["metrics"]["rougeL"]["mid"]) for r in summary["runs"]
        if r.get("metrics") and r["metrics"]["rougeL"]["mid"] < bar]
    if low:
        runs = ", ".join(f"{run} {score:.4f}" for run, score in low)
        raise UserError(f"ROUGE-L below {bar} (a misplaced or mis-split weight?): {runs}; "
                        f"outputs kept in {cfg.output}")
    return 0


def _dashboard_hint() -> None:
    try:
        import ray

        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - the hint is optional
        url = None
    if url:
        print(f"[pipeline] Ray dashboard: http://{url} (metrics: t5ft_pipeline_*, "
              "t5ft_eval_*)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main)
