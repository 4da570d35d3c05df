"""The benchmark lab stays out of the runtime: ``import ordpool`` loads none of it, the scripts
use public names only, and its code keeps to the size limits."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ordpool"

# ``from ordpool._x import``, ``from ordpool import _x``, ``import ordpool._x``, ``ordpool._x.y``
_PRIVATE_IMPORT = re.compile(r"\bordpool\._(?!_)|\bfrom\s+ordpool\s+import\s+(\(\s*)?_(?!_)")


def _imported_after(code: str) -> set[str]:
    """Modules in ``sys.modules`` after ``code`` runs in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import ordpool",
        "import ordpool.__main__; ordpool.__main__.build_parser()",
    ],
)
def test_the_runtime_imports_no_bench_module(code: str) -> None:
    modules = _imported_after(code)
    assert "ordpool" in modules
    loaded = {m for m in modules if m.startswith("ordpool.bench")}
    loaded |= {m for m in modules if m.split(".")[0] in ("orjson", "rich", "mpire", "joblib")}
    assert not loaded


def test_the_bench_imports_without_the_peers() -> None:
    modules = _imported_after("import ordpool.bench")
    assert "ordpool.bench.cli" in modules
    assert not {m for m in modules if m.split(".")[0] in ("mpire", "joblib", "bytewax", "arroyo")}


def _scripts() -> list[Path]:
    return sorted([*(REPO / "bench").glob("*.py"), *(REPO / "examples").glob("*.py")])


def test_scripts_import_no_private_ordpool_module() -> None:
    assert _scripts()
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _scripts()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE_IMPORT.search(line)
    ]
    assert not offenders, "use ordpool's public names or ordpool.bench:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("line", "private"),
    [
        ("from ordpool._engine import usable_cores", True),
        ("from ordpool import _wire", True),
        ("import ordpool._bench", True),
        ("x = ordpool._wire.PROTOCOL", True),
        ("from ordpool import ProcessOrderedPool", False),
        ("from ordpool.bench import usable_cores", False),
        ("batch = pool._engine", False),
        ("print(ordpool.__version__)", False),
    ],
)
def test_the_private_import_pattern(line: str, private: bool) -> None:
    assert bool(_PRIVATE_IMPORT.search(line)) is private


# In ordpool/bench: ``from .._x import``, ``from .. import _x`` (not ``__version__``),
# ``from ordpool._x import``
_RUNTIME_PRIVATE = re.compile(
    r"^\s*from\s+(\.\._|ordpool\._|(\.\.|ordpool)\s+import\s+_(?!_))", re.M
)


def test_only_one_bench_module_imports_private_runtime_names() -> None:
    importers = [
        path.name
        for path in sorted((PACKAGE / "bench").glob("*.py"))
        if _RUNTIME_PRIVATE.search(path.read_text())
    ]
    assert importers == ["_runtime.py"]


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", None)
    if not body:
        return 0
    doc = body[0]
    if isinstance(doc, ast.Expr) and isinstance(getattr(doc.value, "value", None), str):
        return (doc.end_lineno or doc.lineno) - doc.lineno + 1
    return 0


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """Lines of a definition, decorators included, its docstrings not (a class's own and
    those of the functions and classes it holds)."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    lines = (node.end_lineno or node.lineno) - first + 1
    inner = ast.walk(node) if isinstance(node, ast.ClassDef) else iter([node])
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return lines - sum(_docstring_lines(n) for n in inner if isinstance(n, defs))


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_functions_and_classes_stay_short(path: Path) -> None:
    too_long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > 60:
            too_long.append(f"def {node.name}: {_length(node)} lines")
        elif isinstance(node, ast.ClassDef) and _length(node) > 400:
            too_long.append(f"class {node.name}: {_length(node)} lines")
    assert not too_long


def test_bench_all_is_explicit_and_importable() -> None:
    import ordpool.bench

    names = ordpool.bench.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(ordpool.bench, name) is not None


def test_py_typed_is_shipped() -> None:
    assert (PACKAGE / "py.typed").is_file()
    assert "ordpool = py.typed" in (REPO / "setup.cfg").read_text()
