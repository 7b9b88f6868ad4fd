"""EvalOptions: everything ``ray_jobs.evaluate``'s flags set (interfaces.md), plus retry knobs.

The knobs marked ``cli: False`` (max_attempts, ready_timeout_s, actor_num_cpus) are for library
callers and tests; they are neither flags nor pipeline keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from core.options import StageOptions
from evaluation.data import DEFAULT_TEMPLATE

_LIBRARY_ONLY = {"cli": False}


class EvalOptions(StageOptions):
    """Everything ``ray_jobs.evaluate``'s flags set (interfaces.md), plus retry knobs."""

    url: str | Sequence[str] = Field(
        json_schema_extra={"metavar": "HOST:PORT[,HOST:PORT...]"},
        description="Triton gRPC endpoint(s), HOST:PORT[,HOST:PORT...]; requests are "
        "spread over all of them and retried on another when one is down")
    model_name: str = Field(json_schema_extra={"metavar": "NAME"},
                            description="the model's name in the repository")
    output: str = Field(
        json_schema_extra={"metavar": "OUT"},
        description="output folder or gs:// prefix: predictions.jsonl, errors.jsonl, "
        "metrics.json, report.html")
    dataset: str = Field(
        "xsum", json_schema_extra={"metavar": "xsum|FILE"},
        description="'xsum' (EdinburghNLP/xsum from the Hugging Face hub) or a local / "
        "gs:// FILE.jsonl|.json|.parquet|.tsv (tsv: document<TAB>summary lines) "
        "(default: xsum)")
    split: str = Field("test", description="hub split (default: test)")
    max_examples: int | None = Field(None, json_schema_extra={"metavar": "K"},
                                     description="evaluate only the first K rows")
    vocab: str | None = Field(
        None, json_schema_extra={"metavar": "SPIECE.model"},
        description="SentencePiece model (local or gs://) (default: "
        "DST/<model-name>/spiece.model from --model-repository)")
    model_repository: str | None = Field(
        None, json_schema_extra={"metavar": "DST"},
        description="the served model repository: its vocabulary (unless --vocab) and its "
        "config.ini vocab_size, checked against the vocabulary before any request "
        "(more pieces than logits is an error)")
    document_field: str = Field("document", description="(default: document)")
    summary_field: str = Field("summary", description="(default: summary)")
    input_template: str = Field(
        DEFAULT_TEMPLATE,
        description="model input built from the document (default: 'summarize: {document}')")
    max_input_len: int = Field(
        512, description="input tokens, EOS included; longer documents are cut (default: 512)")
    max_output_len: int = Field(64, description="generated tokens at most (default: 64)")
    beam_width: int = Field(1, description="(default: 1)")
    top_k: int = Field(1, description="1 = greedy (default: 1)")
    num_actors: int = Field(4, description="Ray actors sending requests (default: 4)")
    batch_size: int = Field(8, description="examples per request (default: 8)")
    requests_per_actor: int = Field(
        2, description="requests each actor keeps in flight (default: 2)")
    random_seed: int = Field(
        0, description="random_seed sent with each request (matters for sampling only)")
    retry_timeout_s: float = Field(
        180.0, json_schema_extra={"flag": "--retry-timeout"},
        description="seconds a request keeps retrying transient errors (server down or "
        "restarting) before its examples go to errors.jsonl (default: 180)")
    resume: bool = Field(
        False, description="keep OUT/predictions.jsonl's complete lines and send only the rest; "
        "without it OUT's predictions are started afresh")
    progress: bool = Field(True, description="no progress bar on stderr",
                           json_schema_extra={"flag": "--no-progress"})
    max_attempts: int = Field(10, json_schema_extra=_LIBRARY_ONLY,
                              description="tries per request, the first included")
    ready_timeout_s: float = Field(60.0, json_schema_extra=_LIBRARY_ONLY,
                                   description="seconds to wait for the servers to be ready")
    actor_num_cpus: float = Field(0.25, json_schema_extra=_LIBRARY_ONLY,
                                  description="Ray CPUs each request-sending actor reserves")

    def validate(self) -> list[str]:
        """Check the settings; returns the parsed endpoint list ("host:port" strings).

        Raises evaluation.runner.EvaluationError naming the flag at fault.
        """
        # Imported here: runner imports this module.
        from evaluation.client import parse_urls
        from evaluation.runner import EvaluationError

        try:
            urls = parse_urls(self.url)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from exc
        for name in ("max_input_len", "max_output_len", "beam_width", "top_k", "num_actors",
                     "batch_size", "requests_per_actor", "max_attempts"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise EvaluationError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not self.model_name:
            raise EvaluationError("--model-name is empty")
        return urls


EvalSettings = EvalOptions
