"""The pure parts of ordpool: no threads, no locks of their own, no I/O but reading the CPU
count and a worker's CPU time and memory (``defaults``, ``stats``).

``batching`` (batches, tasks, the batch sizer), ``reorder`` (the min-heap that releases batches
in order), ``streams`` (the stream types), ``routing`` (key -> worker slot), ``state`` (the
lifecycle enum), ``stats`` (the frozen snapshots), ``errors`` (the exception hierarchy) and
``defaults`` (the constants every face shares). The engine (:mod:`ordpool._engine`) drives
them under its lock; the unit tests drive them directly.
"""
