"""The layers of docs/architecture.md, checked on the real module graph of the repository.

Every module of ours is a node (package ``__init__`` and ``__main__`` included); every import is
an arrow (function-level and TYPE_CHECKING ones too, relative ones resolved). On that graph:
core imports nothing of ours; each stage imports core and only the side arrows the design
allows; nothing below ray_jobs imports ray_jobs; argparse lives in entry points only (ray_jobs/,
a package's __main__.py, bench/ scripts); bench never imports tests; no module cycle anywhere.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = {"core", "conversion", "serving", "evaluation", "cluster", "pipeline", "ray_jobs", "demo",
        "bench", "tests", "testing"}
# Package -> the packages of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "conversion": {"core"},
    "cluster": {"core"},
    "serving": {"core"},
    "evaluation": {"core"},
    "demo": {"core"},
    "testing": {"core", "demo"},
    "pipeline": {"core", "conversion", "serving", "evaluation", "cluster", "demo"},
    "ray_jobs": {"core", "conversion", "serving", "evaluation", "cluster", "demo", "pipeline"},
}
# Narrow side arrows: (importing module, imported package or module), exact dotted names.
SIDE_ARROWS = (
    ("serving.kubernetes", "cluster"),                  # serving's Kubernetes launch: cluster's builders
    ("evaluation.engine_predictor", "serving.engine"),  # in-process evaluation: the engine's public API
)
ARGPARSE_ONLY_IN_ENTRY_POINTS = "argparse"


def _module_name(rel: str) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/b/__init__.py`` -> ``a.b``."""
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _python_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if (REPO / n).is_file()]


def _modules() -> dict[str, Path]:
    """Every module of ours by dotted name."""
    out = {}
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        if rel.split("/", 1)[0] in OURS:
            out[_module_name(rel)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module NAME lands in: itself, or the nearest enclosing module (``a.b.f`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, target) for every import in MODULE: a module of ours, or a foreign top name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[int, str]] = []

    def add(line: int, name: str) -> None:
        target = _resolve(name, modules) if name.split(".", 1)[0] in OURS else None
        out.append((line, target or name.split(".", 1)[0]))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                # `from core import storage` imports the module core.storage; `from core.errors
                # import UserError` imports core.errors (UserError is no module).
                sub = f"{source}.{alias.name}"
                add(node.lineno, sub if sub in modules else source)
    return list(dict.fromkeys(out))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for _, t in _imports(m, p, modules) if t in modules and t != m}
            for m, p in modules.items()}


def _is_entry_point(module: str) -> bool:
    return module.startswith(("ray_jobs.", "bench.")) or module.endswith(".__main__")


def _side_arrow(src: str, dst: str) -> bool:
    return any(src == s and (dst == d or dst.startswith(d + ".")) for s, d in SIDE_ARROWS)


def _violations() -> list[str]:
    modules = _modules()
    bad: list[str] = []
    for module, path in modules.items():
        pkg = module.split(".", 1)[0]
        rel = path.relative_to(REPO).as_posix()
        for line, target in _imports(module, path, modules):
            top = target.split(".", 1)[0]
            where = f"{rel}:{line} imports {target}"
            if top == ARGPARSE_ONLY_IN_ENTRY_POINTS and not _is_entry_point(module) \
                    and pkg not in ("tests", "testing"):
                bad.append(f"{where} (argparse belongs to entry points)")
            if pkg == "bench" and top == "tests":
                bad.append(f"{where} (bench must not import tests)")
            if top == "testing" and pkg not in ("tests", "bench", "testing"):
                bad.append(f"{where} (testing/ serves tests and benchmarks, not the library)")
            if pkg not in ALLOWED or top not in OURS or top == pkg:
                continue
            if top in ALLOWED[pkg] or _side_arrow(module, target):
                continue
            bad.append(f"{where} (allowed for {pkg}: {sorted(ALLOWED[pkg]) or 'nothing of ours'})")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def test_imports_follow_the_layers() -> None:
    bad = _violations()
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_module_graph_has_no_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_allowed_package_graph_has_no_cycles() -> None:
    graph = {pkg: set(deps) for pkg, deps in ALLOWED.items()}
    for src, dst in SIDE_ARROWS:
        graph[src.split(".", 1)[0]].add(dst.split(".", 1)[0])
    assert not _cycles(graph)


def test_the_check_catches_a_wrong_arrow() -> None:
    # The checker itself: a core module importing a stage, and a library importing argparse.
    probe = REPO / "core" / "_layers_probe.py"
    probe.write_text("import argparse\nfrom conversion import run\n")
    try:
        bad = [b for b in _violations() if "_layers_probe" in b]
    finally:
        probe.unlink()
    assert any("imports argparse" in b for b in bad)
    assert any("imports conversion.run" in b for b in bad)


def test_the_check_catches_ray_jobs_below_it_and_a_cycle() -> None:
    # A package's __main__ importing ray_jobs is an arrow back up; two modules importing each
    # other (one through its package's __init__, under TYPE_CHECKING) are a cycle.
    probes = {
        REPO / "cluster" / "_probe_main.py": "from ray_jobs._cli import run_main\n",
        REPO / "demo" / "_probe_a.py": "from demo import _probe_b\n",
        REPO / "demo" / "_probe_b.py": ("from typing import TYPE_CHECKING\n"
                                        "if TYPE_CHECKING:\n    from demo._probe_a import x\n"),
    }
    for path, text in probes.items():
        path.write_text(text)
    try:
        bad = [b for b in _violations() if "_probe" in b]
        cycles = _cycles(_graph())
    finally:
        for path in probes:
            path.unlink()
    assert any("imports ray_jobs._cli" in b for b in bad)
    assert ["demo._probe_a", "demo._probe_b"] in cycles


def test_the_graph_sees_a_cycle_through_a_package_init() -> None:
    modules = {"p": Path("p/__init__.py"), "p.a": Path("p/a.py"), "p.b": Path("p/b.py")}
    # p/__init__ imports p.a; p.a takes a name from the package p: p.a -> p -> p.a.
    graph = {"p": {"p.a"}, "p.a": {"p"}, "p.b": set()}
    assert _cycles(graph) == [["p", "p.a"]]
    assert _resolve("p.a.f", modules) == "p.a"
