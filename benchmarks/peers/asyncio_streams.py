"""Peer: asyncio streams, the way most asyncio users write a server.

    python benchmarks/peers/asyncio_streams.py --port P --mode framed|raw

``asyncio.start_server``; per frame ``readexactly`` (length, header, content),
then ``write`` + ``drain``.  asyncio sets TCP_NODELAY on every TCP connection.
"""

import asyncio

from framing import HLEN, RECV_SIZE, BACKLOG, FrameError, echo, error_frame, parse_args, parse_header


async def framed_echo(reader, writer):
    try:
        while True:
            try:
                (hlen,) = HLEN.unpack(await reader.readexactly(2))
            except asyncio.IncompleteReadError:
                break  # the client closed between frames
            if hlen == 0:
                raise FrameError("bad-header-length", "the header length is 0")
            header = parse_header(await reader.readexactly(hlen))
            content = await reader.readexactly(header["content-length"])
            writer.write(echo(header, content))
            await writer.drain()
    except FrameError as exc:
        writer.write(error_frame(exc))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # a partial frame at EOF is dropped
    finally:
        writer.close()


async def raw_echo(reader, writer):
    try:
        while data := await reader.read(RECV_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(args):
    handler = framed_echo if args.mode == "framed" else raw_echo
    server = await asyncio.start_server(handler, args.host, args.port, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__)))
