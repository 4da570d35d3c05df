"""A real-data workload: tweets from ``../shared/data/twitter.json``, one message each.

``make_input(path, n)`` writes ``n`` messages (NDJSON: one tweet per line, re-encoded compactly
with orjson, cycling over the file's 100 tweets with a fresh ``id`` each), and ``project(raw)``
is the job: decode one tweet with orjson and keep a small tuple. Decoding a 4.7 KB tweet costs
about 7 us and sending the tuple back almost nothing, so a pool can beat one process here
where it cannot on "JSON -> full dict" (see PERF.md).

Usage, from the repository root::

    python bench/tweets.py /tmp/tweets.ndjson 200000
    ordpool bench --input /tmp/tweets.ndjson --fn bench.tweets:project --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["DATA", "load_tweets", "main", "make_input", "project"]

# The shared data folder sits next to the repository (never copied into it).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def project(raw: bytes) -> tuple[int, str, str, int, int, int, int]:
    """Decode one tweet and keep what a stream job would.

    Returns:
        ``(id, user screen name, lang, len(text), retweet_count, hashtag count,
        user mention count)``.

    Example:
        >>> project(b'{"id": 7, "user": {"screen_name": "ann"}, "lang": "en", "text": "hi #x",'
        ...         b' "retweet_count": 2, "entities": {"hashtags": [{"text": "x"}]}}')
        (7, 'ann', 'en', 5, 2, 1, 0)
    """
    tweet = orjson.loads(raw)
    entities = tweet.get("entities") or {}
    return (
        tweet["id"],
        (tweet.get("user") or {}).get("screen_name", ""),
        tweet.get("lang") or "",
        len(tweet.get("text") or ""),
        tweet.get("retweet_count") or 0,
        len(entities.get("hashtags") or ()),
        len(entities.get("user_mentions") or ()),
    )


def load_tweets(path: Path | None = None) -> list[dict[str, Any]]:
    """The 100 tweets of ``twitter.json`` (its ``statuses``)."""
    path = DATA / "twitter.json" if path is None else path
    return orjson.loads(path.read_bytes())["statuses"]  # type: ignore[no-any-return]


def make_input(path: str | Path, n: int, source: Path | None = None) -> int:
    """Write ``n`` tweets to ``path``, one per line, each with its own ``id``; returns bytes.

    The tweets cycle over the source file's 100; message ``i`` gets ``id = i`` (and
    ``id_str``), so every message is distinct and the order is checkable.
    """
    tweets = load_tweets(source)
    written = 0
    with open(path, "wb") as out:
        for i in range(n):
            tweet = tweets[i % len(tweets)]
            tweet["id"] = i
            tweet["id_str"] = str(i)
            line = orjson.dumps(tweet) + b"\n"
            out.write(line)
            written += len(line)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python bench/tweets.py OUT.ndjson N``."""
    parser = argparse.ArgumentParser(description="Write N tweets as NDJSON, for ordpool bench.")
    parser.add_argument("out", help="the NDJSON file to write")
    parser.add_argument("n", type=int, help="number of messages")
    parser.add_argument("--source", type=Path, help=f"default: {DATA / 'twitter.json'}")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("N must be positive")
    try:
        size = make_input(args.out, args.n, args.source)
    except OSError as exc:
        print(f"tweets.py: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.n:,} tweets, {size / 1e6:,.1f} MB, to {args.out}")
    print(f"next: ordpool bench --input {args.out} --fn bench.tweets:project --check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
