"""The layers of docs/architecture.md, checked on every import in the repository.

core imports nothing of ours; each stage imports core and only the side arrows the design
allows; argparse and ray_jobs live in entry points only (ray_jobs/, a package's __main__.py,
bench/ scripts); bench never imports tests; the package graph has no cycles.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = {"core", "conversion", "serving", "evaluation", "cluster", "pipeline", "ray_jobs", "demo",
        "bench", "tests"}
# Package -> the packages of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "conversion": {"core"},
    "cluster": {"core"},
    "serving": {"core"},
    "evaluation": {"core"},
    "demo": {"core"},
    "pipeline": {"core", "conversion", "serving", "evaluation", "cluster", "demo"},
}
# Narrow side arrows: (importing module prefix, imported module prefix).
SIDE_ARROWS = (
    ("serving/kubernetes.py", "cluster"),       # serving's Kubernetes launch uses cluster's builders
    ("evaluation/", "serving.engine"),          # in-process evaluation runs the engine's public API
)
ENTRY_POINT_ONLY = {"argparse", "ray_jobs"}


def _is_entry_point(rel: str) -> bool:
    return rel.startswith(("ray_jobs/", "bench/")) or rel.endswith("__main__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            # `from core import storage` names modules too: keep the package as the target.
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pkg = path.relative_to(REPO).parts[0]
            out += [(node.lineno, f"{pkg}.{node.module or ''}".rstrip("."))]
    return out


def _python_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).is_file()]


def _violations() -> list[str]:
    bad: list[str] = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        pkg = rel.split("/", 1)[0] if "/" in rel else ""
        for line, module in _imports(path):
            top = module.split(".", 1)[0]
            where = f"{rel}:{line} imports {module}"
            if top in ENTRY_POINT_ONLY and not _is_entry_point(rel) and pkg != "tests":
                bad.append(f"{where} (argparse and ray_jobs belong to entry points)")
            if pkg == "bench" and top == "tests":
                bad.append(f"{where} (bench must not import tests)")
            if pkg not in ALLOWED or top not in OURS or top == pkg:
                continue
            if _is_entry_point(rel):
                continue
            if top in ALLOWED[pkg]:
                continue
            if any(rel.startswith(src) and module.startswith(dst) for src, dst in SIDE_ARROWS):
                continue
            bad.append(f"{where} (allowed for {pkg}: {sorted(ALLOWED[pkg]) or 'nothing of ours'})")
    return bad


def test_imports_follow_the_layers() -> None:
    bad = _violations()
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_allowed_package_graph_has_no_cycles() -> None:
    graph = {pkg: set(deps) for pkg, deps in ALLOWED.items()}
    for src, dst in SIDE_ARROWS:
        graph[src.split("/", 1)[0]].add(dst.split(".", 1)[0])
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        state[node] = 2

    for pkg in sorted(graph):
        visit(pkg, [])


def test_the_check_catches_a_wrong_arrow(tmp_path: Path) -> None:
    # The checker itself: a core module importing a stage, and a library importing argparse.
    probe = REPO / "core" / "_layers_probe.py"
    probe.write_text("import argparse\nfrom conversion import run\n")
    try:
        bad = [b for b in _violations() if "_layers_probe" in b]
    finally:
        probe.unlink()
    assert any("imports argparse" in b for b in bad)
    assert any("imports conversion" in b for b in bad)
