"""Field projection without sockets: the request's fields, the frames per projection, the hub."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.server.test_hub import Client
from tests.server.test_outbox import T, batch
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.config import Limits
from tickwire.core.errors import ProtocolError
from tickwire.server.hub import Hub
from tickwire.server.projection import ALWAYS_KEPT, Projection, parse_fields
from tickwire.server.session import ClientSession, Rejected, Subscribe

Q = Channel.parse("quotes:BTC-USD")
Q2 = Channel.parse("quotes:ETH-USD")
QUOTES = ChannelPattern.parse("quotes:*")
BID_ASK = ALWAYS_KEPT | {"bid", "ask"}


def events_of(frame: bytes) -> list[dict[str, Any]]:
    doc = orjson.loads(frame)
    return [e for m in (doc if isinstance(doc, list) else [doc]) for e in m["events"]]


def test_fields_keep_the_common_ones_and_a_bars_interval() -> None:
    assert parse_fields(["bid", "ask"], [QUOTES]) == BID_ASK
    assert "interval" in ALWAYS_KEPT
    assert parse_fields(["close"], [ChannelPattern.parse("bars.1s:*")]) == ALWAYS_KEPT | {"close"}
    # The same fields give the same projection whatever the types of the request.
    assert parse_fields(["ts"], [QUOTES, ChannelPattern.parse("bars.1s:*")]) == ALWAYS_KEPT
    assert parse_fields(["ts"], [QUOTES]) == ALWAYS_KEPT
    # Every field asked, or none: the subscription is not projected, it shares the whole frame.
    assert parse_fields(["bid", "bid_size", "ask", "ask_size"], [QUOTES]) is None
    assert parse_fields(None, [QUOTES]) is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (["bid", "price"], "price not a field of quotes:*"),
        ([], "non-empty list"),
        ("bid", "non-empty list"),
        ([1], "non-empty list"),
    ],
)
def test_bad_fields_are_refused_naming_them(fields: Any, says: str) -> None:
    with pytest.raises(ProtocolError, match=says) as exc:
        parse_fields(fields, [QUOTES, ChannelPattern.parse("quotes:AAPL")])
    assert exc.value.code == "bad_request"


def test_a_pattern_keeps_its_fields_until_unsubscribed() -> None:
    s = ClientSession(Limits())

    def subscribe(**doc: Any) -> object:
        return s.receive(orjson.dumps({"op": "subscribe", "channels": ["quotes:*"], **doc}), 0.0)

    first = subscribe(fields=["bid"])
    assert isinstance(first, Subscribe) and first.fields == ALWAYS_KEPT | {"bid"}
    again = subscribe(fields=["bid"])  # the same fields: nothing new, not refused
    assert isinstance(again, Subscribe) and again.added == ()
    for other in ({"fields": ["ask"]}, {}):
        refused = subscribe(**other)
        assert isinstance(refused, Rejected) and refused.code == "bad_request"
        assert b"already subscribed with other fields" in refused.message
    s.receive(b'{"op":"unsubscribe","channels":["quotes:*"]}', 0.0)
    whole = subscribe()
    assert isinstance(whole, Subscribe) and whole.added == (QUOTES,) and whole.fields is None


def test_a_channel_under_two_patterns_keeps_the_union_or_everything() -> None:
    exact = ChannelPattern.parse("quotes:BTC-USD")
    p = Projection(frozenset({QUOTES, exact}), {QUOTES: BID_ASK, exact: ALWAYS_KEPT | {"ask_size"}})
    assert p.of(Q) == BID_ASK | {"ask_size"} and p.of(Q2) == BID_ASK
    whole = Projection(frozenset({QUOTES, exact}), {QUOTES: BID_ASK})
    assert whole.of(Q) is None and whole.of(Q2) == BID_ASK


def test_a_projected_frame_keeps_the_fields_in_stored_order_and_is_built_once() -> None:
    b = batch(Q, 1, 3)
    frame = b.frame_for(BID_ASK)
    assert b.frame_for(BID_ASK) is frame and b.frame_for(None) is b.frame
    stored = [orjson.loads(e) for e in b.events]
    assert events_of(frame) == [{k: v for k, v in e.items() if k in BID_ASK} for e in stored]
    assert [list(e) for e in events_of(frame)] == [
        ["v", "type", "sym", "ts", "pt", "bid", "ask", "epoch", "seq"]
    ] * 3
    assert orjson.loads(frame) | {"events": []} == orjson.loads(b.frame) | {"events": []}


@pytest.mark.parametrize("fast", [True, False])
def test_clients_with_one_projection_share_its_frame_beside_whole_ones(fast: bool) -> None:
    hub = Hub()
    a, b = Client(hub, fast=fast), Client(hub, fast=fast)
    for c in (a, b):
        hub.subscribe(c.sub, QUOTES, fields=BID_ASK)
    whole = Client(hub, "quotes:*", fast=fast)
    trades = Client(hub, "trades:*", fast=fast)
    hub.subscribe(trades.sub, QUOTES, fields=ALWAYS_KEPT | {"bid"})
    assert len(hub.groups_of(Q)) == 3  # one group per distinct projection
    first, second = batch(Q, 1, 2), batch(T, 1, 1)
    hub.dispatch([first, second])
    assert whole.frames == [first.frame]
    assert a.frames == b.frames and events_of(a.frames[0]) == events_of(first.frame_for(BID_ASK))
    if fast:
        assert a.frames[0] is b.frames[0]  # one frame written to both
    assert first._projected is not None and set(first._projected) == {
        BID_ASK,
        ALWAYS_KEPT | {"bid"},
    }
    # The trades of `trades:*` go whole to the client whose quotes are projected.
    (quotes, trade) = orjson.loads(trades.frames[0])
    assert list(quotes["events"][0]) == ["v", "type", "sym", "ts", "pt", "bid", "epoch", "seq"]
    assert orjson.dumps(trade) == second.frame


def test_a_shed_outbox_sends_projected_conflated_frames_and_counts_full_sizes() -> None:
    hub = Hub()
    slow = Client(hub, fast=False)
    hub.subscribe(slow.sub, QUOTES, fields=BID_ASK)
    slow.room = False
    batches = [batch(Q, 1, 3), batch(Q, 4, 3)]
    for b in batches:
        hub.dispatch([b])
    # The limit counts what is queued at its full size, projected or not.
    assert slow.outbox.nbytes == sum(b.nbytes for b in batches)
    slow.outbox.shed()
    slow.room = True
    slow.flush()
    gap, events = slow.messages()
    assert gap == {"type": "gap", "ch": Q.name, "from_seq": 1, "to_seq": 5, "reason": "conflated"}
    assert events["conflated"] is True
    assert [list(e) for e in events["events"]] == [
        ["v", "type", "sym", "ts", "pt", "bid", "ask", "epoch", "seq"]
    ]


def test_unsubscribing_a_projected_pattern_drops_its_fields() -> None:
    hub = Hub()
    c = Client(hub)
    hub.subscribe(c.sub, QUOTES, fields=BID_ASK)
    hub.unsubscribe(c.sub, QUOTES)
    assert c.outbox.projection is None and not hub.groups_of(Q)
    hub.subscribe(c.sub, QUOTES)
    first = batch(Q, 1, 1)
    hub.dispatch([first])
    assert c.frames == [first.frame]
