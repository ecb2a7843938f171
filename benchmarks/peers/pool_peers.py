"""Peer: an asyncio Protocol server that runs a blocking handler in an executor.

    python benchmarks/peers/pool_peers.py --port P --app hol|echo|cpu \\
        [--loop asyncio|uvloop] [--executor thread|process] [--workers N]

The way a competent asyncio user serves a handler that may block or burn CPU:
``data_received`` feeds the shared FrameDecoder (framing.py), submits every
complete frame with ``loop.run_in_executor`` and writes the answers back in
request order as their futures complete (one ``transport.write`` per batch
of consecutive finished answers). The handler is the same function
multiconn runs (benchmarks/pool_apps.py, through ``pool_apps.peer_call``).

- ``--executor thread``: a ``ThreadPoolExecutor(--workers)`` (default 32),
  set as the loop's default executor.
- ``--executor process``: a ``ProcessPoolExecutor(--workers)`` (default 2)
  on the ``forkserver`` start method; its workers are started and warmed up
  before the port opens.

A handler that raises is answered with a ``handler-error`` frame and the
connection stays open, as multiconn does. Backpressure: reading pauses while
the transport's write buffer is above its high-water mark.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from framing import BACKLOG, FrameDecoder, encode, error_frame

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import pool_apps  # noqa: E402

BYTEORDER = sys.byteorder


def answer_bytes(request_id, header, content):
    out = {"byteorder": BYTEORDER, "content-type": header["content-type"],
           "content-encoding": header["content-encoding"], "content-length": len(content)}
    if request_id is not None:
        out["id"] = request_id
    return encode(out, content)


def handler_error(request_id, exc):
    body = json.dumps({"error": {"code": "handler-error", "message": f"{type(exc).__name__}: {exc}"}}).encode()
    out = {"byteorder": BYTEORDER, "content-type": "text/json", "content-encoding": "utf-8",
           "content-length": len(body)}
    if request_id is not None:
        out["id"] = request_id
    return encode(out, body)


class PooledFrames(asyncio.Protocol):
    app = "echo"
    executor = None

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder()
        self.pending = deque()  # (request id, future), in request order
        self.failed = None      # a malformed frame: answered after what came before it
        self.closed = False

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data):
        frames = self.decoder.feed(data)
        run = self.loop.run_in_executor
        for header, content in frames:
            future = run(self.executor, pool_apps.peer_call, self.app, header, content)
            self.pending.append((header.get("id"), future))
            future.add_done_callback(self.flush)
        if self.decoder.error is not None:
            self.failed = self.decoder.error
            self.transport.pause_reading()
            self.flush()

    def flush(self, _future=None):
        pending = self.pending
        out = []
        while pending and pending[0][1].done():
            request_id, future = pending.popleft()
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                out.append(handler_error(request_id, exc))
            else:
                header, content = future.result()
                out.append(answer_bytes(request_id, header, content))
        if self.closed:
            return
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self.failed is not None and not pending:
            self.transport.write(error_frame(self.failed))
            self.transport.close()  # after the pending output is flushed
            self.closed = True

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()


async def serve(args, executor):
    loop = asyncio.get_running_loop()
    if args.executor == "thread":
        loop.set_default_executor(executor)  # asyncio accepts only a ThreadPoolExecutor there
    PooledFrames.app, PooledFrames.executor = args.app, executor
    if args.executor == "process":  # start every worker now, not on the first requests
        warm = [loop.run_in_executor(executor, pool_apps.peer_call, "echo",
                                     {"content-type": "binary/octet-stream", "content-encoding": "binary"}, b"")
                for _ in range(4 * args.workers)]
        await asyncio.gather(*warm)
    server = await loop.create_server(PooledFrames, args.host, args.port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app", choices=sorted(pool_apps.APPS), required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--executor", choices=["thread", "process"], default="thread")
    parser.add_argument("--workers", type=int, help="executor size (default 32 threads or 2 processes)")
    args = parser.parse_args()
    if args.workers is None:
        args.workers = 32 if args.executor == "thread" else 2
    if args.executor == "thread":
        executor = ThreadPoolExecutor(args.workers, thread_name_prefix="handler")
    else:
        executor = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        if args.loop == "uvloop":
            import uvloop
            uvloop.run(serve(args, executor))
        else:
            asyncio.run(serve(args, executor))
    except KeyboardInterrupt:
        pass
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does, shutting the executor down


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    main()
