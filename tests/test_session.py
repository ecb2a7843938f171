"""Tests of the sans-IO session (multiconn.session), driven in memory.

A session never touches a socket: bytes and the clock go in (``data_received``,
``get_buffer``/``buffer_updated``, ``eof_received``, ``check_timeouts(now)``)
and what should happen comes out as calls on its transport. So, as h11 tests
its ``Connection`` against a ``ConnectionPair``, these tests drive a session
through `multiconn.testing.MemoryTransport` and a `ManualClock`: no socket, no
thread, no sleep, and every rule is checked byte by byte. Where bytes are fed,
each test runs twice (the ``chunk`` fixture): the whole input in one read, and
one byte per read.

Covered: inline echo (pipelining, partial frames, large contents received in
place), fatal and non-fatal errors, the frame timeout, end of input, idleness,
holding answers past the high-water mark, the pooled session (answer order,
``max_in_flight``, EOF, errors and loss with jobs pending), every transition of
`TRANSITIONS` (and that any other raises), and raw echo.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multiconn import Limits, echo
from multiconn.errors import LocalProtocolError
from multiconn.protocol import LARGE_CONTENT, ErrorCode, Frame, encode_frame, encode_frames
from multiconn.responders import InlineResponder, run_handler
from multiconn.session import (
    ALL_ANSWERED, CLOSED, DONE, FAILING, FINISHING, INPUT_ENDED, OPEN, PROTOCOL_ERROR, TRANSITIONS,
    TRANSPORT_CLOSED, FramedSession, Job, PooledFramedSession, RawEchoSession, SessionContext,
)
from multiconn.testing import ManualClock, MemoryTransport
from multiconn.transport import PAUSE_ENDED, PAUSE_HELD, PAUSE_IN_FLIGHT

from helpers import raw_frame

PROPS = settings(max_examples=150, deadline=None)


# -- helpers ----------------------------------------------------------------


class FakePool:
    """A pooled responder that runs nothing: it records jobs, the test completes them."""

    inline = False
    saturated = False  # never full: the session submits as far as max_in_flight allows

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cancelled: list[Job] = []

    def start(self, loop: Any, on_saturated: Callable[[bool], None]) -> None:
        """Nothing to start."""

    def close(self, timeout: float) -> None:
        """Nothing to stop."""

    def respond(self, request: Frame) -> Frame:
        raise AssertionError("a pool is never asked to answer at once")

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def cancel(self, job: Job) -> None:
        self.cancelled.append(job)

    def wait_for_room(self, session: Any) -> None:
        raise AssertionError("this pool is never saturated")


def open_session(app: Any = echo, *, pool: FakePool | None = None, clock: ManualClock | None = None,
                 **limits: Any) -> tuple[Any, MemoryTransport]:
    """A session on a MemoryTransport: inline with `app`, or pooled on `pool`."""
    transport = MemoryTransport()
    responder = pool if pool is not None else InlineResponder(app)
    context = SessionContext(responder, Limits(**limits), clock or ManualClock())
    session = (PooledFramedSession if pool is not None else FramedSession)(transport, context)
    transport.attach(session)
    return session, transport


def answer(job: Job, app: Any = echo) -> None:
    """Complete `job` as a real pool does: run_handler copies the request's id."""
    job.done(run_handler(app, None, None, None, job.request))


def requests(count: int, size: int = 3) -> list[Frame]:
    return [Frame.binary(bytes([65 + i % 26]) * size, id=i) for i in range(count)]



def header(content_length: int, **extra: Any) -> dict[str, Any]:
    fields = {"byteorder": "big", "content-type": "binary/octet-stream", "content-encoding": "binary",
              "content-length": content_length}
    fields.update({key.replace("_", "-"): value for key, value in extra.items()})
    return fields


def summary(frames: list[Frame]) -> list[tuple[Any, str, bytes]]:
    return [(frame.id, frame.content_type, bytes(frame.content)) for frame in frames]


def ids_out(transport: MemoryTransport) -> list[Any]:
    """The ids of the frames the session sent since the last look."""
    return [frame.id for frame in transport.take_frames()]


def job_ids(jobs: list[Job]) -> list[Any]:
    return [job.request.id for job in jobs]


def code_of(frame: Frame) -> str | None:
    info = frame.error_info
    return info[0] if info else None


@pytest.fixture(params=[None, 1], ids=["whole", "bytewise"])
def chunk(request: pytest.FixtureRequest) -> int | None:
    return request.param


# -- 1. inline echo ------------------------------------------------------------------


def test_pipelined_frames_are_answered_in_order_with_their_ids(chunk: int | None) -> None:
    session, transport = open_session()
    sent = [Frame.binary(b"one", id=1), Frame.json({"k": [1, "\u00e9"]}, id="two"),
            Frame.binary(b"", id=3), Frame.binary(b"no id")]
    transport.feed(encode_frames(sent), chunk)
    assert summary(transport.take_frames()) == summary(sent)
    assert session.is_idle() and session.state is OPEN and transport.paused == 0


def test_the_answers_of_one_read_leave_in_one_write() -> None:
    session, transport = open_session()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    transport.feed(encode_frames(requests(5)))
    assert len(writes) == 1 and writes[0] == encode_frames(requests(5))


def test_a_partial_frame_is_answered_only_when_complete(chunk: int | None) -> None:
    session, transport = open_session()
    first, second = (encode_frame(frame) for frame in requests(2, size=20))
    transport.feed(first[:-1], chunk)
    assert transport.output == b"" and not session.is_idle()
    transport.feed(first[-1:] + second[:7], chunk)
    assert ids_out(transport) == [0]
    transport.feed(second[7:], chunk)
    assert ids_out(transport) == [1] and session.is_idle()


def test_a_large_content_is_received_in_the_sessions_buffer(chunk: int | None) -> None:
    received: list[type] = []

    def app(request: Frame) -> Frame:
        received.append(type(request.content))
        return echo(request)

    session, transport = open_session(app)
    wanted: list[int] = []
    want_buffer = transport.want_buffer
    transport.want_buffer = lambda: (wanted.append(1), want_buffer())[1]  # type: ignore[method-assign]
    big = Frame.binary(bytes(range(256)) * (LARGE_CONTENT // 256) + b"tail", id="big")
    small = Frame.binary(b"after", id=2)
    wire = encode_frames([big, small])
    cut = len(wire) - len(big.content) - len(encode_frame(small)) + 10  # a first read: header + 10 bytes
    transport.feed(wire[:cut], chunk)
    assert wanted, "a content of LARGE_CONTENT bytes or more is received in place"
    transport.feed(wire[cut:], chunk)
    assert received == [bytearray, bytes] and session.is_idle()
    assert summary(transport.take_frames()) == summary([big, small])


@st.composite
def request_frames(draw: Any) -> Frame:
    request_id = draw(st.one_of(st.none(), st.integers(-5, 10**6), st.text(max_size=4)))
    if draw(st.booleans()):
        return Frame.json(draw(st.lists(st.integers(), max_size=3)), id=request_id)
    return Frame.binary(draw(st.binary(max_size=40)), id=request_id)


@PROPS
@given(st.lists(request_frames(), min_size=1, max_size=6), st.data())
def test_property_any_split_of_a_pipelined_stream_gives_the_same_answers(sent: list[Frame],
                                                                         data: st.DataObject) -> None:
    wire = encode_frames(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    session, transport = open_session()
    for start, end in zip([0, *cuts], [*cuts, len(wire)]):
        transport.feed(wire[start:end])
    assert summary(transport.take_frames()) == summary(sent) and session.is_idle()


# -- 2. errors -------------------------------------------------------------------------

FATAL_CASES = {  # name: (bad bytes, code, id in the error frame, limits)
    "bad-header-length": (b"\x00\x00", ErrorCode.BAD_HEADER_LENGTH, None, {}),
    "bad-header": (raw_frame(b'{"byteorder": '), ErrorCode.BAD_HEADER, None, {}),
    "missing-header": (raw_frame({k: v for k, v in header(0, id=7).items() if k != "content-type"}),
                       ErrorCode.MISSING_HEADER, 7, {}),
    "bad-header-value": (raw_frame(header(0, byteorder="middle", id="x")), ErrorCode.BAD_HEADER_VALUE, "x", {}),
    "content-too-large": (raw_frame(header(11, id=9)), ErrorCode.CONTENT_TOO_LARGE, 9, {"max_content": 10}),
}


@pytest.mark.parametrize("case", list(FATAL_CASES))
def test_a_fatal_error_follows_the_answers_before_it_and_ends_input(case: str, chunk: int | None) -> None:
    bad, code, error_id, limits = FATAL_CASES[case]
    session, transport = open_session(**limits)
    later = encode_frame(Frame.binary(b"later", id=3))
    transport.feed(encode_frames(requests(2)) + bad + later, chunk)
    *answers, error = transport.take_frames()
    assert [frame.id for frame in answers] == [0, 1]
    assert (code_of(error), error.id) == (code, error_id)
    assert transport.failed and not transport.finished and transport.paused & PAUSE_ENDED and session.state is DONE
    transport.feed(later, chunk)
    transport.eof()
    assert transport.output == b"" and transport.failed


def test_bad_content_keeps_the_session_open(chunk: int | None) -> None:
    session, transport = open_session()
    bad = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": 4}, b"{not json")
    transport.feed(encode_frames([bad, Frame.binary(b"next", id=5)]), chunk)
    error, following = transport.take_frames()
    assert (code_of(error), error.id) == (ErrorCode.BAD_CONTENT, 4)
    assert (following.id, following.content) == (5, b"next")
    assert session.state is OPEN and not transport.failed and transport.paused == 0


def test_handler_error_keeps_the_session_open(chunk: int | None) -> None:
    def app(request: Frame) -> Frame:
        if request.content == b"boom":
            raise RuntimeError("the app broke")
        return echo(request)

    session, transport = open_session(app)
    transport.feed(encode_frames([Frame.binary(b"boom", id="b"), Frame.binary(b"fine", id="f")]), chunk)
    error, following = transport.take_frames()
    assert (code_of(error), error.id) == (ErrorCode.HANDLER_ERROR, "b")
    assert (following.id, following.content) == ("f", b"fine")
    assert session.state is OPEN and not transport.failed


# -- 3. the frame timeout --------------------------------------------------------------


@pytest.mark.parametrize("header_complete", [True, False], ids=["header-complete", "header-partial"])
def test_the_frame_timeout_fires_at_the_limit_and_not_before(header_complete: bool, chunk: int | None) -> None:
    clock = ManualClock(100.0)
    session, transport = open_session(clock=clock, frame_timeout=5.0)
    slow = encode_frame(Frame.binary(b"0123456789", id=4))
    transport.feed(encode_frame(Frame.binary(b"ok", id=1)) + (slow[:-3] if header_complete else slow[:4]), chunk)
    assert ids_out(transport) == [1]
    clock.advance(4.5)
    assert session.check_timeouts(clock.now) is False and transport.output == b""
    clock.advance(0.5)
    assert session.check_timeouts(clock.now) is True
    (error,) = transport.take_frames()
    assert (code_of(error), error.id) == (ErrorCode.TIMEOUT, 4 if header_complete else None)
    assert transport.failed and transport.paused & PAUSE_ENDED
    assert session.check_timeouts(clock.now + 100) is False and transport.output == b""


def test_the_frame_timeout_counts_from_each_frames_first_byte(chunk: int | None) -> None:
    clock = ManualClock()
    session, transport = open_session(clock=clock, frame_timeout=5.0)
    first, second = (encode_frame(frame) for frame in requests(2, size=10))
    transport.feed(first[:5], chunk)
    clock.advance(3)
    transport.feed(first[5:] + second[:-1], chunk)  # the first completes, the second starts at 3
    assert ids_out(transport) == [0]
    clock.advance(4.5)
    assert session.check_timeouts(clock.now) is False
    clock.advance(0.5)
    assert session.check_timeouts(clock.now) is True
    assert transport.take_frames()[0].id == 1


def test_reading_resumed_pushes_the_deadline_back() -> None:
    clock = ManualClock()
    session, transport = open_session(clock=clock, frame_timeout=5.0)
    transport.feed(encode_frame(requests(1)[0])[:-1])
    clock.advance(4)
    session.reading_resumed(3.0)  # the transport held the peer up for 3 s
    clock.advance(3.5)
    assert session.check_timeouts(clock.now) is False
    clock.advance(0.5)
    assert session.check_timeouts(clock.now) is True and transport.failed


def test_no_timeout_without_a_partial_frame() -> None:
    clock = ManualClock()
    session, transport = open_session(clock=clock, frame_timeout=5.0)
    session.reading_resumed(2.0)
    transport.feed(encode_frames(requests(2)))
    assert session.check_timeouts(clock.now + 1000) is False and not transport.failed


# -- 4. end of input -----------------------------------------------------------------


@pytest.mark.parametrize("end", ["eof", "input_ended"])
def test_end_of_input_answers_complete_frames_and_drops_a_partial(end: str, chunk: int | None) -> None:
    session, transport = open_session()
    transport.feed(encode_frames(requests(2)) + encode_frame(Frame.binary(b"half", id=9))[:-2], chunk)
    if end == "eof":
        transport.eof()
    else:
        session.input_ended("server shutting down")
    assert ids_out(transport) == [0, 1]
    assert transport.output == b"" and transport.finished and not transport.failed
    assert session.state is DONE and session.check_timeouts(1e9) is False


# -- 5. is_idle ------------------------------------------------------------------------


def test_is_idle_is_false_only_while_something_is_in_progress(chunk: int | None) -> None:
    session, transport = open_session()
    assert session.is_idle()
    wire = encode_frame(requests(1)[0])
    transport.feed(wire[:1], chunk)
    assert not session.is_idle()
    transport.feed(wire[1:], chunk)
    assert session.is_idle()  # held requests: section 6; jobs in a pool: section 7


# -- 6. inline holding past the high-water mark -----------------------------------------


HOLDING = {"high_water": 100, "low_water": 50}


def feed_one_read(transport: MemoryTransport, frames: list[Frame], extra: bytes, split: str) -> None:
    """Deliver `frames` + `extra` so that the last read completes all but (bytewise) the first frame's
    first bytes: holding concerns the answers of one read, so one byte per read would never hold."""
    wire = encode_frames(frames) + extra
    cut = len(encode_frame(frames[0])) - 1 if split == "first-bytewise" else 0
    transport.feed(wire[:cut], 1)
    transport.feed(wire[cut:])


@pytest.mark.parametrize("split", ["whole", "first-bytewise"])
def test_answers_past_the_high_water_mark_are_held_until_output_drains(split: str) -> None:
    session, transport = open_session(**HOLDING)
    transport.pending = 90  # room for 10 bytes: the first answer crosses the mark
    feed_one_read(transport, requests(5), b"", split)
    assert ids_out(transport) == [0]
    assert transport.paused == PAUSE_HELD and not session.is_idle()
    session.resume_writing()  # above the low-water mark: nothing yet
    assert transport.output == b"" and transport.paused == PAUSE_HELD
    transport.drain()
    assert ids_out(transport) == [1, 2, 3, 4]
    assert transport.paused == 0 and session.is_idle()


@pytest.mark.parametrize("split", ["whole", "first-bytewise"])
def test_a_fatal_error_after_held_requests_comes_after_their_answers(split: str) -> None:
    session, transport = open_session(**HOLDING)
    transport.pending = 90
    feed_one_read(transport, requests(4), b"\x00\x00", split)
    assert ids_out(transport) == [0]
    assert transport.paused == PAUSE_HELD | PAUSE_ENDED and not transport.failed
    transport.drain()
    *answers, error = transport.take_frames()
    assert [frame.id for frame in answers] == [1, 2, 3]
    assert code_of(error) == ErrorCode.BAD_HEADER_LENGTH
    assert transport.failed and transport.paused == PAUSE_ENDED


def test_end_of_input_with_held_requests_finishes_once_they_are_answered() -> None:
    session, transport = open_session(**HOLDING)
    transport.pending = 90
    transport.feed(encode_frames(requests(3)))
    transport.eof()
    assert not transport.finished and session.state is FINISHING
    transport.drain()
    assert ids_out(transport) == [0, 1, 2] and transport.finished


def test_held_requests_are_dropped_when_the_connection_is_lost() -> None:
    session, transport = open_session(**HOLDING)
    transport.pending = 90
    transport.feed(encode_frames(requests(3)))
    transport.take_frames()
    transport.lose()
    transport.drain()
    assert transport.output == b"" and session.state is CLOSED and session.is_idle()


def fail_sends_after_the_first(transport: MemoryTransport) -> None:
    """The first write goes out, then the connection resets: a real transport's
    write closes it and calls connection_lost, in the middle of the session's call."""
    write = transport.write

    def write_then_reset(data: bytes) -> None:
        write(data)
        transport.write = write  # type: ignore[method-assign]
        transport.lose()

    transport.write = write_then_reset  # type: ignore[method-assign]


def test_a_reset_while_answering_drops_the_requests_it_would_hold() -> None:
    session, transport = open_session(**HOLDING)
    transport.pending = 90
    fail_sends_after_the_first(transport)
    transport.feed(encode_frames(requests(4)))
    assert session.state is CLOSED and ids_out(transport) == [0]
    assert session.is_idle(), "the held requests of a closed connection are kept"


def test_a_reset_while_answering_before_a_fatal_error_sends_no_error_frame() -> None:
    session, transport = open_session()
    fail_sends_after_the_first(transport)
    transport.feed(encode_frames(requests(2)) + b"\x00\x00")
    assert ids_out(transport) == [0, 1]
    assert session.state is CLOSED and not transport.failed and transport.output == b""


# -- 7. the pooled session -------------------------------------------------------------


def test_pooled_requests_become_jobs_in_order(chunk: int | None) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool)
    transport.feed(encode_frames(requests(3)), chunk)
    assert job_ids(pool.jobs) == [0, 1, 2]
    assert transport.output == b"" and not session.is_idle()
    for job in reversed(pool.jobs[1:]):
        answer(job)
    assert transport.output == b"", "answers wait for the first request's"
    answer(pool.jobs[0])
    assert ids_out(transport) == [0, 1, 2] and session.is_idle() and transport.paused == 0


def test_the_pooled_session_writes_the_responders_answer_as_it_is() -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool)
    transport.feed(encode_frames(requests(2)))
    pool.jobs[0].done(Frame.binary(b"no id here"))  # the responder's job to copy ids
    answer(pool.jobs[1])
    plain, copied = transport.take_frames()
    assert (plain.id, plain.content, copied.id) == (None, b"no id here", 1)
    pool.jobs[0].done(Frame.binary(b"twice"))  # answered already: ignored
    assert transport.output == b""


@PROPS
@given(st.integers(1, 8).flatmap(lambda n: st.permutations(range(n))), st.data())
def test_property_pooled_answers_leave_in_request_order(order: list[int], data: st.DataObject) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool)
    wire = encode_frames(requests(len(order)))
    cut = data.draw(st.integers(0, len(wire)))
    transport.feed(wire[:cut])
    transport.feed(wire[cut:])
    done: set[int] = set()
    written = 0
    for index in order:
        answer(pool.jobs[index])
        done.add(index)
        due = written
        while due in done:
            due += 1
        assert ids_out(transport) == list(range(written, due))
        written = due
    assert written == len(order) and session.is_idle() and transport.paused == 0


def test_max_in_flight_pauses_reading_and_holds_the_rest(chunk: int | None) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool, max_in_flight=2)
    transport.feed(encode_frames(requests(5)), chunk)
    assert job_ids(pool.jobs) == [0, 1] and transport.paused == PAUSE_IN_FLIGHT
    answer(pool.jobs[1])  # not the head: nothing leaves, nothing more starts
    assert transport.output == b"" and len(pool.jobs) == 2
    answer(pool.jobs[0])
    assert ids_out(transport) == [0, 1] and job_ids(pool.jobs) == [0, 1, 2, 3]
    assert transport.paused == PAUSE_IN_FLIGHT
    answer(pool.jobs[2])
    assert job_ids(pool.jobs) == [0, 1, 2, 3, 4] and transport.paused == PAUSE_IN_FLIGHT  # 3 and 4 in flight
    answer(pool.jobs[3])
    assert transport.paused == 0 and not session.is_idle()
    answer(pool.jobs[4])
    assert ids_out(transport) == [2, 3, 4] and session.is_idle()


def test_pooled_end_of_input_finishes_after_the_last_answer(chunk: int | None) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool)
    transport.feed(encode_frames(requests(3)) + encode_frame(Frame.binary(b"half"))[:-1], chunk)
    transport.eof()
    answer(pool.jobs[2])
    answer(pool.jobs[0])
    assert ids_out(transport) == [0]
    assert not transport.finished and session.state is FINISHING
    answer(pool.jobs[1])
    assert ids_out(transport) == [1, 2]
    assert transport.finished and session.state is DONE


def test_pooled_fatal_error_waits_for_the_answers_before_it(chunk: int | None) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool, max_in_flight=2)
    transport.feed(encode_frames(requests(3)) + raw_frame(b"[]"), chunk)
    assert len(pool.jobs) == 2 and transport.paused & PAUSE_ENDED and not transport.failed
    answer(pool.jobs[1])
    answer(pool.jobs[0])
    answer(pool.jobs[2])
    *answers, error = transport.take_frames()
    assert [frame.id for frame in answers] == [0, 1, 2]
    assert code_of(error) == ErrorCode.BAD_HEADER and transport.failed


def test_pooled_timeout_waits_for_the_answers_before_it() -> None:
    pool, clock = FakePool(), ManualClock()
    session, transport = open_session(pool=pool, clock=clock, frame_timeout=1.0)
    transport.feed(encode_frame(requests(1)[0]) + encode_frame(Frame.binary(b"slow", id="s"))[:-1])
    clock.advance(1)
    assert session.check_timeouts(clock.now) is True and transport.output == b""
    answer(pool.jobs[0])
    first, error = transport.take_frames()
    assert first.id == 0 and (code_of(error), error.id) == (ErrorCode.TIMEOUT, "s") and transport.failed


def test_losing_the_connection_cancels_every_unanswered_job(chunk: int | None) -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool, max_in_flight=3)
    transport.feed(encode_frames(requests(4)), chunk)
    answer(pool.jobs[0])
    answer(pool.jobs[2])  # done, but not written: it waits for job 1
    assert ids_out(transport) == [0] and job_ids(pool.jobs) == [0, 1, 2, 3]
    transport.lose()
    assert job_ids(pool.cancelled) == [1, 2, 3]
    answer(pool.jobs[1])
    answer(pool.jobs[3])
    assert transport.output == b"" and session.state is CLOSED and not transport.finished


def test_a_reset_while_writing_pooled_answers_cancels_the_rest() -> None:
    pool = FakePool()
    session, transport = open_session(pool=pool)
    transport.feed(encode_frames(requests(3)))
    fail_sends_after_the_first(transport)
    answer(pool.jobs[0])
    assert ids_out(transport) == [0]
    assert session.state is CLOSED and pool.cancelled == pool.jobs[1:]
    answer(pool.jobs[1])
    assert transport.output == b""


# -- 8. the state table ---------------------------------------------------------------

STATES = (OPEN, FINISHING, FAILING, DONE, CLOSED)
EVENTS = (INPUT_ENDED, PROTOCOL_ERROR, ALL_ANSWERED, TRANSPORT_CLOSED)

#: For each transition, a way to reach it: (pooled?, steps). "request" leaves a job pending.
REACH = {
    (OPEN, INPUT_ENDED): (False, ["eof"]),
    (OPEN, PROTOCOL_ERROR): (False, ["bad"]),
    (FINISHING, INPUT_ENDED): (True, ["request", "eof", "server drains"]),
    (FAILING, INPUT_ENDED): (True, ["request", "bad", "eof"]),
    (DONE, INPUT_ENDED): (False, ["eof", "server drains"]),
    (FINISHING, ALL_ANSWERED): (True, ["request", "eof", "answer"]),
    (FAILING, ALL_ANSWERED): (True, ["request", "bad", "answer"]),
    (OPEN, TRANSPORT_CLOSED): (False, ["lose"]),
    (FINISHING, TRANSPORT_CLOSED): (True, ["request", "eof", "lose"]),
    (FAILING, TRANSPORT_CLOSED): (True, ["request", "bad", "lose"]),
    (DONE, TRANSPORT_CLOSED): (False, ["bad", "lose"]),
    (CLOSED, TRANSPORT_CLOSED): (False, ["lose", "lose"]),
}


@pytest.fixture
def transitions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Every (state, event, next state) a session goes through during the test."""
    seen: list[tuple[str, str, str]] = []
    original = FramedSession._transition

    def recording(self: FramedSession, event: str) -> str:
        before = self.state
        after = original(self, event)
        seen.append((before, event, after))
        return after

    monkeypatch.setattr(FramedSession, "_transition", recording)
    return seen


def test_reach_covers_the_whole_table() -> None:
    assert set(REACH) == set(TRANSITIONS)
    assert {state for pair in TRANSITIONS for state in (pair[0], TRANSITIONS[pair])} <= set(STATES)
    assert {event for _, event in TRANSITIONS} <= set(EVENTS)


@pytest.mark.parametrize("step", list(REACH), ids=[f"{state}+{event}" for state, event in REACH])
def test_every_transition_is_reachable(step: tuple[str, str], transitions: list[tuple[str, str, str]]) -> None:
    pooled, steps = REACH[step]
    pool = FakePool() if pooled else None
    session, transport = open_session(pool=pool)
    actions = {
        "request": lambda: transport.feed(encode_frame(requests(1)[0])),
        "bad": lambda: transport.feed(b"\x00\x00"),
        "eof": transport.eof,
        "server drains": lambda: session.input_ended("server shutting down"),
        "answer": lambda: answer(pool.jobs[0]),  # type: ignore[union-attr]
        "lose": transport.lose,
    }
    for name in steps:
        actions[name]()
    assert (*step, TRANSITIONS[step]) in transitions
    assert all(TRANSITIONS[before, event] == after for before, event, after in transitions)


@pytest.mark.parametrize("state,event", [(s, e) for s in STATES for e in EVENTS if (s, e) not in TRANSITIONS])
def test_an_event_not_in_the_table_raises_local_protocol_error(state: str, event: str) -> None:
    session, transport = open_session()
    session.state = state
    with pytest.raises(LocalProtocolError, match="cannot happen"):
        session._transition(event)
    assert session.state == state


# -- 9. raw echo -----------------------------------------------------------------------


@pytest.mark.parametrize("end", ["eof", "input_ended"])
def test_raw_echo_echoes_bytes_and_finishes_at_end_of_input(end: str, chunk: int | None) -> None:
    transport = MemoryTransport()
    session = RawEchoSession(transport)
    transport.attach(session)
    data = b"\x00\x00 not a frame \xff" + bytes(range(256))
    transport.feed(data, chunk)
    assert transport.output == data and session.is_idle() and session.get_buffer() is None
    assert session.check_timeouts(1e9) is False
    with pytest.raises(LocalProtocolError):
        session.buffer_updated(1)
    transport.eof() if end == "eof" else session.input_ended("server shutting down")
    assert transport.finished and not transport.failed
