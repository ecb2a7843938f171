"""The server's limits and timeouts in one place, with the defaults of docs/protocol.md."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import DEFAULT_MAX_CONTENT


@dataclass(frozen=True)
class Limits:
    """What one server allows a connection (sizes in bytes, times in seconds)."""

    #: Largest ``content-length`` accepted; above it: ``content-too-large``.
    max_content: int = DEFAULT_MAX_CONTENT
    #: From a frame's first byte to its last; then ``timeout`` and close.
    frame_timeout: float = 30.0
    #: A connection with nothing in flight (or output that stopped moving) is closed after this.
    idle_timeout: float = 300.0
    #: At this many open connections the server stops accepting.
    max_connections: int = 10_000
    #: On shutdown, work not finished after this long is aborted.
    drain_timeout: float = 10.0
    #: Pending output above which a connection is no longer read (backpressure).
    high_water: int = 1024 * 1024
    #: Pending output below which reading resumes.
    low_water: int = 256 * 1024
    #: After a fatal error frame, how long input is discarded before closing.
    error_linger: float = 1.0
    #: A handler call running longer is interrupted and answered ``handler-error``
    #: (enforced when the server runs in the main thread; see watchdog.py).
    handler_timeout: float = 10.0
    #: Requests one connection may have in a handler pool (running or queued);
    #: at this many the server stops reading that connection.
    max_in_flight: int = 64
    #: Requests the whole server may have waiting for a handler pool; past it
    #: every connection stops reading until the queue drains.
    max_queued: int = 4096

    def __post_init__(self) -> None:
        for name in ("frame_timeout", "idle_timeout", "drain_timeout", "error_linger", "handler_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_content < 0:
            raise ValueError("max_content must be >= 0")
        for name in ("max_connections", "max_in_flight", "max_queued"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError("need 0 <= low_water <= high_water")

    @property
    def sweep_interval(self) -> float:
        """How often timeouts are checked: often enough to be precise to ~1/4."""
        return min(1.0, max(0.01, min(self.frame_timeout, self.idle_timeout) / 4))
