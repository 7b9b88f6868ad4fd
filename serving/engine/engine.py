"""T5Engine: load an FT folder, bucket requests, run the compiled decoding loops.

One compiled program per (kind, batch bucket, input bucket, output bucket): batch sizes and
lengths are rounded up to powers of two, so a stream of requests reuses a handful of programs.

Batch invariance (the default, ``batch_invariant=True``): a row's output ids and log probs must
not depend on the rows it is batched with. They would: the padded input length is the longest
row's, the output bucket the largest max_output_len's, and the batch size picks the program,
whose matrix products reduce in a shape-dependent order (XLA's CPU GEMV for one row and GEMM
for several differ in the last bit; GPU GEMM tilings differ by shape). So in this mode every
row runs at shapes chosen by the row alone: its own input bucket and output bucket, in a group
of rows sharing both, padded with dummy rows to one fixed batch size (:meth:`invariant_rows`)
and split into chunks of that size. The cost is the padding (docs/benchmarks.md).
Rows are grouped by what changes the program (beam width; greedy vs sampling); every other
setting (seed, temperature, top-k/p, penalties, start/end ids, max_output_len) is a per-row
array inside the program, so each row keeps its own values (FT takes the first row's
max_output_len and beam_width for the whole batch; we do not).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from core.t5config import T5Config
from serving.engine import attention, generate, model, sharding, weights

log = logging.getLogger(__name__)

COMPUTE_DTYPES: dict[str, jnp.dtype] = {
    "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's decoding settings, named and defaulted as the FT Triton request inputs.

    FT semantics: top_k == 0 and top_p == 0.0 means greedy; top_k == 1 is greedy.
    len_penalty applies to beam search: score = cum_log_prob / length ** len_penalty.
    start_id / end_id default to the config's decoder_start_token_id / eos_token_id.
    """

    max_output_len: int
    beam_width: int = 1
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    len_penalty: float = 0.0
    repetition_penalty: float = 1.0
    random_seed: int = 0
    start_id: int | None = None
    end_id: int | None = None
    return_log_probs: bool = False

    @property
    def greedy(self) -> bool:
        """Top-1 decoding: no randomness, whatever the seed."""
        return self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)


@dataclasses.dataclass
class GenerationResult:
    """One row's answer, in FT's output conventions.

    output_ids: [beam, max_output_len] uint32, without the start token, end_id after the end.
    sequence_length: [beam] uint32, generated tokens including the end token when produced.
    cum_log_probs: [beam] fp32 sum of the chosen tokens' log-probabilities (None unless asked).
    output_log_probs: [beam, max_output_len] fp32 per-token log-probabilities under the
      adjusted (temperature, penalty) full distribution, 0 after the end (None unless asked).
    """

    output_ids: np.ndarray
    sequence_length: np.ndarray
    cum_log_probs: np.ndarray | None = None
    output_log_probs: np.ndarray | None = None


TRACE_COUNTS: Counter[str] = Counter()


def _counted(name: str, fn):
    """Count each trace of fn: its Python body runs only when jax traces (compiles) it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        TRACE_COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def _logits_fn(cfg: T5Config, params: dict, ids: jax.Array, lengths: jax.Array,
               dec_ids: jax.Array) -> jax.Array:
    enc = model.encode(cfg, params, ids, lengths)
    return model.decode_full(cfg, params, dec_ids, enc, lengths)


# Module-level, with the config static: engines of the same model share compiled programs.
_encode = jax.jit(_counted("encode", generate.encode_cross), static_argnums=(0,))
_sampling = jax.jit(_counted("sampling", generate.generate_sampling), static_argnums=(0,),
                    static_argnames=("out_len", "sample"))
_beam = jax.jit(_counted("beam", generate.generate_beam), static_argnums=(0,),
                static_argnames=("out_len", "width"))
_logits = jax.jit(_counted("logits", _logits_fn), static_argnums=(0,))


def _bucket(n: int, minimum: int) -> int:
    """Round up to a power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


class T5Engine:
    """A T5 encoder-decoder served from an FT weights folder.

    Thread-safe: one lock serialises device work (Triton may call from several threads).
    """

    max_input_len: int = 4096  # longest accepted input row (relative positions allow any)
    max_output_limit: int = 4096  # largest accepted max_output_len
    max_batch: int = 64  # rows per compiled call; larger groups are split
    min_len_bucket: int = 8
    # Batch-invariant mode's fixed batch on a CPU: there a program's cost grows steeply with its
    # rows, so a small fixed batch keeps one-row requests cheap. On a GPU the fixed batch is
    # max_batch (Triton's max_batch_size), what large models need to read their weights once
    # per step for many rows; a 128-row program still costs 3.4x an 8-row one for a 0.2 B
    # model on an H100, so evaluation sends requests of max_batch rows to fill it
    # (evaluation.runner.request_rows; docs/benchmarks.md).
    cpu_invariant_batch: int = 8

    def __init__(self, cfg: T5Config, params: dict, dtype: str = "fp32",
                 tensor_parallel: int = 1, devices: int = 1,
                 batch_invariant: bool = True) -> None:
        """params: a weights.py tree (numpy or jax arrays, already in the compute dtype).
        tensor_parallel: the T of the folder it came from (informational).
        devices: shard over this many local devices with FT's split (sharding.py).
        batch_invariant: run every row at shapes chosen by the row alone (module docstring),
        so its output does not depend on the rows batched with it; False batches freely
        (faster, but a row's tokens and log probs may change with its neighbours)."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {list(COMPUTE_DTYPES)}")
        self.config = cfg
        self.dtype = dtype
        self.batch_invariant = batch_invariant
        self.source_tensor_parallel = tensor_parallel
        self.devices = devices
        if attention.choose(COMPUTE_DTYPES[dtype], cfg.d_kv).fuse_weights:
            params = attention.fuse_weights(params)  # GPUs in half precision (attention.py)
        if devices > 1:
            cfg.check_tensor_parallel(devices)
            self.params = sharding.shard_params(params, sharding.make_mesh(devices))
        else:
            self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self._lock = threading.Lock()

    @classmethod
    def input_limit(cls, asked: int) -> int:
        """The longest input row served when config.pbtxt asks for ``asked`` (its
        ``max_input_len`` parameter): 0 means the engine's limit (:attr:`max_input_len`), and a
        larger ask is capped at it. The Triton model and in-process evaluation both take their
        limit from here, so both refuse exactly the same rows."""
        limit = int(cls.max_input_len)
        return min(asked or limit, limit)

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, weights_dir: str, dtype: str = "fp32", devices: int = 1,
             max_batch: int = 0, batch_invariant: bool = True) -> T5Engine:
        """Read a ``<T>-gpu`` folder of any tensor-parallel size T (ranks are re-joined).

        devices: local devices to shard over (heads and d_ff split as FT does); any T folder
        can be served on any device count that divides num_heads and d_ff.
        max_batch: rows per compiled call (0: the class default); the Triton model passes its
        max_batch_size, so a batch Triton merged runs as one program.
        batch_invariant: see :meth:`__init__` (the config.pbtxt parameter ``batch_invariant``).
        """
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {list(COMPUTE_DTYPES)}")
        cfg, file_dtype, t, full = weights.read_ft_folder(Path(weights_dir))
        params = weights.to_param_tree(cfg, full, np.dtype(COMPUTE_DTYPES[dtype]))
        log.info("loaded %s (%s files, T=%d) as %s", weights_dir, file_dtype, t, dtype)
        engine = cls(cfg, params, dtype=dtype, tensor_parallel=t, devices=devices,
                     batch_invariant=batch_invariant)
        if max_batch:
            engine.max_batch = max_batch
        return engine

    @property
    def trace_counts(self) -> Counter[str]:
        """How many programs of each kind ("encode", "sampling", "beam", "logits") this process has
        traced (= compiled): engines of one config and dtype share their programs."""
        return TRACE_COUNTS

    def invariant_rows(self, width: int) -> int:
        """Batch-invariant mode's fixed batch (requests) for beam width ``width``: every
        program of that width runs exactly this many rows. On a CPU ``cpu_invariant_batch``,
        elsewhere ``max_batch`` rows (as beams: max_batch // width requests)."""
        rows = self.max_batch
        if jax.default_backend() == "cpu":
            rows = min(rows, self.cpu_invariant_batch * width)
        return max(1, rows // width)

    # --- public API --------------------------------------------------------------------------

    def logits(self, input_ids: np.ndarray, decoder_input_ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits. input_ids [B, S], decoder_input_ids [B, T] (no padding;
        decoder_input_ids start with the start token) -> fp32 [B, T, V]."""
        ids = np.asarray(input_ids)
        dec = np.asarray(decoder_input_ids)
        if ids.ndim != 2 or dec.ndim != 2 or ids.shape[0] != dec.shape[0]:
            raise ValueError(f"input_ids {ids.shape} and decoder_input_ids {dec.shape} must be "
                             "[batch, length] with the same batch")
        self._check_tokens(ids, "input_ids")
        self._check_tokens(dec, "decoder_input_ids")
        lengths = np.full(ids.shape[0], ids.shape[1], np.int32)
        with self._lock:
            out = _logits(self.config, self.params, jnp.asarray(ids, jnp.int32),
                          jnp.asarray(lengths), jnp.asarray(dec, jnp.int32))
            return np.asarray(out)

    def generate(self, inputs: Sequence[np.ndarray],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """Decode each row with its own settings. inputs[i]: 1-D int array of real tokens."""
        if len(inputs) != len(params):
            raise ValueError(f"{len(inputs)} input rows but {len(params)} SamplingParams")
        rows = [self._check_row(i, x, p) for i, (x, p) in enumerate(zip(inputs, params,
                                                                         strict=True))]
        # Rows run together only when they share a program kind (beam width; greedy or
        # sampling) and, batch-invariant, also their own input and output buckets.
        groups: dict[tuple[int, bool, int, int], list[int]] = {}
        for i, (x, p) in enumerate(zip(rows, params, strict=True)):
            key = (p.beam_width, p.beam_width == 1 and not p.greedy, 0, 0)
            if self.batch_invariant:
                key = key[:2] + (_bucket(len(x), self.min_len_bucket),
                                 _bucket(p.max_output_len, self.min_len_bucket))
            groups.setdefault(key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(rows)
        for (width, sample, s, n), idx in groups.items():
            fixed = self.invariant_rows(width) if self.batch_invariant else 0
            chunk_rows = fixed or max(1, self.max_batch // width)
            for start in range(0, len(idx), chunk_rows):
                part = idx[start:start + chunk_rows]
                outs = self._run([rows[i] for i in part], [params[i] for i in part],
                                 width, sample, beam=width > 1,
                                 shape=(fixed, s, n) if fixed else None)
                for i, out in zip(part, outs, strict=True):
                    results[i] = out
        return results  # type: ignore[return-value]

    # --- internals ---------------------------------------------------------------------------

    def _check_tokens(self, ids: np.ndarray, what: str) -> None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what} must be integer token ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"{what} holds token ids outside [0, {self.config.vocab_size})")

    def _check_row(self, i: int, x: np.ndarray, p: SamplingParams) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"row {i}: input must be a non-empty 1-D array, got shape {x.shape}")
        self._check_tokens(x, f"row {i} input")
        if x.size > self.max_input_len:
            raise ValueError(f"row {i}: input length {x.size} exceeds {self.max_input_len}")
        if not 1 <= p.max_output_len <= self.max_output_limit:
            raise ValueError(f"row {i}: max_output_len {p.max_output_len} is not in "
                             f"[1, {self.max_output_limit}]")
        if p.beam_width < 1:
            raise ValueError(f"row {i}: beam_width must be >= 1, got {p.beam_width}")
        if p.top_k < 0:
            raise ValueError(f"row {i}: top_k must be >= 0, got {p.top_k}")
        if not 0.0 <= p.top_p <= 1.0:
            raise ValueError(f"row {i}: top_p must be in [0, 1], got {p.top_p}")
        if p.temperature <= 0:
            raise ValueError(f"row {i}: temperature must be > 0, got {p.temperature}")
        if p.repetition_penalty <= 0:
            raise ValueError(f"row {i}: repetition_penalty must be > 0, "
                             f"got {p.repetition_penalty}")
        if not 0 <= p.random_seed < 2**64:
            raise ValueError(f"row {i}: random_seed must fit in uint64, got {p.random_seed}")
        v = self.config.vocab_size
        for name in ("start_id", "end_id"):
            tok = getattr(p, name)
            if tok is not None and not 0 <= tok < v:
                raise ValueError(f"row {i}: {name} {tok} is outside [0, {v})")
        return x.astype(np.int32)

    def _run(self, rows: list[np.ndarray], params: list[SamplingParams], width: int,
             sample: bool, beam: bool, shape: tuple[int, int, int] | None = None
             ) -> list[GenerationResult]:
        """Decode rows in one program. shape: its (batch, input length, output length), fixed
        by the caller (batch-invariant mode); None: buckets of these rows' own extremes."""
        n_real = len(rows)
        if shape is None:
            b = _bucket(n_real, 1)
            s = _bucket(max(len(x) for x in rows), self.min_len_bucket)
            n = _bucket(max(p.max_output_len for p in params), self.min_len_bucket)
        else:
            b, s, n = shape
        # Padding rows: one token, one output step; they finish at once.
        pad_p = SamplingParams(max_output_len=1)
        params = list(params) + [pad_p] * (b - n_real)
        ids = np.zeros((b, s), np.int32)
        lengths = np.ones(b, np.int32)
        for i, x in enumerate(rows):
            ids[i, :len(x)] = x
            lengths[i] = len(x)
        cfg = self.config

        def col(f, dtype) -> jax.Array:
            return jnp.asarray(np.array([f(p) for p in params], dtype=dtype))

        seeds = np.array([p.random_seed for p in params], dtype=np.uint64)
        r = generate.Rows(
            ids=jnp.asarray(ids), lengths=jnp.asarray(lengths),
            start=col(lambda p: cfg.decoder_start_token_id if p.start_id is None
                      else p.start_id, np.int32),
            end=col(lambda p: cfg.eos_token_id if p.end_id is None else p.end_id, np.int32),
            max_len=col(lambda p: p.max_output_len, np.int32),
            top_k=col(lambda p: p.top_k, np.int32),
            top_p=col(lambda p: p.top_p, np.float32),
            temperature=col(lambda p: p.temperature, np.float32),
            repetition_penalty=col(lambda p: p.repetition_penalty, np.float32),
            len_penalty=col(lambda p: p.len_penalty, np.float32),
            seed_lo=jnp.asarray((seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
            seed_hi=jnp.asarray((seeds >> np.uint64(32)).astype(np.uint32)),
        )
        with self._lock:
            if not beam:
                cross = _encode(self.config, self.params, r.ids, r.lengths)
                out = _sampling(self.config, self.params, r, cross, out_len=n, sample=sample)
                del cross  # 2 x L buffers of [B, H, S, K]: free them before the next batch
            else:
                out = _beam(self.config, self.params, r, out_len=n, width=width)
            out = jax.tree_util.tree_map(np.asarray, out)
        results = []
        for i, p in enumerate(params[:n_real]):
            m = p.max_output_len
            want_lp = p.return_log_probs
            results.append(GenerationResult(
                output_ids=out.tokens[i, :, :m].astype(np.uint32),
                sequence_length=out.seq_len[i].astype(np.uint32),
                cum_log_probs=out.cum_log_probs[i].astype(np.float32) if want_lp else None,
                output_log_probs=(out.output_log_probs[i, :, :m].astype(np.float32)
                                  if want_lp else None)))
        return results

    def generate_beam(self, inputs: Sequence[np.ndarray],
                      params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """Beam search for every row, even at beam_width 1 (generate() sends width-1 rows to
        the greedy/sampling loop, as FT does); for tests and scoring."""
        rows = [self._check_row(i, x, p) for i, (x, p) in enumerate(zip(inputs, params,
                                                                         strict=True))]
        widths = {p.beam_width for p in params}
        if len(widths) != 1:
            raise ValueError(f"generate_beam needs one beam_width, got {sorted(widths)}")
        return self._run(rows, list(params), widths.pop(), sample=False, beam=True)
