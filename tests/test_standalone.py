"""The repository stands alone: a fresh clone, with nothing beside it, has all it reads.

CI clones the repository next to a copy of the project's shared folder, so a test or a doc that
reaches out of the repository would pass there and fail for a user. These tests read every
tracked file (`git ls-files`, binary files included) and refuse:

- a relative path that leaves the repository: the shared folder beside it by name, or any
  chain of `../` that, resolved from the file's own folder, climbs above the repository root;
- `Path(__file__)` climbing (`.parent` chains, `.parents[k]`) above the repository root, and
  `.parent` taken of a repository-root variable (`REPO`, `REPO_ROOT`, ...);
- absolute paths into a developer machine's folders (`/work`, `/home`, `/Users`);
- a `<name>.md` that no tracked file is called (a doc the reader cannot open).

No file is exempt. The patterns below are written so that their own source does not match them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The folder CI places beside the clone (and its schemas folder), with either separator.
SHARED_SIBLING = re.compile(rb"\.\.[/\\]+(?:shared|schemas)\b")
# A run of "../" that is not part of "..." (gs://.../x is an elided bucket path, not a path).
PARENT_RUN = re.compile(rb"(?<![\w.])((?:\.\.[/\\])+)")
HOST_PATH = re.compile(rb"(?<![\w.~])/(?:work|home|Users)/")
FILE_CLIMB = re.compile(rb"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent\b)+|\.parents\[(\d+)\])")
ROOT_PARENT = re.compile(rb"\b[A-Z_]*(?:REPO|ROOT)[A-Z_]*\.parent\b")
MD_NAME = re.compile(rb"(?<![\w.-])([\w.-]+\.md)\b")
# A document on the web (a URL's last part) is not one a reader looks for in the repository.
URL = re.compile(rb"https?://\S+")
# Markdown names that are outputs, not documents a reader is sent to. Each says who writes it.
WRITTEN_NOT_TRACKED = {
    "comparison.md": "written by ray_jobs.pipeline / bench into their output folder",
}


def tracked_files() -> list[str]:
    """Every file git tracks in this checkout (the state a clone gets)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout, cannot list tracked files: {e}")
    return [name for name in out.decode().split("\0") if name]


def leaves_repo(rel_file: str, text: bytes) -> list[str]:
    """What in one tracked file reads or points outside the repository, one line per finding."""
    found = []
    depth = len(Path(rel_file).parts) - 1  # folders between the repository root and the file
    for m in SHARED_SIBLING.finditer(text):
        found.append(f"names the folder beside the repository: {m.group().decode()!r}")
    for m in PARENT_RUN.finditer(text):
        ups = m.group(1).count(b"..")
        if ups > depth:
            found.append(f"{m.group(1).decode()!r} climbs {ups} folders from depth {depth}")
    for m in HOST_PATH.finditer(text):
        found.append(f"absolute host path {m.group().decode()!r}")
    for m in FILE_CLIMB.finditer(text):
        # Path(__file__).parent is the file's folder: climbing depth + 1 levels is the root.
        levels = int(m.group(2)) + 1 if m.group(2) else m.group(1).count(b".parent")
        if levels > depth + 1:
            found.append(f"{m.group().decode()!r} goes above the repository root")
    for m in ROOT_PARENT.finditer(text):
        found.append(f"{m.group().decode()!r} is the folder above the repository")
    return found


def test_no_tracked_file_reaches_outside_the_repository() -> None:
    problems = []
    for name in tracked_files():
        path = REPO / name
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(REPO):
                problems.append(f"{name}: symlink to {target}")
            continue
        if not path.is_file():  # deleted in the working tree but still tracked: nothing to read
            continue
        problems += [f"{name}: {p}" for p in leaves_repo(name, path.read_bytes())]
    assert not problems, "\n".join(problems)


def test_every_markdown_document_named_is_in_the_repository() -> None:
    names = tracked_files()
    have = {Path(n).name for n in names}
    missing = []
    for name in names:
        path = REPO / name
        if not path.is_file() or path.is_symlink():
            continue
        for m in MD_NAME.finditer(URL.sub(b"", path.read_bytes())):
            doc = m.group(1).decode()
            if Path(doc).name not in have and Path(doc).name not in WRITTEN_NOT_TRACKED:
                missing.append(f"{name}: names {doc}, which no tracked file is")
    assert not missing, "\n".join(missing)


def test_the_guard_catches_what_it_is_for() -> None:
    """The patterns find each way out (built here, so no tracked file holds them literally)."""
    up = "../"
    assert leaves_repo("conversion/x.py", f"see {up}shared/docs".encode())
    assert leaves_repo("tests/conftest.py", f"open('{up}{up}data')".encode())
    assert not leaves_repo("tests/a/b.py", f"open('{up}{up}README.md')".encode())
    assert not leaves_repo("pipeline/config.py", b"src: gs://.../checkpoint_1000")
    assert leaves_repo("tests/conftest.py", b"X = " + b"REPO" + b".parent / 'data'")
    here = b"Path(" + b"__file__)"
    assert leaves_repo("tests/a/b.py", here + b".resolve().parents[3]")
    assert not leaves_repo("tests/a/b.py", here + b".resolve().parents[2]")
    assert leaves_repo("x.py", here + b".parent.parent")
    assert not leaves_repo("a/x.py", here + b".parent.parent")
    assert leaves_repo("README.md", b"cd " + b"/wo" + b"rk/main")


def test_vendored_kuberay_crds_load() -> None:
    """The CRDs the cluster tests validate against are in the repository, as KubeRay ships them."""
    for file_name, kind in [("ray.io_rayclusters.yaml", "RayCluster"),
                            ("ray.io_rayjobs.yaml", "RayJob")]:
        crd = yaml.load((REPO / "cluster" / "schemas" / file_name).read_text(),
                        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert v1["served"] and "spec" in v1["schema"]["openAPIV3Schema"]["properties"]
