"""Peer: trio.

    python benchmarks/peers/trio_echo.py --port P --mode framed|raw

``trio.serve_tcp``; ``receive_some`` feeds a FrameDecoder, the frames that a
chunk completed are answered with one ``send_all`` (which waits while the
socket is full: backpressure for free).  trio's SocketStream sets TCP_NODELAY.
(Not called trio.py: the script's folder comes first on sys.path.)
"""

from functools import partial

import trio

from framing import BACKLOG, RECV_SIZE, FrameDecoder, echo, error_frame, parse_args


async def framed_echo(stream):
    decoder = FrameDecoder()
    try:
        while data := await stream.receive_some(RECV_SIZE):
            frames = decoder.feed(data)
            if frames:
                await stream.send_all(b"".join([echo(header, content) for header, content in frames]))
            if decoder.error is not None:
                await stream.send_all(error_frame(decoder.error))
                break
    except trio.BrokenResourceError:
        pass  # serve_tcp closes the stream when the handler returns


async def raw_echo(stream):
    try:
        while data := await stream.receive_some(RECV_SIZE):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


def main():
    args = parse_args(__doc__)
    handler = framed_echo if args.mode == "framed" else raw_echo
    trio.run(partial(trio.serve_tcp, handler, args.port, host=args.host, backlog=BACKLOG))


if __name__ == "__main__":
    main()
