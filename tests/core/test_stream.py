from __future__ import annotations

from tickwire.core.events import encode_body
from tickwire.core.stream import complete_body, entry_id, epoch_of, publish_ns_of, seq_of


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
