"""What a benchmark found: `BenchResult`, as JSON or as the table ``multiconn bench`` prints."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from .options import DRAIN_TIMEOUT, BenchOptions

__all__ = ["BenchResult", "percentiles_us"]


@dataclass
class BenchResult:
    """The outcome of one run; `to_json` and `format_table` present it."""

    options: BenchOptions
    duration_s: float
    requests: int
    errors: int
    error_samples: list[str]
    latency_us: dict[str, float] | None
    server_cpu_us_per_request: float | None
    server_pid: int | None = None
    client_cpu_percent: float | None = None
    outstanding_after_drain: int = 0
    target: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.rps * self.options.size / 1e6

    def to_json(self) -> dict[str, Any]:
        options = self.options
        return {
            "mode": options.mode,
            "connections": options.connections,
            "size": options.size,
            "pipeline": options.pipeline,
            "processes": options.processes,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "mbps": round(self.mbps, 3),
            "latency_us": ({key: round(value, 1) for key, value in self.latency_us.items()}
                           if self.latency_us is not None else None),
            "server_cpu_us_per_request": (round(self.server_cpu_us_per_request, 2)
                                          if self.server_cpu_us_per_request is not None else None),
            "error_samples": list(self.error_samples),
        }

    def format_table(self, micro: str | None = None) -> str:
        """The human-readable report; `micro` is the µs unit (default: "us" where stdout cannot print "µ")."""
        options = self.options
        micro = micro or _micro_sign()
        server = (f"server started by bench (pid {self.server_pid})" if self.server_pid is not None
                  else f"server at {self.target}")
        processes = f"{options.processes} process{'es' if options.processes > 1 else ''}"
        lines = [
            f"multiconn bench: {options.mode}, {options.connections} connections x pipeline {options.pipeline}, "
            f"{options.size} B payload, {processes}, {server}",
            f"measured {self.duration_s:g} s after {options.warmup:g} s of warm-up",
            "",
        ]
        rows: list[tuple[str, str]] = [
            ("requests", f"{self.requests:,}"),
            ("req/s", f"{self.rps:,.0f}"),
            ("MB/s", f"{self.mbps:,.3f}  (payload, one direction)"),
        ]
        names = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"), ("max", "max")]
        for label, key in names:
            value = self.latency_us[key] if self.latency_us is not None else None
            rows.append((f"latency {label}", _format_us(value, micro)))
        rows.append(("errors", f"{self.errors:,}"))
        if self.server_pid is not None:
            cpu = self.server_cpu_us_per_request
            rows.append(("server CPU / request", f"{cpu:,.1f} {micro}" if cpu is not None else "-"))
        if self.client_cpu_percent is not None:
            rows.append(("bench CPU", f"{self.client_cpu_percent:.0f} % of a core per process"))
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
        if self.outstanding_after_drain:
            lines.append(f"  ({self.outstanding_after_drain} responses still outstanding "
                         f"{DRAIN_TIMEOUT:g} s after the window)")
        for sample in self.error_samples:
            lines.append(f"  error: {sample}")
        return "\n".join(lines)


def _format_us(value: float | None, micro: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {micro}" if value >= 100 else f"{value:.1f} {micro}"


def _micro_sign() -> str:
    try:
        "\u00b5".encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "us"
    return "\u00b5s"


def percentiles_us(latencies: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p90/p99/p99.9 and max, in µs, of latencies in seconds."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    count = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(count, max(1, math.ceil(q * count))) - 1] * 1e6

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "p999": rank(0.999),
            "max": ordered[-1] * 1e6}
