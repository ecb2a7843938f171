"""The application of the ``--workers`` tests (tests/test_workers.py), importable
by name (``worker_apps:app``) with tests/apps on PYTHONPATH.

Every answer is a binary frame ``PID:RESULT``, PID being the worker process
that answered, so a test knows which worker holds a connection. Requests are
binary frames whose content is a command:

- ``nodelay:PORT``: RESULT is TCP_NODELAY (``0`` or ``1``) as read with
  getsockopt on this process's own socket whose peer port is PORT (the
  client's local port), or ``none`` if it has no such socket;
- ``sleep:SECONDS``: sleeps, then RESULT is the command;
- anything else: RESULT is the content itself.
"""

from __future__ import annotations

import os
import socket
import time

from multiconn import Frame


def _nodelay_of_peer(port: int) -> str:
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.getpeername()[1] != port:
                    continue
            except OSError:  # not connected: a listener, the loop's wake-up pair
                continue
            return str(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return "none"


def app(request: Frame) -> Frame:
    content = bytes(request.content)
    verb, _, arg = content.partition(b":")
    if verb == b"nodelay":
        result = _nodelay_of_peer(int(arg)).encode()
    elif verb == b"sleep":
        time.sleep(float(arg))
        result = content
    else:
        result = content
    return Frame.binary(str(os.getpid()).encode() + b":" + result)
