"""The server: listening sockets, accepting, the connection table, shutdown.

Accept policy is spelled out as constants so that behaviour under overload can
be read in one place:

* up to `ACCEPT_BATCH` connections are accepted per wake-up, so a burst of
  connects costs few select() calls, but a flood cannot starve the connections
  already open;
* when the process or system runs out of descriptors or memory
  (`ACCEPT_CAPACITY_ERRNOS`) the server stops watching its listening sockets for
  `ACCEPT_RETRY_DELAY` seconds (or until a connection closes) instead of
  spinning on a listener that stays readable;
* at `Limits.max_connections` it stops accepting; waiting clients sit in the
  listen backlog until a slot frees.

Shutdown (`shutdown`, or the first SIGTERM/SIGINT) closes the listeners, lets
every connection answer what it already received, and stops the loop when the
last one has closed or the drain timeout has passed. A second signal aborts.
"""

from __future__ import annotations

import errno
import functools
import logging
import resource
import signal
import socket
import ssl
from typing import Any, Callable, Sequence, Union, cast

from .apps import App, ConnectionApp, RawEcho, load_app
from .limits import Limits
from .loop import EVENT_READ, EventLoop
from .process_pool import ProcessPoolResponder
from .responders import (
    DEFAULT_THREAD_POOL_SIZE,
    POOL_KINDS,
    AsyncResponder,
    InlineResponder,
    Responder,
    ServerStatus,
    ThreadPoolResponder,
    app_name,
    check_async_loop,
    is_async_app,
)
from .session import FramedSession, PooledFramedSession, RawEchoSession, SessionContext
from .proxy import ProxyHeaderParser
from .proxy_stage import DEFAULT_TRUSTED, ProxyProtocolStage, parse_networks
from .tls import TLSHandshake, TLSTransport
from .transport import PAUSE_QUEUE, StageFactory, Transport
from .buffers import BufferPool
from .connection_info import WithConnection, wants_connection
from .metrics import InlineTiming, ServerMetrics
from .metrics_endpoint import MetricsEndpoint
from .watchdog import Watchdog

log = logging.getLogger("multiconn.server")

ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 0.1
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that concern only the one connection being accepted.
ACCEPT_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH}
)
DEFAULT_BACKLOG = 1024
#: After the drain, how long a pool's threads or processes get to finish.
POOL_STOP_TIMEOUT = 2.0


class ServerAborted(BaseException):
    """Raised out of whatever the server was doing when a second signal arrives.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (a handler's, the loop's) can swallow it.
    """


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("could not raise RLIMIT_NOFILE to %s: %s", target, exc)
    return soft


def format_address(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """Serves an application on one or more listening sockets.

    `app` is a frame handler (``Frame -> Frame``, or an ``async def`` one), `raw_echo`,
    or the name of a built-in app / ``package.module:attr``. With `ssl_context` (a
    server-side ``ssl.SSLContext``) every connection speaks TLS.

    `handler_pool` says where a synchronous handler runs: ``"inline"`` in the
    event loop (the default, and the fastest for handlers that neither wait nor
    compute), ``"thread"`` in `pool_size` threads (default 32), ``"process"`` in
    `pool_size` processes (default: one per CPU; the app must be picklable and
    importable by name). An ``async def`` handler always runs on one asyncio
    loop in a helper thread (`async_loop` ``"uvloop"`` for uvloop's), and cannot
    be combined with a thread or process pool. See `multiconn.responders`.

    `listeners`, if given, are sockets already bound and listening: the server
    serves on them instead of binding `host`:`port` (a worker of
    `multiconn.supervisor` gets its own from the supervisor).
    """

    def __init__(
        self,
        app: Union[App, ConnectionApp, RawEcho, str] = "search",
        host: str | None = "127.0.0.1",
        port: int = 65432,
        *,
        limits: Limits = Limits(),
        loop: EventLoop | None = None,
        backlog: int = DEFAULT_BACKLOG,
        ssl_context: ssl.SSLContext | None = None,
        handler_pool: str = "inline",
        pool_size: int | None = None,
        async_loop: str = "asyncio",
        log_level: int = logging.WARNING,
        metrics: bool = False,
        metrics_address: tuple[str, int] | None = None,
        proxy_protocol: str | None = None,
        proxy_trusted: str | Sequence[str] = DEFAULT_TRUSTED,
        listeners: Sequence[socket.socket] | None = None,
    ) -> None:
        self.app = load_app(app) if isinstance(app, str) else app
        with_connection = False
        if not isinstance(self.app, RawEcho) and wants_connection(self.app):
            with_connection = True
            self.app = WithConnection(self.app)
        self.host = host
        self.port = port
        self.limits = limits
        self.backlog = backlog
        self.ssl_context = ssl_context
        self._raw_echo = isinstance(self.app, RawEcho)
        #: What the server says of itself (health checks answer "draining" once it stops).
        self.status = ServerStatus()
        self.responder = make_responder(self.app, handler_pool, pool_size, limits, async_loop, log_level,
                                         self.status)
        self._own_loop = loop is None
        self.loop = loop if loop is not None else EventLoop()
        self._transport_class: type[Transport] = Transport if ssl_context is None else TLSTransport
        #: What runs on each connection before the session, in order (see transport.Stage).
        self._preamble: tuple[StageFactory, ...] = ()
        trusted = parse_networks(proxy_trusted)  # checked even when unused: a typo should not wait
        if proxy_protocol is not None:  # first: the balancer's header comes before any TLS
            self._preamble += (functools.partial(ProxyProtocolStage, accept=proxy_protocol, trusted=trusted),)
            ProxyHeaderParser(proxy_protocol)  # ValueError now for an unknown version
        if ssl_context is not None:
            self._preamble += (TLSHandshake,)
        self.proxy_protocol = proxy_protocol
        if self._raw_echo:
            self._session_class: Any = RawEchoSession
        elif self.responder.inline:
            self._session_class = FramedSession
        else:
            self._session_class = PooledFramedSession
        self._context = SessionContext(self.responder, limits, self.loop, self.status)
        self._context.with_connection = with_connection
        self._context.buffers = BufferPool()  # large contents, reused when nothing holds them
        self._owner = _ConnectionOwner(self)
        #: Counters for ``--metrics`` (`multiconn.metrics`); None when not asked for.
        self.metrics: ServerMetrics | None = ServerMetrics() if metrics or metrics_address else None
        self.metrics_address = metrics_address
        self.metrics_endpoint: MetricsEndpoint | None = None
        if self.metrics is not None:
            self._context.metrics = self.metrics
            if isinstance(self.responder, InlineResponder):
                self.responder.time_requests(InlineTiming(self.metrics, self.loop))
            else:
                self.responder.metrics = self.metrics  # type: ignore[attr-defined]
        self._responder_started = False
        self._saturated = False
        self._listeners: list[socket.socket] = []
        #: Sockets already bound and listening, to serve on instead of binding host:port
        #: (`multiconn.supervisor` hands its workers theirs); closed with the server.
        self._given_listeners = list(listeners) if listeners is not None else None
        self._accepting = False
        self._accept_backoff = False
        self._out_of_capacity = False
        self.connections: set[Transport] = set()
        self._shutting_down = False
        self._signalled = False
        self._sweep_handle: Any = None
        self._drain_handle: Any = None
        self._closed = False
        self._watchdog: Watchdog | None = None

    # -- setup ------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` of every listening socket (port 0 resolved)."""
        return [sock.getsockname()[:2] for sock in self._listeners]

    def start(self) -> None:
        """Bind, listen and start accepting (the loop must then be run)."""
        if self._listeners:
            return
        raise_nofile_limit()
        if not self._responder_started:
            self.responder.start(self.loop, self._set_saturated)  # a process pool may refuse the app here
            self._responder_started = True
        if self._given_listeners is not None:
            self._listeners = self._given_listeners
            for sock in self._listeners:
                sock.setblocking(False)
        else:
            self._listeners = _bind_listeners(self.host, self.port, self.backlog)
        if self.metrics_address is not None and self.metrics is not None:
            metrics = self.metrics
            self.metrics_endpoint = MetricsEndpoint(
                self.loop, _bind_listeners(*self.metrics_address, 16), lambda: metrics.render(self))
            for address in self.metrics_endpoint.addresses:
                log.info("metrics on http://%s/metrics", format_address(address))
        self._set_accepting(True)
        self._sweep_handle = self.loop.call_later(self.limits.sweep_interval, self._sweep)
        for address in self.addresses:
            log.info("listening on %s (app %s%s%s)", format_address(address), app_name(self.app),
                     _describe_pool(self.responder), ", TLS" if self.ssl_context is not None else "")

    def serve_forever(self, *, handle_signals: bool = True) -> None:
        """Start if needed and run until shut down; then release everything."""
        self.start()
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(signum, self._on_signal, signum, immediate=True)
            if isinstance(self.responder, InlineResponder) and not self._raw_echo:
                self._watchdog = Watchdog(self.responder.clock, self.limits.handler_timeout)
        try:
            self.loop.run_forever()
        except ServerAborted as exc:
            log.warning("%s: aborting %d connections", exc, len(self.connections))
        finally:
            self.close()

    # -- accepting --------------------------------------------------------

    def _set_accepting(self, wanted: bool) -> None:
        wanted = wanted and not (self._shutting_down or self._closed or self._accept_backoff)
        wanted = wanted and len(self.connections) < self.limits.max_connections
        if wanted == self._accepting:
            return
        self._accepting = wanted
        for sock in self._listeners:
            if wanted:
                self.loop.register(sock, EVENT_READ, _bind_accept(self._accept, sock))
            else:
                self.loop.unregister(sock)

    def _accept(self, listener: socket.socket) -> None:
        connections = self.connections
        limit = self.limits.max_connections
        for _ in range(ACCEPT_BATCH):
            if len(connections) >= limit:
                log.debug("at max-connections (%d): not accepting", limit)
                self._set_accepting(False)
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._back_off_accepting(exc)
                    return
                if exc.errno in ACCEPT_TRANSIENT_ERRNOS:
                    continue
                # Unknown: the listener may stay readable, so back off rather than spin.
                log.error("accept failed: %s", exc)
                self._back_off_accepting(exc)
                return
            try:
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                connection = self._transport_class(sock, self.loop, self.limits, self._owner, self._preamble)
                connection.attach(self._session_class(connection, self._context), raw_echo=self._raw_echo)
            except OSError as exc:  # e.g. the peer reset before we set it up
                log.debug("could not set up connection from %s: %s", peer, exc)
                sock.close()
                continue
            if self._saturated:
                connection.pause_reading(PAUSE_QUEUE)
            connections.add(connection)
            if self.metrics is not None:
                self.metrics.accepted += 1
            if self._out_of_capacity:
                self._out_of_capacity = False
                log.warning("accepting again, %d connections open", len(connections))
            log.debug("accepted %s (%d open)", connection, len(connections))

    def _back_off_accepting(self, exc: OSError) -> None:
        # One warning per episode; the retries every ACCEPT_RETRY_DELAY are DEBUG.
        level = logging.DEBUG if self._out_of_capacity else logging.WARNING
        self._out_of_capacity = True
        log.log(level, "accept failed (%s), %d connections open: pausing accepts, retrying every %g s",
                exc.strerror, len(self.connections), ACCEPT_RETRY_DELAY)
        self._set_accepting(False)
        self._accept_backoff = True
        self.loop.call_later(ACCEPT_RETRY_DELAY, self._end_backoff)

    def _end_backoff(self) -> None:
        self._accept_backoff = False
        self._set_accepting(True)

    def _connection_closed(self, connection: Transport, reason: str) -> None:
        self.connections.discard(connection)
        if self.metrics is not None:
            self.metrics.connection_closed(connection.sock, close_kind(reason))
        if self._shutting_down:
            if not self.connections:
                self._finish_shutdown()
        elif not self._accepting:
            self._accept_backoff = False  # a descriptor was freed: worth a try
            self._set_accepting(True)

    # -- handler pools ----------------------------------------------------

    def _set_saturated(self, saturated: bool) -> None:
        """The responder's queue is full (or has drained): stop (resume) reading everywhere."""
        self._saturated = saturated
        for connection in list(self.connections):
            if saturated:
                connection.pause_reading(PAUSE_QUEUE)
            else:
                connection.resume_reading(PAUSE_QUEUE)

    # -- timeouts ---------------------------------------------------------

    def _sweep(self) -> None:
        now = self.loop.clock()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        if not self._closed:
            self._sweep_handle = self.loop.call_later(self.limits.sweep_interval, self._sweep)

    # -- shutdown ---------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop; safe to call from any thread."""
        self.loop.call_soon_threadsafe(self._begin_shutdown)

    def _on_signal(self, signum: int) -> None:
        """Runs inside the signal handler: may interrupt anything, even a handler."""
        name = signal.Signals(signum).name
        if self._signalled:
            raise ServerAborted(f"second {name}")
        self._signalled = True
        self.loop.call_soon(self._on_first_signal, name)

    def _on_first_signal(self, name: str) -> None:
        log.info("%s: stopping (up to %g s to drain)", name, self.limits.drain_timeout)
        self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if self._shutting_down:
            return
        self._set_accepting(False)
        self._shutting_down = True
        self.status.draining = True
        for sock in self._listeners:
            sock.close()
        self._drain_handle = self.loop.call_later(self.limits.drain_timeout, self._drain_timed_out)
        for connection in list(self.connections):
            connection.drain()
        if not self.connections:
            self._finish_shutdown()

    def _drain_timed_out(self) -> None:
        if self.connections:
            log.warning("drain timeout: aborting %d connections", len(self.connections))
        self._abort_all()

    def _abort_all(self) -> None:
        self._shutting_down = True
        for connection in list(self.connections):
            connection.close("aborted")
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        self.loop.stop()

    def close(self) -> None:
        """Close listeners, connections and (if it is ours) the loop."""
        if self._closed:
            return
        self._closed = True
        self._shutting_down = True
        if self._watchdog is not None:
            self._watchdog.close()
        self._set_accepting(False)
        for sock in self._listeners:
            sock.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        for connection in list(self.connections):
            connection.close("server closed")
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        # Every connection is closed: nobody waits for the pool any more.
        self.responder.close(POOL_STOP_TIMEOUT)
        if self._own_loop:
            self.loop.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ConnectionOwner:
    """The seam between the server and its transports (`multiconn.transport.TransportOwner`):
    all a connection may tell the server, and nothing it may ask of it."""

    __slots__ = ("_server",)

    def __init__(self, server: Server) -> None:
        self._server = server

    def connection_closed(self, transport: Transport, reason: str) -> None:
        self._server._connection_closed(transport, reason)

    def output_paused(self, transport: Transport) -> None:
        metrics = self._server.metrics
        if metrics is not None:
            metrics.pauses += 1


#: How `close_kind` sorts the transport's reasons for closing (by their first words).
CLOSE_KINDS = (
    ("done", "done"), ("idle timeout", "idle"), ("pending output did not move", "idle"),
    ("recv failed", "reset"), ("send failed", "reset"), ("peer gone", "reset"),
    ("error linger over", "error"), ("peer closed after error", "error"),
    ("drain linger over", "shutdown"), ("peer closed after drain", "shutdown"),
    ("preamble timed out", "timeout"),
    ("server", "shutdown"), ("aborted", "shutdown"),
    ("internal error", "internal"),
)


def close_kind(reason: str) -> str:
    """The metrics label for a transport's reason to close."""
    for prefix, kind in CLOSE_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"


def _bind_accept(accept: Callable[[socket.socket], None], sock: socket.socket) -> Callable[[int], None]:
    def on_readable(mask: int) -> None:
        accept(sock)
    return on_readable


def _describe_pool(responder: Responder) -> str:
    kind = getattr(responder, "kind", "inline")
    if kind == "inline":
        return ""
    if kind == "async":
        return f", async on {responder.loop_kind}"  # type: ignore[attr-defined]
    return f", {kind} pool of {responder.size}"  # type: ignore[attr-defined]


def make_responder(app: Any, handler_pool: str, pool_size: int | None, limits: Limits,
                   async_loop: str, log_level: int, status: ServerStatus | None = None) -> Responder:
    """The responder for `app` in `handler_pool`; ValueError for a combination that cannot work."""
    if handler_pool not in POOL_KINDS:
        raise ValueError(f"handler pool must be one of {', '.join(POOL_KINDS)}, not {handler_pool!r}")
    if pool_size is not None and pool_size < 1:
        raise ValueError("pool size must be >= 1")
    if isinstance(app, RawEcho):
        if handler_pool != "inline":
            raise ValueError("raw-echo has no handler to pool")
        # Never called: raw echo answers bytes, not frames.
        return InlineResponder(cast(App, app), status)
    pooled = dict(handler_timeout=limits.handler_timeout, max_queued=limits.max_queued)
    if is_async_app(app):
        if handler_pool != "inline":
            raise ValueError(f"the app {app_name(app)} is async (it runs on an asyncio loop): "
                             f"it cannot run in a {handler_pool} pool; leave out --handler-pool")
        problem = check_async_loop(async_loop)
        if problem:
            raise ValueError(problem)
        return AsyncResponder(app, loop_kind=async_loop, **pooled)  # type: ignore[arg-type]
    if handler_pool == "thread":
        return ThreadPoolResponder(app, pool_size or DEFAULT_THREAD_POOL_SIZE, **pooled)  # type: ignore[arg-type]
    if handler_pool == "process":
        return ProcessPoolResponder(app, pool_size, log_level=log_level, **pooled)  # type: ignore[arg-type]
    return InlineResponder(app, status)


def _bind_listeners(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, on one port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen = set()
    listeners: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in infos:
            if (family, address[:2]) in seen:
                continue
            seen.add((family, address[:2]))
            if listeners and port == 0:  # every socket on the port the first one got
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, type_, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


#: Listening sockets for every address a host resolves to (also the supervisor's and the metrics endpoint's).
bind_listeners = _bind_listeners
