"""Key routing: the worker slot of a key, the same in every process and run."""

from __future__ import annotations

from typing import Any

__all__ = ["KeyRouter", "fnv1a"]

_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a(key: str | bytes | int) -> int:
    """64-bit FNV-1a hash of a key: the same in every process, run and ``PYTHONHASHSEED``.

    ``str`` keys hash their UTF-8 bytes, ``int`` keys their signed 8-byte little-endian form
    (arbitrary precision ints: their minimal two's-complement bytes).

    >>> fnv1a(b"")
    14695981039346656037
    >>> fnv1a("a") == fnv1a(b"a") == 0xAF63DC4C8601EC8C
    True
    """
    if isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        length = max(8, (key.bit_length() + 8) // 8)
        data = key.to_bytes(length, "little", signed=True)
    else:
        raise TypeError(f"keys must be str, bytes or int, not {type(key).__name__}")
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


class KeyRouter:
    """The worker slot of a key, ``fnv1a(key) % workers``, remembered for recent small keys.

    FNV-1a runs a Python step per byte of the key, which costs more than the parent's whole
    work per message elsewhere (docs/design.md has the figures). Stream keys
    repeat (users, devices, sessions), so a dict of the last :attr:`size` keys makes routing a
    lookup. Only exact ``str``, ``bytes`` and ``int`` keys of bounded size are remembered: a
    ``bool`` or a ``float`` equal to a cached ``int`` must still be refused by :func:`fnv1a`,
    and a large key must not be kept alive. Safe from any thread (the GIL makes each dict
    operation atomic, and every answer is the same whoever computes it).

    >>> route = KeyRouter(4)
    >>> route("user-1") == fnv1a("user-1") % 4 == route("user-1")
    True
    """

    __slots__ = ("caches", "size", "workers")

    MAX_KEY_BYTES = 256

    def __init__(self, workers: int, size: int = 1 << 16) -> None:
        self.workers = workers
        self.size = size  # keys remembered, per key type
        # One dict per type: "a" and b"a" hash alike, and comparing them warns under -b.
        self.caches: dict[type, dict[Any, int]] = {str: {}, bytes: {}, int: {}}

    def __call__(self, key: Any) -> int:
        kind = type(key)
        if ((kind is str or kind is bytes) and len(key) <= self.MAX_KEY_BYTES) or (
            kind is int and -_INT_BOUND <= key < _INT_BOUND
        ):
            cache = self.caches[kind]
            slot = cache.get(key)
            if slot is None:
                slot = fnv1a(key) % self.workers
                if len(cache) >= self.size:
                    cache.clear()
                cache[key] = slot
            return slot
        return fnv1a(key) % self.workers


_INT_BOUND = 1 << 63
