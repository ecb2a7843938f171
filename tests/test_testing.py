"""multiconn.testing.MemoryConnection: an application unit-tested in memory,
as a user would (the README's example), with no socket and no sleep."""

from __future__ import annotations

import pytest

from multiconn import ConnectionInfo, ErrorCode, Frame, Limits, ProtocolError, encode_frame, encode_frames
from multiconn.testing import MemoryConnection


def upper(request: Frame) -> Frame:
    if request.is_json:
        raise ProtocolError(ErrorCode.BAD_CONTENT, "send me text as binary")
    return Frame.binary(bytes(request.content).upper())


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_pipelined_requests_in_any_split_are_answered_in_order(chunk: int | None) -> None:
    conn = MemoryConnection(upper)
    conn.send([Frame.binary(b"a", id=1), Frame.binary(b"b", id="two"), Frame.json([1], id=3)], chunk=chunk)
    answers = conn.answers()
    assert [a.id for a in answers] == [1, "two", 3]
    assert [bytes(a.content) for a in answers[:2]] == [b"A", b"B"]
    assert answers[2].error_info[0] == "bad-content"
    assert not conn.failed and not conn.finished


def test_a_partial_frame_is_answered_when_complete_and_times_out_otherwise() -> None:
    conn = MemoryConnection(upper, limits=Limits(frame_timeout=5))
    data = encode_frame(Frame.binary(b"slow", id=9))
    conn.send(data[:10])
    conn.advance(4)
    assert conn.answers() == []
    conn.send(data[10:])
    assert bytes(conn.answers()[0].content) == b"SLOW"
    conn.send(data[:-2])  # the header is complete: the error frame carries its id
    conn.advance(4.9)
    assert conn.answers() == [] and not conn.failed
    conn.advance(0.2)
    (error,) = conn.answers()
    assert error.error_info[0] == "timeout" and error.id == 9
    assert conn.failed


def test_eof_answers_what_is_complete_and_drops_a_partial_frame() -> None:
    conn = MemoryConnection("echo")
    data = encode_frames([Frame.binary(b"1"), Frame.binary(b"2")])
    conn.send(data + encode_frame(Frame.binary(b"3"))[:5])
    conn.close_input()
    assert [bytes(a.content) for a in conn.answers()] == [b"1", b"2"]
    assert conn.finished


def test_a_two_parameter_app_gets_its_connection() -> None:
    seen = []

    def app(request: Frame, connection: ConnectionInfo) -> Frame:
        seen.append(connection)
        return Frame.binary(str(connection.peer).encode())

    client = ConnectionInfo(("203.0.113.9", 4000), ("192.0.2.1", 443), proxied=True)
    conn = MemoryConnection(app, connection=client)
    conn.send(Frame.binary(b"x"))
    assert conn.answers()[0].content == b"('203.0.113.9', 4000)"
    assert seen == [client]


def test_health_checks_and_async_apps() -> None:
    conn = MemoryConnection("search")
    conn.send(Frame({"content-type": "binary/health", "content-encoding": "binary"}, b""))
    assert conn.answers()[0].content == b"ok"

    async def later(request: Frame) -> Frame:
        return request

    with pytest.raises(ValueError, match="ServerThread"):
        MemoryConnection(later)
