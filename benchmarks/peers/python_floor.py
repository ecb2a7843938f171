"""Peer: the least a Python raw echo server can do per request (raw mode only).

    python benchmarks/peers/python_floor.py --port P [--host H]

What it is for: under light load, raw echo's server CPU per request is the
kernel's work plus the server's own Python. This server's Python is as little
as a correct one can have: one loop over ``select.epoll.poll`` with no
timeout (so no timer, and no clock read), a dict from descriptor to socket,
``os.read`` and ``os.write`` on the descriptor, and nothing else: no idle
timeouts, no limits, no logging, no shutdown, no framing. Whatever it costs
beyond uvloop is what any server written in Python on the standard library
pays (the GIL released and taken again around each system call, the objects
``epoll.poll`` and ``os.read`` make, the bytecode), which is how
`benchmarks/results/shared-harness.md` reads multiconn's light-load figures.

Correct, not a stub: a send the kernel takes only in part keeps the rest and
waits for EPOLLOUT, and reading pauses meanwhile, so output stays bounded.
"""

import os
import select
import socket

from framing import BACKLOG, parse_args

READ_SIZE = 448  # multiconn's SMALL_RECV_SIZE: CPython's small-object allocator, not malloc


def serve(host: str, port: int) -> None:
    listener = socket.create_server((host, port), backlog=BACKLOG, reuse_port=False)
    listener.setblocking(False)
    poller = select.epoll()
    listen_fd = listener.fileno()
    poller.register(listen_fd, select.EPOLLIN)
    sockets: dict[int, socket.socket] = {}
    unsent: dict[int, bytes] = {}
    while True:
        for fd, events in poller.poll():
            if fd == listen_fd:
                accept(listener, poller, sockets)
            elif events == select.EPOLLIN:
                try:
                    data = os.read(fd, READ_SIZE)
                    if not data:
                        close(fd, poller, sockets, unsent)
                        continue
                    try:
                        sent = os.write(fd, data)
                    except BlockingIOError:
                        sent = 0  # the send buffer is full: all of it waits
                except BlockingIOError:
                    continue  # a stale readiness: nothing to read
                except OSError:
                    close(fd, poller, sockets, unsent)
                    continue
                if sent < len(data):
                    unsent[fd] = data[sent:]
                    poller.modify(fd, select.EPOLLOUT)
            elif fd in unsent:
                flush(fd, poller, sockets, unsent)
            else:  # an error or hang-up with nothing owed: the peer is gone
                close(fd, poller, sockets, unsent)


def accept(listener: socket.socket, poller: select.epoll, sockets: dict[int, socket.socket]) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sockets[conn.fileno()] = conn
    poller.register(conn.fileno(), select.EPOLLIN)


def flush(fd: int, poller: select.epoll, sockets: dict[int, socket.socket], unsent: dict[int, bytes]) -> None:
    """Writable (or an error or hang-up): send what is left, then read again."""
    data = unsent[fd]
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        return
    except OSError:
        close(fd, poller, sockets, unsent)
        return
    if sent < len(data):
        unsent[fd] = data[sent:]
        return
    unsent.pop(fd, None)
    poller.modify(fd, select.EPOLLIN)


def close(fd: int, poller: select.epoll, sockets: dict[int, socket.socket], unsent: dict[int, bytes]) -> None:
    poller.unregister(fd)
    unsent.pop(fd, None)
    sockets.pop(fd).close()


def main() -> None:
    args = parse_args(__doc__)
    if args.mode != "raw":
        raise SystemExit("python_floor.py serves raw echo only (--mode raw)")
    try:
        serve(args.host, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
