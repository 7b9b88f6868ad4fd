"""Teach the demo model to reproduce the bundled XSum summaries.

Teacher-forced cross-entropy with Adam, full batch, deterministic (fixed PRNG key, fixed data
order, CPU). The goal is memorisation: after training, greedy decoding of each document must
give back its reference summary, so that a served copy of the model scores near ROUGE 1.0 and
any mistake in conversion or serving shows up as a collapsed score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core.t5config import T5Config
from demo import model as m
from demo.vocab import EOS_ID


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and data settings.

    Attributes:
      steps: full-batch Adam steps.
      learning_rate: peak rate, reached after ``warmup`` steps, then decayed linearly to a
        tenth of it at the last step (the decay lets memorisation settle on every token).
      seed: PRNG seed for the initial parameters.
      max_input_len: encoder length S; documents are truncated to it the way evaluation does.
      max_target_len: decoder length T, >= the longest summary + EOS.
      input_template: how a document becomes the model's input text.
    """

    steps: int = 300
    learning_rate: float = 3e-3
    warmup: int = 20
    seed: int = 0
    max_input_len: int = 128
    max_target_len: int = 64
    input_template: str = "summarize: {document}"


def input_variants(ids: Sequence[int], max_len: int) -> list[list[int]]:
    """The encoder inputs a client may send for one document's ids.

    Clients differ in whether they append EOS and whether they truncate before or after
    appending it; training on each variant makes the demo model indifferent to that choice.
    """
    ids = list(ids)
    variants = [ids[: max_len - 1] + [EOS_ID], ids[:max_len]]
    unique: list[list[int]] = []
    for v in variants:
        if v not in unique:
            unique.append(v)
    return unique


def make_examples(encode: Callable[[str], list[int]], rows: Sequence[dict],
                  cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, S], targets [N, T]) int32, 0-padded; targets end with EOS.

    ``rows`` hold ``document`` and ``summary``; N >= len(rows) (one row per input variant).
    """
    inputs, targets = [], []
    for row in rows:
        target = encode(row["summary"]) + [EOS_ID]
        if len(target) > cfg.max_target_len:
            raise ValueError(
                f"summary of {len(target)} tokens exceeds max_target_len {cfg.max_target_len}"
            )
        doc_ids = encode(cfg.input_template.format(document=row["document"]))
        for variant in input_variants(doc_ids, cfg.max_input_len):
            inputs.append(variant + [0] * (cfg.max_input_len - len(variant)))
            targets.append(target + [0] * (cfg.max_target_len - len(target)))
    return np.asarray(inputs, np.int32), np.asarray(targets, np.int32)


def loss_fn(params: m.Params, inputs: jax.Array, targets: jax.Array,
            cfg: T5Config) -> jax.Array:
    """Mean token cross-entropy over non-padding target positions."""
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # shift right, start id 0
    logits = m.forward(params, inputs, decoder_inputs, cfg)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = (targets > 0).astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.sum(weights)


def train(model_cfg: T5Config, train_cfg: TrainConfig, inputs: np.ndarray,
          targets: np.ndarray,
          progress: Callable[[int, float], None] | None = None) -> tuple[m.Params, float]:
    """Adam on the full batch. Returns (params, last loss). progress(step, loss) every 50."""
    params = m.init_params(model_cfg, jax.random.PRNGKey(train_cfg.seed))
    b1, b2, eps = 0.9, 0.98, 1e-9
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = (params, zeros, zeros)
    x, y = jnp.asarray(inputs), jnp.asarray(targets)

    # The data are arguments, not closed-over constants: XLA would otherwise spend minutes
    # constant-folding the one-hot cross-entropy of the whole batch at compile time.
    @jax.jit
    def step(state, t, x, y):
        params, mu, nu = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, model_cfg)
        warm = jnp.minimum(1.0, (t + 1) / train_cfg.warmup)
        decay = 1.0 - 0.9 * t / max(train_cfg.steps - 1, 1)
        lr = train_cfg.learning_rate * warm * decay
        mu = jax.tree_util.tree_map(lambda a, g: b1 * a + (1 - b1) * g, mu, grads)
        nu = jax.tree_util.tree_map(lambda a, g: b2 * a + (1 - b2) * g * g, nu, grads)
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        params = jax.tree_util.tree_map(
            lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + eps), params, mu, nu)
        return (params, mu, nu), loss

    loss = float("nan")
    for t in range(train_cfg.steps):
        state, loss_arr = step(state, jnp.float32(t), x, y)
        if progress and (t % 50 == 0 or t == train_cfg.steps - 1):
            loss = float(loss_arr)
            progress(t, loss)
    loss = float(loss_arr)
    return state[0], loss
