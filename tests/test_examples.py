"""The examples run, check themselves, and say so."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAFKA_LIKE = os.path.join(ROOT, "examples", "kafka_like.py")

_SUMMARY = re.compile(
    r"^OK: (\d+) messages, offsets (\d+)\.\.(\d+) \((\d+) offsets skipped\), in order, "
    r"1 malformed at offset (\d+), (\d+) workers decoded [\d /]+$"
)


@pytest.mark.timeout(120)
def test_kafka_like_example_runs_and_checks_itself(start_method):
    n = 3000
    out = subprocess.run(
        [sys.executable, KAFKA_LIKE, "--messages", str(n), "--start-method", start_method],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "FAIL" not in out.stderr
    *lines, summary = out.stdout.splitlines()
    match = _SUMMARY.match(summary)
    assert match, summary
    count, first, last, _, malformed, workers = map(int, match.groups())
    assert count == n
    assert workers in (1, 2)
    # the printed stream itself: one line per message, offsets strictly increasing
    assert len(lines) == n
    offsets = [int(line.split("\t")[0]) for line in lines]
    assert offsets[0] == first and offsets[-1] == last
    assert all(b > a for a, b in itertools.pairwise(offsets))
    assert offsets[0] > 2**32
    errors = [line for line in lines if "\tERROR " in line]
    assert errors == [f"{malformed}\tERROR JSONDecodeError"]


def _load_example():
    # not registered in sys.modules: cloudpickle then ships its functions by value, which
    # spawned workers need (they could not import a module named kafka_like)
    spec = importlib.util.spec_from_file_location("kafka_like_under_test", KAFKA_LIKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lying_state():
    import orjson

    def loads(raw):
        msg = orjson.loads(raw)
        msg["amount"] += 1  # a decoder that corrupts every message
        return msg

    return {"loads": loads, "decoded": 0, "pid": os.getpid()}


@pytest.mark.timeout(120)
def test_kafka_like_example_fails_when_a_value_is_wrong(start_method, tmp_path, capsys):
    example = _load_example()
    example.make_state = _lying_state
    assert example.run(200, 2, start_method, True, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "FAIL: offset " in err
    assert "!=" in err


@pytest.mark.timeout(120)
def test_kafka_like_example_passes_in_process(start_method, tmp_path, capsys):
    example = _load_example()
    assert example.run(200, 2, start_method, True, str(tmp_path)) == 0
    assert _SUMMARY.match(capsys.readouterr().out.strip())
