"""python -m ray_jobs.evaluate: sharded XSum evaluation against Triton (interfaces.md).

Reads the data, sends it over a pool of Ray actors (Ray Data) holding Triton gRPC clients, and
writes OUT/predictions.jsonl (as results arrive), errors.jsonl, metrics.json and report.html.
"""

from __future__ import annotations

import argparse

from ray_jobs._cli import UserError, add_common_arguments, emit_summary, init_ray, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.evaluate",
        description="Evaluate a Triton-served T5 (FasterTransformer request contract) on XSum "
        "with ROUGE, over a pool of Ray actors. Greedy decoding (--top-k 1 --beam-width 1) "
        "gives the same predictions whatever --num-actors is. Generated ids are decoded as "
        "seqio does: ids the vocabulary has no piece for become unk, nothing after EOS counts.",
    )
    p.add_argument("--url", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="Triton gRPC endpoint(s), HOST:PORT[,HOST:PORT...]; requests are "
                   "spread over all of them and retried on another when one is down")
    p.add_argument("--model-name", required=True, metavar="NAME", help="the model's name in the repository")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="output folder or gs:// prefix: predictions.jsonl, errors.jsonl, "
                   "metrics.json, report.html")
    p.add_argument("--dataset", default="xsum", metavar="xsum|FILE",
                   help="'xsum' (EdinburghNLP/xsum from the Hugging Face hub) or a local / "
                   "gs:// FILE.jsonl|.json|.parquet|.tsv (tsv: document<TAB>summary lines) "
                   "(default: xsum)")
    p.add_argument("--split", default="test", help="hub split (default: test)")
    p.add_argument("--max-examples", type=int, default=None, metavar="K",
                   help="evaluate only the first K rows")
    p.add_argument("--vocab", default=None, metavar="SPIECE.model",
                   help="SentencePiece model (local or gs://) (default: "
                   "DST/<model-name>/spiece.model from --model-repository)")
    p.add_argument("--model-repository", default=None, metavar="DST",
                   help="the served model repository: its vocabulary (unless --vocab) and its "
                   "config.ini vocab_size, checked against the vocabulary before any request "
                   "(more pieces than logits is an error)")
    p.add_argument("--document-field", default="document", help="(default: document)")
    p.add_argument("--summary-field", default="summary", help="(default: summary)")
    p.add_argument("--input-template", default="summarize: {document}",
                   help="model input built from the document (default: 'summarize: {document}')")
    p.add_argument("--max-input-len", type=int, default=512,
                   help="input tokens, EOS included; longer documents are cut (default: 512)")
    p.add_argument("--max-output-len", type=int, default=64,
                   help="generated tokens at most (default: 64)")
    p.add_argument("--beam-width", type=int, default=1, help="(default: 1)")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy (default: 1)")
    p.add_argument("--num-actors", type=int, default=4,
                   help="Ray actors sending requests (default: 4)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per request (default: 8)")
    p.add_argument("--requests-per-actor", type=int, default=2,
                   help="requests each actor keeps in flight (default: 2)")
    p.add_argument("--random-seed", type=int, default=0,
                   help="random_seed sent with each request (matters for sampling only)")
    p.add_argument("--retry-timeout", type=float, default=180.0,
                   help="seconds a request keeps retrying transient errors (server down or "
                   "restarting) before its examples go to errors.jsonl (default: 180)")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT/predictions.jsonl's complete lines and send only the rest; "
                   "without it OUT's predictions are started afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evaluation.data import DataError
    from evaluation.outputs import ResumeError
    from evaluation.runner import EvalSettings, EvaluationError, evaluate
    from evaluation.tokenizer import VocabError

    settings = EvalSettings(
        url=args.url, model_name=args.model_name, output=args.output, dataset=args.dataset,
        split=args.split, max_examples=args.max_examples, vocab=args.vocab,
        model_repository=args.model_repository, document_field=args.document_field,
        summary_field=args.summary_field, input_template=args.input_template,
        max_input_len=args.max_input_len, max_output_len=args.max_output_len,
        beam_width=args.beam_width, top_k=args.top_k, num_actors=args.num_actors,
        batch_size=args.batch_size, requests_per_actor=args.requests_per_actor,
        random_seed=args.random_seed, retry_timeout_s=args.retry_timeout, resume=args.resume,
        progress=not args.no_progress,
    )
    try:
        result = evaluate(settings, init_ray=lambda: init_ray(args.address, log_to_driver=False))
    except (DataError, VocabError, ResumeError, EvaluationError) as exc:
        raise UserError(str(exc)) from exc
    paths = ("output", "predictions", "report")
    emit_summary({"metrics": {k: v for k, v in result.items() if k not in paths},
                  "examples": result["examples"], "failed": result["failed"],
                  **{k: result[k] for k in paths}}, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
