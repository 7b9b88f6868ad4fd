"""Convert a T5X checkpoint into a Triton model repository of FasterTransformer shards.

    python -m ray_jobs.convert --src SRC --dst DST [--tensor-parallel 2] [--json] ...

SRC is a T5X checkpoint folder (legacy msgpack + zarr, or orbax OCDBT), or a folder of
checkpoint_<step> folders (the newest is used); SRC and DST may be local or gs:// URLs.
One Ray task converts each layer (and one the globals); see conversion/run.py.
"""

from __future__ import annotations

import argparse
import logging

from conversion.run import USER_ERRORS, ConvertOptions, convert
from core import ft_format
from core.repository import ENGINES
from ray_jobs._cli import UserError, add_common_arguments, emit_summary, init_ray, run_main

DTYPES = list(ft_format.WEIGHT_DTYPES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.convert",
        description="Convert a T5X checkpoint (T5 1.1, Flan-T5, UL2; legacy or OCDBT, local or "
        "gs://) into FasterTransformer weight shards in a Triton model repository: "
        "DST/<model>/config.pbtxt, DST/<model>/1/<T>-gpu/{config.ini, *.bin, manifest.json}.",
    )
    p.add_argument("--src", required=True,
                   help="T5X checkpoint folder (checkpoint_<step>), or a folder holding several "
                   "(the newest step is used); local path or gs:// URL")
    p.add_argument("--dst", required=True, help="Triton model repository root (local or gs://)")
    p.add_argument("--model-name", default="t5", help="model folder name in DST (default t5)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="T: split attention heads and d_ff over T GPUs (default 1)")
    p.add_argument("--pipeline-parallel", type=int, default=1,
                   help="pipeline_para_size written to config.pbtxt (default 1)")
    p.add_argument("--weight-dtype", choices=DTYPES, default="fp32",
                   help="dtype of the stored .bin files (default fp32)")
    p.add_argument("--inference-dtype", choices=DTYPES, default="bf16",
                   help="data_type in config.pbtxt (default bf16)")
    p.add_argument("--gin", default=None,
                   help="config.gin giving what shapes cannot tell (activation) and the "
                   "vocabulary; default: a config.gin beside or up to two folders above the "
                   "checkpoint (docs/gin.md)")
    p.add_argument("--activation", choices=list(ft_format.ACTIVATIONS), default=None,
                   help="feed_forward_proj, overriding config.gin (default: from gin, else "
                   "gated-gelu for gated MLPs and relu otherwise, reported as inferred)")
    p.add_argument("--param-scan-axis", type=int, default=None, metavar="N",
                   help="layer axis of a scanned (scalable_t5) checkpoint's stacked parameters, "
                   "t5x's param_scan_axis, overriding config.gin (default: from gin, else from "
                   "the shapes when only one axis fits; ignored for unscanned checkpoints)")
    p.add_argument("--vocab", default=None,
                   help="SentencePiece model copied to DST/<model>/spiece.model (default: the "
                   "one config.gin names, seqio.SentencePieceVocabulary.sentencepiece_model_file,"
                   " when it exists)")
    p.add_argument("--engine", choices=list(ENGINES), default="fastertransformer",
                   help="Triton backend config.pbtxt is written for (default fastertransformer)")
    p.add_argument("--resume", action="store_true",
                   help="keep files whose manifest entry, size and sha256 check out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete DST/<model> first, even when it holds a different model")
    p.add_argument("--verify", action="store_true",
                   help="re-read every written file and check it against the manifest; also "
                   "report files in the weights folder that nothing accounts for")
    p.add_argument("--task-cpus", type=float, default=0.5,
                   help="CPUs each per-layer Ray task requests (default 0.5: two tasks per "
                   "core, one decompressing while the other writes)")
    p.add_argument("--task-gpus", type=float, default=0.0,
                   help="GPUs each per-layer Ray task requests, to run on GPU workers (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ConvertOptions(
        src=args.src, dst=args.dst, model_name=args.model_name,
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        weight_dtype=args.weight_dtype, inference_dtype=args.inference_dtype, gin=args.gin,
        vocab=args.vocab, engine=args.engine, activation=args.activation,
        param_scan_axis=args.param_scan_axis, resume=args.resume,
        overwrite=args.overwrite, verify=args.verify, task_cpus=args.task_cpus,
        task_gpus=args.task_gpus, progress=not args.no_progress,
    )
    if opts.overwrite and opts.resume:
        raise UserError("--resume and --overwrite exclude each other")
    try:
        summary = convert(opts, connect=lambda: init_ray(
            args.address, log_to_driver=False, logging_level=logging.ERROR))
    except USER_ERRORS as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    emit_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
