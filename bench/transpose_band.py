"""The writer's transposing copy (conversion/placement.py ``_copy``) at several band widths.

    .venv/bin/python bench/transpose_band.py [--repeats 7]

One stored t5x chunk of UL2 20B's widths (a [4096, 4096] fp32 attention kernel, 64 MiB) is
copied transposed into the writer's scratch slab, 512 rows at a time (``_write_box`` cuts a
box into slabs of at most 8 MiB: 512 rows of 4096 fp32), with ``_BAND`` set to each width in
turn; widths alternate within each repeat so that the machine's load favours none. Reports the
best and the median of the repeats, per width, and a plain (untransposed) copy. --format hf
transposes every kernel (torch's [out, in]); FT only the LM head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conversion import placement  # noqa: E402

WIDTHS = (32, 64, 128, 256)


def copy_chunk(src: np.ndarray, slab: np.ndarray) -> None:
    """Every 512-row slab of ``src`` through ``placement._copy``."""
    rows = slab.shape[0]
    for i in range(0, src.shape[0], rows):
        placement._copy(slab, src[i:i + rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    chunk = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    slab = np.empty((512, 4096), np.float32)
    seconds: dict[str, list[float]] = {}
    saved = placement._BAND
    try:
        for _ in range(args.repeats):
            for name, width, src in [("plain", saved, chunk)] + [
                    (f"band {w}", w, chunk.T) for w in WIDTHS]:
                placement._BAND = width
                t0 = time.perf_counter()
                copy_chunk(src, slab)
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
    finally:
        placement._BAND = saved
    result = {name: {"best_ms": round(min(v) * 1e3, 1),
                     "median_ms": round(statistics.median(v) * 1e3, 1),
                     "GB_per_s_best": round(chunk.nbytes / min(v) / 1e9, 2)}
              for name, v in seconds.items()}
    result["load"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
