"""Each stage as its own job: ``python -m ray_jobs.<stage> ... --json`` on the same Ray cluster.

The pipeline composes the jobs through their command-line contract (interfaces.md) rather than
their internals: a config's keys are exactly the jobs' flags, each stage's one-line failure
reason and JSON summary come back as the contract says, and ``ray_jobs.serve``'s own SIGTERM
handling stops the servers. The child jobs join the pipeline's Ray cluster (``--address``), so
their tasks, actors and metrics show on the same dashboard.

Also here: whether a stage's outputs already exist and verify, so a rerun can skip it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from core import ft_format, storage
from pipeline.config import to_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
# Hash local weight files when a model is at most this big; above it sizes are checked only
# (hashing UL2's 80 GB would cost more than converting again with --resume, which hashes).
HASH_LIMIT_BYTES = 2 << 30


class StageError(RuntimeError):
    """A stage's job failed; the message is its one-line reason."""


def _env() -> dict[str, str]:
    env = os.environ.copy()
    parts = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def command(stage: str, settings: dict[str, Any], address: str | None,
            extra: list[str] = ()) -> list[str]:
    """The job's command line: this interpreter, ``-m ray_jobs.<stage>``, the settings' flags."""
    argv = [sys.executable, "-m", f"ray_jobs.{stage}", *to_argv(stage, settings), *extra]
    if address:
        argv += ["--address", address]
    return argv


class _Tail:
    """Forward a child's stream to ours as it comes (progress bars included), keeping the
    last lines for the failure message."""

    def __init__(self, stream: IO[bytes], sink: IO[str] | None, keep: int = 50) -> None:
        self.lines: list[str] = []
        self._partial = b""
        self._keep = keep
        self._thread = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes], sink: IO[str] | None) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.write(chunk.decode("utf-8", "replace"))
                    sink.flush()
            data = self._partial + chunk
            *done, self._partial = data.split(b"\n")
            for line in done:
                self.lines.append(line.decode("utf-8", "replace").rstrip("\r"))
            del self.lines[:-self._keep]

    def join(self, timeout: float | None = None) -> list[str]:
        self._thread.join(timeout)
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        return self.lines


def _reason(stage: str, code: int, stderr_lines: list[str]) -> str:
    for line in reversed(stderr_lines):
        if line.startswith("error:"):
            return f"{stage} failed: {line[len('error:'):].strip()}"
    last = next((ln.strip() for ln in reversed(stderr_lines) if ln.strip()), "no output")
    return f"{stage} failed with exit code {code}: {last}"


def run_job(stage: str, argv: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Run a job to completion; return its JSON summary (the last stdout line).

    Raises StageError with the job's one-line reason when it exits non-zero.
    """
    log(f"{stage}: {' '.join(_quote(a) for a in argv[1:])}")
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = _Tail(proc.stdout, None)  # its JSON summary is read below, not echoed
    err = _Tail(proc.stderr, sys.stderr)
    try:
        code = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    out_lines, err_lines = out.join(10), err.join(10)
    if code != 0:
        raise StageError(_reason(stage, code, err_lines))
    for line in reversed(out_lines):
        if line.strip():
            try:
                return json.loads(line)
            except ValueError:
                break
    raise StageError(f"{stage} exited 0 but its last stdout line is not a JSON summary")


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=,@" for c in arg) else repr(arg)


def _terminate(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class Servers:
    """``ray_jobs.serve`` running in the background until :meth:`stop` (SIGTERM).

    The job prints one JSON line with the endpoints once every replica is ready; until then
    its stderr is forwarded, and if it exits first, its one-line reason is raised.
    """

    def __init__(self, argv: list[str], log: Callable[[str], None],
                 ready_timeout_s: float) -> None:
        self.argv = argv
        self.log = log
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        self.log(f"serve: {' '.join(_quote(a) for a in self.argv[1:])}")
        self.proc = subprocess.Popen(self.argv, env=_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._err = _Tail(self.proc.stderr, sys.stderr)
        found: list[dict] = []
        reader = threading.Thread(target=self._read_ready, args=(found,), daemon=True)
        reader.start()
        reader.join(self.ready_timeout_s)
        if not found:
            code = self.proc.poll()
            self.stop()
            if code is not None:
                raise StageError(_reason("serve", code, self._err.join(5)))
            raise StageError(f"serve failed: no ready line after {self.ready_timeout_s:.0f}s")
        self.ready = found[0]
        return self.ready

    def _read_ready(self, found: list[dict]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if "endpoints" in obj:
                        found.append(obj)
                        # Keep draining stdout so the child never blocks on a full pipe.
                        threading.Thread(target=self._drain, daemon=True).start()
                        return
            print(line, file=sys.stderr, flush=True)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def grpc_urls(self) -> list[str]:
        return [e["grpc"] for e in self.ready.get("endpoints", [])]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the serve job (it stops every server it started) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.log("serve: stopping the servers")
            _terminate(self.proc)
        self.proc = None

    def __enter__(self) -> Servers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- outputs that verify -------------------------------------------------------------------


def weights_dir(convert: dict[str, Any]) -> str:
    t = int(convert.get("tensor_parallel") or 1)
    return storage.join(convert["dst"], convert.get("model_name") or "t5", "1",
                        ft_format.weights_dir_name(t))


def manifest_digest(model_repository: str, model_name: str,
                    tensor_parallel: int | None = None) -> str | None:
    """sha256 of the served model's manifest (its identity), or None when it has none.

    Without ``tensor_parallel`` the first ``<T>-gpu`` folder found is taken.
    """
    base = storage.join(model_repository, model_name, "1")
    with contextlib.suppress(FileNotFoundError, OSError, ValueError):
        subs = ([ft_format.weights_dir_name(tensor_parallel)] if tensor_parallel
                else sorted(storage.list_dirs(base)))
        for sub in subs:
            url = storage.join(base, sub, ft_format.MANIFEST)
            if storage.exists(url):
                return hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return None


def verify_conversion(convert: dict[str, Any]) -> str | None:
    """None when the converted model is complete and intact, else what is wrong.

    Complete: config.pbtxt, config.ini and a manifest marked complete whose files are every
    file FT opens for that config at that tensor-parallel size; intact: each file's size (and,
    for local models up to HASH_LIMIT_BYTES, its sha256) matches the manifest.
    """
    out = weights_dir(convert)
    model_dir = storage.join(convert["dst"], convert.get("model_name") or "t5")
    t = int(convert.get("tensor_parallel") or 1)
    try:
        if not storage.exists(storage.join(model_dir, "config.pbtxt")):
            return f"{model_dir}/config.pbtxt is missing"
        header, entries = ft_format.parse_manifest(
            storage.read_text(storage.join(out, ft_format.MANIFEST)))
        cfg, dtype = ft_format.parse_config_ini(
            storage.read_text(storage.join(out, ft_format.CONFIG_INI)))
    except FileNotFoundError as exc:
        return f"missing {exc.filename or exc}"
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest or config.ini in {out}: {exc}"
    if not header.get("complete"):
        return f"{out}/manifest.json says the conversion is incomplete"
    wanted_dtype = convert.get("weight_dtype") or "fp32"
    if dtype != wanted_dtype or int(header.get("tensor_parallel", t)) != t:
        return f"{out} holds {dtype} at T={header.get('tensor_parallel')}, not {wanted_dtype}"
    if convert.get("vocab") and not storage.exists(storage.join(model_dir, "spiece.model")):
        return f"{model_dir}/spiece.model is missing"
    expected = {f.name for f in ft_format.all_files(cfg, t)}
    missing = sorted(expected - set(entries))
    if missing:
        return f"the manifest lacks {len(missing)} file(s), e.g. {missing[0]}"
    total = sum(entries[n].bytes for n in expected)
    local = not str(out).startswith("gs://")
    hash_files = local and total <= HASH_LIMIT_BYTES
    for name in sorted(expected):
        url = storage.join(out, name)
        size = storage.size(url)
        if size != entries[name].bytes:
            return f"{name}: {size} bytes on disk, {entries[name].bytes} in the manifest"
        if hash_files and _sha256(url) != entries[name].sha256:
            return f"{name}: sha256 differs from the manifest"
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metrics(output: str) -> dict[str, Any] | None:
    """An evaluation's metrics.json, or None when it is not there."""
    try:
        return json.loads(storage.read_text(storage.join(output, "metrics.json")))
    except (FileNotFoundError, ValueError):
        return None


def wait_until(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()
