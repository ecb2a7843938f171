"""The applications of benchmarks/pools.py, for multiconn and for its peers.

    multiconn serve --app pool_apps:hol          # with benchmarks/ on PYTHONPATH
    multiconn serve --app pool_apps:hol_async
    multiconn serve --app pool_apps:echo --handler-pool thread --pool-size 32
    multiconn serve --app pool_apps:cpu --handler-pool process --pool-size 2

Every application takes a `multiconn.Frame` and returns one. The peer servers
(benchmarks/peers/pool_peers.py) run the very same functions, through
`peer_call`, in their executors, so that every server does the same work per
request and differs only in how it gets there.

- `hol`: a request whose content starts with ``SLOW_PREFIX`` sleeps
  `SLOW_SECONDS` (``time.sleep``), any other returns at once; both answer
  their own content. `hol_async` is the same with ``await asyncio.sleep``.
- `echo`: the same content-type, content-encoding and content (multiconn's
  built-in echo, here so that it runs in the handler pool like the others).
- `cpu`: about 2 ms of pure-Python arithmetic (`spin`), answered with its
  result in decimal. The loop count is `CPU_ITERATIONS`: the environment
  variable ``POOL_CPU_ITERATIONS`` when set (pools.py calibrates once and
  gives every server and every worker process the same count), otherwise
  calibrated at import to `CPU_TARGET_SECONDS`.
"""

from __future__ import annotations

import asyncio
import os
import time

from multiconn import Frame

SLOW_PREFIX = b"slow"
SLOW_SECONDS = 0.050
CPU_TARGET_SECONDS = 0.002


def hol(request: Frame) -> Frame:
    content = request.content
    if content.startswith(SLOW_PREFIX):
        time.sleep(SLOW_SECONDS)
    return Frame.binary(content)


async def hol_async(request: Frame) -> Frame:
    content = request.content
    if content.startswith(SLOW_PREFIX):
        await asyncio.sleep(SLOW_SECONDS)
    return Frame.binary(content)


def echo(request: Frame) -> Frame:
    header = request.header
    return Frame({"content-type": header["content-type"], "content-encoding": header["content-encoding"]},
                 request.content)


def spin(iterations: int) -> int:
    """Pure-Python work that holds the GIL: a loop of integer arithmetic."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def spin_result(iterations: int) -> int:
    """What `spin` returns, without the loop (for the load generator's check)."""
    full, rest = divmod(iterations, 7)
    per_cycle = sum(i * i % 7 for i in range(7))
    return full * per_cycle + sum(i * i % 7 for i in range(rest))


def calibrate(target: float = CPU_TARGET_SECONDS, samples: int = 7) -> int:
    """The loop count of `spin` that takes about `target` seconds of CPU here (median of samples).

    Timed with the thread's CPU clock, so that time-slicing by other processes
    on a busy machine does not count.
    """
    clock = time.thread_time
    n = 10_000
    while True:  # grow until one call is long enough to time well
        start = clock()
        spin(n)
        elapsed = clock() - start
        if elapsed >= target / 4:
            break
        n *= 2
    times = []
    for _ in range(samples):
        start = clock()
        spin(n)
        times.append(clock() - start)
    times.sort()
    return max(1, round(n * target / times[len(times) // 2]))


CPU_ITERATIONS = int(os.environ.get("POOL_CPU_ITERATIONS") or 0) or calibrate()
CPU_ANSWER = str(spin_result(CPU_ITERATIONS)).encode()


def cpu(request: Frame) -> Frame:
    return Frame.binary(str(spin(CPU_ITERATIONS)).encode())


APPS = {"hol": hol, "echo": echo, "cpu": cpu}


def peer_call(app: str, header: dict, content: bytes) -> tuple[dict, bytes]:
    """Run application `app` on a decoded request; its answer's header and content.

    For the peers' executors: module-level, so that a process pool can pickle it.
    """
    answer = APPS[app](Frame(header, content))
    return answer.header, answer.content
