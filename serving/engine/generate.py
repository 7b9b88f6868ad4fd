"""Decoding loops: greedy / top-k / top-p sampling, and beam search, each one lax.while_loop.

All functions here are pure and traced under jax.jit with static shapes by engine.py. Per-row
settings arrive as arrays [B], so rows with different temperatures, seeds or output lengths
share one compiled program. Conventions (FT's, ft-t5-format.md section 4):

- output tokens exclude the start token; after a row ends, its tokens are end_id;
- sequence_length counts generated tokens including the end token (FT's sampling kernels add
  one for the step that produces end_id, then stop counting);
- a row also stops after its own max_output_len tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from core.t5config import T5Config
from serving.engine import model

NEG = -1e30  # "impossible" score, finite so that arithmetic on it stays defined


class Rows(NamedTuple):
    """Per-row request arrays, all [B] (beam search: [B], one entry per request row)."""

    ids: jax.Array          # [B, S] int32 encoder input, padded
    lengths: jax.Array      # int32 real input lengths
    start: jax.Array        # int32
    end: jax.Array          # int32
    max_len: jax.Array      # int32 max output tokens of the row
    top_k: jax.Array        # int32 (0 = no top-k)
    top_p: jax.Array        # fp32 (0 = no top-p)
    temperature: jax.Array  # fp32
    repetition_penalty: jax.Array  # fp32 (1 = none)
    len_penalty: jax.Array  # fp32, beam search only
    seed_lo: jax.Array      # uint32 low and high halves of the uint64 random seed
    seed_hi: jax.Array


class Output(NamedTuple):
    """Decoded hypotheses (B rows, W beams or 1, N output tokens), best first."""

    tokens: jax.Array       # [B, W, N] int32
    seq_len: jax.Array      # [B, W] int32
    cum_log_probs: jax.Array    # [B, W] fp32
    output_log_probs: jax.Array  # [B, W, N] fp32


def adjust_logits(logits: jax.Array, seen: jax.Array, temperature: jax.Array,
                  repetition_penalty: jax.Array) -> jax.Array:
    """Temperature then repetition penalty, as FT's sampling penalty kernels.

    logits [R, V] fp32, seen [R, V] bool (tokens already in the output, start token included),
    temperature / repetition_penalty [R].
    """
    logits = logits / temperature[:, None]
    pen = repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / pen, logits * pen)
    return jnp.where(seen, penalised, logits)


def _row_keys(seed_lo: jax.Array, seed_hi: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row from its own seed and the step: a row's sample is independent of
    which other rows share its batch."""
    def one(lo: jax.Array, hi: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(lo), hi)
        return jax.random.fold_in(key, step)
    return jax.vmap(one)(seed_lo, seed_hi)


def sample_tokens(logits: jax.Array, keys: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Top-k then top-p (nucleus, over the renormalised top-k) sampling, per row.

    logits [R, V] fp32, keys [R] (typed PRNG keys), top_k [R] int32 (0 = all), top_p [R] (0 = off).
    Rows with top_k == 1, or top_k == 0 and top_p == 0, take the argmax (FT's greedy).
    """
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(top_k > 0, top_k, v)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= jnp.where(top_p[:, None] > 0, mass_before < top_p[:, None], True)
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    greedy = (top_k == 1) | ((top_k == 0) & (top_p <= 0))
    return jnp.where(greedy, order[:, 0], sampled).astype(jnp.int32)


def _mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


class Cross(NamedTuple):
    """The encoder's side of every decoder step (R rows: B, or B*W for beam search)."""

    k: list[jax.Array]  # per decoder layer [R, H, S, K]
    v: list[jax.Array]
    bias: jax.Array     # [R, 1, 1, S] additive key mask


def encode_cross(cfg: T5Config, params: dict, ids: jax.Array, lengths: jax.Array) -> Cross:
    """Encode once: ids [B, S] (padded), lengths [B] -> the cross-attention keys, values and
    mask every decoder step reads."""
    enc = model.encode(cfg, params, ids, lengths)
    k, v = model.cross_kv(params, enc)
    return Cross(k, v, model.key_mask(lengths, ids.shape[1]))


def _init_cache(cfg: T5Config, rows: int, cache_len: int, dtype: jnp.dtype
                ) -> tuple[list[jax.Array], list[jax.Array]]:
    """Self-attention key and value caches: per decoder layer, zeros [rows, H, M, K]."""
    shape = (rows, cfg.num_heads, cache_len, cfg.d_kv)
    n = cfg.num_decoder_layers
    return [jnp.zeros(shape, dtype) for _ in range(n)], [jnp.zeros(shape, dtype) for _ in range(n)]


def generate_sampling(cfg: T5Config, params: dict, r: Rows, cross: Cross, out_len: int,
                      sample: bool) -> Output:
    """Greedy (sample=False) or per-row sampling over the encoded rows ``cross``
    (encode_cross of r.ids). Returns Output with W = 1, N = out_len.

    The encoder runs in its own program (engine.py): its outputs then reach this loop as
    2 x L separate arguments instead of one share of the loop program's single temporary
    allocation, which at 256 rows of 512 tokens (UL2 20B: 64 GiB of keys and values) could
    not be placed beside the weights.
    """
    b = r.ids.shape[0]
    v = cfg.vocab_size
    cache_k, cache_v = _init_cache(cfg, b, out_len, cross.k[0].dtype)

    class State(NamedTuple):
        step: jax.Array
        last: jax.Array
        done: jax.Array
        seq_len: jax.Array
        tokens: jax.Array
        cum: jax.Array
        lps: jax.Array
        seen: jax.Array
        cache_k: list[jax.Array]
        cache_v: list[jax.Array]

    init = State(
        step=jnp.int32(0), last=r.start, done=r.max_len <= 0,
        seq_len=jnp.zeros(b, jnp.int32),
        tokens=jnp.broadcast_to(r.end[:, None], (b, out_len)).astype(jnp.int32),
        cum=jnp.zeros(b, jnp.float32), lps=jnp.zeros((b, out_len), jnp.float32),
        seen=_mark_seen(jnp.zeros((b, v), bool), r.start),
        cache_k=cache_k, cache_v=cache_v)

    def cond(s: State) -> jax.Array:
        return (s.step < out_len) & ~jnp.all(s.done)

    def body(s: State) -> State:
        logits, ck, cv = model.decode_step(cfg, params, s.last, s.step, s.cache_k, s.cache_v,
                                           cross.k, cross.v, cross.bias)
        logits = adjust_logits(logits, s.seen, r.temperature, r.repetition_penalty)
        logp = jax.nn.log_softmax(logits, axis=-1)
        if sample:
            tok = sample_tokens(logits, _row_keys(r.seed_lo, r.seed_hi, s.step), r.top_k, r.top_p)
        else:
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(s.done, r.end, tok)
        lp = jnp.where(s.done, 0.0, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0])
        live = ~s.done
        return State(
            step=s.step + 1, last=tok,
            done=s.done | (tok == r.end) | (s.step + 1 >= r.max_len),
            seq_len=s.seq_len + live.astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, axis=1),
            cum=s.cum + lp,
            lps=jax.lax.dynamic_update_slice_in_dim(s.lps, lp[:, None], s.step, axis=1),
            seen=_mark_seen(s.seen, tok), cache_k=ck, cache_v=cv)

    s = jax.lax.while_loop(cond, body, init)
    return Output(s.tokens[:, None], s.seq_len[:, None], s.cum[:, None], s.lps[:, None])


def _length_score(cum: jax.Array, length: jax.Array, len_penalty: jax.Array) -> jax.Array:
    """FT's beam score: cum_log_prob / length ** len_penalty (len_penalty 0: no effect)."""
    return cum / jnp.power(jnp.maximum(length, 1).astype(jnp.float32), len_penalty)


class _Beam(NamedTuple):
    """Beam search's loop state (B rows, W beams, N output tokens, V vocabulary)."""

    step: jax.Array
    done: jax.Array       # [B]
    alive_seq: jax.Array  # [B, W, N]
    alive_lps: jax.Array  # [B, W, N]
    alive_cum: jax.Array  # [B, W]
    seen: jax.Array       # [B*W, V]
    fin_seq: jax.Array    # [B, W, N]
    fin_lps: jax.Array    # [B, W, N]
    fin_cum: jax.Array    # [B, W]
    fin_len: jax.Array    # [B, W]
    fin_score: jax.Array  # [B, W]
    cache_k: list[jax.Array]
    cache_v: list[jax.Array]


def _beam_init(cfg: T5Config, params: dict, r: Rows, n: int, w: int) -> tuple[_Beam, Cross]:
    """Encode once; the initial state with only beam 0 of each row alive.

    r: Rows of B requests (ids [B, S]); n: output tokens N; w: beams W.
    """
    b, v = r.ids.shape[0], cfg.vocab_size
    once = encode_cross(cfg, params, r.ids, r.lengths)
    # Every beam of a row attends to the same encoder output: repeat once, never gathered.
    cross = jax.tree_util.tree_map(lambda c: jnp.repeat(c, w, axis=0), once)
    cache_k, cache_v = _init_cache(cfg, b * w, n, once.k[0].dtype)
    seq0 = jnp.broadcast_to(r.end[:, None, None], (b, w, n)).astype(jnp.int32)
    init = _Beam(
        step=jnp.int32(0), done=r.max_len <= 0,
        alive_seq=seq0, alive_lps=jnp.zeros((b, w, n), jnp.float32),
        # only beam 0 is live at the start, so the first step does not pick W copies
        alive_cum=jnp.where(jnp.arange(w)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1)),
        seen=_mark_seen(jnp.zeros((b * w, v), bool), jnp.repeat(r.start, w, axis=0)),
        fin_seq=seq0, fin_lps=jnp.zeros((b, w, n), jnp.float32),
        fin_cum=jnp.full((b, w), NEG), fin_len=jnp.zeros((b, w), jnp.int32),
        fin_score=jnp.full((b, w), NEG),
        cache_k=cache_k, cache_v=cache_v)
    return init, cross


def _beam_step(cfg: T5Config, params: dict, r: Rows, cross: Cross, s: _Beam) -> _Beam:
    """One decoder step for every beam: the 2W best extensions of each row update its
    finished set (those that end) and its alive set (the W best that do not)."""
    b, w, n = s.alive_seq.shape
    v = cfg.vocab_size
    bw = b * w

    def per_beam(x: jax.Array) -> jax.Array:
        return jnp.repeat(x, w, axis=0)

    step = s.step
    last = jnp.where(step == 0, per_beam(r.start),
                     jax.lax.dynamic_index_in_dim(s.alive_seq, jnp.maximum(step - 1, 0),
                                                  axis=2, keepdims=False).reshape(bw))
    logits, ck, cv = model.decode_step(cfg, params, last, step, s.cache_k, s.cache_v,
                                       cross.k, cross.v, cross.bias)
    logp = jax.nn.log_softmax(adjust_logits(logits, s.seen, per_beam(r.temperature),
                                            per_beam(r.repetition_penalty)), axis=-1)
    cand = (s.alive_cum[:, :, None] + logp.reshape(b, w, v)).reshape(b, w * v)
    top_cum, top_idx = jax.lax.top_k(cand, 2 * w)  # [B, 2W]
    beam, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
    tok_lp = jnp.take_along_axis(logp.reshape(b, w * v), top_idx, axis=-1)
    length = step + 1
    last_step = length >= r.max_len[:, None]  # the row's final token: every candidate ends
    # As FT (which follows HF): a hypothesis ending in end_id is only accepted when it
    # ranks among the top W of the 2W candidates.
    top_w = jnp.arange(2 * w)[None, :] < w
    is_end = tok == r.end[:, None]
    ends = is_end | last_step
    valid = (top_cum > NEG / 2) & (top_w | ~is_end)

    def extend(seq: jax.Array, new: jax.Array) -> jax.Array:
        seq = jnp.take_along_axis(seq, beam[:, :, None], axis=1)  # [B, 2W, N]
        return jax.lax.dynamic_update_slice_in_dim(seq, new[:, :, None], step, axis=2)

    cand_seq, cand_lps = extend(s.alive_seq, tok), extend(s.alive_lps, tok_lp)

    # new finished set: the best W of (old finished, candidates that end now)
    new_score = jnp.where(ends & valid,
                          _length_score(top_cum, jnp.full_like(tok, length),
                                        r.len_penalty[:, None]), NEG)
    all_score = jnp.concatenate([s.fin_score, new_score], axis=1)
    fin_score, pick = jax.lax.top_k(all_score, w)

    def merge(old: jax.Array, new: jax.Array) -> jax.Array:
        both = jnp.concatenate([old, new], axis=1)
        idx = pick.reshape(pick.shape + (1,) * (both.ndim - 2))
        return jnp.take_along_axis(both, idx, axis=1)

    fin_seq = merge(s.fin_seq, cand_seq)
    fin_lps = merge(s.fin_lps, cand_lps)
    fin_cum = merge(s.fin_cum, top_cum)
    fin_len = merge(s.fin_len, jnp.full_like(tok, length))

    # new alive set: the best W candidates that did not end
    alive_key = jnp.where(ends, NEG, top_cum)
    alive_cum, keep = jax.lax.top_k(alive_key, w)  # [B, W]
    src_beam = jnp.take_along_axis(beam, keep, axis=1)
    alive_seq = jnp.take_along_axis(cand_seq, keep[:, :, None], axis=1)
    alive_lps = jnp.take_along_axis(cand_lps, keep[:, :, None], axis=1)
    rows = (jnp.arange(b)[:, None] * w + src_beam).reshape(bw)
    new_tok = jnp.take_along_axis(tok, keep, axis=1).reshape(bw)
    seen = _mark_seen(s.seen[rows], new_tok)
    ck, cv = [c[rows] for c in ck], [c[rows] for c in cv]

    # a row is done when no alive beam can beat its worst finished hypothesis
    best_alive = alive_cum[:, 0]
    bound_len = jnp.where(r.len_penalty > 0, r.max_len, length)
    bound = _length_score(best_alive, bound_len, r.len_penalty)
    done_now = last_step[:, 0] | ((fin_score[:, -1] > NEG / 2) & (fin_score[:, -1] >= bound))
    keep_old = s.done

    def hold(old: jax.Array, new: jax.Array) -> jax.Array:
        mask = keep_old.reshape(keep_old.shape + (1,) * (old.ndim - 1))
        return jnp.where(mask, old, new)

    return _Beam(
        step=step + 1, done=s.done | done_now,
        alive_seq=hold(s.alive_seq, alive_seq), alive_lps=hold(s.alive_lps, alive_lps),
        alive_cum=hold(s.alive_cum, alive_cum), seen=seen,
        fin_seq=hold(s.fin_seq, fin_seq), fin_lps=hold(s.fin_lps, fin_lps),
        fin_cum=hold(s.fin_cum, fin_cum), fin_len=hold(s.fin_len, fin_len),
        fin_score=hold(s.fin_score, fin_score), cache_k=ck, cache_v=cv)


def _beam_finalize(s: _Beam) -> Output:
    """The finished hypotheses as Output [B, W, N]; log probs past each one's length are 0.

    Rows with max_output_len 0 finish with nothing: they keep their (end-filled) empty
    hypotheses, cum_log_probs 0.
    """
    n = s.fin_seq.shape[2]
    steps = jnp.arange(n)[None, None, :]
    lps = jnp.where(steps < s.fin_len[:, :, None], s.fin_lps, 0.0)
    return Output(s.fin_seq, s.fin_len, jnp.where(s.fin_score > NEG / 2, s.fin_cum, 0.0), lps)


def generate_beam(cfg: T5Config, params: dict, r: Rows, out_len: int, width: int) -> Output:
    """Beam search of `width` beams per row. Returns Output [B, W, N], best beam first.

    r: Rows of B requests (ids [B, S]); out_len: N, the longest output; width: W beams.
    Alive beams (the W best unfinished hypotheses) and finished hypotheses (the W best that
    produced end_id, or reached the row's max_output_len) are kept separately, scored
    cum_log_prob / length ** len_penalty with length counting the end token; a row stops
    when no alive beam can still beat its worst finished one (the bound is exact: log
    probabilities only decrease).
    """
    init, cross = _beam_init(cfg, params, r, out_len, width)

    def cond(s: _Beam) -> jax.Array:
        return (s.step < out_len) & ~jnp.all(s.done)

    final = jax.lax.while_loop(
        cond, lambda s: _beam_step(cfg, params, r, cross, s), init)
    return _beam_finalize(final)
