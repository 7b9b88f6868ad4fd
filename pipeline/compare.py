"""One table comparing the runs of a pipeline: ROUGE with its bootstrap bounds, throughput.

Written beside the per-run outputs as ``comparison.md`` (for people) and ``comparison.json``
(for scripts). Every run was evaluated against the same data with its own model / decoding
settings; the table says which settings differ so a reader sees what is being compared.
"""

from __future__ import annotations

import json
from typing import Any

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Settings worth a column when they differ between runs.
_SETTING_KEYS = (
    ("convert", "src"), ("convert", "tensor_parallel"), ("convert", "weight_dtype"),
    ("convert", "inference_dtype"), ("convert", "engine"), ("serve", "model_name"),
    ("serve", "replicas"), ("evaluate", "beam_width"), ("evaluate", "top_k"),
    ("evaluate", "max_input_len"), ("evaluate", "max_output_len"),
    ("evaluate", "input_template"),
)


def _differing(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = []
    for stage, key in _SETTING_KEYS:
        values = {json.dumps((r["settings"].get(stage) or {}).get(key), default=str)
                  for r in rows}
        if len(values) > 1:
            keys.append((stage, key))
    return keys


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """rows: ``{"run", "output", "settings": {stage: flags}, "metrics": metrics.json}``.

    Returns the comparison as JSON: the differing settings and, per run, ROUGE low/mid/high,
    examples, failed, examples/s and p50 latency.
    """
    differing = _differing(rows)
    out_rows = []
    for r in rows:
        m = r["metrics"] or {}
        out_rows.append({
            "run": r["run"],
            "output": r["output"],
            "settings": {f"{s}.{k}": (r["settings"].get(s) or {}).get(k) for s, k in differing},
            **{t: m.get(t) for t in ROUGE},
            "examples": m.get("examples"),
            "failed": m.get("failed"),
            "examples_per_second": m.get("examples_per_second"),
            "latency_ms_p50": (m.get("latency_ms") or {}).get("p50"),
        })
    return {"differing_settings": [f"{s}.{k}" for s, k in differing], "runs": out_rows}


def _bounds(score: dict[str, float] | None) -> str:
    if not score:
        return "-"
    return f"{score['mid']:.4f} [{score['low']:.4f}, {score['high']:.4f}]"


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown table: mid F-measure with [low, high] bootstrap bounds."""
    settings = comparison["differing_settings"]
    head = ["run", *settings, "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "examples",
            "failed", "examples/s", "p50 ms"]
    lines = [
        "# Evaluation comparison",
        "",
        "F-measures: mid [low, high] from rouge-score's bootstrap (95% interval).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in comparison["runs"]:
        eps = r["examples_per_second"]
        p50 = r["latency_ms_p50"]
        cells = [r["run"], *(str(r["settings"][s]) for s in settings),
                 *(_bounds(r[t]) for t in ROUGE), str(r["examples"]), str(r["failed"]),
                 "-" if eps is None else f"{eps:.2f}", "-" if p50 is None else f"{p50:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
