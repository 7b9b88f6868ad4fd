"""python -m ray_jobs.evaluate: sharded XSum evaluation against Triton (interfaces.md).

Reads the data, sends it over a pool of Ray actors (Ray Data) holding Triton gRPC clients (or,
with ``--backend in-process``, the repository's JAX engine itself), and writes
OUT/predictions.jsonl (as results arrive), errors.jsonl, metrics.json and report.html.
The flags are evaluation.options.EvalOptions' fields.
"""

from __future__ import annotations

import argparse

from evaluation.options import EvalOptions
from ray_jobs import _cli


def build_parser() -> argparse.ArgumentParser:
    """The command line: EvalOptions' flags plus --address and --json."""
    return _cli.stage_parser("evaluate", EvalOptions.COMMAND_HELP, EvalOptions)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, evaluate, print the summary."""
    args = build_parser().parse_args(argv)
    from evaluation.runner import evaluate

    settings = _cli.options_from_args(EvalOptions, args)
    result = evaluate(settings, init_ray=lambda: _cli.init_ray(args.address, log_to_driver=False))
    paths = ("output", "predictions", "report")
    _cli.emit_summary({"metrics": {k: v for k, v in result.items() if k not in paths},
                  "examples": result["examples"], "failed": result["failed"],
                  **{k: result[k] for k in paths}}, args.json)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
