"""report.html: the metrics, ROUGE distributions and the latency histogram in one file.

Plots are matplotlib (Agg) PNGs embedded as base64, so the report is a single self-contained
file that can sit in a bucket and open anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def rouge_histograms(per_example: Mapping[str, Sequence[float]]) -> str:
    """One histogram of per-example F-measures per ROUGE type; base64 PNG."""
    fig, axes = plt.subplots(1, len(ROUGE_TYPES), figsize=(4 * len(ROUGE_TYPES), 3), sharey=True)
    for ax, name in zip(axes, ROUGE_TYPES, strict=True):
        values = list(per_example.get(name, []))
        ax.hist(values, bins=20, range=(0.0, 1.0), color="#4C72B0")
        ax.set_title(f"{name} F (n={len(values)})")
        ax.set_xlabel("F-measure")
    axes[0].set_ylabel("examples")
    return _png(fig)


def latency_histogram(latencies_ms: Sequence[float]) -> str:
    """Histogram of request latency (ms) with p50/p90/p99 marked; base64 PNG."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3))
    if len(latencies_ms):
        ax.hist(latencies_ms, bins=30, color="#55A868")
        for q, style in ((50, "-"), (90, "--"), (99, ":")):
            v = float(np.percentile(latencies_ms, q))
            ax.axvline(v, color="black", linestyle=style, label=f"p{q} {v:.0f} ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no request in this run", ha="center", va="center")
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("examples")
    return _png(fig)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(
    metrics: Mapping[str, Any],
    *,
    per_example: Mapping[str, Sequence[float]],
    latencies_ms: Sequence[float],
    samples: Sequence[Mapping[str, Any]] = (),
    errors: Sequence[Mapping[str, Any]] = (),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML string."""
    rouge_rows = [
        [t, *(f"{metrics[t][k]:.4f}" for k in ("low", "mid", "high"))] for t in ROUGE_TYPES
    ]
    lat = metrics.get("latency_ms", {})
    run_rows = [
        ["examples", metrics.get("examples")],
        ["failed", metrics.get("failed")],
        ["kept from an earlier run", metrics.get("resumed", 0)],
        ["seconds", metrics.get("seconds")],
        ["examples per second", metrics.get("examples_per_second")],
        ["latency p50 / p90 / p99 (ms)",
         " / ".join(f"{lat.get(k, 0):.1f}" for k in ("p50", "p90", "p99"))],
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>XSum evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
        "vertical-align:top}</style></head><body>",
        "<h1>XSum evaluation</h1>",
    ]
    if settings:
        parts.append(_table([[k, v] for k, v in settings.items()], ["setting", "value"]))
    parts += [
        "<h2>ROUGE (F-measure, bootstrap 95% interval)</h2>",
        _table(rouge_rows, ["metric", "low", "mid", "high"]),
        "<h2>Run</h2>",
        _table(run_rows, ["", ""]),
        "<h2>Per-example ROUGE</h2>",
        f"<img alt='ROUGE distributions' src='data:image/png;base64,{rouge_histograms(per_example)}'>",
        "<h2>Latency</h2>",
        f"<img alt='latency histogram' src='data:image/png;base64,{latency_histogram(latencies_ms)}'>",
    ]
    if samples:
        parts += [
            "<h2>First examples</h2>",
            _table([[s["id"], s["prediction"], s["reference"], f"{s['rougeL']:.3f}"]
                    for s in samples], ["id", "prediction", "reference", "rougeL"]),
        ]
    if errors:
        parts += [
            "<h2>Failures (first 20)</h2>",
            _table([[e["id"], e["reason"]] for e in errors], ["id", "reason"]),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)
