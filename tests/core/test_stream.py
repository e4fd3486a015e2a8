from __future__ import annotations

import hiredis
import orjson

from tickwire.core.events import encode_body
from tickwire.core.stream import (
    complete_bodies,
    complete_body,
    entry_id,
    epoch_of,
    framed_bodies,
    publish_ns_of,
    seq_of,
)


def test_epoch_and_publish_time_read_from_event_bytes() -> None:
    raw = complete_body(
        encode_body(
            "quote", "AAPL", 5, 123456789, {"bid": 1.0, "bid_size": 1, "ask": 1.5, "ask_size": 2}
        ),
        "a1b2",
        9,
    )
    assert epoch_of(raw) == "a1b2"
    assert publish_ns_of(raw) == 123456789
    assert epoch_of(b"{}") == "" and publish_ns_of(b"{}") == 0


def test_entry_id_round_trips_seq() -> None:
    assert seq_of(entry_id(1041)) == 1041


def test_completed_bodies_carry_their_epoch_and_consecutive_seqs_one_or_many() -> None:
    bodies = [
        encode_body(
            "trade", "AAPL", n, n, {"price": 1.5, "size": n, "side": "buy", "trade_id": str(n)}
        )
        for n in (1, 2, 3)
    ]
    for epoch in ("a1b2", "c3d4", "a1b2"):  # an epoch seen before comes from the cache
        many = complete_bodies(bodies, epoch, 41)
        one = complete_bodies(bodies[:1], epoch, 41)
        assert one == many[:1]
        events = [orjson.loads(b) for b in many]
        assert [(e["epoch"], e["seq"], e["size"]) for e in events] == [
            (epoch, 41, 1),
            (epoch, 42, 2),
            (epoch, 43, 3),
        ]


def test_framed_bodies_are_the_completed_bodies_as_the_wire_protocol_frames_arguments() -> None:
    fields = {"price": 1.5, "size": 2, "side": "buy", "trade_id": 7}
    bodies = [encode_body("trade", "AAPL", n, n, fields) for n in (1, 2, 3)]

    # Seqs 98-100 cross a digit: each frame's length counts its own digits.
    def as_hiredis_frames(args: list[bytes]) -> bytes:
        packed: bytes = hiredis.pack_command(("X", *args))  # type: ignore[arg-type]
        return packed[packed.index(b"X\r\n") + 3 :]

    framed = framed_bodies(bodies, "e1", 98)
    assert b"".join(framed) == as_hiredis_frames(complete_bodies(bodies, "e1", 98))
    assert b"".join(framed_bodies(bodies, "", 0)) == as_hiredis_frames(bodies)
