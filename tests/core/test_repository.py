"""core.repository's handle on real files, and the rule that nothing else reads them.

The weights-folder rule and the reading of config.pbtxt and config.ini live in
core/repository.py alone; the Triton model, evaluation (both backends), serve and the
pipeline ask its ConvertedModel. A second reader anywhere in the library fails
test_one_reader_of_the_repository.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format

from core import ft_format, repository
from core.repository import ConvertedModel
from core.t5config import T5Config

REPO = Path(__file__).resolve().parents[2]
# What only core/repository.py may call (core/ft_format.py defines the formats it reads).
READERS = {"parse_config_ini", "parse_pbtxt", "weights_dir_name"}
OWNERS = {"core/repository.py", "core/ft_format.py"}
# Folders that are not the library: the test writers make repositories as NVIDIA's tools do.
NOT_LIBRARY = ("tests/", "testing/", "bench/")

CFG = T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_encoder_layers=1,
               num_decoder_layers=1)


def _write(root: Path, config, tensor_parallel: int = 1, sub: str | None = None) -> Path:
    model = root / config.name
    weights = model / "1" / (sub or ft_format.weights_dir_name(tensor_parallel))
    weights.mkdir(parents=True)
    (model / "config.pbtxt").write_text(repository.to_pbtxt(config))
    (weights / ft_format.CONFIG_INI).write_text(ft_format.config_ini(CFG, "fp32", tensor_parallel))
    return weights


def test_the_handle_answers_from_config_pbtxt(tmp_path):
    config = repository.model_config("t5", "jax", 2, data_type="fp16")
    weights = _write(tmp_path, config, tensor_parallel=2)
    model = ConvertedModel.open(str(tmp_path), "t5")
    assert (model.engine, model.tensor_parallel, model.pipeline_parallel) == ("jax", 2, 1)
    assert model.data_type == "fp16" and model.max_input_len == 1024
    assert model.max_batch_size == 128 and "input_ids" in model.inputs
    assert model.weights_dir == str(weights)
    assert model.vocab_url == str(tmp_path / "t5" / "spiece.model")
    cfg, dtype = model.config_ini()
    assert (cfg.vocab_size, dtype) == (64, "fp32")
    # Every parameter is there by name, including ones this code does not know yet.
    config.parameters["batch_invariant"].string_value = "1"
    (tmp_path / "t5" / "config.pbtxt").write_text(repository.to_pbtxt(config))
    assert ConvertedModel.open(str(tmp_path), "t5").parameter("batch_invariant") == "1"


def test_the_weights_folder_rule(tmp_path):
    # FT: default_model_filename; an explicit model_checkpoint_path wins over it.
    ft = repository.model_config("ft", "fastertransformer", 1)
    weights = _write(tmp_path, ft)
    assert ConvertedModel.open(str(tmp_path), "ft").weights_dir == str(weights)
    elsewhere = tmp_path / "elsewhere"
    explicit = repository.model_config("ex", "fastertransformer", 1,
                                       model_checkpoint_path=str(elsewhere))
    _write(tmp_path, explicit)
    assert ConvertedModel.open(str(tmp_path), "ex").weights_dir == str(elsewhere)
    # Neither parameter nor default filename: 1/<tensor_para_size>-gpu.
    bare = text_format.Parse('name: "bare" parameters { key: "tensor_para_size" '
                             'value { string_value: "4" } }', repository.mc.ModelConfig())
    assert ConvertedModel("r", "bare", bare).weights_dir == "r/bare/1/4-gpu"
    assert ConvertedModel.unconfigured("r", "none").weights_dir == "r/none/1/1-gpu"
    assert repository.weights_url("r", "m", 2) == "r/m/1/2-gpu"


def test_missing_and_malformed(tmp_path):
    assert ConvertedModel.find(str(tmp_path), "t5") is None
    with pytest.raises(FileNotFoundError):
        ConvertedModel.open(str(tmp_path), "t5")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.pbtxt").write_text("name: [")
    with pytest.raises(text_format.ParseError):
        ConvertedModel.open(str(tmp_path), "t5")


def _library_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if not n.startswith(NOT_LIBRARY) and (REPO / n).is_file()]


def _second_readers(files: list[Path]) -> list[str]:
    """Uses of the readers' names, and of the word config.pbtxt or config.ini joined into a
    path, outside core/repository.py."""
    bad = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel in OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.id if isinstance(node, ast.Name) else
                    node.attr if isinstance(node, ast.Attribute) else
                    node.name if isinstance(node, ast.alias) else None)
            if name in READERS:
                bad.append(f"{rel}:{node.lineno} uses {name}")
            if isinstance(node, ast.Call) and any(
                    isinstance(a, ast.Constant) and a.value in ("config.pbtxt", "config.ini")
                    for a in node.args):
                bad.append(f"{rel}:{node.lineno} builds a path to {node.args[-1].value}")
    return bad


def test_one_reader_of_the_repository():
    bad = _second_readers(_library_files())
    assert not bad, "read config.pbtxt/config.ini through core.repository:\n" + "\n".join(bad)


def test_the_rule_catches_a_second_reader(tmp_path):
    probe = REPO / "evaluation" / "_reader_probe.py"
    probe.write_text("from core import ft_format, storage\n\n"
                     "def f(d):\n"
                     "    return ft_format.parse_config_ini(storage.join(d, 'config.ini'))\n")
    try:
        bad = _second_readers([probe])
    finally:
        probe.unlink()
    assert any("uses parse_config_ini" in b for b in bad)
    assert any("builds a path to config.ini" in b for b in bad)
