"""Peer: a thread per connection with the standard library's socketserver.

    python benchmarks/peers/threads.py --port P --mode framed|raw

``socketserver.ThreadingTCPServer``; each connection's thread reads a frame
with blocking reads from a buffered file (length, header, content) and
answers it with ``sendall``.  The kernel's socket buffer is the backpressure.
"""

import socket
import socketserver

from framing import BACKLOG, HLEN, RECV_SIZE, FrameError, echo, error_frame, parse_args, parse_header


class FramedEcho(socketserver.StreamRequestHandler):
    disable_nagle_algorithm = True  # TCP_NODELAY

    def handle(self):
        read, send = self.rfile.read, self.request.sendall
        try:
            while len(prefix := read(2)) == 2:
                (hlen,) = HLEN.unpack(prefix)
                if hlen == 0:
                    raise FrameError("bad-header-length", "the header length is 0")
                raw = read(hlen)
                if len(raw) < hlen:
                    break  # a partial frame at EOF is dropped
                header = parse_header(raw)
                content = read(header["content-length"])
                if len(content) < header["content-length"]:
                    break
                send(echo(header, content))
        except FrameError as exc:
            send(error_frame(exc))
        except ConnectionError:
            pass


class RawEcho(socketserver.BaseRequestHandler):
    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        try:
            while data := self.request.recv(RECV_SIZE):
                self.request.sendall(data)
        except ConnectionError:
            pass


class Server(socketserver.ThreadingTCPServer):
    request_queue_size = BACKLOG
    allow_reuse_address = True
    daemon_threads = True


def main():
    args = parse_args(__doc__)
    handler = FramedEcho if args.mode == "framed" else RawEcho
    with Server((args.host, args.port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
