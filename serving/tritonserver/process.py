"""One ``tritonserver`` process, launched and watched from plain Python: no Ray needed.

The binary is the one the ``nvidia-pytriton`` wheel ships (``pytriton/tritonserver/bin``) with
its Python backend; only its files are used, pytriton's own Python API is never imported (its
metadata pins numpy<2, which the DLPack-only model does not need). :class:`TritonServer`

- lays out a backend directory holding the Python backend and the stub built for this
  interpreter's version (as pytriton does; the wheel keeps one stub per Python version aside),
- launches ``tritonserver --model-control-mode=explicit --load-model=NAME`` on free ports (or
  the ones asked for), with this interpreter's LIBDIR first in ``LD_LIBRARY_PATH`` (the stub
  links ``libpython3.x.so``); the model's ``model.py`` is a one-line shim importing
  :mod:`serving.triton_model.model` from this project's installed package (``environment.stub_cwd``),
- waits for ``/v2/health/ready`` and the model's ready flag,
- watches the process and restarts it on the same ports when it dies after having been ready.

The Ray actors of :mod:`serving.local` each own one; a plain command runs one too::

    python -m serving.tritonserver --model-repository DIR [--model-name NAME]

prints one JSON line ``{"model": NAME, "endpoints": [{"grpc": ..., "http": ..., "metrics":
...}], "pid": PID, "log": PATH}`` once the model is ready, serves until SIGINT/SIGTERM, then
stops the server and exits 0. On a GPU machine the JAX engine inside it runs on the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from serving.tritonserver import ready
from serving.tritonserver.environment import _ANY_HOSTS, free_ports, node_ip, server_env, stub_cwd
from serving.tritonserver.errors import ServerError
from serving.tritonserver.staging import check_repository, is_gcs, stage_model
from serving.tritonserver.wheel import prepare_backends, pytriton_dist

LOG = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


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
        check_repository(model_repository, model_name)
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
        """``{"grpc", "http", "metrics"}``: ``host:port`` each, as clients should dial them."""
        return {k: f"{self.advertised_host}:{p}" for k, p in self.ports.items()}

    @property
    def pid(self) -> int | None:
        """The current tritonserver process id (None before start and after stop)."""
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        """tritonserver's argv for the next launch (a fresh shared-memory prefix each time)."""
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
        """The process runs, the server is ready and the model is loaded (HTTP probes)."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        return ready.is_ready(f"{self._local_host()}:{self.ports['http']}", self.model_name)

    def _local_host(self) -> str:
        return "127.0.0.1" if self.host in _ANY_HOSTS else self.host

    def _died_unready(self) -> bool:
        """The process exited before it was ever ready (a start-up failure: no restart)."""
        with self._lock:
            proc = self._proc
            return proc is not None and proc.poll() is not None and not self.ever_ready

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, str]:
        """Block until ready; raises ServerError with the log's tail if it dies or times out."""
        if ready.wait_for(self.is_ready, timeout_s, give_up=self._died_unready):
            self.ever_ready = True
            return self.endpoints
        proc = self._proc
        if proc is not None and proc.poll() is not None and not self.ever_ready:
            raise ServerError(
                f"tritonserver for {self.model_name} exited with code {proc.returncode} "
                f"before it was ready: {self.failure_reason()}"
            )
        raise ServerError(
            f"tritonserver for {self.model_name} not ready after {timeout_s:.0f}s: "
            f"{self.failure_reason()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of tritonserver.log ("" when there is none yet)."""
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
        """pid, alive, ready, restarts, log path and endpoints, for monitors."""
        return {"pid": self.pid, "alive": self._proc is not None and self._proc.poll() is None,
                "ready": self.is_ready(), "restarts": self.restarts, "log": str(self.log_path),
                "endpoints": self.endpoints}
