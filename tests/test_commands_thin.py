"""Issue 10 seam 7: ``saekit.commands`` only parses flags and prints; the work is library code.

On main at 9e49562 ``commands/compress.py`` loaded models and tokenizers itself
(``load_model_and_tokenizer``, with ``transformers``), and ``commands/train.py`` held the
run document's layering and the sweep's site resolution (``load_configs``, ``_site``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import saekit

SRC = Path(saekit.__file__).parent
HEAVY = ("torch", "transformers", "datasets", "numpy", "safetensors")
#: a command function longer than this is doing library work
MAX_LINES = 60


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return out


def test_commands_import_no_heavy_library_and_hold_no_long_functions() -> None:
    bad = []
    for p in sorted((SRC / "commands").glob("*.py")):
        tree = ast.parse(p.read_text())
        bad += [f"{p.name} imports {m}" for m in _imports(tree) if m.split(".")[0] in HEAVY]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES:
                    bad.append(f"{p.name}:{node.lineno} {node.name} has {n} lines")
    assert bad == []


def test_the_library_never_imports_the_commands() -> None:
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "__main__.py"):
            continue
        mods = _imports(ast.parse(p.read_text()))
        bad += [f"{rel} imports {m}" for m in mods if m.startswith("saekit.commands")]
    assert bad == []
