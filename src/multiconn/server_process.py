"""``multiconn serve`` in a subprocess, for tests and for ``multiconn bench``.

`ServerProcess` starts ``python -m multiconn serve --port 0 ARGS``, reads the
port it chose from its log, drains its stderr, and stops it. Tests use it as
``multiconn.testing.ServerProcess``; ``multiconn bench`` starts its embedded
server with it. It lives here, not in `multiconn.testing`, so that the bench
does not import the test helpers (nor the server they run in-process).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from typing import Any

from .errors import ServerStartError
from .procstats import process_cpu_seconds, process_open_fds, process_rss_bytes

__all__ = ["LISTENING", "ServerProcess"]

#: The server's INFO line that announces each listening address.
LISTENING = re.compile(r"listening on (\S+):(\d+) \(app ")


class ServerProcess:
    """``python -m multiconn serve --port 0 ARGS`` in a subprocess: its port,
    its stderr, and what /proc says about it.

    For what a thread cannot show: signals, exit codes, descriptor limits, the
    server's own CPU time and memory. The port comes from the "listening on"
    log line (so the server must log at INFO, the default). Stderr is read by
    a thread for as long as the process runs, because a full pipe would block
    the server; its lines are appended to `lines`. Extra keyword arguments go
    to `subprocess.Popen` (``env``, ``preexec_fn``, ``start_new_session``).
    """

    def __init__(self, *args: str, python: str = sys.executable, **popen_args: Any) -> None:
        self.command = [python, "-m", "multiconn", "serve", "--port", "0", *args]
        self.lines: list[str] = []
        self.host: str | None = None
        self.port: int | None = None
        self._popen_args = popen_args
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "ServerProcess":
        """Start it and wait for its port; raises `ServerStartError`."""
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, **self._popen_args)
        except OSError as exc:
            raise ServerStartError(f"cannot start the server ({self.command[0]}): {exc.strerror or exc}") from None
        self._reader = threading.Thread(target=self._read_stderr, name="multiconn-serve-stderr", daemon=True)
        self._reader.start()
        self._listening.wait(timeout)
        if self.port is None:
            status = self.proc.poll()
            if status is None:
                self._reader.join(0.5)  # it set the event on its way out
            if status is None and not self._reader.is_alive():  # stderr closed: the exit is moments away
                try:
                    status = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self.stop()
            last = self.lines[-1] if self.lines else "no output"
            if status is None:
                raise ServerStartError(f"the server did not report listening within {timeout:g} s ({last})")
            raise ServerStartError(f"the server exited with status {status} at start: {last}")
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                if self.port is None:
                    match = LISTENING.search(line)
                    if match:
                        self.host, self.port = match.group(1), int(match.group(2))
                        self._listening.set()
        except (OSError, ValueError):
            pass  # the pipe was closed under us by stop()
        finally:
            self._listening.set()  # EOF before the line: start() says why

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> bool:
        """Wait until a line of stderr contains `text`; False if none did in time."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit and for all of stderr to be read; the exit status.

        Raises `subprocess.TimeoutExpired` if it is still running.
        """
        assert self.proc is not None and self._reader is not None, "not started"
        status = self.proc.wait(timeout)
        self._reader.join(5)
        return status

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, up to `timeout` s for a graceful exit, then SIGKILL; the exit
        status. Releases the pipe and the reader; safe to call again."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self._reader is not None:
                self._reader.join(5)
            if proc.stderr is not None:
                proc.stderr.close()
        return proc.returncode

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def rss_bytes(self) -> int | None:
        return process_rss_bytes(self.pid)

    def open_fds(self) -> int | None:
        return process_open_fds(self.pid)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
