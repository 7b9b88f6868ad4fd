"""The environment is the dependency set pyproject.toml declares (issue 13: numpy 2).

Read from the installed distributions' own metadata (importlib.metadata), against the pins
parsed with ``packaging``: every pinned requirement is installed at its pinned version, numpy is
2.x, the Python range admits 3.11 and 3.12, and the tritonserver wheel installed without its
dependencies is there, with a Python-backend stub for this interpreter.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pins(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"],
            pyproject["tool"]["t5x-ft-ray"]["tritonserver-wheel"]]
    return [Requirement(r) for r in reqs]


def test_every_pin_is_exact_and_installed(pyproject):
    wrong = []
    for req in _pins(pyproject):
        (spec,) = req.specifier  # one exact pin each
        assert spec.operator == "==", f"{req} is not pinned to one version"
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            wrong.append(f"{req.name} missing")
            continue
        if not req.specifier.contains(have, prereleases=True):
            wrong.append(f"{req.name} {have} (pinned {spec.version})")
    assert not wrong, f"installed set differs from pyproject.toml: {wrong}"


def test_numpy_2_and_python_range(pyproject):
    import numpy as np

    assert int(np.__version__.split(".")[0]) == 2
    numpy_pin = next(r for r in _pins(pyproject) if r.name == "numpy")
    assert next(iter(numpy_pin.specifier)).version.startswith("2.")
    python = SpecifierSet(pyproject["project"]["requires-python"])
    assert {"3.11", "3.12"} <= {v for v in ("3.10", "3.11", "3.12", "3.13") if v in python}
    assert "3.10" not in python and "3.13" not in python
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in python


def test_tritonserver_wheel_has_this_pythons_stub(pyproject):
    from serving.tritonserver import pytriton_dist

    pin = Requirement(pyproject["tool"]["t5x-ft-ray"]["tritonserver-wheel"])
    assert md.version(pin.name) == next(iter(pin.specifier)).version
    # The wheel still declares numpy<2 (why it goes in with --no-deps): the numpy we run is 2.
    declared = [Requirement(r) for r in md.requires(pin.name) or []]
    numpy_req = next(r for r in declared if r.name == "numpy")
    assert not numpy_req.specifier.contains(md.version("numpy"))
    dist = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (dist / "bin" / "tritonserver").is_file()
    assert (dist / "python_backend_stubs" / version / "triton_python_backend_stub").is_file()
