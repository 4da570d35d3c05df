"""A progress bar on stderr while the benchmark runs, drawn by rich; silent off a terminal."""

from __future__ import annotations

import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

__all__ = ["Progress"]

_TICK = 3.0  # seconds between redraws during a step (the elapsed time)


class Progress:
    """A progress bar on stderr, drawn after the first second; silent off a tty.

    The bar is redrawn when a step starts or ends, by the caller, and otherwise every 3 s by a
    thread (the elapsed time). Steps start and end between timed runs, so their redraws fall
    outside the timings; rich's own refresh thread (10 redraws a second, each taking the GIL
    from the parent being measured) is off. A redraw costs about 0.7 ms (against 6 us for a
    hand-drawn line), so the thread's redraws take about 0.02% of the parent's time during a
    timed run.

    Example:
        >>> progress = Progress(2, enabled=False)
        >>> progress.step("warm-up")
        >>> progress.advance()
        >>> progress.close()
    """

    def __init__(self, total: int, enabled: bool = True, delay: float = 1.0) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = max(1, total)
        self.done = 0  # steps finished: 3
        self.what = ""  # the step running: "round 1/3: ordpool"
        self._delay = delay
        self._stop = threading.Event()
        self._shown = threading.Event()  # set once the bar is on screen (after the delay)
        self._bar = RichProgress(
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            auto_refresh=False,
            transient=True,  # the line is cleared at the end
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._bar.add_task("", total=self.total)
        self._thread = threading.Thread(target=self._run, name="bench-progress", daemon=True)
        if self.enabled:
            self._thread.start()

    def step(self, what: str) -> None:
        """A step is starting (``what`` names it); the previous one is done."""
        self.what = what
        if self._shown.is_set():
            self._draw()

    def advance(self) -> None:
        """One step finished."""
        self.done = min(self.total, self.done + 1)
        if self._shown.is_set():
            self._draw()

    def _draw(self) -> None:
        self._bar.update(self._task, completed=self.done, description=self.what, refresh=True)

    def _run(self) -> None:
        if self._stop.wait(self._delay):
            return
        self._bar.start()
        self._shown.set()
        while True:
            self._draw()
            if self._stop.wait(_TICK):
                break
        self._shown.clear()
        self._bar.stop()

    def close(self) -> None:
        """Stop drawing and clear the line."""
        self._stop.set()
        if self.enabled:
            self._thread.join()
