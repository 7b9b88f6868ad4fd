"""EvalOptions: everything ``ray_jobs.evaluate``'s flags set (interfaces.md), plus retry knobs.

The knobs marked ``cli: False`` (max_attempts, ready_timeout_s, actor_num_cpus) are for library
callers and tests; they are neither flags nor pipeline keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import pydantic

from core.options import StageOptions, option
from evaluation.data import DEFAULT_TEMPLATE


class EvalOptions(StageOptions):
    """Everything ``ray_jobs.evaluate``'s flags set (interfaces.md), plus retry knobs."""

    # The --help description of python -m ray_jobs.evaluate.
    COMMAND_HELP: ClassVar[str] = (
        "Evaluate a Triton-served T5 (FasterTransformer request contract) on XSum "
        "with ROUGE, over a pool of Ray actors (or, with --backend in-process, the "
        "repository's JAX engine inside the actors, no server). Greedy decoding (--top-k 1 --beam-width 1) "
        "gives the same predictions whatever --num-actors is. Generated ids are decoded as "
        "seqio does: ids the vocabulary has no piece for become unk, nothing after EOS counts."
    )

    url: str | Sequence[str] | None = option(
        None, metavar="HOST:PORT[,HOST:PORT...]",
        help="Triton gRPC endpoint(s), HOST:PORT[,HOST:PORT...]; requests are "
        "spread over all of them and retried on another when one is down "
        "(required with --backend triton, unused with --backend in-process)")
    backend: Literal["triton", "in-process"] = option(
        "triton",
        help="who answers the requests: 'triton' sends them to --url; 'in-process' loads "
        "the --model-repository's JAX engine (--engine jax conversions) into the Ray actors "
        "themselves, no server; the same requests, predictions and outputs (default: triton)")
    num_gpus_per_actor: float | None = option(
        None, metavar="G",
        help="GPUs each in-process actor reserves (default: 1 when Ray has GPUs, else 0)")
    model_name: str = option(metavar="NAME",
                            help="the model's name in the repository")
    output: str = option(
        metavar="OUT",
        help="output folder or gs:// prefix: predictions.jsonl, errors.jsonl, "
        "metrics.json, report.html")
    dataset: str = option(
        "xsum", metavar="xsum|FILE",
        help="'xsum' (EdinburghNLP/xsum from the Hugging Face hub) or a local / "
        "gs:// FILE.jsonl|.json|.parquet|.tsv (tsv: document<TAB>summary lines) "
        "(default: xsum)")
    split: str = option("test", help="hub split (default: test)")
    max_examples: int | None = option(None, metavar="K",
                                     help="evaluate only the first K rows")
    vocab: str | None = option(
        None, metavar="SPIECE.model",
        help="SentencePiece model (local or gs://) (default: "
        "DST/<model-name>/spiece.model from --model-repository)")
    model_repository: str | None = option(
        None, metavar="DST",
        help="the served model repository: its vocabulary (unless --vocab) and its "
        "config.ini vocab_size, checked against the vocabulary before any request "
        "(more pieces than logits is an error); with --backend in-process, the local "
        "repository whose engine answers")
    document_field: str = option("document", help="(default: document)")
    summary_field: str = option("summary", help="(default: summary)")
    input_template: str = option(
        DEFAULT_TEMPLATE,
        help="model input built from the document (default: 'summarize: {document}')")
    max_input_len: int = option(
        512, help="input tokens, EOS included; longer documents are cut (default: 512)")
    max_output_len: int = option(64, help="generated tokens at most (default: 64)")
    beam_width: int = option(1, help="(default: 1)")
    top_k: int = option(1, help="1 = greedy (default: 1)")
    num_actors: int = option(4, help="Ray actors sending requests (default: 4)")
    batch_size: int | None = option(
        None, help="examples per request (default: the served model's max_batch_size when it "
        "decodes batch-invariantly, 128 for a jax model: one engine program on a GPU, where "
        "fewer rows cost as much; else 8)")
    requests_per_actor: int = option(
        2, help="requests each actor keeps in flight (default: 2)")
    random_seed: int = option(
        0, help="random_seed sent with each request (matters for sampling only)")
    retry_timeout_s: float = option(
        180.0, flag="--retry-timeout",
        help="seconds a request keeps retrying transient errors (server down or "
        "restarting) before its examples go to errors.jsonl (default: 180)")
    resume: bool = option(
        False, help="keep OUT/predictions.jsonl's complete lines and send only the rest; "
        "without it OUT's predictions are started afresh")
    progress: bool = option(True, help="no progress bar on stderr",
                           flag="--no-progress")
    max_attempts: int = option(10, cli=False,
                              help="tries per request, the first included")
    ready_timeout_s: float = option(60.0, cli=False,
                                   help="seconds to wait for the servers to be ready")
    actor_num_cpus: float = option(0.25, cli=False,
                                  help="Ray CPUs each request-sending actor reserves")

    def checked_urls(self) -> list[str]:
        """Check the settings; returns the parsed endpoint list ("host:port" strings; empty
        with ``--backend in-process``).

        Raises evaluation.errors.EvaluationError naming the flag at fault.
        """
        # Imported here: evaluation.client loads tritonclient, which building options does not need.
        from core.gcs_env import is_gcs
        from evaluation.client import parse_urls
        from evaluation.errors import EvaluationError

        urls: list[str] = []
        if self.backend == "in-process":
            if not self.model_repository:
                raise EvaluationError("--backend in-process needs --model-repository DST (the "
                                      "converted repository whose engine it runs)")
            if is_gcs(self.model_repository):
                # the engine reads its weights folder from local files (serving/engine/weights.py)
                raise EvaluationError(
                    f"--backend in-process reads a local --model-repository, got "
                    f"{self.model_repository} (copy it down first: gcloud storage cp -r "
                    f"{self.model_repository} DIR)")
        elif self.url is None:
            raise EvaluationError("--url HOST:PORT is required with --backend triton (or give "
                                  "--backend in-process --model-repository DST)")
        else:
            try:
                urls = parse_urls(self.url)
            except ValueError as exc:
                raise EvaluationError(str(exc)) from exc
        return urls

    @pydantic.model_validator(mode="after")
    def _check(self) -> EvalOptions:
        """What no evaluation could run with, refused the same way on every path (the
        endpoints, known only once servers run, are :meth:`checked_urls`')."""
        from evaluation.errors import EvaluationError

        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise EvaluationError(
                f"--num-gpus-per-actor must be >= 0, got {self.num_gpus_per_actor}")
        for name in ("max_input_len", "max_output_len", "beam_width", "top_k", "num_actors",
                     "batch_size", "requests_per_actor", "max_attempts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise EvaluationError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not self.model_name:
            raise EvaluationError("--model-name is empty")
        return self


EvalSettings = EvalOptions
