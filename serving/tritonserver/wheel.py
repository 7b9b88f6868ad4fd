"""The nvidia-pytriton wheel's layout: its ``tritonserver`` binary, libraries and backends.

Only the wheel's files are used; pytriton's own Python API is never imported (its metadata pins
numpy<2, which the DLPack-only model does not need).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from serving.tritonserver.errors import ServerError


def _pytriton_package() -> Path:
    """The installed ``pytriton`` package folder, found without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the nvidia-pytriton wheel (tritonserver) is not installed: run make, "
                          "or pip install --no-deps the version pyproject.toml pins")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def pytriton_dist() -> Path:
    """The ``tritonserver`` folder inside the installed nvidia-pytriton wheel."""
    return _pytriton_package() / "tritonserver"


def pytriton_libs() -> Path:
    """Shared libraries the wheel's binaries link (auditwheel's ``nvidia_pytriton.libs``)."""
    return _pytriton_package().parent / "nvidia_pytriton.libs"


def prepare_backends(dst: Path) -> Path:
    """A ``--backend-directory`` with the Python backend and this interpreter's stub.

    Symlinks only: the stub's RPATH is ``$ORIGIN``-relative, and ``$ORIGIN`` resolves through
    the link to the wheel, so its bundled libraries are still found.
    """
    dist = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    python_dir = dst / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (dist / "backends" / "python").iterdir():
        if src.is_file():
            _symlink(src, python_dir / src.name)
    _symlink(stub, python_dir / "triton_python_backend_stub")
    return dst


def _symlink(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)
