"""The live progress line of ``multiconn bench`` on a terminal."""

from __future__ import annotations

from typing import Any, TextIO

__all__ = ["PROGRESS_INTERVAL", "ProgressLine"]

#: The live progress line is redrawn this often.
PROGRESS_INTERVAL = 0.5


class ProgressLine:
    """The live line on a TTY: elapsed, completed, current rate."""

    def __init__(self, stream: TextIO | None, counts: Any, start: float, warmup: float, duration: float) -> None:
        self.stream = stream
        self.counts = counts
        self.start = start
        self.warmup = warmup
        self.duration = duration
        self.last_time = start
        self.last_count = 0
        self.next = start + PROGRESS_INTERVAL
        self.drawn = False

    def update(self, now: float) -> None:
        if self.stream is None or now < self.next:
            return
        self.next = now + PROGRESS_INTERVAL
        completed = sum(self.counts)
        rate = (completed - self.last_count) / max(1e-9, now - self.last_time)
        self.last_time, self.last_count = now, completed
        elapsed = now - self.start
        phase = ("warm-up" if elapsed < self.warmup
                 else "measuring" if elapsed < self.warmup + self.duration else "draining")
        self.stream.write(f"\r{elapsed:6.1f} s  {phase:<9}  {completed:>12,} done  {rate:>10,.0f} req/s\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn and self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False
