"""Scratch files with an owner: staged writes that a killed run leaves behind are removable.

Every writer that stages (conversion tasks, evaluation outputs, pipeline summaries) writes its
scratch under a name that carries the id of the process that owns it, and keeps a lease file
beside that scratch for as long as the scratch exists:

- ``<folder>/<name>.tmp-<owner>-<random>``: a scratch file or folder (local destinations stage
  beside their target; gs:// destinations stage in :func:`node_dir`, the node's scratch folder);
- ``<folder>/.t5ft-<owner>.lease``: JSON ``{"owner", "host", "pid", "start"}`` (``start``: the
  process start time from ``/proc/<pid>/stat``, so a reused pid is not mistaken for the owner),
  written before the first scratch in that folder, touched every :data:`REFRESH_SECONDS` by a
  daemon thread, and deleted once the owner's last scratch there is gone.

:func:`sweep` removes scratch whose owner is gone and never touches a live owner's:

- lease written on this host: gone when that pid no longer runs (or is a zombie, or started at
  another time);
- lease written on another host (a shared folder): liveness cannot be checked from here, so
  it is gone only once not refreshed for :data:`STALE_SECONDS`;
- scratch whose lease is missing: gone (the lease outlives its scratch); scratch named the
  older way, with no owner (``<name>.tmp-<hex>``, ``<temp>/t5ft-*.part``,
  ``<temp>/t5ft-eval-*``), once untouched for :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# The node's scratch folder (gs:// staging): $T5FT_SCRATCH_DIR, else <temp dir>/t5ft-scratch-<uid>.
SCRATCH_DIR_ENV = "T5FT_SCRATCH_DIR"
# A lease is touched this often while its owner lives ...
REFRESH_SECONDS = 30.0
# ... and one written on another host counts as abandoned after this long without a touch:
# far above the refresh period, so a busy or briefly paused owner is never taken for dead.
STALE_SECONDS = 15 * 60.0

_SCRATCH = re.compile(r"^(?P<target>.+)\.tmp-(?P<owner>[0-9a-f]{12})-[0-9a-f]{8,}$")
_LEGACY = re.compile(r"^.+\.tmp-[0-9a-f]{12}$")
_LEASE = re.compile(r"^\.t5ft-(?P<owner>[0-9a-f]{12})\.lease(\.w)?$")


@dataclasses.dataclass
class Removed:
    """What a sweep removed: files (a scratch folder counts its files) and their bytes."""

    files: int = 0
    bytes: int = 0

    def add(self, other: Removed) -> Removed:
        """Add another sweep's counts to these; returns self."""
        self.files += other.files
        self.bytes += other.bytes
        return self

    def as_dict(self) -> dict[str, int]:
        """``{"files": n, "bytes": n}``, as summaries report it."""
        return {"files": self.files, "bytes": self.bytes}


def is_scratch(path: str | os.PathLike) -> bool:
    """Whether a file's name (the last part of ``path``) is a scratch file's or a lease's."""
    name = Path(path).name
    return bool(_SCRATCH.match(name) or _LEASE.match(name) or _LEGACY.match(name))


def node_dir() -> Path:
    """This node's scratch folder for staged gs:// writes.

    The default is per user (``t5ft-scratch-<uid>``): a folder that one user creates in a shared
    temp dir is not writable by the others.
    """
    if value := os.environ.get(SCRATCH_DIR_ENV):
        return Path(value)
    user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    return Path(tempfile.gettempdir(), f"t5ft-scratch{user}")


def forwarded_env() -> dict[str, str]:
    """The scratch setting of this process, for the env_vars of the Ray tasks it starts."""
    value = os.environ.get(SCRATCH_DIR_ENV)
    return {SCRATCH_DIR_ENV: value} if value else {}


def _process_start(pid: int) -> str | None:
    """The start time of a running process (clock ticks since boot), or None if it is gone.

    A zombie counts as gone: it writes nothing more. Without /proc only "alive" is known.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


class _Owner:
    """This process as an owner of scratch: its id, and its leases with how much each covers."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.pid = os.getpid()
        self.record = json.dumps({"owner": self.id, "host": socket.gethostname(),
                                  "pid": self.pid, "start": _process_start(self.pid)})
        self.held: dict[Path, int] = {}
        self.lock = threading.Lock()
        self.refresher: threading.Thread | None = None

    def lease_path(self, folder: Path) -> Path:
        """This process's lease file in ``folder``."""
        return folder / f".t5ft-{self.id}.lease"

    def write_lease(self, folder: Path) -> None:
        """Write (or refresh) this process's lease in ``folder``, atomically."""
        lease = self.lease_path(folder)
        tmp = lease.with_name(lease.name + ".w")  # whole or absent, never half a lease
        tmp.write_text(self.record)
        os.replace(tmp, lease)

    def acquire(self, folder: Path) -> None:
        """Count one more scratch in ``folder`` (a real path: one lease per folder)."""
        with self.lock:
            if self.held.get(folder, 0) == 0:
                self.write_lease(folder)
            self.held[folder] = self.held.get(folder, 0) + 1
            if self.refresher is None:
                self.refresher = threading.Thread(target=self._refresh, daemon=True,
                                                  name="t5ft-scratch-lease")
                self.refresher.start()

    def release(self, folder: Path) -> None:
        """Count one scratch fewer in ``folder``; the last one removes the lease."""
        with self.lock:
            self.held[folder] -= 1
            if self.held[folder] == 0:
                del self.held[folder]
                with contextlib.suppress(FileNotFoundError):
                    self.lease_path(folder).unlink()

    def _refresh(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            with self.lock:
                for folder in self.held:
                    try:
                        os.utime(self.lease_path(folder))
                    except FileNotFoundError:  # taken for abandoned after a long pause
                        with contextlib.suppress(OSError):
                            self.write_lease(folder)
                    except OSError:
                        pass


_owner: _Owner | None = None
_owner_lock = threading.Lock()


def _me() -> _Owner:
    global _owner
    with _owner_lock:
        if _owner is None or _owner.pid != os.getpid():  # a forked child is another owner
            _owner = _Owner()
        return _owner


@contextlib.contextmanager
def _held(folder: Path, target_name: str) -> Iterator[Path]:
    owner = _me()
    folder.mkdir(parents=True, exist_ok=True)
    # One spelling per folder, so that two spellings never share a lease that one then deletes.
    folder = Path(os.path.realpath(folder))
    owner.acquire(folder)
    try:
        yield folder / f"{target_name}.tmp-{owner.id}-{uuid.uuid4().hex[:12]}"
    finally:
        owner.release(folder)


@contextlib.contextmanager
def scratch_file(target: str | os.PathLike | None = None, name: str = "part") -> Iterator[str]:
    """A scratch file path, deleted on exit if still there (the caller renames it away to
    publish). Beside ``target`` when given (same filesystem, so the rename is atomic), else in
    :func:`node_dir` named after ``name``."""
    if target is not None:
        folder, base = Path(target).parent, Path(target).name
    else:
        folder, base = node_dir(), name
    with _held(folder, base) as path:
        try:
            yield str(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A scratch folder in :func:`node_dir`, deleted with its content on exit."""
    with _held(node_dir(), name) as path:
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _lease_alive(lease: Path, now: float) -> bool:
    try:
        mtime = lease.stat().st_mtime
    except FileNotFoundError:
        return False
    try:
        info = json.loads(lease.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return now - mtime < STALE_SECONDS  # unreadable: judge by age alone
    if info.get("host") != socket.gethostname():
        return now - mtime < STALE_SECONDS
    return _process_start(int(info["pid"])) == info.get("start")


def _size(path: Path) -> Removed:
    if path.is_dir() and not path.is_symlink():
        found = Removed()
        for p in path.rglob("*"):
            if p.is_file():
                found.files += 1
                found.bytes += p.lstat().st_size
        return found
    return Removed(1, path.lstat().st_size)


def _remove(path: Path) -> Removed:
    """Delete a scratch file or folder; what it held (nothing if another sweep got there)."""
    try:
        found = _size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:  # gone already (another sweep), or not ours to delete
        return Removed()
    return found


def sweep(folder: str | os.PathLike) -> Removed:
    """Remove the scratch in ``folder`` (not below it) whose owner is gone, and its leases."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return Removed()
    now = time.time()
    alive: dict[str, bool] = {}

    def owner_alive(owner: str) -> bool:
        if owner not in alive:
            alive[owner] = _lease_alive(folder / f".t5ft-{owner}.lease", now)
        return alive[owner]

    removed = Removed()
    leases = []
    for name in names:
        path = folder / name
        if m := _LEASE.match(name):
            leases.append((m["owner"], path))
        elif m := _SCRATCH.match(name):
            if not owner_alive(m["owner"]):
                removed.add(_remove(path))
        elif _LEGACY.match(name):
            with contextlib.suppress(FileNotFoundError):
                if now - path.lstat().st_mtime >= STALE_SECONDS:
                    removed.add(_remove(path))
    # Leases last: a lease goes only after its owner's scratch, as its owner would do it.
    for owner, path in leases:
        if not owner_alive(owner):
            removed.add(_remove(path))
    return removed


def _newest_mtime(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def _sweep_unowned_temp() -> Removed:
    """Staging that versions before owned scratch left in the system temp folder
    (``t5ft-*.part`` files, ``t5ft-eval-*`` folders): no owner to ask, so by age alone."""
    removed = Removed()
    now = time.time()
    for path in Path(tempfile.gettempdir()).glob("t5ft-*"):
        if not re.fullmatch(r"t5ft-\w+\.part|t5ft-eval-\w+", path.name):
            continue
        with contextlib.suppress(OSError):
            if now - _newest_mtime(path) >= STALE_SECONDS:
                removed.add(_remove(path))
    return removed


def sweep_node() -> Removed:
    """:func:`sweep` this node's scratch folder, and, when that is the default one in the temp
    folder, what earlier versions staged in the temp folder itself (with $T5FT_SCRATCH_DIR set,
    staging is where it says and nothing else is looked through)."""
    removed = sweep(node_dir())
    if not os.environ.get(SCRATCH_DIR_ENV):
        removed.add(_sweep_unowned_temp())
    return removed


def sweep_tree(root: str | os.PathLike) -> Removed:
    """:func:`sweep` every folder under ``root`` (``root`` included)."""
    removed = Removed()
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not _SCRATCH.match(d)]  # a scratch folder is swept whole
        removed.add(sweep(folder))
    return removed
