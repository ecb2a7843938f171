"""Applications for the handler-pool tests, importable by name (``pool_apps:slow``)
so that a process pool's workers and a ``multiconn serve`` subprocess can load them.

Requests are binary frames whose content is a command: ``sleep:SECONDS``,
``exit:CODE``, ``kill``, ``pid``, ``touch:PATH`` (create a file, so a test can
see whether a request ran), or anything else (echoed at once).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from multiconn import Frame


def _command(request: Frame) -> tuple[str, str]:
    verb, _, arg = bytes(request.content).decode("utf-8", "replace").partition(":")
    return verb, arg


def slow(request: Frame) -> Frame:
    """Blocking handler: sleeps, exits, kills itself, or echoes."""
    verb, arg = _command(request)
    if verb == "sleep":
        time.sleep(float(arg))
    elif verb == "exit":
        os._exit(int(arg))
    elif verb == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif verb == "pid":
        return Frame.binary(str(os.getpid()).encode())
    elif verb == "touch":
        Path(arg).touch()
    return Frame.binary(request.content)


async def async_slow(request: Frame) -> Frame:
    """The same commands, awaited: ``sleep`` is ``asyncio.sleep``."""
    verb, arg = _command(request)
    if verb == "sleep":
        await asyncio.sleep(float(arg))
    elif verb == "touch":
        Path(arg).touch()
    return Frame.binary(request.content)


async def async_loop_name(request: Frame) -> Frame:
    """`async_slow`'s commands, answered with the running loop's class (module and name)."""
    await async_slow(request)
    loop = type(asyncio.get_running_loop())
    return Frame.binary(f"{loop.__module__}.{loop.__qualname__}".encode())


class AsyncCallable:
    """A callable object whose ``__call__`` is ``async def``: detected as async too."""

    async def __call__(self, request: Frame) -> Frame:
        return await async_slow(request)


async_callable = AsyncCallable()

unpicklable = lambda request: request  # noqa: E731  (a lambda cannot be pickled by name)


async def async_blocking(request: Frame) -> Frame:
    """A mistake to guard against: a blocking call inside ``async def``."""
    verb, arg = _command(request)
    if verb == "sleep":
        time.sleep(float(arg))
    return Frame.binary(request.content)
