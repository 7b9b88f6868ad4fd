"""The Dockerfiles cannot be built here (no Docker, no registry): check by reading that their
pins are pyproject.toml's, that they copy exactly the packages `pip install .` installs, and that
the cluster examples point at the images they build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet

from cluster.config import DEFAULT_RAY_VERSION, load_config

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY = (REPO / "docker" / "ray.Dockerfile").read_text()
SERVING = (REPO / "docker" / "serving.Dockerfile").read_text()


def _pin(name: str) -> str:
    """The exact version pyproject.toml pins NAME (or NAME[extras]) to."""
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _arg(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)$", text, re.M).group(1)


def _copied(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^COPY (?:--chown=\S+ )?(\w+) \1$", text, re.M)}


def test_ray_image_pins_match_pyproject():
    assert _arg(RAY, "RAY_VERSION") == _pin("ray") == DEFAULT_RAY_VERSION
    python = _arg(RAY, "PYTHON_TAG")
    version = f"{python[2]}.{python[3:]}"
    assert version in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}" in RAY


def test_ray_image_installs_only_this_package():
    # The image is how code reaches Ray pods (no working_dir zip, docs/gke.md "Images"):
    # pyproject.toml's pins and nothing unpinned beside them.
    assert re.findall(r"^RUN pip install .*$", RAY, re.M) == ["RUN pip install --no-cache-dir ."]


def test_gpu_ray_image_gets_cuda_jax_at_the_pinned_version():
    # The gpu worker group runs `evaluate --backend in-process` on its GPUs: CUDA jax, pinned.
    match = re.search(r'if \[ "\$VARIANT" = "-gpu" \]; then \\\s+pip install --no-cache-dir '
                      r'"jax\[cuda12\]==(\S+)"', RAY)
    assert match and match.group(1) == _pin("jax")
    assert RAY.index("FROM rayproject") < RAY.index("\nARG VARIANT\n")  # visible after FROM
    cloudbuild = yaml.safe_load((REPO / "docker" / "cloudbuild.yaml").read_text())
    assert any("VARIANT=-gpu" in step["args"] for step in cloudbuild["steps"])
    assert cloudbuild["options"]["logging"] == "CLOUD_LOGGING_ONLY"


def test_serving_image_pins_match_pyproject():
    assert re.search(r'"jax\[cuda12\]==(\S+)"', SERVING).group(1) == _pin("jax")
    release = _arg(SERVING, "TRITON_RELEASE")
    # Triton >= 23.03 reads gs:// with Workload Identity; 24.12 ships Python 3.12.
    assert tuple(map(int, release.split("."))) >= (23, 3)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3" in SERVING
    assert "ea-bignlp" not in SERVING + RAY


def test_dockerfiles_copy_exactly_the_installed_packages():
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"][
        "include"]}
    assert _copied(RAY) == _copied(SERVING) == packages


def test_examples_use_the_images_built_here():
    for name in ("cluster-gke.yaml", "cluster-small.yaml"):
        cfg = load_config(REPO / "examples" / name)
        assert cfg.image.rsplit("/", 1)[-1] == f"ray:{_pin('ray')}-{_arg(RAY, 'PYTHON_TAG')}"
        assert cfg.gpu_image == f"{cfg.image}-gpu"
        assert cfg.triton.image.rsplit("/", 1)[-1].startswith("serving:")
        assert cfg.triton.backend == "python" and cfg.triton.run_as_user == 1000
    pipeline = yaml.safe_load((REPO / "examples" / "pipeline-ul2-gke.yaml").read_text())
    assert pipeline["convert"]["engine"] == "jax"
