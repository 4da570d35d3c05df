"""Failures of the pool itself, and how a worker's exception travels home.

User exceptions keep their type: a worker catches the exception its task raised, pickles it
together with the formatted traceback, and the parent re-raises the very same type with a
:class:`RemoteTraceback` chained as ``__cause__`` (the scheme of CPython's
``concurrent.futures.process``). Everything the *pool* can go wrong with is one of the small
hierarchy below.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from concurrent.futures import BrokenExecutor
from typing import Any

import cloudpickle

__all__ = [
    "BrokenPool",
    "OrdpoolError",
    "PoolClosed",
    "RemoteTraceback",
    "WorkerCrashed",
    "WorkerInitError",
]


class OrdpoolError(Exception):
    """Base class of the errors raised by ordpool itself (never by user code)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process.

    Chained as ``__cause__`` of the re-raised exception, so an uncaught error prints the worker's
    stack under "The above exception was the direct cause of the following exception".
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class BrokenPool(OrdpoolError, BrokenExecutor):
    """The pool cannot run tasks any more (a worker failed to initialise, or it was killed).

    Subclass of :class:`concurrent.futures.BrokenExecutor`, so code written against the standard
    library's executors catches it unchanged.
    """


class WorkerInitError(BrokenPool):
    """A worker's ``init`` (or ``initializer``) raised; the worker's traceback is ``__cause__``."""


class WorkerCrashed(OrdpoolError):
    """The worker process running this item died (signal, ``os._exit``, segfault, OOM kill).

    Attributes:
        exitcode: the worker's exit code; negative ``-N`` when it was killed by signal ``N``.
        pid: the dead worker's process id.
    """

    def __init__(self, message: str, exitcode: int | None = None, pid: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.exitcode, self.pid))


class PoolClosed(OrdpoolError, RuntimeError):
    """The pool was closed or terminated: it takes no new work."""


def describe_exit(exitcode: int | None) -> str:
    """``"exit code 3"`` or ``"signal SIGKILL"`` for a process's exit code."""
    if exitcode is None:
        return "an unknown exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class _ExceptionWithTraceback:
    """Pickles an exception with its formatted traceback (CPython's recipe, hardened).

    If the exception cannot make the round trip (a lock in its args, a local class, an
    ``__init__`` that its ``args`` do not fit), it is replaced by a :class:`RuntimeError` naming
    the original type and message, so the failure still arrives at its own index instead of
    failing the whole batch when the parent unpickles it. The round trip is tried here, in the
    worker, where it costs only when something failed.
    """

    def __init__(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.tb = f'\n"""\n{tb}"""'
        exc.__traceback__ = None
        try:
            try:
                data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                data = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)  # a local class
            pickle.loads(data)
            self.exc: BaseException = exc
        except Exception:
            self.exc = RuntimeError(
                f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
                "(the original exception could not be sent from the worker: it does not pickle)"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_exc, (self.exc, self.tb)


def _rebuild_exc(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def wrap_exception(exc: BaseException) -> _ExceptionWithTraceback:
    """Make ``exc`` ready to travel from a worker to the parent."""
    return _ExceptionWithTraceback(exc)
