"""Hand-built text frames are byte-for-byte what the websockets library would send."""

from __future__ import annotations

from websockets.frames import Frame, Opcode

from tickwire.server.frames import text_frame


def library_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_text_frame_matches_the_library_at_every_length_boundary() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = b"x" * n
        assert text_frame(payload) == library_frame(payload), n
