"""`make` installs the Linux-only tritonserver wheel only where pip finds one for the platform:
the decision is pip's own answer to a dry-run install, asked here for other platforms."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _make(flags: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-s", "tritonserver-wheel", f"PY={sys.executable}",
                           f"PIP_PLATFORM_FLAGS={flags}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pip_decides_the_tritonserver_wheel_per_platform():
    linux = _make("--platform manylinux_2_35_x86_64 --python-version 3.11")
    # A platform the wheel exists for: pip says so (nothing is installed when asking).
    assert linux == ("tritonserver: pip has nvidia-pytriton==0.7.0 for --platform "
                     "manylinux_2_35_x86_64 --python-version 3.11")
    # macOS: pip finds no wheel, so the install is skipped with one line saying what and why.
    mac = _make("--platform macosx_11_0_arm64 --python-version 3.11")
    assert mac.startswith("tritonserver: skipped nvidia-pytriton==0.7.0: pip has no wheel for "
                          "this platform (ERROR: No matching distribution found for "
                          "nvidia-pytriton==0.7.0)")
    assert len(mac.splitlines()) == 1


def test_the_client_side_installs_on_apple_silicon_macs():
    # Every pin of pyproject.toml has a wheel for macOS 12+ on arm64, as pip itself answers
    # (rouge-score publishes only a pure-Python sdist, which builds anywhere, so it is left
    # out of the binary-only question; --no-deps keeps the question to our pins, which is
    # where the binary packages are: ray, jaxlib, tensorstore, pyarrow, sentencepiece...).
    # Intel Macs are not covered: Ray 2.60 has no macosx x86_64 wheel (docs/gke.md, section 0).
    import tomllib

    pins = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
            ["dependencies"] if not d.startswith("rouge-score")]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
         "--only-binary=:all:", "--platform", "macosx_12_0_arm64", "--python-version", "3.11",
         "--quiet", *pins], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
