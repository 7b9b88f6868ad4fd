"""Triton servers on the Ray cluster's own nodes: one Ray actor owns one ``tritonserver``.

The binary is the one the ``nvidia-pytriton`` wheel ships (``pytriton/tritonserver/bin``) with
its Python backend. Each actor

- lays out a backend directory holding the Python backend and the stub built for this
  interpreter's version (as pytriton does; the wheel keeps one stub per Python version aside),
- launches ``tritonserver --model-control-mode=explicit --load-model=NAME`` on free ports (or
  the ones asked for), with this interpreter's LIBDIR first in ``LD_LIBRARY_PATH`` (the stub
  links ``libpython3.x.so``) and the repository root on ``PYTHONPATH`` (the model's ``model.py``
  is a one-line shim importing :mod:`serving.triton_model.model`),
- waits for ``/v2/health/ready`` and the model's ready flag,
- watches the process and restarts it on the same ports when it dies after having been ready.

:class:`LocalServers` is the driver-side handle::

    with LocalServers(repo, "t5", replicas=2) as servers:
        servers.endpoints  # [{"grpc": "127.0.0.1:PORT", "http": ..., "metrics": ...}, ...]
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
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
import uuid
from pathlib import Path
from typing import Any

import ray

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Ports are advertised as this host when the server binds every interface.
_ANY_HOSTS = ("0.0.0.0", "::", "")
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A tritonserver that could not start, load its model, or become ready."""


def pytriton_dist() -> Path:
    """The ``tritonserver`` folder inside the installed nvidia-pytriton wheel."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def pytriton_libs() -> Path:
    """Shared libraries the wheel's binaries link (auditwheel's ``nvidia_pytriton.libs``)."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


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
    - PYTHONPATH holds the repository root and this interpreter's site-packages, for any
      Python the server starts un-isolated (the stub itself runs with -E; see ``_launch``).
    """
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [libdir, str(pytriton_libs())]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    import site

    py = [str(REPO_ROOT), *(extra_pythonpath or []), *site.getsitepackages()]
    if env.get("PYTHONPATH"):
        py.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(py))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A persistent XLA cache shared by every server on the node: a restarted server (or a
    # second replica) reuses the decoding programs instead of compiling them again, which on
    # CPU takes seconds per (batch, length) bucket. JAX's own variable wins when set.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax_cache_dir())
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


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
    """Run in the child before exec: SIGKILL it if the actor process that started it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonServer:
    """One tritonserver process and its watcher, inside one actor (or a test process).

    Args:
      model_repository: folder holding ``<model_name>/config.pbtxt``; a gs:// URL is
        downloaded into this server's work folder first.
      model_name: the one model this server loads.
      host: address to bind; ``0.0.0.0`` binds all and advertises the node's IP.
      grpc_port / http_port / metrics_port: 0 picks free ports (kept across restarts).
      log_dir: where ``tritonserver.log`` goes (a temp folder when None).
    """

    def __init__(self, model_repository: str, model_name: str, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 log_dir: str | None = None, log_verbose: int = 0,
                 watch_interval_s: float = 0.5) -> None:
        _check_repository(model_repository, model_name)
        self.model_name = model_name
        self.host = host
        self.advertised_host = ray.util.get_node_ip_address() if host in _ANY_HOSTS else host
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
            # No CUDA here or on CPU nodes: do not ask for pinned host memory.
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
                    # The stub runs Python isolated (-E: PYTHONPATH ignored) but keeps '' on
                    # sys.path, i.e. its cwd: starting in the repository root is what makes
                    # the model.py shim's ``import serving...`` work.
                    stdin=subprocess.DEVNULL, env=server_env(), cwd=REPO_ROOT,
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
        """Server ready (``/v2/health/ready``) and the model ready."""
        import tritonclient.http as httpclient

        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            client = httpclient.InferenceServerClient(
                f"{self._local_host()}:{self.ports['http']}", connection_timeout=2.0,
                network_timeout=2.0)
            try:
                return bool(client.is_server_ready() and client.is_model_ready(self.model_name))
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not listening yet reads as not ready
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


@ray.remote(max_restarts=0, max_concurrency=4)
class TritonServerActor:
    """A Ray actor owning one :class:`TritonServer` (one replica)."""

    def __init__(self, *args, **kwargs) -> None:
        self.server = TritonServer(*args, **kwargs)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def start(self) -> dict[str, str]:
        return self.server.start()

    def wait_ready(self, timeout_s: float) -> dict[str, str]:
        return self.server.wait_ready(timeout_s)

    def is_ready(self) -> bool:
        return self.server.is_ready()

    def kill(self) -> int:
        return self.server.kill()

    def status(self) -> dict[str, Any]:
        return self.server.status()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines)

    def stop(self) -> None:
        self.server.stop()


def _runtime_env() -> dict | None:
    """GCS emulator / auth variables of this process, for the actors (they stage gs://)."""
    from core.gcs_env import forwarded_env

    env = forwarded_env()
    return {"env_vars": env} if env else None


class LocalServers:
    """``replicas`` tritonservers for one model, each owned by an actor, spread over nodes.

    Args:
      model_repository: a local model repository folder (every node must see the path; on one
        machine that is always so), or a gs:// URL that each server downloads on its node.
      model_name: the model to load.
      replicas: how many servers.
      host: bind address; ``0.0.0.0`` advertises each node's IP.
      grpc_port / http_port / metrics_port: 0 picks free ports; N gives replica i port N + i.
      ready_timeout: seconds to wait for every replica to be ready.
      num_cpus: Ray CPUs each actor holds, so other work is not scheduled onto its cores.

    Ray must be initialised (``ray_jobs._cli.init_ray``).
    """

    def __init__(self, model_repository: str, model_name: str, replicas: int = 1,
                 host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                 metrics_port: int = 0, ready_timeout: float = 300.0,
                 num_cpus: float = 1.0, log_verbose: int = 0) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        _check_repository(model_repository, model_name)
        self.model_repository = model_repository if is_gcs(model_repository) \
            else str(Path(model_repository).resolve())
        self.model_name = model_name
        self.replicas = replicas
        self.host = host
        self.ports = (grpc_port, http_port, metrics_port)
        self.ready_timeout = ready_timeout
        self.num_cpus = num_cpus
        self.log_verbose = log_verbose
        self.actors: list[ray.actor.ActorHandle] = []
        self.endpoints: list[dict[str, str]] = []

    def start(self) -> list[dict[str, str]]:
        """Start every replica and wait until all are ready; returns their endpoints."""
        if not ray.is_initialized():
            raise ServerError("Ray is not initialised; call ray_jobs._cli.init_ray first")
        try:
            for i in range(self.replicas):
                ports = [p + i if p else 0 for p in self.ports]
                actor = TritonServerActor.options(
                    num_cpus=self.num_cpus, scheduling_strategy="SPREAD",
                    runtime_env=_runtime_env()).remote(self.model_repository, self.model_name, self.host, *ports,
                         log_verbose=self.log_verbose)
                self.actors.append(actor)
            try:
                ray.get([a.start.remote() for a in self.actors])
            except ray.exceptions.RayActorError as exc:
                # The actor's constructor failed (bad repository, download error): say why.
                lines = [ln for ln in str(exc).splitlines() if "Error:" in ln]
                raise ServerError(lines[-1].strip() if lines else str(exc)) from None
            self.endpoints = self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def wait_ready(self, timeout: float | None = None) -> list[dict[str, str]]:
        """Block until every replica is ready (after a restart too)."""
        timeout = self.ready_timeout if timeout is None else timeout
        try:
            return ray.get([a.wait_ready.remote(timeout) for a in self.actors])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            raise ServerError(str(cause).splitlines()[-1] if str(cause) else repr(cause)) \
                from None

    def kill(self, i: int) -> int:
        """SIGKILL replica i's tritonserver (not its actor): the watcher must bring it back."""
        return ray.get(self.actors[i].kill.remote())

    def status(self) -> list[dict[str, Any]]:
        return ray.get([a.status.remote() for a in self.actors])

    def node_ids(self) -> list[str]:
        """The Ray node each replica runs on."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def stop(self) -> None:
        """Stop every server, then its actor. Safe to call twice."""
        actors, self.actors = self.actors, []
        if not actors:
            return
        with contextlib.suppress(Exception):
            ray.get([a.stop.remote() for a in actors], timeout=60)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def __enter__(self) -> LocalServers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

