"""Large content buffers are reused, and never while anything still holds them."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from multiconn import Frame, FrameDecoder, Limits, encode_frame, encode_frames
from multiconn.buffers import BufferPool
from multiconn.protocol import LARGE_CONTENT

SIZE = LARGE_CONTENT * 2


def test_the_pool_reuses_only_free_buffers_of_the_same_size() -> None:
    pool = BufferPool(max_buffers=2)
    first = pool.take(SIZE)
    assert pool.take(SIZE) is not first  # still held here
    first_id = id(first)
    del first
    again = pool.take(SIZE)
    assert id(again) == first_id and pool.reused == 1
    view = memoryview(again)[10:]  # a view (an output queue's partial send) holds it too
    del again
    assert id(pool.take(SIZE)) != first_id
    del view
    assert pool.take(SIZE + 1) is not None  # another size evicts a free buffer, never a held one
    assert len(pool) == 2


def test_the_pool_is_bounded() -> None:
    pool = BufferPool(max_buffers=4, max_bytes=3 * SIZE)
    held = [pool.take(SIZE) for _ in range(6)]
    assert len(pool) == 3 and pool.allocated == 6
    del held


def test_decoder_contents_from_a_pool_are_exact() -> None:
    pool = BufferPool()
    decoder = FrameDecoder(buffers=pool)
    kept = []
    for index in range(5):
        content = os.urandom(SIZE)
        frames = decoder.feed(encode_frame(Frame.binary(content, id=index)))
        if not frames:  # fed whole: the in-place path finishes on the next read
            frames = decoder.feed(b"")
        (frame,) = frames
        assert bytes(frame.content) == content
        if index % 2:
            kept.append((content, frame.content))
        del frame, frames
    assert all(bytes(buffer) == content for content, buffer in kept)


def test_an_app_that_keeps_contents_sees_them_intact(start_server) -> None:
    """Thousands of large frames later, every content the app kept is unchanged."""
    kept: list[tuple[bytes, bytes]] = []

    def keeper(request: Frame) -> Frame:
        if len(kept) < 50:
            kept.append((hashlib.sha256(bytes(request.content)).digest(), request.content))
        return Frame.binary(request.content[:16])

    server = start_server(keeper)
    with server.connect(timeout=20) as client:
        for batch in range(40):
            frames = [Frame.binary(os.urandom(16) * (SIZE // 16), id=i) for i in range(50)]
            answers = client.request_many(frames)
            assert [bytes(a.content) for a in answers] == [bytes(f.content[:16]) for f in frames]
    assert len(kept) == 50
    assert all(hashlib.sha256(bytes(content)).digest() == digest for digest, content in kept)
    assert server.server._context.buffers.reused > 1000  # the others were reused


def test_a_slow_reader_never_gets_a_buffer_that_was_reused(start_server) -> None:
    """Large pipelined echoes, read slowly: whatever is queued for sending is
    never reused, so every echo arrives exactly as sent."""
    server = start_server("echo", limits=Limits(high_water=256 * 1024, low_water=64 * 1024))
    contents = [bytes([i]) * SIZE + os.urandom(64) for i in range(64)]
    with socket.create_connection(server.address) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        # Send from a thread: the server stops reading while we do not read its
        # answers (backpressure), so sending it all first would never finish.
        payload = encode_frames(Frame.binary(c, id=i) for i, c in enumerate(contents))
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        decoder = FrameDecoder(max_content=1 << 30)
        answers: list[Frame] = []
        sock.settimeout(20)
        while len(answers) < len(contents):
            data = sock.recv(16 * 1024)
            assert data
            answers += decoder.feed(data)
            time.sleep(0.0005)
        sender.join(10)
    assert [a.id for a in answers] == list(range(64))
    assert all(bytes(a.content) == c for a, c in zip(answers, contents))
