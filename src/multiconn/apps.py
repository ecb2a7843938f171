"""Applications: what a server answers. Built-ins and loading a user's own.

An application is any callable that takes the request `Frame` and returns the
response `Frame`. It may raise `ProtocolError` with code ``bad-content`` to say
the content is not what it accepts; anything else it raises is answered with
``handler-error`` and the connection stays open. The server copies the request's
``id`` into the response, so applications need not.

`raw_echo` is not a frame handler: it marks a server that echoes bytes with no
framing at all.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Union, cast

from .connection_info import ConnectionInfo, format_address
from .errors import AppLoadError, ProtocolError
from .protocol import ErrorCode, Frame

App = Callable[[Frame], Frame]
#: An application that also takes its request's connection (see connection_info.py).
ConnectionApp = Callable[[Frame, ConnectionInfo], Frame]

#: The guide's search table (docs/protocol.md, "Applications built in").
SEARCH_ANSWERS = {
    "morpheus": "Follow the white rabbit. \U0001f430",
    "ring": "In the caves beneath the Misty Mountains. \U0001f48d",
    "\U0001f436": "\U0001f43e Playing ball! \U0001f3d0",
}


def search(request: Frame) -> Frame:
    """The guide's application: search a tiny table, or echo 10 bytes of binary."""
    if not request.is_json:
        return Frame.binary(
            b"First 10 bytes of request: " + request.content[:10],
            content_type="binary/custom-server-binary-type",
        )
    query = request.json_content()
    if not isinstance(query, dict):
        raise ProtocolError(ErrorCode.BAD_CONTENT, "search expects a JSON object", request.id)
    action = query.get("action")
    if action == "search":
        value = query.get("value")
        answer = SEARCH_ANSWERS.get(value) if isinstance(value, str) else None
        result = answer if answer is not None else f"No match for '{value}'."
    else:
        result = f"Error: invalid action '{action}'."
    return Frame.json({"result": result})


def echo(request: Frame) -> Frame:
    """Answer with the same content-type, content-encoding and content."""
    header = request.header
    return Frame(
        {"content-type": header["content-type"], "content-encoding": header["content-encoding"]},
        request.content,
    )


def whoami(request: Frame, connection: ConnectionInfo) -> Frame:
    """Who is asking, as this server sees it: the real client (from the PROXY
    header when a load balancer sent one), the local address, this process.

    What a person debugging a deployment (and the tests) asks first.
    """
    return Frame.json({
        "peer": format_address(connection.peer),
        "local": format_address(connection.local),
        "worker": os.getpid(),
        "proxied": connection.proxied,
    })


class RawEcho:
    """Marker for a server that echoes raw bytes, with no framing."""

    def __repr__(self) -> str:
        return "raw_echo"


raw_echo = RawEcho()

BUILTIN_APPS: dict[str, Union[App, ConnectionApp, RawEcho]] = {
    "search": search,
    "echo": echo,
    "whoami": whoami,
    "raw-echo": raw_echo,
}


def load_app(spec: str) -> Union[App, ConnectionApp, RawEcho]:
    """A built-in app by name, or ``package.module:attr`` for a user's own.

    Raises `AppLoadError` with a readable reason when it cannot be loaded.
    """
    if spec in BUILTIN_APPS:
        return BUILTIN_APPS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        names = ", ".join(BUILTIN_APPS)
        raise AppLoadError(f"unknown app {spec!r}: use one of {names} or package.module:attr")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's to read
        raise AppLoadError(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise AppLoadError(f"{spec!r} is not callable")
    return cast("Union[App, ConnectionApp, RawEcho]", target)
