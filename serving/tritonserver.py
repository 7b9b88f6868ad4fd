"""One ``tritonserver`` process, launched and watched from plain Python: no Ray needed.

The binary is the one the ``nvidia-pytriton`` wheel ships (``pytriton/tritonserver/bin``) with
its Python backend; only its files are used, pytriton's own Python API is never imported (its
metadata pins numpy<2, which the DLPack-only model does not need). :class:`TritonServer`

- lays out a backend directory holding the Python backend and the stub built for this
  interpreter's version (as pytriton does; the wheel keeps one stub per Python version aside),
- launches ``tritonserver --model-control-mode=explicit --load-model=NAME`` on free ports (or
  the ones asked for), with this interpreter's LIBDIR first in ``LD_LIBRARY_PATH`` (the stub
  links ``libpython3.x.so``); the model's ``model.py`` is a one-line shim importing
  :mod:`serving.triton_model.model` from this project's installed package (:func:`stub_cwd`),
- waits for ``/v2/health/ready`` and the model's ready flag,
- watches the process and restarts it on the same ports when it dies after having been ready.

The Ray actors of :mod:`serving.local` each own one; a plain command runs one too::

    python -m serving.tritonserver --model-repository DIR [--model-name NAME]

prints one JSON line ``{"model": NAME, "endpoints": [{"grpc": ..., "http": ..., "metrics":
...}], "pid": PID, "log": PATH}`` once the model is ready, serves until SIGINT/SIGTERM, then
stops the server and exits 0. On a GPU machine the JAX engine inside it runs on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

# The folder holding serving/: only a fallback for a checkout that is not installed.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
# Ports are advertised as this host when the server binds every interface.
_ANY_HOSTS = ("0.0.0.0", "::", "")
_PR_SET_PDEATHSIG = 1
# Readiness probes go straight to the server, whatever http_proxy says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A tritonserver that could not start, load its model, or become ready."""


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


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def stage_model(repository: str, model_name: str, dst: Path) -> Path:
    """Download ``repository/model_name`` (a gs:// URL) into ``dst``; returns the new root.

    tritonserver reads gs:// itself only with credentials in its own environment; going
    through core.storage uses the same client (and emulator settings) as the rest of the
    pipeline, and runs on the node that serves, so every node gets its own copy.
    """
    from core import storage

    src = storage.join(repository, model_name)
    names = storage.list_files(src)
    if "config.pbtxt" not in names:
        raise ServerError(f"{src} has no config.pbtxt")
    LOG.info("downloading %d files of %s to %s", len(names), src, dst)
    for name in names:
        target = dst / model_name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with storage.open_read(storage.join(src, name)) as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
    return dst


def _check_repository(model_repository: str, model_name: str) -> None:
    if is_gcs(model_repository):
        from core import storage

        ok = storage.exists(storage.join(model_repository, model_name, "config.pbtxt"))
    else:
        ok = (Path(model_repository) / model_name / "config.pbtxt").is_file()
    if not ok:
        raise ServerError(f"model repository {model_repository} has no {model_name}/config.pbtxt")


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it if the process that started it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonServer:
    """One tritonserver process and its watcher, in any process (a Ray actor, a command).

    Args:
      model_repository: folder holding ``<model_name>/config.pbtxt``; a gs:// URL is
        downloaded into this server's work folder first.
      model_name: the one model this server loads.
      host: address to bind; ``0.0.0.0`` binds all and advertises the node's IP.
      grpc_port / http_port / metrics_port: 0 picks free ports (kept across restarts).
      log_dir: where ``tritonserver.log`` goes (a temp folder when None).
      advertised_host: the host the endpoints name when ``host`` binds every interface (the
        Ray actor passes Ray's node IP); default: this machine's address (:func:`node_ip`).
    """

    def __init__(self, model_repository: str, model_name: str, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 log_dir: str | None = None, log_verbose: int = 0,
                 watch_interval_s: float = 0.5, advertised_host: str | None = None) -> None:
        _check_repository(model_repository, model_name)
        self.model_name = model_name
        self.host = host
        if host not in _ANY_HOSTS:
            self.advertised_host = host
        else:
            self.advertised_host = advertised_host or node_ip()
        spare = iter(free_ports(host, 3))
        self.ports = {
            "grpc": grpc_port or next(spare),
            "http": http_port or next(spare),
            "metrics": metrics_port or next(spare),
        }
        self._own_workdir = log_dir is None
        self.workdir = Path(log_dir or tempfile.mkdtemp(prefix="t5ft-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "tritonserver.log"
        if is_gcs(model_repository):
            self.model_repository = stage_model(model_repository, model_name,
                                                self.workdir / "repo")
        else:
            self.model_repository = Path(model_repository).resolve()
        self.backends = prepare_backends(self.workdir / "backends")
        self.cwd = stub_cwd(self.workdir)
        self.log_verbose = log_verbose
        self.watch_interval_s = watch_interval_s
        self.restarts = 0
        self.ever_ready = False
        self._proc: subprocess.Popen | None = None
        self._launch_error: str | None = None
        self._shm_prefix = ""
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- process ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> dict[str, str]:
        return {k: f"{self.advertised_host}:{p}" for k, p in self.ports.items()}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        binary = pytriton_dist() / "bin" / "tritonserver"
        # A fresh shm prefix per launch: a stub orphaned by a crash may still hold the old one.
        self._shm_prefix = f"t5ft{uuid.uuid4().hex[:12]}"
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--load-model={self.model_name}",
            f"--backend-directory={self.backends}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
            f"--http-address={self.host}", f"--http-port={self.ports['http']}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            # Tensors reach the model through DLPack; Triton needs no pinned host memory.
            "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]

    def _launch(self) -> None:
        with self._lock:
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== launch {self.restarts} at {time.ctime()} ===\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT,
                    # The stub keeps '' (its cwd) on sys.path: see stub_cwd.
                    stdin=subprocess.DEVNULL, env=server_env(), cwd=self.cwd,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            LOG.info("tritonserver pid %s for %s on %s", self._proc.pid, self.model_name,
                     self.endpoints)

    def start(self) -> dict[str, str]:
        """Launch the server and its watcher; returns the endpoints (not yet ready).

        The watcher thread does every launch: PR_SET_PDEATHSIG fires when the *thread* that
        forked exits, and the watcher lives exactly as long as the server should.
        """
        self._stopping.clear()
        launched = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(launched,),
                                         name="triton-watcher", daemon=True)
        self._watcher.start()
        launched.wait(timeout=30)
        if self._proc is None:
            raise ServerError(f"tritonserver for {self.model_name} could not be launched: "
                              f"{self._launch_error or 'timed out'}")
        return self.endpoints

    def _reap(self, proc: subprocess.Popen) -> None:
        """Kill what a dead (or stopping) server leaves: its stubs and their shared memory."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
        for path in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _watch(self, launched: threading.Event) -> None:
        """Restart a server that dies once it has served; leave one that never came up dead."""
        try:
            self._launch()
        except OSError as exc:
            self._launch_error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            launched.set()
        while not self._stopping.wait(self.watch_interval_s):
            with self._lock:
                proc = self._proc
                if proc is None or proc.poll() is None:
                    continue
                if self._stopping.is_set():
                    return
                if not self.ever_ready:
                    # Startup failure (bad model, port taken): restarting would only loop.
                    return
                LOG.warning("tritonserver pid %s exited with %s; restarting", proc.pid,
                            proc.returncode)
                self._reap(proc)
                self.restarts += 1
                self.ever_ready = False
                self._launch()

    def kill(self) -> int:
        """SIGKILL the server process only, as a crash would (tests)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                raise ServerError("no running tritonserver to kill")
            pid = self._proc.pid
            os.kill(pid, signal.SIGKILL)
            return pid

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the watcher stops first."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    LOG.warning("tritonserver pid %s ignored SIGTERM; killing", proc.pid)
            self._reap(proc)
            self._proc = None
        if self._own_workdir and not os.environ.get("T5FT_KEEP_TRITON_LOGS"):
            # A clean stop leaves nothing behind; set T5FT_KEEP_TRITON_LOGS to keep the log.
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- readiness ---------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Server ready (``/v2/health/ready``) and the model ready (``/v2/models/NAME/ready``).

        Plain HTTP through the standard library: the launcher needs no client package (a GPU
        machine may have tritonclient's gRPC side only).
        """
        if self._proc is None or self._proc.poll() is not None:
            return False
        base = f"http://{self._local_host()}:{self.ports['http']}/v2"
        try:
            for path in ("/health/ready", f"/models/{self.model_name}/ready"):
                with _NO_PROXY.open(base + path, timeout=2.0) as reply:
                    if reply.status != 200:
                        return False
            return True
        except (OSError, urllib.error.URLError):  # not listening yet, or 400: not ready
            return False

    def _local_host(self) -> str:
        return "127.0.0.1" if self.host in _ANY_HOSTS else self.host

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, str]:
        """Block until ready; raises ServerError with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                self.ever_ready = True
                return self.endpoints
            with self._lock:
                proc = self._proc
                dead = proc is not None and proc.poll() is not None
            if dead and not self.ever_ready:
                raise ServerError(
                    f"tritonserver for {self.model_name} exited with code {proc.returncode} "
                    f"before it was ready: {self.failure_reason()}"
                )
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver for {self.model_name} not ready after {timeout_s:.0f}s: "
            f"{self.failure_reason()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure_reason(self) -> str:
        """The most telling line of the log: why the model failed to load, else the first
        error that is not CUDA noise (a CPU-only machine logs one at every start)."""
        tail = self.log_tail(300).splitlines()
        # A Python traceback is logged inside one quoted line with literal "\n": cut there.
        def first(pred) -> str | None:
            for line in tail:
                if pred(line):
                    line = line.split('] "', 1)[-1]  # drop Triton's "E1124 time pid file]"
                    return line.split("\\n")[0].strip().rstrip('"')
            return None

        return (first(lambda s: "failed to load '" in s and ":" in s.split("failed to load")[1])
                or first(lambda s: s.startswith("error:"))
                or first(lambda s: s.startswith("E") and "cuda" not in s.lower())
                or (tail[-1].strip() if tail else "no log output"))

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self._proc is not None and self._proc.poll() is None,
                "ready": self.is_ready(), "restarts": self.restarts, "log": str(self.log_path),
                "endpoints": self.endpoints}


# --- the plain command ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``python -m serving.tritonserver``'s flags (docs/interfaces.md)."""
    p = argparse.ArgumentParser(
        prog="python -m serving.tritonserver",
        description="Serve one model of a Triton model repository with one tritonserver "
        "process, without Ray. Prints one JSON line with the endpoints once the model is "
        "ready, restarts the server if it dies after that, and on SIGINT/SIGTERM stops it "
        "and exits 0.",
    )
    p.add_argument("--model-repository", required=True,
                   help="Triton model repository root: a local folder or gs://bucket/prefix "
                   "(downloaded to a work folder first)")
    p.add_argument("--model-name", default=None,
                   help="the model to load (a folder in it); default: the repository's only "
                   "model")
    for name, what in (("grpc", "gRPC"), ("http", "HTTP"), ("metrics", "metrics")):
        p.add_argument(f"--{name}-port", type=int, default=0,
                       help=f"{what} port; 0 picks a free one (default 0)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 binds all and advertises this machine's IP "
                   "(default 127.0.0.1)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for the model to be ready (default 300)")
    p.add_argument("--log-dir", default=None,
                   help="folder for tritonserver.log, kept after exit (default: a temporary "
                   "folder, removed on a clean stop)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return p


def _model_name(repository: str, asked: str | None) -> str:
    """``asked``, else the one folder of a local repository that holds a config.pbtxt."""
    from core.errors import UserError

    if asked:
        return asked
    if is_gcs(repository):
        raise UserError("--model-name is required with a gs:// repository")
    models = sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    if len(models) != 1:
        raise UserError(f"{repository} holds {len(models)} models ({', '.join(models) or 'none'})"
                        "; name one with --model-name")
    return models[0]


def main(argv: list[str] | None = None) -> int:
    """Start, announce, watch, stop: the command's whole life."""
    from core.errors import UserError

    args = build_parser().parse_args(argv)
    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a port")
    if args.ready_timeout <= 0:
        raise UserError(f"--ready-timeout must be > 0, got {args.ready_timeout}")
    name = _model_name(args.model_repository, args.model_name)
    try:
        server = TritonServer(args.model_repository, name, host=args.host,
                              grpc_port=args.grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, log_dir=args.log_dir,
                              log_verbose=args.log_verbose)
    except ServerError as exc:
        raise UserError(str(exc)) from None
    stop, ready = threading.Event(), threading.Event()

    def _on_signal(signum, _frame) -> None:
        print(f"received {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        stop.set()
        if not ready.is_set():
            raise KeyboardInterrupt  # abort the wait for readiness; finally stops the server

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        print(f"starting tritonserver for {name}", file=sys.stderr, flush=True)
        try:
            server.start()
            server.wait_ready(args.ready_timeout)
        except ServerError as exc:
            raise UserError(str(exc)) from None
        ready.set()
        # The ready line, always JSON: readers wait for it (same shape as ray_jobs.serve's).
        print(json.dumps({"model": name, "endpoints": [server.endpoints], "pid": server.pid,
                          "log": str(server.log_path)}), flush=True)
        restarts = 0
        while not stop.wait(1.0):
            if server.restarts != restarts:
                restarts = server.restarts
                print(f"tritonserver restarted ({restarts} so far)", file=sys.stderr, flush=True)
        print("stopping tritonserver", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    from ray_jobs._cli import run_main

    run_main(main)
