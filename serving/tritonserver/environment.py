"""tritonserver's environment: variables, working directory, ports, this node's address."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from serving.tritonserver.wheel import pytriton_libs

LOG = logging.getLogger(__name__)

# The folder holding serving/: only a fallback for a checkout that is not installed.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
# Ports are advertised as this host when the server binds every interface.
_ANY_HOSTS = ("0.0.0.0", "::", "")


def server_env(extra_pythonpath: list[str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs.

    - LIBDIR first in LD_LIBRARY_PATH: the stub links the interpreter's libpython, and a
      system libpython of the same version but another build must not win.
    - PATH starts with this interpreter's bin folder: the embedded interpreter finds its prefix
      (and the virtualenv's site-packages) from the ``python3`` it sees first on PATH.
    - PYTHONPATH holds this interpreter's site-packages, for any Python the server starts
      un-isolated (the stub itself runs with -E and finds the installed project through its
      prefix's site-packages; see :func:`stub_cwd`).
    """
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [libdir, str(pytriton_libs())]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    import site

    py = [*(extra_pythonpath or []), *site.getsitepackages()]
    if env.get("PYTHONPATH"):
        py.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(py))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A persistent XLA cache shared by every server on the node: a restarted server (or a
    # second replica) reuses the decoding programs instead of compiling them again, which on
    # CPU takes seconds per (batch, length) bucket. JAX's own variable wins when set.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax_cache_dir())
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # On a GPU, JAX would take 75 % of its memory at start-up; the engine allocates as it goes.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def node_ip() -> str:
    """This machine's address on its default route (what Ray advertises as the node's IP).

    A UDP ``connect`` sends nothing; it only makes the kernel pick the outgoing interface.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("8.8.8.8", 80))
        return s.getsockname()[0]
    return socket.gethostbyname(socket.gethostname())


def jax_cache_dir() -> str:
    """``$T5FT_JAX_CACHE``, else a folder in the system temp dir."""
    return os.environ.get("T5FT_JAX_CACHE") or os.path.join(tempfile.gettempdir(),
                                                             "t5ft-jax-cache")


def free_ports(host: str, n: int) -> list[int]:
    """n distinct ports nothing listens on right now (held open together, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host if host not in _ANY_HOSTS else "", 0))
            ports.append(sock.getsockname()[1])
        return ports


def stub_cwd(workdir: Path) -> Path:
    """The working directory for tritonserver and its Python stubs.

    The stub runs Python isolated (-E: PYTHONPATH ignored) with only its cwd ('') and the
    prefix's site-packages on sys.path. When ``serving`` imports from ``workdir`` in such an
    interpreter, the project is installed (a wheel or ``pip install -e .``) and ``workdir`` is
    the answer: the model repository then needs nothing from a checkout. Otherwise (a Ray
    ``--working-dir`` upload, not installed) the folder above ``serving/`` is, with a warning.
    """
    probe = subprocess.run(
        [sys.executable, "-E", "-c", "import importlib.util as u; "
         "raise SystemExit(u.find_spec('serving.triton_model') is None)"],
        cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if probe.returncode == 0:
        return workdir
    LOG.warning("this project is not installed here; the Python model imports serving from "
                "%s (working directory of tritonserver)", _SOURCE_ROOT)
    return _SOURCE_ROOT
