"""The documentation: its code examples run, and it stays inside the repository.

Every ```python block of README.md and docs/*.md runs as a script of its own (a fresh process,
under each start method of the ``start_method`` fixture), and must exit with status 0. A block
preceded by the line ``<!-- no-run -->`` is shown but not run (it needs Ray, Kafka or a
cluster); keep those few.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = "<!-- no-run -->"
MAX_NO_RUN = 6

_FENCE = re.compile(r"^```python\s*$")


def _blocks() -> list[tuple[str, int, str, bool]]:
    """(file, line of the fence, code, runnable) for every ```python block."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if _FENCE.match(lines[i]):
                start = i
                previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
                j = i + 1
                while j < len(lines) and lines[j].strip() != "```":
                    j += 1
                assert j < len(lines), f"{path.name}:{start + 1}: unclosed ```python block"
                code = "\n".join(lines[i + 1 : j]) + "\n"
                found.append(
                    (path.relative_to(ROOT).as_posix(), start + 1, code, previous != NO_RUN)
                )
                i = j
            i += 1
    return found


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[3]]

# Runs the example as __main__ under the start method given in argv[2], so that spawn and
# forkserver import it again in their workers, as they would a script of the user's.
_RUNNER = (
    "import multiprocessing, runpy, sys; "
    "multiprocessing.set_start_method(sys.argv[2]); "
    "runpy.run_path(sys.argv[1], run_name='__main__')"
)


def test_the_docs_have_examples_and_few_are_left_unrun():
    assert len(RUNNABLE) >= 10
    assert len(BLOCKS) - len(RUNNABLE) <= MAX_NO_RUN


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("where", "code"),
    [pytest.param(f"{f}:{line}", code, id=f"{f}:{line}") for f, line, code, _ in RUNNABLE],
)
def test_doc_example_runs(where, code, start_method, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(script), start_method],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, f"{where} failed:\n{out.stdout}\n{out.stderr}"


# --- staying inside the repository, and out of the project's log -----------------------------

_SCANNED = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "ordpool").rglob("*.py")),
    *sorted((ROOT / "examples").rglob("*.py")),
]

_OUTSIDE = re.compile(r"\.\./shared|/work/|\bPERF\.md\b")
_LOG = re.compile(
    r"\b(?:work|previous|this|next|last|earlier|later|first|second|third|fourth|fifth|sixth)"
    r" session\b|\bSession \d|\bprevious version\b|\bissue #?\d+|\bseen once\b",
    re.IGNORECASE,
)


def _hits(pattern: re.Pattern[str]) -> list[str]:
    hits = []
    for path in _SCANNED:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return hits


def test_nothing_points_outside_the_repository():
    assert _hits(_OUTSIDE) == []


def test_docs_and_code_speak_to_users_not_of_work_sessions():
    assert _hits(_LOG) == []


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve_inside_the_repository():
    broken = []
    for path in DOCS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in _LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL or an anchor on the same page
                resolved = (path.parent / target.split("#")[0]).resolve()
                if ROOT not in resolved.parents or not resolved.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert broken == []
