"""Issue 10 seam 8: tests install nothing; the Makefile's test set-up does.

On main at 9e49562 the dashboard's ``chromium`` fixture ran ``apt-get update`` and
``apt-get install`` (up to 25 minutes) from inside the test session.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent
INSTALLERS = re.compile(r"(apt-get|apt|yum|dnf|brew|snap)")  # system package managers


def _subprocess_args(tree: ast.Module) -> list[tuple[int, str]]:
    """Constant strings passed to subprocess / os.system calls."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name not in ("run", "call", "check_call", "check_output", "Popen", "system"):
            continue
        for arg in ast.walk(ast.Tuple(elts=list(node.args), ctx=ast.Load())):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((node.lineno, arg.value))
    return out


def test_no_test_installs_packages() -> None:
    bad = []
    for p in sorted(TESTS.glob("*.py")):
        for line, s in _subprocess_args(ast.parse(p.read_text())):
            if INSTALLERS.fullmatch(s.split()[0] if s.split() else ""):
                bad.append(f"{p.name}:{line} runs {s!r}")
    assert bad == []


def test_make_test_sets_up_chromium_first() -> None:
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\btest-deps\b", mk, re.M)
    recipe = mk.split("\ntest-deps:", 1)[1].split("\n\n", 1)[0]
    assert "chromium" in recipe and "apt-get install" in recipe
