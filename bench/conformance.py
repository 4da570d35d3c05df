"""Run CPython's own ``test_concurrent_futures`` against ``OrderedProcessPoolExecutor``.

The test module is not copied into this repository: it is taken, at run time, from the
running Python's ``test`` package when that has it, or else from Debian's
``libpython3.X-testsuite`` package (``apt-get download``), or from ``--test-file``. The
``ProcessPoolExecutor`` test classes run twice per start method, in a fresh interpreter each:
once as they are (the stdlib) and once with ``concurrent.futures.ProcessPoolExecutor``
replaced by ``ordpool.OrderedProcessPoolExecutor`` (also in the scripts some tests run in a
subprocess). The report lists every test whose outcome differs.

Usage::

    python bench/conformance.py [--methods fork,forkserver,spawn] [--json OUT] [--md OUT]

A test that runs longer than ``--test-timeout`` seconds counts as a hang (its thread stacks
are printed); a process that does not exit after its last test counts as an exit hang.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any

MODULE = "test_concurrent_futures"
PREFIX = {"fork": "ProcessPoolFork", "forkserver": "ProcessPoolForkserver",
          "spawn": "ProcessPoolSpawn"}  # fmt: skip


# -- finding the test module ------------------------------------------------------------------


def find_test_file(given: str | None, cache: Path) -> Path:
    """The path of ``test_concurrent_futures.py`` for the running Python, or of the
    ``test_concurrent_futures`` package that replaced it in Python 3.12."""
    if given:
        return Path(given)
    try:
        import test  # the running Python's own test package

        for own in (Path(test.__file__).parent / name for name in (MODULE, f"{MODULE}.py")):
            if own.exists():
                return own
    except ImportError:
        pass
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = cache / f"python{version}" / f"{MODULE}.py"
    if not found.exists():
        _fetch_debian(version, found)
    return found


def _fetch_debian(version: str, dest: Path) -> None:
    """Extract the module from Debian's ``libpython<version>-testsuite`` package."""
    package = f"libpython{version}-testsuite"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
        )
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode or not debs:
            raise SystemExit(
                f"cannot fetch {package} with apt-get ({done.stderr.strip()}); "
                "pass the module with --test-file"
            )
        member = f"./usr/lib/python{version}/test/{MODULE}.py"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_deb_member(debs[0], member))
        (dest.parent / "SOURCE").write_text(debs[0].name + "\n")


def _deb_member(deb: Path, member: str) -> bytes:
    """One file of a ``.deb`` (an ``ar`` archive holding ``data.tar.*``)."""
    blob = deb.read_bytes()
    pos = 8  # b"!<arch>\n"
    while pos < len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                handle = tar.extractfile(member)
                if handle is None:
                    raise SystemExit(f"{member} not in {deb.name}")
                return handle.read()
        pos += 60 + size + (size & 1)
    raise SystemExit(f"no data archive in {deb.name}")


# -- one run, in a child interpreter ---------------------------------------------------------


class _Recorder(unittest.TextTestResult):
    """Writes each test's outcome as a JSON line as soon as it is known."""

    def __init__(self, out: Any, timeout: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._out = out
        self._timeout = timeout

    def _write(self, test: Any, outcome: str, detail: str = "") -> None:
        name = test.id().split(".", 1)[-1]
        self._out.write(json.dumps({"test": name, "outcome": outcome, "detail": detail}) + "\n")
        self._out.flush()

    def startTest(self, test: Any) -> None:
        import faulthandler

        super().startTest(test)
        self._out.write(json.dumps({"start": test.id().split(".", 1)[-1]}) + "\n")
        self._out.flush()
        faulthandler.dump_traceback_later(self._timeout, exit=True)

    def stopTest(self, test: Any) -> None:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._write(test, "pass")

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._write(test, "error", self._last(self.errors))

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._write(test, "fail", self._last(self.failures))

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._write(test, "skip", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._write(test, "xfail")

    @staticmethod
    def _last(entries: list[tuple[Any, str]]) -> str:
        lines = entries[-1][1].strip().splitlines()
        return lines[-1] if lines else ""


def child(impl: str, method: str, test_file: str, out_path: str, timeout: float) -> None:
    """Run one start method's process-pool tests with ``impl``; outcomes go to ``out_path``."""
    if impl == "ordpool":
        import concurrent.futures as cf

        from ordpool import OrderedProcessPoolExecutor

        cf.ProcessPoolExecutor = OrderedProcessPoolExecutor  # type: ignore[misc]
    workdir = Path(tempfile.mkdtemp(prefix="conformance-"))
    sys.path.insert(0, str(workdir))
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for module in _test_modules(Path(test_file), workdir, impl):
        for name in sorted(dir(module)):
            if name.startswith(PREFIX[method]) and (
                method == "forkserver" or not name.startswith(PREFIX["forkserver"])
            ):
                suite.addTests(loader.loadTestsFromTestCase(getattr(module, name)))
    # Module fixtures (setUpModule) run because the tests come from the module.
    with open(out_path, "w") as out:
        runner = unittest.TextTestRunner(
            stream=sys.stderr,
            verbosity=0,
            resultclass=lambda *a, **k: _Recorder(out, timeout, *a, **k),
        )
        runner.run(suite)
        out.write(json.dumps({"finished": True}) + "\n")
        out.flush()
    shutil.rmtree(workdir, ignore_errors=True)


def _test_modules(test_file: Path, workdir: Path, impl: str) -> list[Any]:
    """Copy the test module (or package) into ``workdir`` as a top-level one, with the
    executor swapped in where a test's script imports it by name; import its test modules."""
    import importlib

    def copy(source: Path, dest: Path) -> None:
        text = source.read_text()
        if impl == "ordpool":  # a test's subprocess script imports the executor by class name
            text = text.replace(
                "from concurrent.futures import {executor_type}",
                "from ordpool import {executor_type}",
            )
        dest.write_text(text)

    if test_file.is_dir():  # Python 3.12+: a package of test modules
        (workdir / MODULE).mkdir()
        for source in test_file.glob("*.py"):
            copy(source, workdir / MODULE / source.name)
        names = sorted(f"{MODULE}.{p.stem}" for p in test_file.glob("test_*.py"))
    else:
        copy(test_file, workdir / f"{MODULE}.py")
        names = [MODULE]
    return [importlib.import_module(name) for name in names]


# -- the parent: every (impl, method) pair, then the comparison -------------------------------


def run_one(impl: str, method: str, test_file: Path, test_timeout: float) -> dict[str, Any]:
    """Run one child; return its outcomes, whether it finished, and whether it exited."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
        out_path = handle.name
    cmd = [sys.executable, __file__, "--child", impl, method, str(test_file), out_path,
           str(test_timeout)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    outcomes: dict[str, dict[str, str]] = {}
    current: str | None = None
    finished = False
    exit_hang = False
    deadline = started + test_timeout * 40
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        outcomes, current, finished = _read(out_path)
        if finished:  # every test ran: the process must now exit
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                exit_hang = True
            break
    if proc.poll() is None:
        proc.kill()
    stderr = proc.communicate()[1]
    outcomes, current, finished = _read(out_path)
    if current is not None and current not in outcomes:
        outcomes[current] = {"outcome": "hang", "detail": _hang_detail(stderr)}
    os.unlink(out_path)
    return {
        "outcomes": outcomes,
        "finished": finished,
        "exit_hang": exit_hang,
        "seconds": round(time.monotonic() - started, 1),
    }


def _read(path: str) -> tuple[dict[str, dict[str, str]], str | None, bool]:
    outcomes: dict[str, dict[str, str]] = {}
    current = None
    finished = False
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "start" in row:
            current = row["start"]
        elif "finished" in row:
            finished = True
        else:
            outcomes[row["test"]] = {"outcome": row["outcome"], "detail": row["detail"]}
    return outcomes, current, finished


def _hang_detail(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "File " in ln]
    return " | ".join(ln.strip() for ln in lines[:3])


def compare(runs: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, str]]:
    """Every test whose ordpool outcome differs from the stdlib's, per start method."""
    rows = []
    for method, pair in runs.items():
        std, ours = pair["stdlib"]["outcomes"], pair["ordpool"]["outcomes"]
        for test in sorted(set(std) | set(ours)):
            a = std.get(test, {"outcome": "missing", "detail": ""})
            b = ours.get(test, {"outcome": "missing", "detail": ""})
            if a["outcome"] != b["outcome"]:
                rows.append({"method": method, "test": test, "stdlib": a["outcome"],
                             "ordpool": b["outcome"], "detail": b["detail"][:160]})  # fmt: skip
    return rows


def _counts(run: dict[str, Any]) -> str:
    tally: dict[str, int] = {}
    for row in run["outcomes"].values():
        tally[row["outcome"]] = tally.get(row["outcome"], 0) + 1
    extra = " EXIT HANG" if run["exit_hang"] else ""
    return ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) + f" ({run['seconds']} s){extra}"


def report(runs: dict[str, Any], rows: list[dict[str, str]], source: str) -> str:
    """The Markdown report: counts per start method, then every difference."""
    lines = [
        "# CPython test_concurrent_futures: stdlib against ordpool",
        "",
        f"- command: `python bench/conformance.py --methods {','.join(runs)}`",
        f"- test module: {source}",
        f"- commit: {_commit()}",
        f"- Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} cores",
        "",
        "| start method | stdlib | ordpool |",
        "| --- | --- | --- |",
    ]
    for method, pair in runs.items():
        lines.append(f"| {method} | {_counts(pair['stdlib'])} | {_counts(pair['ordpool'])} |")
    lines += ["", f"Tests whose outcome differs: {len(rows)}", ""]
    if rows:
        lines += [
            "| start method | test | stdlib | ordpool | detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            detail = r["detail"].replace("|", "/")
            lines.append(
                f"| {r['method']} | {r['test']} | {r['stdlib']} | {r['ordpool']} | {detail} |"
            )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fork,forkserver,spawn")
    parser.add_argument("--impls", default="stdlib,ordpool")
    parser.add_argument("--test-file", help="a test_concurrent_futures.py to use")
    parser.add_argument("--test-timeout", type=float, default=120.0)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ordpool-conformance"))
    parser.add_argument("--json", help="write every outcome here")
    parser.add_argument("--md", help="write the Markdown report here")
    args = parser.parse_args(argv)
    test_file = find_test_file(args.test_file, Path(args.cache))
    source_note = test_file.parent / "SOURCE"
    source = source_note.read_text().strip() if source_note.exists() else str(test_file)
    runs: dict[str, Any] = {}
    for method in args.methods.split(","):
        runs[method] = {}
        for impl in args.impls.split(","):
            print(f"{method} {impl} ...", file=sys.stderr, flush=True)
            runs[method][impl] = run_one(impl, method, test_file, args.test_timeout)
            print(f"  {_counts(runs[method][impl])}", file=sys.stderr, flush=True)
    rows = compare(runs) if "," in args.impls else []
    text = report(runs, rows, source) if rows or "," in args.impls else ""
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"source": source, "runs": runs, "differences": rows}, indent=1)
        )
    hung = any(run["exit_hang"] for pair in runs.values() for run in pair.values())
    return 1 if rows or hung else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]))
    else:
        sys.exit(main())
