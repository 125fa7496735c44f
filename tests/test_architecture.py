"""The package's layers hold: the import-linter contract, every import counted (also inside functions), the
few imports inside functions each say why, no long functions, and a `--help` that loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "layerprune"
REASONS = ("start-up", "heavy", "optional")  # why an import may sit inside a function
MAX_FUNCTION_LINES = 100


def python_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "resources" not in p.parts)


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def layerprune_imports(tree: ast.AST):
    """(node, the top-level package imported) of every `from layerprune.x import ...` / `import layerprune.x`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("layerprune."):
            yield node, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("layerprune."):
                    yield node, alias.name.split(".")[1]


def test_the_import_linter_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (it is a test extra)")
    result = subprocess.run([str(lint)], capture_output=True, text=True, cwd=SRC.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:]


def test_packages_form_a_dag_counting_imports_inside_functions():
    edges: dict[str, set[str]] = {}
    for path in python_files():
        source = package_of(path)
        for _, target in layerprune_imports(ast.parse(path.read_text())):
            if target != source:
                edges.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if reaches(b, a, {b}))
    assert cycles == [], f"packages that import each other (directly or through others): {cycles}"


def test_every_import_inside_a_function_says_why():
    unexplained = []
    for path in python_files():
        text = path.read_text()
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerprune")):
                    continue
                block_start = node.lineno - 1  # the comment sits on the line or above the block of imports
                while block_start > 0 and not lines[block_start].lstrip().startswith("#") and (
                        not lines[block_start - 1].strip()
                        or lines[block_start - 1].lstrip().startswith(("from ", "import ", "#", ")"))):
                    block_start -= 1
                said = " ".join(lines[block_start:node.end_lineno])
                if not any(reason in said for reason in REASONS):
                    unexplained.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert unexplained == [], f"imports inside functions without a reason ({', '.join(REASONS)}): {unexplained}"


def test_no_function_is_longer_than_a_screenful():
    long = [f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in python_files() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_command_line_starts_without_torch():
    code = "import sys, layerprune, layerprune.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
