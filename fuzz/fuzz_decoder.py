"""Coverage-guided fuzzing of the frame decoder with atheris.

The input is split into chunks (sizes taken from the input itself) and fed to a
`FrameDecoder`, alternating `feed` with the in-place path (`recv_buffer` /
`buffer_updated`) the server uses for large contents. Anything other than
`ProtocolError` escaping, or a decoded frame that does not re-encode and decode
to itself, is a crash.

    python fuzz/fuzz_decoder.py -max_total_time=600 fuzz/corpus
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from multiconn.errors import ProtocolError
    from multiconn.protocol import Frame, FrameDecoder, encode_frame


def decode(data: bytes, fdp: atheris.FuzzedDataProvider) -> list[Frame]:
    decoder = FrameDecoder(max_content=1 << 20)
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        step = fdp.ConsumeIntInRange(1, 4096)
        view = decoder.recv_buffer()
        if view is not None and fdp.ConsumeBool():
            n = min(len(view), step, len(data) - pos)
            view[:n] = data[pos : pos + n]
            view.release()
            frames += decoder.buffer_updated(n)
        else:
            if view is not None:
                view.release()
            n = step
            frames += decoder.feed(data[pos : pos + n])
        pos += n
    return frames


def check_round_trip(frame: Frame) -> None:
    header = {k: v for k, v in frame.header.items() if k not in ("byteorder", "content-length")}
    again = FrameDecoder(max_content=1 << 20).feed(encode_frame(Frame(header, bytes(frame.content))))
    assert len(again) == 1, again
    assert again[0].content == frame.content
    for key in ("content-type", "content-encoding", "id"):
        assert again[0].header.get(key) == frame.header.get(key), key


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, len(raw)))
    try:
        frames = decode(data, fdp)
    except ProtocolError as exc:
        frames = exc.frames  # type: ignore[attr-defined]
    for frame in frames:
        check_round_trip(frame)
        if frame.is_json:
            try:
                frame.json_content()
            except ProtocolError:
                pass
        frame.error_info


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
