"""Peer: an asyncio Protocol with an incremental frame decoder.

    python benchmarks/peers/asyncio_protocol.py --port P --mode framed|raw [--loop asyncio|uvloop]
        [--tls-cert FILE [--tls-key FILE]]

``data_received`` feeds a FrameDecoder and answers all the frames that a chunk
completed with one ``transport.write``.  Backpressure: when the transport's
write buffer passes its high-water mark, reading from that connection pauses
until it drains.  Both asyncio and uvloop set TCP_NODELAY on TCP connections.

With ``--tls-cert`` every connection speaks TLS: ``create_server(ssl=context)``,
the context made as ``multiconn serve --tls-cert`` makes its own (the loop's
own SSL transport then encrypts and decrypts under the same protocol).
"""

import asyncio

from framing import BACKLOG, FrameDecoder, echo, error_frame, parse_args, server_ssl_context


class RawEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()


class FramedEcho(RawEcho):
    def connection_made(self, transport):
        self.transport = transport
        self.decoder = FrameDecoder()

    def data_received(self, data):
        frames = self.decoder.feed(data)
        if frames:
            self.transport.write(b"".join([echo(header, content) for header, content in frames]))
        if self.decoder.error is not None:
            self.transport.write(error_frame(self.decoder.error))
            self.transport.close()  # after the pending output is flushed


async def main(args):
    loop = asyncio.get_running_loop()
    protocol = FramedEcho if args.mode == "framed" else RawEcho
    server = await loop.create_server(protocol, args.host, args.port, backlog=BACKLOG,
                                      ssl=server_ssl_context(args))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = parse_args(__doc__, loops=True, tls=True)
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(main(args))
    else:
        asyncio.run(main(args))
