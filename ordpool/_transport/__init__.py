"""What carries batches to workers and back: the :class:`~.base.Transport` protocol and its
implementations, local worker processes (``process``, with the worker side in ``worker`` and
the byte formats in ``wire``) and Ray actors (``ray``, imported only when asked for)."""
