"""Bounded memory: a long stream through imap, read lazily, with a consumer slower than the
workers. The parent's RSS must stay flat, the input must not be read far ahead, and the items in
flight must never exceed the window (plus the batch being formed).

If the pool buffered its input or its results, 2,000,000 items of ~100 bytes would cost the
parent hundreds of megabytes (about 300 MB with an unbounded window); the bound below is a
fraction of that, and about ten times what the bounded stream needs.
"""

from __future__ import annotations

import time

import psutil
import pytest

from ordpool import ProcessOrderedPool

N = 2_000_000
WINDOW = 4096
RSS_BOUND = 60 * 1024 * 1024


def _head(item: bytes) -> bytes:
    return item[:48]


def _message(i: int) -> bytes:
    return b"%096d" % i  # 96 bytes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_streaming_two_million_items_keeps_memory_and_in_flight_bounded(start_method):
    proc = psutil.Process()
    produced = 0

    def source():
        nonlocal produced
        for i in range(N):
            produced = i + 1
            yield _message(i)

    with ProcessOrderedPool(_head, workers=2, window=WINDOW, start_method=start_method) as pool:
        engine = pool._engine
        batch_max = engine.sizer.maximum  # the window caps the batch size too
        assert batch_max <= WINDOW
        # warm up (worker pages, allocator pools, the batch size), then take the baseline
        pool.map([_message(i) for i in range(20_000)])
        baseline = proc.memory_info().rss
        peak_rss = baseline
        peak_inflight = 0
        peak_read_ahead = 0
        count = 0
        for i, value in enumerate(pool.imap(source())):
            if i % 1000 == 0:
                # a slow consumer, now and then a very slow one: the workers and the feeder
                # must wait for it (and the window fills up while it sleeps)
                time.sleep(0.02 if i % 50_000 == 0 else 0.0005)
                peak_inflight = max(peak_inflight, engine.inflight)
                peak_read_ahead = max(peak_read_ahead, produced - i)
                assert engine.inflight <= WINDOW + batch_max, engine.inflight
                if i % 50_000 == 0:
                    rss = proc.memory_info().rss
                    peak_rss = max(peak_rss, rss)
                    assert rss - baseline < RSS_BOUND, (i, (rss - baseline) / 2**20)
            if value != _message(i)[:48]:
                raise AssertionError(f"item {i}: {value!r}")
            count += 1
        assert count == N
        assert engine.delivery.peak_heap <= WINDOW
    assert peak_rss - baseline < RSS_BOUND
    # the stream really was held back by the consumer (else this test proves little) ...
    assert peak_inflight > WINDOW // 2
    # ... and the input was read lazily: never more than the window and two batches ahead
    assert peak_read_ahead <= WINDOW + 2 * batch_max, peak_read_ahead
