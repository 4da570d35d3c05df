"""``ordpool bench`` with the peers too: mpire and joblib (loky), when they are installed.

Same options, same methodology, same table as ``ordpool bench`` (see ``ordpool/_bench.py``),
with two more engines: mpire's ``WorkerPool.imap`` and joblib's ``Parallel`` over the loky
backend (``return_as="generator"``), each at its best chunk/batch size from the same sweep as
the stdlib pools. Neither is a dependency of ordpool: a missing one is skipped with a message
(``pip install mpire joblib``, or ``pip install -e '.[bench]'``).

Usage, from the repository root::

    python bench/peers.py                          # the default comparison + peers
    python bench/peers.py --workload decode --messages 100000 --check
    python bench/peers.py --engines ordpool,mpire  # just these (serial always runs)

joblib's loky backend starts its workers its own way (``--start-method`` does not apply to it)
and has no initializer: with ``--init``, each worker builds its state on its first message.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from typing import Any, Callable, Iterator, Sequence

from ordpool import _bench
from ordpool._bench import BenchEngine, ChunkedEngine

PEERS = {"mpire": "mpire", "joblib": "joblib"}  # engine key -> module it needs


class MpireEngine(ChunkedEngine):
    """``mpire.WorkerPool(n_jobs, keep_alive=True).imap(fn, messages, chunk_size=...)``."""

    key = "mpire"
    name = "mpire imap"

    def open(self) -> None:
        from mpire import WorkerPool

        self._pool = WorkerPool(
            n_jobs=self.workers, start_method=self.config.start_method, keep_alive=True
        )
        # Made once: mpire restarts its workers when the function or worker_init changes.
        self._fn = self.fn()
        self._worker_init: Callable[[], None] | None = None
        if self.workload.init is not None:
            self._worker_init = functools.partial(
                _bench._stdlib_init, self.workload.init, self.workload.initargs
            )

    def prepare(self, messages: Sequence[Any]) -> None:
        # mpire starts its workers on the first map: they are the processes the warm-up starts.
        self._track_workers(lambda: super(MpireEngine, self).prepare(messages))

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        return self._pool.imap(  # type: ignore[no-any-return]
            self._fn,
            messages,
            chunk_size=chunksize,
            worker_init=self._worker_init,
            iterable_len=len(messages),
        )

    def close(self, abort: bool = False) -> None:
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        if abort:
            pool.terminate()
        else:
            pool.stop_and_join()


class JoblibEngine(ChunkedEngine):
    """``joblib.Parallel(n_jobs, backend="loky", batch_size=..., return_as="generator")``."""

    key = "joblib"
    name = "joblib loky"

    def open(self) -> None:
        import joblib

        self._joblib = joblib
        if self.workload.init is None:
            self._fn = self.workload.fn
        else:
            self._fn = functools.partial(
                _bench._call_with_lazy_state,
                self.workload.init,
                self.workload.initargs,
                self.workload.fn,
            )

    def prepare(self, messages: Sequence[Any]) -> None:
        # loky starts its workers (a reusable executor) on first use.
        self._track_workers(lambda: super(JoblibEngine, self).prepare(messages))

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        delayed = self._joblib.delayed(self._fn)
        parallel = self._joblib.Parallel(
            n_jobs=self.workers, backend="loky", batch_size=chunksize, return_as="generator"
        )
        return parallel(delayed(m) for m in messages)  # type: ignore[no-any-return]

    def close(self, abort: bool = False) -> None:
        if getattr(self, "_joblib", None) is None:
            return
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=abort)


ENGINES: dict[str, type[BenchEngine]] = {"mpire": MpireEngine, "joblib": JoblibEngine}


def installed(key: str) -> bool:
    """Whether the peer ``key`` can be imported."""
    return importlib.util.find_spec(PEERS[key]) is not None


def main(argv: list[str] | None = None) -> int:
    """Parse ``ordpool bench``'s options, add the installed peers, run, print the table."""
    parser = argparse.ArgumentParser(
        prog="bench/peers.py", description=__doc__.split("\n\n")[0].strip("`")
    )
    _bench.add_arguments(parser)
    parser.set_defaults(engines="ordpool,pool,executor,mpire,joblib")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    kept = []
    for key in engines:
        if key in PEERS and not installed(key):
            print(f"{key} is not installed: skipped (pip install {PEERS[key]})", file=sys.stderr)
        else:
            kept.append(key)
    args.engines = ",".join(kept)
    args.command_line = " ".join(["bench/peers.py", *argv])
    return _bench.run_command(args, ENGINES)


if __name__ == "__main__":
    sys.exit(main())
