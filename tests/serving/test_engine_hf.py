"""The JAX engine against an independent T5: HF transformers' T5ForConditionalGeneration
(torch, CPU) loaded from the same FT files by a loader written here, not the engine's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration

from core import ft_format
from core.t5config import T5Config
from serving.engine import SamplingParams, T5Engine
from testing.ft_writer import (
    T5_TINY,
    UL2_TINY,
    random_ft_weights,
    tensor_stem,
    write_ft_folder,
)

# T5 1.1 / Flan-T5 style: gated-gelu (the tanh approximation, HF's "gelu_new"), untied head.
T5V11_TINY = dataclasses.replace(UL2_TINY, feed_forward_proj="gated-gelu",
                                 num_decoder_layers=2)
MODELS = {"ul2": UL2_TINY, "t5": T5_TINY, "t5v11": T5V11_TINY}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The same random weights of each model written at tensor-parallel 1 and 2."""
    out = {}
    for name, cfg in MODELS.items():
        weights = random_ft_weights(cfg, seed=7)
        for t in (1, 2):
            out[name, t] = write_ft_folder(tmp_path_factory.mktemp(f"{name}{t}"), cfg, t, weights)
    return out


@pytest.fixture(scope="module")
def engines(folders) -> dict[tuple[str, int], T5Engine]:
    return {key: T5Engine.load(str(path)) for key, path in folders.items()}


def read_ft_full(folder: Path) -> tuple[T5Config, dict[str, np.ndarray]]:
    """Independent FT reader: every file of every rank, re-joined into full tensors."""
    cfg, dtype = ft_format.parse_config_ini((folder / "config.ini").read_text())
    t = int(folder.name.split("-")[0])
    parts: dict[str, list[np.ndarray]] = {}
    splits = {}
    for spec in ft_format.all_files(cfg, t):
        data = (folder / spec.name).read_bytes()
        parts.setdefault(tensor_stem(spec), []).append(
            ft_format.from_bytes(data, spec.shape(t), dtype).astype(np.float32))
        splits[tensor_stem(spec)] = spec.split
    return cfg, {k: ft_format.join_ranks(v, splits[k]) for k, v in parts.items()}


def hf_model(folder: Path) -> T5ForConditionalGeneration:
    """FT files -> HF state dict: [in, out] kernels transposed for torch Linear, the fused
    decoder qkv [D, 3, I] unfused, relative bias [H, B] -> [B, H], wi/wi2 -> wi_0/wi_1."""
    cfg, w = read_ft_full(folder)
    hf_cfg = HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj=cfg.feed_forward_proj, tie_word_embeddings=cfg.tie_word_embeddings,
        dropout_rate=0.0, decoder_start_token_id=cfg.decoder_start_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id)
    sd: dict[str, np.ndarray] = {"shared.weight": w["shared.weight_T"],
                                 "encoder.final_layer_norm.weight":
                                     w["encoder.final_layer_norm.weight"],
                                 "decoder.final_layer_norm.weight":
                                     w["decoder.final_layer_norm.weight"]}
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for side in ("encoder", "decoder"):
        sd[f"{side}.{bias}"] = w[f"{side}.{bias}"].T

    def mlp(src: str, dst: str) -> None:
        if cfg.gated:
            sd[f"{dst}.DenseReluDense.wi_0.weight"] = w[f"{src}.DenseReluDense.wi.weight"].T
            sd[f"{dst}.DenseReluDense.wi_1.weight"] = w[f"{src}.DenseReluDense.wi2.weight"].T
        else:
            sd[f"{dst}.DenseReluDense.wi.weight"] = w[f"{src}.DenseReluDense.wi.weight"].T
        sd[f"{dst}.DenseReluDense.wo.weight"] = w[f"{src}.DenseReluDense.wo.weight"].T

    for i in range(cfg.num_encoder_layers):
        p = f"encoder.block.{i}"
        for n in ("q", "k", "v", "o"):
            sd[f"{p}.layer.0.SelfAttention.{n}.weight"] = w[f"{p}.layer.0.SelfAttention.{n}.weight"].T
        for j in (0, 1):
            sd[f"{p}.layer.{j}.layer_norm.weight"] = w[f"{p}.layer.{j}.layer_norm.weight"]
        mlp(f"{p}.layer.1", f"{p}.layer.1")
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}"
        qkv = w[f"{p}.layer.0.SelfAttention.qkv.weight"]
        for j, n in enumerate("qkv"):
            sd[f"{p}.layer.0.SelfAttention.{n}.weight"] = qkv[:, j, :].T
        sd[f"{p}.layer.0.SelfAttention.o.weight"] = w[f"{p}.layer.0.SelfAttention.o.weight"].T
        for n in ("q", "k", "v", "o"):
            key = f"{p}.layer.1.EncDecAttention.{n}.weight"
            sd[key] = w[key].T
        for j in (0, 1, 2):
            sd[f"{p}.layer.{j}.layer_norm.weight"] = w[f"{p}.layer.{j}.layer_norm.weight"]
        mlp(f"{p}.layer.2", f"{p}.layer.2")

    model = T5ForConditionalGeneration(hf_cfg).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                            "lm_head.weight"}, missing
    with torch.no_grad():
        model.shared.weight.copy_(state["shared.weight"])
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.shared.weight
        else:
            # transformers 5 always ties: give the untied model its own head back.
            model.lm_head.weight = torch.nn.Parameter(
                torch.from_numpy(np.ascontiguousarray(w["lm_head.weight"])))
    assert model.config.scale_decoder_outputs == cfg.tie_word_embeddings
    assert (model.lm_head.weight is model.shared.weight) == cfg.tie_word_embeddings
    return model


@pytest.fixture(scope="module")
def hf_models(folders) -> dict[str, T5ForConditionalGeneration]:
    return {name: hf_model(folders[name, 2]) for name in MODELS}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_hf(engines, hf_models, name: str, tp: int) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 100, size=(3, 11))
    dec = np.concatenate([np.zeros((3, 1), int), rng.integers(2, 100, size=(3, 9))], axis=1)
    ours = engines[name, tp].logits(ids, dec)
    with torch.no_grad():
        theirs = hf_models[name](input_ids=torch.from_numpy(ids),
                                 decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    assert ours.shape == theirs.shape == (3, 10, 100)
    assert np.abs(theirs).max() > 0.5  # not a degenerate model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf(engines, hf_models, name: str, tp: int) -> None:
    """Incremental (KV-cache) greedy decoding of a mixed-length batch equals HF's greedy
    generate of each row alone."""
    rng = np.random.default_rng(2)
    rows = [rng.integers(2, 100, size=n) for n in (4, 13, 9)]
    n_out = 14
    ours = engines[name, tp].generate(rows, [SamplingParams(max_output_len=n_out)] * len(rows))
    lengths = set()
    for row, res in zip(rows, ours, strict=True):
        with torch.no_grad():
            out = hf_models[name].generate(
                torch.from_numpy(row[None]), max_new_tokens=n_out, do_sample=False,
                num_beams=1, min_length=0,
                # transformers 5 sizes its cache by the encoder depth: wrong for 2 enc / 3 dec
                use_cache=False)[0].numpy()
        gen = out[1:]  # HF keeps the start token
        ended = np.flatnonzero(gen == 1)
        n_gen = int(ended[0]) + 1 if ended.size else len(gen)
        want = np.full(n_out, 1)
        want[:n_gen] = gen[:n_gen]
        assert res.output_ids.shape == (1, n_out)
        np.testing.assert_array_equal(res.output_ids[0], want)
        assert int(res.sequence_length[0]) == n_gen
        lengths.add(n_gen)
    assert any(n > 3 for n in lengths)  # some rows decode for a while


@pytest.mark.parametrize("name", list(MODELS))
def test_rank_files_rejoin_to_the_same_model(engines, name: str) -> None:
    import jax

    one, two = engines[name, 1], engines[name, 2]
    assert two.source_tensor_parallel == 2 and one.config == two.config
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_stays_close_to_fp32(folders, engines) -> None:
    bf16 = T5Engine.load(str(folders["ul2", 2]), dtype="bf16")
    ids = np.random.default_rng(3).integers(2, 100, size=(2, 8))
    dec = np.zeros((2, 4), int)
    ref = engines["ul2", 1].logits(ids, dec)
    got = bf16.logits(ids, dec)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_config_dataclass_is_what_was_written(engines) -> None:
    assert engines["ul2", 2].config == dataclasses.replace(UL2_TINY)
    assert engines["t5", 1].config == T5_TINY


@pytest.mark.parametrize(("name", "alpha"), [("t5", 0.0), ("ul2", 1.0)])
def test_beam_search_matches_hf(engines, hf_models, name: str, alpha: float) -> None:
    """Beam width 3 returns HF's three hypotheses in HF's order (FT's beam search follows
    HF's: end_id candidates count only within the top W of 2W; score cum / len ** alpha)."""
    rng = np.random.default_rng(4)
    rows = [rng.integers(2, 100, size=n) for n in (4, 13, 9)]
    n_out, width = 12, 3
    ours = engines[name, 1].generate(rows, [SamplingParams(
        max_output_len=n_out, beam_width=width, len_penalty=alpha, return_log_probs=True)] * 3)
    for row, res in zip(rows, ours, strict=True):
        with torch.no_grad():
            out = hf_models[name].generate(
                torch.from_numpy(row[None]), max_new_tokens=n_out, num_beams=width,
                num_return_sequences=width, do_sample=False, length_penalty=alpha,
                early_stopping="never", use_cache=False, output_scores=True,
                return_dict_in_generate=True)
        hf = out.sequences.numpy()[:, 1:]
        want = np.pad(hf, ((0, 0), (0, n_out - hf.shape[1])), constant_values=1)
        np.testing.assert_array_equal(res.output_ids, want)
        score = res.cum_log_probs / res.sequence_length.astype(np.float32) ** alpha
        np.testing.assert_allclose(score, out.sequences_scores.numpy(), atol=1e-4)
