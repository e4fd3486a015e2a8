from __future__ import annotations

import pytest

from tickwire.core.errors import CodecError
from tickwire.core.events import Trade, decode_event, encode_body, tick_decimals
from tickwire.core.stream import complete_body


def test_encoded_trade_decodes_to_typed_event_with_seq_and_epoch_last() -> None:
    body = encode_body(
        "trade", "BTC-USD", 10, 20, {"price": 64123.5, "size": 0.25, "side": "buy", "trade_id": 7}
    )
    raw = complete_body(body, "e1", 41)
    assert raw.endswith(b',"epoch":"e1","seq":41}')
    ev = decode_event(raw)
    assert isinstance(ev, Trade)
    assert (ev.sym, ev.price, ev.seq, ev.epoch, ev.v, ev.channel_name) == (
        "BTC-USD",
        64123.5,
        41,
        "e1",
        1,
        "trades:BTC-USD",
    )


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"type":"x","v":1}', "unknown event type"),
        (b'{"type":"quote"}', "schema version"),
        (b'{"type":"quote","v":1,"sym":"A"}', "lacks field"),
    ],
)
def test_decode_rejects_bad_events_with_clear_errors(raw: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_event(raw)


def test_encode_body_requires_every_field_of_the_type() -> None:
    with pytest.raises(CodecError, match="trade event lacks size, side, trade_id"):
        encode_body("trade", "A", 0, 0, {"price": 1.5})
    with pytest.raises(CodecError, match="unknown event type"):
        encode_body("order", "A", 0, 0, {})


@pytest.mark.parametrize("tick, decimals", [(0.5, 1), (0.25, 2), (0.01, 2), (1.0, 0), (0.00001, 5)])
def test_tick_decimals(tick: float, decimals: int) -> None:
    assert tick_decimals(tick) == decimals
