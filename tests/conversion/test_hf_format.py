"""--format hf: T5X checkpoints -> a Hugging Face T5 checkpoint transformers loads.

Checked against things this repository did not make: transformers' T5ForConditionalGeneration
(its load report: no missing, unexpected or mismatched keys), safetensors' own reader, and,
for the values, an independent FT -> transformers state-dict loader
(tests/serving/test_engine_hf.py's ``hf_model``) applied to the FT conversion of the same
checkpoint: every tensor equal, and the teacher-forced logits of our JAX engine on the FT
files equal transformers' on the HF folder within 1e-4 (fp32, random rows).
Models: T5 1.0 (relu, tied, OCDBT, bf16 save), T5 1.1 / Flan-T5 (gated-gelu, untied, legacy),
UL2 (gated-silu, untied, I != D, 2 encoder / 3 decoder layers, legacy multi-chunk) and UL2
scanned (current scalable_t5 naming, heads on their own axis, a table in every layer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import T5ForConditionalGeneration

from conversion.run import ConversionError, ConvertOptions, convert
from core import hf_format
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from serving.engine import T5Engine
from tests.conversion.conftest import MODELS, SMALL_CHUNK_BYTES
from tests.conversion.reference import scan_params
from tests.serving.test_engine_hf import hf_model

T5V11 = dataclasses.replace(MODELS["ul2"], feed_forward_proj="gated-gelu", num_decoder_layers=2)
CASES = {
    # name: (config, layout, save dtype, scanned)
    "t5v1-ocdbt": (MODELS["t5v1"], "ocdbt", "bfloat16", False),
    # a non-gated gelu MLP (t5x's tanh approximation: transformers' "gelu_new"), untied, OCDBT
    "gelu-ocdbt": (dataclasses.replace(MODELS["t5v1"], feed_forward_proj="gelu",
                                       tie_word_embeddings=False), "ocdbt", "float32", False),
    "t5v11-legacy": (T5V11, "legacy", "float32", False),
    "ul2-legacy": (MODELS["ul2"], "legacy", "float32", False),
    "ul2-scanned": (MODELS["ul2"], "legacy", "float32", True),
}
TOLERANCE = 1e-4  # fp32 logits, ours (JAX) against transformers (torch), same weights


def _checkpoint(root: Path, case: str, tables: dict | None = None) -> Path:
    cfg, layout, dtype, scanned = CASES[case]
    params = random_t5x_params(cfg, seed=3, dtype=dtype)
    gin_lines = ["  scan_layers = True", "  param_scan_axis = 1"] if scanned else None
    if scanned:
        params = scan_params(params, cfg, naming="current", tables=tables)
    # T5 1.0 (relu) from the shapes alone; the others' activation from their config.gin
    gin = None if cfg.feed_forward_proj == "relu" else gin_config(cfg, gin_lines or [])
    return write_t5x_checkpoint(root / case, params, step=5, dtype=dtype, layout=layout,
                                gin=gin, chunk_bytes=SMALL_CHUNK_BYTES)


@pytest.fixture(scope="module")
def converted(ray_local, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """case -> (HF folder, FT weights folder, HF summary), both from the same checkpoint."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for case in CASES:
        src = str(_checkpoint(root / "src", case))
        hf = convert(ConvertOptions(src=src, dst=str(root / "hf"), model_name=case,
                                    format="hf", verify=True, progress=False))
        ft = convert(ConvertOptions(src=src, dst=str(root / "ft"), model_name=case,
                                    progress=False))
        out[case] = (Path(hf["output"]), Path(ft["output"]), hf)
    return out


def _load(folder: Path) -> T5ForConditionalGeneration:
    model, info = T5ForConditionalGeneration.from_pretrained(str(folder),
                                                             output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_every_tensor_as_the_ft_conversion_holds_it(converted, case):
    cfg = CASES[case][0]
    folder, ft_folder, summary = converted[case]
    assert summary["format"] == "hf" and summary["verified"] and summary["unaccounted"] == []
    model = _load(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    n = 1 + cfg.num_encoder_layers + cfg.num_decoder_layers  # one per layer and the globals
    assert shards == [hf_format.shard_name(i, n) for i in range(n)]
    assert summary["files"] == n

    # safetensors' own reader agrees with the index, and every name is transformers'.
    index = json.loads((folder / hf_format.INDEX).read_text())
    stored = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert {k: index["weight_map"][k] for k in stored} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in stored.values())
    state = model.state_dict()
    assert set(stored) <= set(state)
    assert set(state) - set(stored) <= {"encoder.embed_tokens.weight",
                                        "decoder.embed_tokens.weight", "lm_head.weight"}

    # Values: equal to the independent FT -> transformers loader's on the FT conversion.
    reference = hf_model(ft_folder).state_dict()
    for name, value in state.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
        assert model.config.scale_decoder_outputs
    else:
        assert not torch.equal(model.lm_head.weight, model.shared.weight)
        assert not model.config.scale_decoder_outputs
    assert (model.config.num_layers, model.config.num_decoder_layers) == (
        cfg.num_encoder_layers, cfg.num_decoder_layers)
    want = "gelu_new" if cfg.feed_forward_proj == "gelu" else cfg.feed_forward_proj
    assert model.config.feed_forward_proj == want


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_forced_logits_equal_our_engine_on_the_ft_files(converted, case):
    cfg = CASES[case][0]
    folder, ft_folder, _ = converted[case]
    rng = np.random.default_rng(5)
    ids = rng.integers(2, cfg.vocab_size, size=(3, 9))
    dec = np.concatenate([np.zeros((3, 1), int), rng.integers(2, cfg.vocab_size, (3, 6))], 1)
    ours = T5Engine.load(str(ft_folder)).logits(ids, dec)
    with torch.no_grad():
        theirs = _load(folder)(input_ids=torch.from_numpy(ids),
                               decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    assert theirs.shape == ours.shape == (3, 7, cfg.vocab_size)
    assert np.abs(theirs).max() > 0.1  # not a degenerate model
    np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)


def test_bf16_shards_hold_the_fp32_values_rounded(converted, tmp_path):
    folder, _, summary = converted["ul2-legacy"]
    src = summary["source"]
    bf16 = convert(ConvertOptions(src=src, dst=str(tmp_path), format="hf", weight_dtype="bf16",
                                  progress=False))
    model = _load(Path(bf16["output"]))
    assert json.loads((Path(bf16["output"]) / "config.json").read_text())["dtype"] == "bfloat16"
    full = _load(folder).state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        torch.testing.assert_close(value, full[name].to(torch.bfloat16), rtol=0, atol=0)


def test_scanned_per_layer_tables_that_differ_are_refused_in_one_line(tmp_path):
    """As a user runs it: exit 2, one stderr line saying why, nothing written (the tables are
    compared before Ray is even started)."""
    import subprocess
    import sys

    cfg = MODELS["ul2"]
    rng = np.random.default_rng(8)
    shape = (cfg.num_heads, cfg.relative_attention_num_buckets)
    tables = {side: [rng.standard_normal(shape).astype(np.float32) for _ in range(depth)]
              for side, depth in (("encoder", 2), ("decoder", 3))}
    src = _checkpoint(tmp_path / "src", "ul2-scanned", tables)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.convert", "--src", str(src), "--dst",
                           str(tmp_path / "out"), "--format", "hf", "--json"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "transformers' T5 holds one table per stack" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_tensor_parallel_does_not_apply(ray_local, converted, tmp_path):
    src = converted["ul2-legacy"][2]["source"]
    with pytest.raises(ConversionError, match="--tensor-parallel does not apply"):
        convert(ConvertOptions(src=src, dst=str(tmp_path), format="hf", tensor_parallel=2,
                               progress=False))


@pytest.fixture(scope="module")
def demo_hf(ray_local, tmp_path_factory) -> tuple[Path, Path, object]:
    """The trained demo model (T5FT_DEMO_CACHE) converted to HF and to FT; its build."""
    from demo.build import build

    demo = build()
    root = tmp_path_factory.mktemp("demo")
    hf = convert(ConvertOptions(src=str(demo.checkpoint), dst=str(root), model_name="hf",
                                format="hf", vocab=str(demo.vocab), progress=False))
    ft = convert(ConvertOptions(src=str(demo.checkpoint), dst=str(root), model_name="ft",
                                progress=False))
    return Path(hf["output"]), Path(ft["output"]), demo


def test_tokenizer_is_sentencepiece_plus_eos_and_decodes_back(demo_hf, xsum_sample):
    """AutoTokenizer on the folder (tokenizer.json, no conversion at load) against the
    SentencePiece model itself, and against what transformers' T5Tokenizer writes."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    from conversion.hf_files import precompiled_charsmap

    folder, _, demo = demo_hf
    sp = spm.SentencePieceProcessor(model_file=str(demo.vocab))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(tok).__name__ == "T5Tokenizer" and len(tok) == sp.get_piece_size()
    rows = [json.loads(line) for line in xsum_sample.read_text().splitlines()]
    for text in [r[k] for r in rows for k in ("document", "summary")]:
        ids = tok(text).input_ids
        assert ids == sp.encode(text) + [1]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert tok.decode(tok(rows[0]["summary"]).input_ids, skip_special_tokens=True) == \
        rows[0]["summary"]

    # The files equal what the real producer writes for the same pieces and charsmap.
    model = demo.vocab.read_bytes()
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    reference = folder.parent / "reference-tokenizer"
    T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=precompiled_charsmap(model),
                extra_ids=0).save_pretrained(str(reference))
    assert json.loads((folder / "tokenizer.json").read_text()) == json.loads(
        (reference / "tokenizer.json").read_text())
    ours = json.loads((folder / "tokenizer_config.json").read_text())
    theirs = json.loads((reference / "tokenizer_config.json").read_text())
    theirs.pop("model_max_length")  # transformers' "no limit" default, left to it
    assert ours == theirs
    assert (folder / "spiece.model").read_bytes() == model


def test_greedy_outputs_of_the_trained_demo_equal_our_engines(demo_hf, xsum_sample):
    from transformers import AutoTokenizer

    from serving.engine import SamplingParams

    folder, ft_folder, demo = demo_hf
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = _load(folder)
    rows = [json.loads(line) for line in xsum_sample.read_text().splitlines()]
    inputs = [np.asarray(tok("summarize: " + r["document"], truncation=True,
                             max_length=128).input_ids) for r in rows]
    n_out = demo.settings.max_output_len
    ours = T5Engine.load(str(ft_folder)).generate(
        inputs, [SamplingParams(max_output_len=n_out)] * len(rows))
    exact = 0
    for ids, res, row in zip(inputs, ours, rows, strict=True):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(ids[None]), max_new_tokens=n_out,
                                 do_sample=False, num_beams=1)[0].numpy()[1:]  # drop start id
        n = int(res.sequence_length[0])
        assert out.tolist()[:n] == res.output_ids[0][:n].tolist()
        assert len(out) == n or out[n:].tolist() == [0] * (len(out) - n)  # HF pads after EOS
        exact += tok.decode(out, skip_special_tokens=True) == row["summary"]
    assert exact >= len(rows) // 2  # the trained model reproduces its summaries


def test_an_ft_folder_and_an_hf_folder_are_never_mixed(converted):
    """Either format into a folder the other wrote: refused in one line, nothing touched."""
    hf_folder, ft_folder, summary = converted["t5v1-ocdbt"]
    src = summary["source"]
    ft_root, hf_root = ft_folder.parents[2], hf_folder.parent
    before = sorted(p.name for p in hf_folder.iterdir())
    with pytest.raises(ConversionError,
                       match="already holds a different model .format 'ft', not 'hf'"):
        convert(ConvertOptions(src=src, dst=str(ft_root), model_name="t5v1-ocdbt", format="hf",
                               resume=True, progress=False))
    with pytest.raises(ConversionError, match="already holds files that are not this conversion"):
        convert(ConvertOptions(src=src, dst=str(hf_root), model_name="t5v1-ocdbt",
                               resume=True, progress=False))
    assert sorted(p.name for p in hf_folder.iterdir()) == before


@pytest.mark.parametrize(("weight_dtype", "torch_dtype"), [
    ("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_shard_header_is_what_safetensors_writes(weight_dtype, torch_dtype):
    """core.hf_format's header, then the data in its order, is byte for byte the file
    safetensors' own serializer makes of the same tensors (which it orders by name when the
    dtypes are equal: so the tensors are given here sorted by name)."""
    from safetensors.torch import save

    specs = sorted(hf_format.decoder_block(MODELS["ul2"], 0), key=lambda t: t.name)
    gen = torch.Generator().manual_seed(0)
    tensors = {t.name: torch.randn(t.shape, generator=gen).to(torch_dtype) for t in specs}
    header, offsets = hf_format.safetensors_header(specs, weight_dtype)
    data = b"".join(tensors[t.name].view(torch.uint8).numpy().tobytes() for t in specs)
    theirs = save(tensors, metadata={"format": "pt"})
    assert header + data == theirs
    assert offsets[0] == len(header) and len(theirs) == hf_format.shard_bytes(specs,
                                                                             weight_dtype)
