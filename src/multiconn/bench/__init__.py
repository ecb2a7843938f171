"""`multiconn bench`: a load generator for echo servers, in Python.

Open every connection first, keep ``pipeline`` requests in flight on each,
verify every byte of every response, and time each request from the moment it
is queued to the moment its response is complete. A warm-up is not counted;
the measured window follows; then no new requests are issued, the outstanding
ones are drained (for at most `DRAIN_TIMEOUT`) and the connections are closed.

``run(BenchOptions(...))`` returns a `BenchResult` or raises `BenchError`. The
modules:

- `multiconn.bench.options`: `BenchOptions` (what to run) and `BenchError`;
- `multiconn.bench.results`: `BenchResult` (what was found), as JSON or a table;
- `multiconn.bench.worker`: the worker process that generates the load and
  verifies the answers (the request ring, the byte-compare fast path);
- `multiconn.bench.runner`: orchestration: the embedded server, the workers,
  the phases, the server's CPU time, the merged result;
- `multiconn.bench.progress`: the live progress line on a terminal.

It does not import `multiconn.testing`: the embedded server is a
`multiconn.server_process.ServerProcess`.
"""

from __future__ import annotations

from .options import DRAIN_TIMEOUT, BenchError, BenchOptions
from .results import BenchResult, percentiles_us
from .runner import run

__all__ = ["DRAIN_TIMEOUT", "BenchError", "BenchOptions", "BenchResult", "percentiles_us", "run"]
