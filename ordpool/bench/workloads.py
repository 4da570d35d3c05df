"""What every engine runs: the built-in workloads, the messages, and the user's ``--fn``/``--init``.

Everything here is module-level, so that every pool (and pickle) finds it by reference, and the
worker-state helpers at the end are what a pool's workers call to build ``--init``'s state.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from .config import BenchError

__all__ = [
    "WORKLOADS",
    "Workload",
    "call_with_lazy_state",
    "call_with_state",
    "input_bytes",
    "load_callable",
    "make_messages",
    "read_input",
    "sleep_1ms",
    "spin",
    "stdlib_init",
    "stream_work",
    "transform",
]

_REQUIRED_FIELDS = (
    ("id", int),
    ("ts", float),
    ("user", str),
    ("values", list),
    ("tags", list),
    ("meta", dict),
)


def transform(raw: bytes) -> tuple[int, str, float, int, int]:
    """Decode with stdlib ``json``, validate, compute a few fields: a 5-tuple (about 8 us).

    The shape of a typical stream job: the worker does more than the parent must undo (a small
    tuple is cheap to send back), unlike a plain decode.

    Raises:
        ValueError: a required field is missing or has the wrong type.

    >>> transform(make_messages(1)[0])[:2]
    (0, 'user00000')
    """
    doc = json.loads(raw)
    for key, kind in _REQUIRED_FIELDS:
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"message field {key!r} is missing or not {kind.__name__}")
    values = doc["values"]
    mean = sum(values) / len(values) if values else 0.0
    score = len(doc["tags"]) + (2 if doc["meta"].get("priority") == "high" else 0)
    return doc["id"], doc["user"].lower(), round(mean, 6), score, zlib.crc32(raw)


def sleep_1ms(raw: bytes) -> int:
    """Sleep one millisecond (a latency-bound job: a lookup, a call); return the message size."""
    time.sleep(0.001)
    return len(raw)


# -- the --stream workload -----------------------------------------------------------------------

_SPIN_PER_US = 0.0  # loop turns per microsecond in this process, measured on first use: 61.2


def _spin_loop(turns: int) -> None:
    for _ in range(turns):
        pass


def _calibrate_spin() -> float:
    """Loop turns per microsecond: the fastest of five runs of 20,000 turns (about 1.5 ms)."""
    turns = 20_000
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        _spin_loop(turns)
        best = min(best, time.perf_counter() - start)
    return turns / max(best * 1e6, 1e-3)


def spin(us: float) -> None:
    """Run a pure-Python loop for about ``us`` microseconds of CPU (holding the GIL).

    The turns per microsecond are measured once per process, on the first call, on an
    undisturbed run (the fastest of five): under contention the same turns take longer, as real
    work would.
    """
    global _SPIN_PER_US
    if not _SPIN_PER_US:
        _SPIN_PER_US = _calibrate_spin()
    _spin_loop(int(us * _SPIN_PER_US))


def stream_work(item: tuple[int, float, float]) -> int:
    """The work of ``ordpool bench --stream``: ``item`` is ``(index, work_us, slow_ms)``.

    Sleeps ``slow_ms`` milliseconds when it is positive (a slow message: a lookup that
    stalls), else spins ``work_us`` microseconds of CPU; returns ``index``, which the consumer
    checks against the order it expects.

    >>> stream_work((7, 5.0, 0.0)), stream_work((8, 0.0, 1.0))
    (7, 8)
    """
    index, work_us, slow_ms = item
    if slow_ms > 0:
        time.sleep(slow_ms / 1e3)
    else:
        spin(work_us)
    return index


@dataclass(frozen=True)
class Workload:
    """What every engine runs: ``fn(msg)``, or ``fn(state, msg)`` with ``state = init(*initargs)``.

    Attributes:
        name: ``"transform"``, ``"decode"``, ..., or ``"module:function"`` for ``--fn``.
        fn: a module-level callable (the stdlib pools pickle it by reference).
        init: builds a worker's state, or ``None``.
        initargs: arguments for ``init``.
        messages: default number of generated messages.
        chunksizes: chunksize candidates swept for the chunked pools.
        description: one line for the report.
    """

    name: str
    fn: Callable[..., Any]
    init: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    messages: int = 200_000
    chunksizes: tuple[int, ...] = (100, 1000, 5000)
    description: str = ""

    def serial_callable(self) -> Callable[[Any], Any]:
        """``fn`` ready to call in this process (its state built here, once)."""
        if self.init is None:
            return self.fn
        return functools.partial(self.fn, self.init(*self.initargs))


WORKLOADS: dict[str, Workload] = {
    "transform": Workload(
        "transform",
        transform,
        description="stdlib json.loads + validation + computed fields -> 5-tuple (~8 us/msg)",
    ),
    "decode": Workload("decode", orjson.loads, description="orjson.loads -> dict"),
    "stdlib-json": Workload("stdlib-json", json.loads, description="json.loads -> dict"),
    "sleep": Workload(
        "sleep",
        sleep_1ms,
        messages=1_000,
        chunksizes=(1, 10, 100),
        description="time.sleep(0.001) per message (latency-bound)",
    ),
}

# -- input ---------------------------------------------------------------------------------------

_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
)


def _base_doc(rng: random.Random, b: int, size: int, letters: str) -> dict[str, Any]:
    """The ``b``-th template message, its ``text`` padded so that it encodes to about ``size``."""
    doc: dict[str, Any] = {
        "id": 0,
        "ts": 1.7e9,
        "user": f"User{b:05d}",
        "kind": rng.choice(("click", "view", "buy", "scroll")),
        "values": [round(rng.uniform(-1e3, 1e3), 4) for _ in range(10)],
        "tags": rng.sample(_WORDS, rng.randint(1, 4)),
        "meta": {
            "source": rng.choice(("web", "ios", "android")),
            "priority": rng.choice(("high", "low", "low")),
            "session": f"{rng.getrandbits(128):032x}",
            "version": 3,
        },
        "text": "",
    }
    pad = max(0, size - len(orjson.dumps(doc)) - 12)  # 12: room for the id and ts digits
    start = rng.randrange(len(letters) - min(pad, len(letters) - 1))
    doc["text"] = (letters * (pad // len(letters) + 1))[start : start + pad]
    return doc


def make_messages(n: int, size: int = 600, seed: int = 0) -> list[bytes]:
    """``n`` Kafka-like JSON messages of about ``size`` bytes each (compact, orjson-encoded).

    A nested object: id, timestamp, user, kind, 10 floats, a list of tags, a sub-object, and a
    ``text`` field padded to reach ``size``. Deterministic for a given ``seed``.

    >>> msgs = make_messages(3, size=300)
    >>> [orjson.loads(m)["id"] for m in msgs]
    [0, 1, 2]
    >>> all(280 <= len(m) <= 320 for m in msgs)
    True
    """
    rng = random.Random(seed)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(8192))
    bases = [_base_doc(rng, b, size, letters) for b in range(min(n, 256))]
    out = []
    dumps = orjson.dumps
    for i in range(n):
        doc = bases[i % len(bases)]
        doc["id"] = i
        doc["user"] = f"User{i % 100_000:05d}"
        doc["ts"] = 1.7e9 + i * 0.001
        out.append(_compact(dumps(doc)))
    return out


def _compact(data: bytes) -> bytes:
    """A copy of ``data`` that owns just its bytes.

    ``orjson.dumps`` returns bytes that keep its whole output buffer: a 600-byte message holds
    about 8 KB of memory (orjson 3.13). A million of them would be 8 GB, and the benchmark
    would measure page faults and cache misses.
    """
    return bytes(memoryview(data))


def read_input(path: str | os.PathLike[str], limit: int | None = None) -> list[bytes]:
    """Messages from a file: one per line (blank lines skipped), or the items of a JSON array.

    A file that parses as one JSON array gives one message per element, re-encoded compactly
    with orjson, so ``fn`` gets ``bytes`` of one JSON document either way.

    Raises:
        BenchError: the file cannot be read or holds no message.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read --input {str(path)!r}: {exc.strerror or exc}") from exc
    messages = _json_array_items(data)
    if messages is None:
        messages = [line for line in (raw.strip() for raw in data.splitlines()) if line]
    if limit is not None:
        messages = messages[:limit]
    if not messages:
        raise BenchError(f"--input {str(path)!r} holds no message")
    return messages


def _json_array_items(data: bytes) -> list[bytes] | None:
    """Each element of ``data`` re-encoded, when ``data`` is one JSON array; else ``None``."""
    if data.lstrip()[:1] != b"[":
        return None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, list):
        return None
    return [_compact(orjson.dumps(item)) for item in doc]


def input_bytes(messages: Sequence[Any]) -> int | None:
    """Total size of the messages, when they are bytes or str (else None)."""
    total = 0
    for m in messages:
        if not isinstance(m, (bytes, bytearray, str)):
            return None
        total += len(m)
    return total


# -- user callables ------------------------------------------------------------------------------


def _make_cwd_importable() -> None:
    """Put the current directory on ``sys.path`` here, and on ``PYTHONPATH`` for the workers.

    Workers started with ``spawn`` get this process's ``sys.path``; the ``forkserver`` (Python
    3.11) does not, but inherits the environment. Call it before the first pool starts.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *parts])


def load_callable(spec: str, option: str = "--fn") -> Callable[..., Any]:
    """Import ``"package.module:function"`` (the current directory is importable).

    Raises:
        BenchError: a malformed spec, a module that cannot be imported, a missing attribute,
            or something that is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BenchError(f"{option} must look like module:function, got {spec!r}")
    _make_cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BenchError(f"{option} {spec}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise BenchError(
            f"{option} {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchError(
                f"{option} {spec}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise BenchError(f"{option} {spec}: {type(obj).__name__} object is not callable")
    return obj  # type: ignore[no-any-return]


# -- worker state --------------------------------------------------------------------------------
# How ``--init``'s state reaches the pools other than ordpool: their ``initializer`` stores it
# in a module global of the worker, and a top-level wrapper (picklable by reference, through
# functools.partial) reads it on every call.

_STATE: Any = None  # set in each worker by stdlib_init: init(*initargs)


def stdlib_init(init: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
    """``initializer`` of the stdlib pools: build the worker's state once, keep it global."""
    global _STATE
    _STATE = init(*initargs)


def call_with_state(fn: Callable[[Any, Any], Any], msg: Any) -> Any:
    """``fn(state, msg)`` with the state the initializer built (used via functools.partial)."""
    return fn(_STATE, msg)


_UNSET: Any = object()
_LAZY_STATE: Any = _UNSET  # set in each worker by its first call_with_lazy_state


def call_with_lazy_state(
    init: Callable[..., Any], initargs: tuple[Any, ...], fn: Callable[[Any, Any], Any], msg: Any
) -> Any:
    """``fn(state, msg)`` for pools without an initializer: the state is built on first use."""
    global _LAZY_STATE
    if _LAZY_STATE is _UNSET:
        _LAZY_STATE = init(*initargs)
    return fn(_LAZY_STATE, msg)
