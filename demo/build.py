"""Build (or load from cache) the demo's model: vocabulary, trained weights, T5X checkpoint.

Everything is derived deterministically from the bundled XSum sample and the settings below,
so the cache key is a hash of the settings, the sample and the code that builds the model.
The cache folder (``.demo-cache/<key>/`` in the repository, or ``$T5FT_DEMO_CACHE/<key>/``)
holds::

    spiece.model                       the SentencePiece vocabulary (T5 ids)
    t5x/config.gin                     the architecture, as t5x's gin macros
    t5x/checkpoint_<steps>/            a real T5X checkpoint (legacy msgpack + zarr)
    build.json                         settings, training loss, greedy self-check, timings

A folder is published (renamed into place) only once complete, so a crash mid-build leaves no
half cache behind and concurrent builders (two tests) just race to the same result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from core.t5config import T5Config

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "data" / "xsum_sample.jsonl"
# Code whose change changes the model: part of the cache key.
# (This file's own steps are covered by hashing their outputs' inputs: settings and gin text.)
_CODE = ("model.py", "train.py", "vocab.py", "t5x_writer.py")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo model is built from: a model of demo.model.MODELS (its sizes, a
    core.t5config.T5Config; the default is UL2's architecture at toy size) and training."""

    model: str = "ul2-demo"
    steps: int = 300
    learning_rate: float = 3e-3
    seed: int = 0
    max_input_len: int = 128
    max_output_len: int = 64
    input_template: str = "summarize: {document}"


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """Paths of a built demo model."""

    root: Path
    checkpoint_dir: Path  # the t5x model dir (holds config.gin and checkpoint_<step>)
    checkpoint: Path  # checkpoint_<step>
    gin: Path
    vocab: Path
    settings: DemoSettings
    info: dict


def cache_root() -> Path:
    """Where built models are cached: $T5FT_DEMO_CACHE, else .demo-cache/ in the repository."""
    return Path(os.environ.get("T5FT_DEMO_CACHE") or REPO_ROOT / ".demo-cache")


def load_rows(path: Path = SAMPLE) -> list[dict]:
    """The sample's rows (each with 'document' and 'summary'); ValueError names a bad row."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not row.get("document") or not row.get("summary"):
                    raise ValueError(f"{path}:{n}: a row needs 'document' and 'summary'")
                rows.append(row)
    return rows


def model_config(settings: DemoSettings) -> T5Config:
    """The T5Config that ``settings.model`` names (demo.model.MODELS)."""
    from demo.model import MODELS

    try:
        return MODELS[settings.model]
    except KeyError:
        raise ValueError(f"no demo model {settings.model!r} (known: {sorted(MODELS)})") from None


def cache_key(settings: DemoSettings, sample: Path = SAMPLE) -> str:
    """What the built model depends on, hashed: settings, model sizes, sample, gin, code."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    h.update(json.dumps(dataclasses.asdict(model_config(settings)), sort_keys=True).encode())
    h.update(sample.read_bytes())
    h.update(gin_text(settings).encode())
    for name in _CODE:
        path = Path(__file__).resolve().parent / name
        h.update(name.encode() + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()[:16]


def gin_text(s: DemoSettings) -> str:
    """t5x-style gin bindings for the demo network (what the converter reads), with the
    sequence lengths it was trained on as t5x's run configs give them (TASK_FEATURE_LENGTHS),
    which convert records and evaluate warns against."""
    from demo.t5x_writer import gin_config

    lengths = {"inputs": s.max_input_len, "targets": s.max_output_len}
    return gin_config(model_config(s)) + f"TASK_FEATURE_LENGTHS = {lengths!r}\n"


# By name, not __name__: ``python -m demo.build`` runs this module as __main__, a logger
# that the entry point's configuration (core.cli.configure_logging) would not show at INFO.
LOG = logging.getLogger("demo.build")


def _log(message: str) -> None:
    """One progress line on stderr (through the entry point's logging), as ``[demo] ...``."""
    LOG.info("[demo] %s", message)


def _open(root: Path, settings: DemoSettings) -> DemoModel | None:
    try:
        info = json.loads((root / "build.json").read_text())
        ckpt = root / "t5x" / f"checkpoint_{settings.steps}"
        if not (ckpt / "checkpoint").is_file() or not (root / "spiece.model").is_file():
            return None
    except (OSError, ValueError):
        return None
    return DemoModel(root, root / "t5x", ckpt, root / "t5x" / "config.gin",
                     root / "spiece.model", settings, info)


def build(settings: DemoSettings | None = None, cache: Path | None = None) -> DemoModel:
    """The demo model for ``settings``: loaded from the cache, else built and cached.

    Building trains the vocabulary, trains the network (about a minute on 2 cores), checks by
    greedy decoding that it reproduces every reference summary, and writes the checkpoint.
    """
    settings = settings or DemoSettings()
    key = cache_key(settings)
    root = (cache or cache_root()) / key
    found = _open(root, settings)
    if found is not None:
        _log(f"model from cache {root}")
        return found

    from demo import model as m
    from demo import train as tr
    from demo.t5x_writer import write_t5x_checkpoint
    from demo.vocab import load, train_sentencepiece

    start = time.monotonic()
    tmp = root.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        rows = load_rows()
        texts = [settings.input_template.format(document=r["document"]) for r in rows]
        texts += [r["summary"] for r in rows]
        model_cfg = model_config(settings)
        _log(f"training a {model_cfg.vocab_size}-piece SentencePiece vocabulary on the sample")
        sp = load(train_sentencepiece(texts, tmp / "spiece.model", model_cfg.vocab_size))

        train_cfg = tr.TrainConfig(
            steps=settings.steps, learning_rate=settings.learning_rate, seed=settings.seed,
            max_input_len=settings.max_input_len, max_target_len=settings.max_output_len,
            input_template=settings.input_template)
        inputs, targets = tr.make_examples(sp.encode, rows, train_cfg)
        _log(f"training the model ({settings.steps} steps on {len(inputs)} sequences)")
        params, loss = tr.train(
            model_cfg, train_cfg, inputs, targets,
            progress=lambda step, loss: _log(f"  step {step:4d}/{settings.steps} loss {loss:.4f}"))

        decoded = m.greedy_decode(params, inputs, settings.max_output_len, model_cfg)
        exact = sum(
            out == [t for t in ref if t > 1] for out, ref in zip(decoded, targets.tolist(),
                                                                 strict=True))
        _log(f"greedy self-check: {exact}/{len(decoded)} summaries reproduced exactly")

        gin = gin_text(settings)
        write_t5x_checkpoint(tmp / "t5x", m.flatten(params), step=settings.steps,
                             dtype="float32", layout="legacy", gin=gin)
        info = {
            "key": key,
            "settings": dataclasses.asdict(settings),
            "final_loss": loss,
            "greedy_exact": exact,
            "greedy_total": len(decoded),
            "build_seconds": round(time.monotonic() - start, 1),
        }
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        try:
            tmp.rename(root)
        except OSError:
            # Another builder published first: theirs is identical by construction.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    found = _open(root, settings)
    if found is None:
        raise RuntimeError(f"demo model cache {root} is incomplete after building it")
    _log(f"model built in {time.monotonic() - start:.0f}s and cached at {root}")
    return found


def from_json(obj: dict) -> DemoModel:
    """The :class:`DemoModel` that ``python -m demo.build`` printed."""
    return DemoModel(Path(obj["root"]), Path(obj["checkpoint_dir"]), Path(obj["checkpoint"]),
                     Path(obj["gin"]), Path(obj["vocab"]), DemoSettings(**obj["settings"]),
                     obj["info"])


def to_json(model: DemoModel) -> dict:
    """The model's paths and settings as JSON (what ``python -m demo.build`` prints)."""
    return {"root": str(model.root), "checkpoint_dir": str(model.checkpoint_dir),
            "checkpoint": str(model.checkpoint), "gin": str(model.gin),
            "vocab": str(model.vocab), "settings": dataclasses.asdict(model.settings),
            "info": model.info}


if __name__ == "__main__":
    # A process of its own: JAX's threads and memory end with it, before the pipeline runs
    # its stages. Progress on stderr; the last stdout line is the model's paths as JSON.
    from core.cli import configure_logging

    configure_logging()
    print(json.dumps(to_json(build())), flush=True)
