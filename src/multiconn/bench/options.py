"""What a benchmark is asked to do: `BenchOptions`, and `BenchError` when it cannot."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DRAIN_TIMEOUT", "MODES", "BenchError", "BenchOptions"]

MODES = ("framed", "raw")
#: After the measured window, how long outstanding responses are waited for.
DRAIN_TIMEOUT = 2.0


class BenchError(Exception):
    """The benchmark could not run (no server, no connection); one readable line."""


@dataclass(frozen=True)
class BenchOptions:
    """What to run; the defaults are the command line's."""

    host: str = "127.0.0.1"
    #: None: start an echo server on a free port and stop it at the end.
    port: int | None = None
    connections: int = 50
    size: int = 64
    pipeline: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    mode: str = "framed"
    processes: int = 1
    timeout: float = 10.0

    def validate(self) -> None:
        """Raise ValueError naming the first option out of range."""
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.connections >= 1, "connections must be >= 1"),
            (self.size >= (1 if self.mode == "raw" else 0),
             "size must be >= 1 in raw mode" if self.mode == "raw" else "size must be >= 0"),
            (self.pipeline >= 1, "pipeline must be >= 1"),
            (self.duration > 0, "duration must be > 0"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.processes >= 1, "processes must be >= 1"),
            (self.processes <= self.connections, "processes must not exceed connections"),
            (self.timeout > 0, "timeout must be > 0"),
            (self.port is None or 0 < self.port <= 65535, "port must be 1..65535"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
