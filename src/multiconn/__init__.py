"""multiconn: many TCP connections at once on epoll and selectors, with a small framed protocol.

The protocol (`Frame`, `FrameDecoder`, `encode_frame`) does no I/O; the event
loop, server and clients sit on top of it and are the only code that touches
sockets.
"""

from .apps import echo, load_app, raw_echo, search, whoami
from .client import Client, MultiClient, Response, connect
from .connection_info import ConnectionInfo
from .errors import (
    AppLoadError,
    CertificateVerificationError,
    ConnectionClosed,
    ConnectionFailed,
    ErrorResponse,
    MulticonnError,
    ProtocolError,
    ServerStartError,
    Timeout,
    TLSError,
)
from .limits import Limits
from .loop import EventLoop
from .protocol import ErrorCode, Frame, FrameDecoder, encode_frame, encode_frames
from .server import Server

__version__ = "0.1.0"

__all__ = [
    "AppLoadError", "CertificateVerificationError", "Client", "ConnectionInfo", "ConnectionClosed", "ConnectionFailed", "ErrorCode",
    "ErrorResponse", "EventLoop", "Frame", "FrameDecoder", "Limits", "MultiClient",
    "MulticonnError", "ProtocolError", "Response", "Server", "ServerStartError", "Timeout", "TLSError", "connect",
    "echo", "encode_frame", "encode_frames", "load_app", "raw_echo", "search", "whoami",
]
