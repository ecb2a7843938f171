"""The ``multiconn`` command line: ``serve``, ``request`` and ``bench``.

Errors a user can cause (a bad flag, a busy port, a refused connection, an
error frame) end in one readable line on stderr and a non-zero exit status,
never in a traceback: 2 for bad usage (argparse's convention), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from typing import Callable, Sequence, cast

from . import __version__
from .apps import load_app
from .client import DEFAULT_TIMEOUT, connect
from .errors import AppLoadError, ErrorResponse, MulticonnError
from .limits import Limits
from .process_pool import default_process_pool_size
from .proxy import VERSIONS as PROXY_VERSIONS
from .proxy_stage import DEFAULT_TRUSTED
from .protocol import DEFAULT_MAX_CONTENT, Frame
from .responders import ASYNC_LOOPS, DEFAULT_THREAD_POOL_SIZE, POOL_KINDS
from .server import Server
from .supervisor import run_supervisor, worker_count, worker_role

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65432
_DEFAULTS = Limits()


def _number(kind: Callable[[str], float], minimum: float, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value < minimum or (value == minimum and not inclusive):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_float = _number(float, 0, inclusive=False)
positive_int = _number(int, 1, inclusive=True)
non_negative_int = _number(int, 0, inclusive=True)


def port_number(text: str) -> int:
    port = non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {text}")
    return int(port)


def host_and_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), port_number(port)


def _add_address(parser: argparse.ArgumentParser, port_help: str) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to use (default {DEFAULT_HOST}; IPv6 like ::1 works)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=port_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiconn",
        description="Serve and query many TCP connections at once with the multiconn framed protocol.",
    )
    parser.add_argument("--version", action="version", version=f"multiconn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run a server", description="Run a multiconn server until SIGINT/SIGTERM.")
    _add_address(serve, f"port to listen on; 0 picks a free one (default {DEFAULT_PORT})")
    serve.add_argument("--app", default="search",
                       help="search (default), echo, whoami, raw-echo, or package.module:attr for your own handler")
    serve.add_argument("--max-content", type=non_negative_int, default=DEFAULT_MAX_CONTENT, metavar="BYTES",
                       help=f"largest content-length accepted (default {DEFAULT_MAX_CONTENT})")
    serve.add_argument("--frame-timeout", type=positive_float, default=_DEFAULTS.frame_timeout, metavar="SECONDS",
                       help=f"time from a frame's first byte to its last (default {_DEFAULTS.frame_timeout:g})")
    serve.add_argument("--idle-timeout", type=positive_float, default=_DEFAULTS.idle_timeout, metavar="SECONDS",
                       help=f"close connections idle this long (default {_DEFAULTS.idle_timeout:g})")
    serve.add_argument("--max-connections", type=positive_int, default=_DEFAULTS.max_connections, metavar="N",
                       help=f"stop accepting at this many open connections (default {_DEFAULTS.max_connections})")
    serve.add_argument("--drain-timeout", type=positive_float, default=_DEFAULTS.drain_timeout, metavar="SECONDS",
                       help=f"on shutdown, abort what is not done after this long (default {_DEFAULTS.drain_timeout:g})")
    serve.add_argument("--handler-timeout", type=positive_float, default=_DEFAULTS.handler_timeout, metavar="SECONDS",
                       help=f"interrupt a handler call that runs longer, answering handler-error (default {_DEFAULTS.handler_timeout:g})")
    serve.add_argument("--workers", type=worker_count, default=1, metavar="N|auto",
                       help="worker processes, each with its own event loop, under a supervisor that restarts "
                            "them and reloads them on SIGHUP; auto: one per CPU (default 1: one process, no supervisor)")
    serve.add_argument("--handler-pool", choices=POOL_KINDS, default="inline",
                       help="where handlers run: inline in the event loop (default; fastest for handlers that "
                            "neither wait nor compute), thread (blocking I/O), process (CPU-bound work). "
                            "An async def app runs on an asyncio loop by itself and takes no pool")
    serve.add_argument("--pool-size", type=positive_int, default=None, metavar="N",
                       help=f"threads or processes in the pool (default {DEFAULT_THREAD_POOL_SIZE} threads, "
                            f"or one process per CPU: {default_process_pool_size()} here)")
    serve.add_argument("--max-in-flight", type=positive_int, default=_DEFAULTS.max_in_flight, metavar="N",
                       help=f"requests one connection may have in a pool; at that many it is not read "
                            f"(default {_DEFAULTS.max_in_flight})")
    serve.add_argument("--max-queued", type=positive_int, default=_DEFAULTS.max_queued, metavar="N",
                       help=f"requests the server may have waiting for a pool; past it no connection is read "
                            f"until the queue drains (default {_DEFAULTS.max_queued})")
    serve.add_argument("--async-loop", choices=ASYNC_LOOPS, default="asyncio",
                       help="event loop for an async def app: asyncio (default) or uvloop (if installed)")
    serve.add_argument("--proxy-protocol", choices=PROXY_VERSIONS, default=None,
                       help="every connection starts with a PROXY protocol header (HAProxy's send-proxy / "
                            "send-proxy-v2) giving the real client; default: off (never guessed)")
    serve.add_argument("--proxy-trusted", default=",".join(DEFAULT_TRUSTED), metavar="CIDR[,CIDR...]",
                       help=f"peers allowed to send a PROXY header (default {','.join(DEFAULT_TRUSTED)})")
    serve.add_argument("--metrics", type=host_and_port, default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="logging threshold (default info)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM; default: in the cert file)")
    serve.set_defaults(run=run_serve)

    request = commands.add_parser(
        "request", help="send one request and print the answer",
        description="Send one request, as the guide's app-client does: 'search VALUE' sends a JSON "
                    "search; any other ACTION sends ACTION+VALUE as binary content.",
    )
    _add_address(request, f"server port (default {DEFAULT_PORT})")
    request.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                         help=f"give up after this long without progress (default {DEFAULT_TIMEOUT:g})")
    request.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server's certificate")
    request.add_argument("--tls-ca", metavar="FILE", help="trust this CA bundle (PEM) instead of the system's (implies --tls)")
    request.add_argument("--tls-server-name", metavar="NAME",
                         help="name the server's certificate must carry (default: --host; implies --tls)")
    request.add_argument("action", help="'search', or any other word for a binary request")
    request.add_argument("value", help="the search term, or the rest of the binary content")
    request.set_defaults(run=run_request)
    bench = commands.add_parser(
        "bench", help="measure an echo server: throughput, latency, server CPU",
        description="Load an echo server with many connections, verify every response, and report "
                    "requests/s, MB/s, latency percentiles and errors. Without --port it starts "
                    "'multiconn serve --app echo' (or raw-echo) itself and also reports its CPU per request.",
    )
    bench.add_argument("--host", default=DEFAULT_HOST, help=f"server address (default {DEFAULT_HOST})")
    bench.add_argument("--port", type=port_number, default=None,
                       help="port of a running echo server (default: start one on a free port)")
    bench.add_argument("--connections", type=positive_int, default=50, metavar="N",
                       help="concurrent connections, all opened first (default 50)")
    bench.add_argument("--size", type=non_negative_int, default=64, metavar="BYTES",
                       help="payload bytes per request (default 64; raw mode needs >= 1)")
    bench.add_argument("--pipeline", type=positive_int, default=1, metavar="N",
                       help="requests in flight per connection (default 1)")
    bench.add_argument("--duration", type=positive_float, default=5.0, metavar="SECONDS",
                       help="measured window (default 5)")
    bench.add_argument("--warmup", type=_number(float, 0, inclusive=True), default=1.0, metavar="SECONDS",
                       help="load before the measured window, not counted (default 1)")
    bench.add_argument("--mode", choices=["framed", "raw"], default="framed",
                       help="framed: multiconn frames to the echo app (default); raw: bytes to raw-echo")
    bench.add_argument("--processes", type=positive_int, default=1, metavar="N",
                       help="load generator processes, sharing the connections (default 1)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"limit for connecting and for each response (default {DEFAULT_TIMEOUT:g})")
    bench.set_defaults(run=run_bench, subparser=bench)
    return parser


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:
        return run_supervisor(args, parser)
    worker = worker_role()  # what a supervisor handed this process, if one started it
    try:
        app = load_app(args.app)
    except AppLoadError as exc:
        parser.error(f"--app: {exc}")
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--tls-cert/--tls-key: cannot load {args.tls_cert}: {exc.strerror or exc}")
    elif args.tls_key:
        parser.error("--tls-key needs --tls-cert")
    limits = Limits(
        max_content=args.max_content, frame_timeout=args.frame_timeout, idle_timeout=args.idle_timeout,
        max_connections=args.max_connections, drain_timeout=args.drain_timeout,
        handler_timeout=args.handler_timeout, max_in_flight=args.max_in_flight, max_queued=args.max_queued,
    )
    if args.pool_size is not None and args.handler_pool == "inline":
        parser.error("--pool-size needs --handler-pool thread or process")
    try:
        server = Server(app, args.host, args.port, limits=limits, ssl_context=ssl_context,
                        handler_pool=args.handler_pool, pool_size=args.pool_size, async_loop=args.async_loop,
                        log_level=logging.getLogger().level,
                        # Under a supervisor, it serves /metrics: this worker counts and reports to it.
                        metrics=worker.push_metrics, metrics_address=None if worker.active else args.metrics,
                        proxy_protocol=args.proxy_protocol, proxy_trusted=args.proxy_trusted,
                        listeners=worker.listen())
    except (ValueError, AppLoadError) as exc:
        parser.error(str(exc))
    try:
        server.start()
    except AppLoadError as exc:
        server.close()
        parser.error(f"--app: {exc}")
    except (OSError, UnicodeError) as exc:
        server.close()
        reason = getattr(exc, "strerror", None) or "invalid host name"
        print(f"multiconn serve: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    worker.started(server)
    server.serve_forever()
    worker.finished()
    logging.getLogger("multiconn.server").info("stopped")
    return 0


def request_frame(action: str, value: str) -> Frame:
    """The guide's app-client request for ACTION VALUE."""
    if action == "search":
        return Frame.json({"action": action, "value": value})
    return Frame.binary((action + value).encode("utf-8"), content_type="binary/custom-client-binary-type")


def format_answer(frame: Frame) -> str:
    """What `request` prints: the search result, or the content as text."""
    if frame.is_json:
        value = frame.json_content()
        if isinstance(value, dict) and "result" in value:
            return str(value["result"])
        return json.dumps(value, ensure_ascii=False)
    return frame.content.decode("utf-8", errors="backslashreplace")


def client_tls_context(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_server_name):
        return None
    try:
        return ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"--tls-ca: cannot load {args.tls_ca}: {getattr(exc, 'strerror', None) or exc}")


def run_request(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ssl_context = client_tls_context(args, parser)
    try:
        with connect(args.host, args.port, timeout=args.timeout, ssl_context=ssl_context,
                     server_hostname=args.tls_server_name) as client:
            answer = client.request(request_frame(args.action, args.value))
        print(format_answer(answer))
    except ErrorResponse as exc:
        print(f"multiconn request: the server answered {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except MulticonnError as exc:
        print(f"multiconn request: {exc}", file=sys.stderr)
        return 1
    return 0


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import BenchError, BenchOptions, run  # the load generator is not needed by other commands

    if args.mode == "raw" and args.size < 1:
        args.subparser.error("argument --size: must be >= 1 with --mode raw")
    if args.port == 0:
        args.subparser.error("argument --port: 0 is not a server's port (leave --port out to start a server)")
    if args.processes > args.connections:
        args.subparser.error(f"argument --processes: must not exceed --connections ({args.connections})")
    options = BenchOptions(
        host=args.host, port=args.port, connections=args.connections, size=args.size,
        pipeline=args.pipeline, duration=args.duration, warmup=args.warmup, mode=args.mode,
        processes=args.processes, timeout=args.timeout,
    )
    progress = sys.stderr if not args.json and sys.stderr.isatty() else None
    try:
        result = run(options, progress=progress)
    except BenchError as exc:
        print(f"multiconn bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()) if args.json else result.format_table())
    return 1 if result.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return cast(int, args.run(args, parser))
    except KeyboardInterrupt:
        return 130
