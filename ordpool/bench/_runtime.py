"""The runtime's private names that the benchmark uses, imported from this one place.

Everything else in :mod:`ordpool.bench` reaches the runtime through ``ordpool``'s public API.

* ``usable_cores()``: cores this process may run on, the default worker count;
* ``MAX_DELAY``: the pool's default ``max_delay``, for ``--stream``'s report;
* ``PICKLE_PROTOCOL`` and ``result_chunk_length(first_size)``: how ordpool pickles results
  and how many go in one chunk (``bench/floor.py`` measures pickling the same way).
"""

from __future__ import annotations

from .._core.defaults import MAX_DELAY, usable_cores
from .._transport.wire import PROTOCOL as PICKLE_PROTOCOL
from .._transport.wire import chunk_length as result_chunk_length

__all__ = ["MAX_DELAY", "PICKLE_PROTOCOL", "result_chunk_length", "usable_cores"]
