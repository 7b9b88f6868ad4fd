"""One logging style in the library: module loggers, configured once by the entry point.

The library (core and the stages, pipeline included) never prints to stderr itself nor passes
``log`` callables around; core/cli.py, where a command ends, prints its one error line.
"""

from __future__ import annotations

import ast
import io
import logging
from contextlib import redirect_stderr
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("core", "conversion", "serving", "evaluation", "cluster", "pipeline", "demo")
# How a command ends (the error line after a refusal or a bug): the entry point's own output.
PRINTS_TO_STDERR = {"core/cli.py"}


def _modules():
    for package in LIBRARY:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text())


def _prints_to_stderr(call: ast.Call) -> bool:
    return (isinstance(call.func, ast.Name) and call.func.id == "print"
            and any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr"
                    for k in call.keywords))


def test_the_library_prints_nothing_to_stderr_and_passes_no_log_callables():
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and _prints_to_stderr(node)
                    and name not in PRINTS_TO_STDERR):
                found.append(f"{name}:{node.lineno}: print(..., file=sys.stderr)")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                    if arg.arg == "log":
                        found.append(f"{name}:{node.lineno}: {node.name}(log=...)")
    assert found == []


def test_the_entry_points_configuration_prints_library_messages_alone_on_stderr():
    # What the README's transcripts show: the message, its prefix included, nothing added;
    # on the stderr of the moment (a caller that redirects it gets the lines).
    from core.cli import configure_logging

    configure_logging()
    configure_logging()  # once: a second call adds no second handler
    err = io.StringIO()
    with redirect_stderr(err):
        logging.getLogger("pipeline.run").info("[pipeline] %s", "1 run(s)")
        logging.getLogger("evaluation.runner").warning("evaluate: warning: %s", "longer")
        logging.getLogger("jax").info("not ours: below WARNING, not shown")
    assert err.getvalue() == "[pipeline] 1 run(s)\nevaluate: warning: longer\n"
