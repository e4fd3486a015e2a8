"""The sans-I/O client session, frame by frame: exact requests out, exact messages in."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tickwire.clients.errors import InvalidFrame, ServerError
from tickwire.clients.messages import (
    ChannelList,
    EventBatch,
    Gap,
    Heartbeat,
    Message,
    Pong,
    Position,
    Received,
    Reset,
    ResumeNeeded,
    Status,
    Subscribed,
    Unsubscribed,
    Welcome,
    event_to_dict,
)
from tickwire.clients.session import ClientSession
from tickwire.core.errors import ChannelError, UnknownChannelType
from tickwire.core.events import Quote, Trade

BTC = "trades:BTC-USD"
ETH = "trades:ETH-USD"
NOW = 5_000_000


def trade(seq: int, epoch: str = "e1", sym: str = "BTC-USD", pt: int = 1_000) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "trade",
        "sym": sym,
        "ts": 900,
        "pt": pt,
        "price": 64123.5,
        "size": 0.0123,
        "side": "buy",
        "trade_id": seq * 10,
        "epoch": epoch,
        "seq": seq,
    }


def events(ch: str, seqs: range | list[int], epoch: str = "e1", **extra: Any) -> dict[str, Any]:
    sym = ch.partition(":")[2]
    return {
        "type": "events",
        "ch": ch,
        "epoch": epoch,
        "events": [trade(s, epoch, sym) for s in seqs],
        **extra,
    }


def frame(*messages: dict[str, Any]) -> bytes:
    return orjson.dumps(messages[0] if len(messages) == 1 else list(messages))


def seqs(messages: list[Message]) -> list[int]:
    return [e.seq for m in messages if isinstance(m, EventBatch) for e in m.events]


@pytest.fixture
def session() -> ClientSession:
    s = ClientSession()
    assert s.connection_made() == []
    return s


def test_requests_have_increasing_ids_and_exact_frames(session: ClientSession) -> None:
    sub = session.subscribe([BTC, "quotes:*"], snapshot=True)
    assert sub.frame == (
        '{"op":"subscribe","id":1,"channels":["trades:BTC-USD","quotes:*"],"snapshot":true}'
    )
    assert (sub.id, sub.op, sub.channels, sub.snapshot) == (1, "subscribe", (BTC, "quotes:*"), True)
    assert session.unsubscribe(["quotes:*"]).frame == (
        '{"op":"unsubscribe","id":2,"channels":["quotes:*"]}'
    )
    assert session.ping().frame == '{"op":"ping","id":3}'
    assert session.list_channels().frame == '{"op":"list","id":4}'
    assert session.subscriptions == (BTC,)


def test_subscribe_rejects_malformed_names_before_anything_is_recorded(
    session: ClientSession,
) -> None:
    with pytest.raises(UnknownChannelType):
        session.subscribe(["candles:BTC-USD"])
    with pytest.raises(ChannelError):
        session.subscribe([BTC, "trades:btc usd"])
    with pytest.raises(ChannelError):
        session.subscribe([])
    assert session.subscriptions == ()
    # A single string is one channel, not its characters.
    assert session.subscribe(BTC).channels == (BTC,)


def test_events_become_typed_events_with_channel_and_latency(session: ClientSession) -> None:
    session.subscribe([BTC])
    (batch,) = session.receive(frame(events(BTC, [1, 2])), now_ns=NOW)
    assert isinstance(batch, EventBatch)
    assert (batch.channel, batch.epoch, batch.received_ns, batch.conflated) == (
        BTC,
        "e1",
        NOW,
        False,
    )
    first = Trade(
        sym="BTC-USD",
        ts=900,
        pt=1_000,
        seq=1,
        epoch="e1",
        v=1,
        price=64123.5,
        size=0.0123,
        side="buy",
        trade_id=10,
    )
    assert batch.events[0] == first
    items = list(batch)
    assert items[0] == Received(BTC, first, NOW - 1_000)
    assert [(i.channel, i.seq, i.epoch, i.latency_ns) for i in items] == [
        (BTC, 1, "e1", NOW - 1_000),
        (BTC, 2, "e1", NOW - 1_000),
    ]
    assert batch.latencies_ns() == [NOW - 1_000, NOW - 1_000]
    assert items[0].raw is None
    assert session.positions == {BTC: Position("e1", 2)}


def test_frame_may_be_one_object_or_an_array_as_bytes_or_text(session: ClientSession) -> None:
    session.subscribe([BTC, ETH])
    one = session.receive(frame(events(BTC, [1])).decode(), NOW)
    many = session.receive(
        frame(events(BTC, [2]), events(ETH, [7, 8]), {"type": "status", "redis": "down"}), NOW
    )
    assert seqs(one) == [1]
    assert [type(m) for m in many] == [EventBatch, EventBatch, Status]
    assert seqs(many) == [2, 7, 8]
    assert many[2] == Status("down") and not Status("down").redis_up


def test_duplicates_are_dropped_within_an_epoch(session: ClientSession) -> None:
    session.subscribe([BTC])
    assert seqs(session.receive(frame(events(BTC, range(1, 4))), NOW)) == [1, 2, 3]
    assert seqs(session.receive(frame(events(BTC, range(2, 6))), NOW)) == [4, 5]
    assert session.receive(frame(events(BTC, [5])), NOW) == []
    assert session.stats.duplicates == 3
    assert session.stats.delivered == 5


def test_gap_is_delivered_trimmed_to_what_was_not_delivered(session: ClientSession) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, range(1, 4))), NOW)
    gap = {"type": "gap", "ch": BTC, "from_seq": 2, "to_seq": 6, "reason": "trimmed"}
    assert session.receive(frame(gap), NOW) == [Gap(BTC, 4, 6, "trimmed")]
    assert Gap(BTC, 4, 6, "trimmed").count == 3
    assert session.positions[BTC] == Position("e1", 6)
    # Announced already: not again.
    assert session.receive(frame(gap), NOW) == []
    assert seqs(session.receive(frame(events(BTC, [7])), NOW)) == [7]


def test_conflated_flag_is_kept_on_the_batch(session: ClientSession) -> None:
    session.subscribe(["quotes:*"])
    q = {
        "v": 1,
        "type": "quote",
        "sym": "AAPL",
        "ts": 1,
        "pt": 2,
        "bid": 189.5,
        "bid_size": 100,
        "ask": 189.52,
        "ask_size": 300,
        "epoch": "q",
        "seq": 9,
    }
    gap = {"type": "gap", "ch": "quotes:AAPL", "from_seq": 1, "to_seq": 8, "reason": "conflated"}
    out = session.receive(
        frame(
            gap,
            {"type": "events", "ch": "quotes:AAPL", "epoch": "q", "events": [q], "conflated": True},
        ),
        NOW,
    )
    assert out[0] == Gap("quotes:AAPL", 1, 8, "conflated")
    assert isinstance(out[1], EventBatch) and out[1].conflated
    assert out[1].events == (Quote("AAPL", 1, 2, 9, "q", 1, 189.5, 100, 189.52, 300),)


def test_hole_without_gap_stalls_the_channel_and_asks_for_a_resume(
    session: ClientSession,
) -> None:
    session.subscribe(["trades:*"])
    session.receive(frame(events(BTC, range(1, 4)), events(ETH, [1])), NOW)
    out = session.receive(frame(events(BTC, [6, 7])), NOW)
    assert out == [ResumeNeeded((BTC,), "trades:BTC-USD: seqs 4..5 missing")]
    assert session.resume_needed
    # The stalled channel delivers nothing more on this connection; others go on.
    out = session.receive(frame(events(BTC, [4]), events(ETH, [2])), NOW)
    assert [(m.channel, seqs([m])) for m in out if isinstance(m, EventBatch)] == [(ETH, [2])]
    session.connection_lost()
    assert not session.resume_needed
    (resub,) = session.connection_made()
    assert orjson.loads(resub.frame) == {
        "op": "subscribe",
        "id": resub.id,
        "channels": ["trades:*"],
        "resume": {BTC: {"epoch": "e1", "seq": 3}, ETH: {"epoch": "e1", "seq": 2}},
    }
    assert seqs(session.receive(frame(events(BTC, range(4, 8))), NOW)) == [4, 5, 6, 7]


def test_hole_still_there_after_max_resumes_is_announced_as_unrecovered_gap() -> None:
    session = ClientSession(max_resume_attempts=1)
    session.connection_made()
    session.subscribe([BTC])
    session.receive(frame(events(BTC, [1])), NOW)
    assert isinstance(session.receive(frame(events(BTC, [4])), NOW)[0], ResumeNeeded)
    session.connection_lost()
    session.connection_made()
    out = session.receive(frame(events(BTC, [4, 5])), NOW)
    assert out[0] == Gap(BTC, 2, 3, "unrecovered")
    assert seqs(out) == [4, 5]
    assert not session.resume_needed


def test_gap_starting_after_a_hole_is_a_hole_too(session: ClientSession) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, [1])), NOW)
    gap = {"type": "gap", "ch": BTC, "from_seq": 5, "to_seq": 6, "reason": "slow_consumer"}
    out = session.receive(frame(gap), NOW)
    assert out == [ResumeNeeded((BTC,), "trades:BTC-USD: seqs 2..4 missing")]


def test_reset_lets_the_new_epoch_start_at_any_seq(session: ClientSession) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, range(1, 4))), NOW)
    out = session.receive(
        frame({"type": "reset", "ch": BTC, "epoch": "e2"}, events(BTC, [40, 41], "e2")), NOW
    )
    assert out[0] == Reset(BTC, "e2")
    assert seqs(out) == [40, 41]
    assert session.positions[BTC] == Position("e2", 41)
    # A reset to the epoch we are in says nothing new.
    assert session.receive(frame({"type": "reset", "ch": BTC, "epoch": "e2"}), NOW) == []


def test_reset_then_resume_asks_for_the_whole_new_epoch(session: ClientSession) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, [1]), {"type": "reset", "ch": BTC, "epoch": "e2"}), NOW)
    session.connection_lost()
    (resub,) = session.connection_made()
    assert resub.resume == {BTC: Position("e2", 0)}


def test_events_of_another_epoch_without_reset_are_reported_as_reset(
    session: ClientSession,
) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, [1, 2])), NOW)
    out = session.receive(frame(events(BTC, [1, 2], "e2")), NOW)
    assert out[0] == Reset(BTC, "e2")
    assert seqs(out) == [1, 2]


def test_heartbeat_ahead_of_delivery_asks_for_a_resume(session: ClientSession) -> None:
    session.subscribe(["trades:*"])
    session.receive(frame(events(BTC, [1, 2]), events(ETH, [5])), NOW)
    last = {BTC: 2, ETH: 5, "trades:SOL-USD": 9}
    quiet = {"type": "heartbeat", "ts": 77, "last": last}
    assert session.receive(frame(quiet), NOW) == [Heartbeat(77, last)]
    assert not session.resume_needed
    ahead = {"type": "heartbeat", "ts": 78, "last": {BTC: 4, ETH: 5}}
    out = session.receive(frame(ahead), NOW)
    assert out[1] == ResumeNeeded((BTC,), "heartbeat shows events sent but not delivered")
    assert session.resume_needed


def test_reconnect_resumes_every_seen_channel_covered_by_wildcards(
    session: ClientSession,
) -> None:
    session.subscribe(["quotes:*", BTC])
    session.receive(frame(events(BTC, [1, 2])), NOW)
    for sym, seq in (("AAPL", 7), ("MSFT", 3)):
        q = {
            **trade(seq, "q", sym),
            "type": "quote",
            "bid": 1.0,
            "bid_size": 1,
            "ask": 2.0,
            "ask_size": 1,
        }
        session.receive(
            frame({"type": "events", "ch": f"quotes:{sym}", "epoch": "q", "events": [q]}), NOW
        )
    assert [r.id for r in session.connection_lost()] == [1]  # never acknowledged
    (resub,) = session.connection_made()
    assert resub.resync and not resub.snapshot
    assert resub.frame == (
        '{"op":"subscribe","id":2,"channels":["quotes:*","trades:BTC-USD"],'
        '"resume":{"trades:BTC-USD":{"epoch":"e1","seq":2},'
        '"quotes:AAPL":{"epoch":"q","seq":7},"quotes:MSFT":{"epoch":"q","seq":3}}}'
    )


def test_reconnect_asks_snapshot_only_where_nothing_was_delivered(
    session: ClientSession,
) -> None:
    session.subscribe([BTC, ETH, "bars.1s:*"], snapshot=True)
    session.receive(frame(events(BTC, [3])), NOW)
    session.connection_lost()
    resumed, snap = session.connection_made()
    assert (resumed.channels, resumed.snapshot, dict(resumed.resume)) == (
        (BTC,),
        False,
        {BTC: Position("e1", 3)},
    )
    assert (snap.channels, snap.snapshot, dict(snap.resume)) == ((ETH, "bars.1s:*"), True, {})


def test_subscriptions_made_while_disconnected_are_sent_on_reconnect() -> None:
    session = ClientSession()
    req = session.subscribe([BTC])
    assert not session.is_open
    (resub,) = session.connection_made()
    assert resub.channels == (BTC,) and resub.id != req.id
    assert session.receive(
        frame({"type": "subscribed", "id": resub.id, "channels": [BTC]}), NOW
    ) == [Subscribed(resub.id, (BTC,))]


def test_unsubscribe_forgets_positions_and_drops_late_events(session: ClientSession) -> None:
    session.subscribe(["trades:*"])
    session.receive(frame(events(BTC, [1]), events(ETH, [1])), NOW)
    session.unsubscribe(["trades:*"])
    assert session.positions == {}
    assert session.receive(frame(events(BTC, [2])), NOW) == []
    assert session.stats.discarded == 1
    # Subscribing again starts afresh, wherever the server starts.
    session.subscribe([BTC])
    assert seqs(session.receive(frame(events(BTC, [9])), NOW)) == [9]


def test_refused_subscribe_removes_only_what_it_added(session: ClientSession) -> None:
    session.subscribe([BTC])
    req = session.subscribe([BTC, ETH])
    err = {"type": "error", "id": req.id, "code": "too_many_subscriptions", "message": "at most 1"}
    (out,) = session.receive(frame(err), NOW)
    assert isinstance(out, ServerError)
    assert (out.code, out.message, out.id) == ("too_many_subscriptions", "at most 1", req.id)
    assert session.subscriptions == (BTC,)


def test_refused_resubscription_is_retried_only_when_retrying_can_help(
    session: ClientSession,
) -> None:
    session.subscribe([BTC])
    session.receive(frame(events(BTC, [1])), NOW)
    session.connection_lost()
    (resub,) = session.connection_made()
    err = {"type": "error", "id": resub.id, "code": "rate_limited", "message": "slow down"}
    (out,) = session.receive(frame(err), NOW)
    assert out == ResumeNeeded((BTC,), "resubscribe failed: rate_limited: slow down")
    assert session.subscriptions == (BTC,)
    session.connection_lost()
    (resub,) = session.connection_made()
    err = {"type": "error", "id": resub.id, "code": "unknown_channel", "message": "no trades"}
    (out,) = session.receive(frame(err), NOW)
    assert isinstance(out, ServerError) and out.code == "unknown_channel"
    assert not session.subscriptions and not session.positions


def test_connection_lost_returns_the_unanswered_requests(session: ClientSession) -> None:
    sub = session.subscribe([BTC])
    ping = session.ping()
    lst = session.list_channels()
    session.receive(frame({"type": "pong", "id": ping.id, "ts": 5}), NOW)
    assert session.connection_lost() == [sub, lst]
    assert not session.is_open
    # Requests made while no connection is up are not pending on any.
    session.ping()
    assert session.connection_lost() == []


def test_replies_are_typed(session: ClientSession) -> None:
    welcome = {
        "type": "welcome",
        "protocol": 1,
        "server": "tickwire/0.1.0",
        "heartbeat_ms": 5000,
        "limits": {"max_subscriptions": 1024},
    }
    out = session.receive(
        frame(
            welcome,
            {"type": "subscribed", "id": 1, "channels": [BTC]},
            {"type": "unsubscribed", "id": 2, "channels": []},
            {"type": "pong", "id": "p", "ts": 9},
            {"type": "channels", "id": 4, "channels": [BTC, ETH]},
            {"type": "status", "redis": "up"},
            {"type": "news", "text": "a type from a newer server"},
        ),
        NOW,
    )
    assert out == [
        Welcome(1, "tickwire/0.1.0", 5000, {"max_subscriptions": 1024}),
        Subscribed(1, (BTC,)),
        Unsubscribed(2, ()),
        Pong("p", 9),
        ChannelList(4, (BTC, ETH)),
        Status("up"),
    ]
    assert session.welcome == out[0]


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1, 2]",
        b'{"type": "events", "ch": "trades:BTC-USD", "events": {}}',
        b'{"type": "gap", "ch": "trades:BTC-USD", "from_seq": 5, "to_seq": 4, "reason": "x"}',
        b'{"type": "gap", "ch": "trades:BTC-USD", "from_seq": "5", "to_seq": 6, "reason": "x"}',
        b'{"type": "welcome", "protocol": 2, "heartbeat_ms": 5000}',
        b'{"type": "subscribed", "id": 1, "channels": "trades:BTC-USD"}',
        orjson.dumps(events(BTC, [1]) | {"events": [{"seq": 1, "epoch": "e"}]}),
        orjson.dumps(
            events(BTC, [1]) | {"events": [{k: v for k, v in trade(1).items() if k != "pt"}]}
        ),
    ],
)
def test_frames_that_break_the_protocol_raise_invalid_frame(
    session: ClientSession, data: bytes
) -> None:
    session.subscribe([BTC])
    with pytest.raises(InvalidFrame):
        session.receive(data, NOW)


def test_keep_raw_keeps_the_decoded_object_and_event_to_dict_matches_it() -> None:
    session = ClientSession(keep_raw=True)
    session.connection_made()
    session.subscribe([BTC])
    extra = {**trade(1), "venue": "X"}
    (batch,) = session.receive(
        frame({"type": "events", "ch": BTC, "epoch": "e1", "events": [extra]}), NOW
    )
    assert isinstance(batch, EventBatch)
    (item,) = batch
    assert item.raw == extra
    assert event_to_dict(item.event) == trade(1)
    assert list(event_to_dict(item.event)) == list(trade(1))


def test_subscribed_positions_are_the_resume_point_of_channels_with_nothing_delivered() -> None:
    session = ClientSession()
    session.connection_made()
    req = session.subscribe(["trades:*"])
    ack = {
        "type": "subscribed",
        "id": req.id,
        "channels": ["trades:*"],
        "positions": {
            "trades:BTC-USD": {"epoch": "e1", "seq": 104},
            "trades:NEW": {"epoch": "", "seq": 0},
        },
    }
    session.receive(orjson.dumps(ack), 0)
    # An event of the first channel moves its position; the second stays at the ack's.
    session.receive(orjson.dumps(events("trades:BTC-USD", [105])), 0)
    session.connection_lost()
    (again,) = session.connection_made()
    assert dict(again.resume) == {
        "trades:BTC-USD": Position("e1", 105),
        "trades:NEW": Position("", 0),
    }
    # A channel with nothing stored when acked takes its first events whatever their epoch.
    out = session.receive(orjson.dumps(events("trades:NEW", [1], epoch="e9")), 0)
    assert [type(m).__name__ for m in out] == ["EventBatch"]


def test_resume_requests_are_split_under_the_request_size_limit() -> None:
    session = ClientSession(max_request_bytes=1024)
    session.connection_made()
    req = session.subscribe(["trades:*"])
    positions: dict[str, dict[str, Any]] = {
        f"trades:S{i:04d}": {"epoch": "e1", "seq": i + 1} for i in range(200)
    }
    session.receive(
        orjson.dumps(
            {"type": "subscribed", "id": req.id, "channels": ["trades:*"], "positions": positions}
        ),
        0,
    )
    session.connection_lost()
    requests = session.connection_made()
    assert len(requests) > 1
    assert all(len(r.frame) <= 1024 for r in requests)
    resumed: dict[str, Any] = {}
    for r in requests:
        assert r.channels == ("trades:*",)
        resumed.update(r.resume)
    assert resumed == {ch: Position("e1", p["seq"]) for ch, p in positions.items()}


def test_projected_events_decode_with_the_missing_fields_none(session: ClientSession) -> None:
    req = session.subscribe(["trades:*"], fields=["price"])
    assert orjson.loads(req.frame)["fields"] == ["price"]
    kept = {"v", "type", "sym", "ts", "pt", "price", "epoch", "seq"}
    doc = events(BTC, [1]) | {"events": [{k: v for k, v in trade(1).items() if k in kept}]}
    (batch,) = session.receive(frame(doc), NOW)
    assert isinstance(batch, EventBatch)
    (event,) = batch.events
    assert isinstance(event, Trade)
    assert (event.price, event.size, event.side, event.trade_id) == (64123.5, None, None, None)
    assert event_to_dict(event) == {k: v for k, v in trade(1).items() if k in kept}
    assert list(batch.to_numpy()) == ["sym", "ts", "pt", "seq", "epoch", "price"]


def test_resubscribe_after_reconnect_keeps_each_patterns_fields(session: ClientSession) -> None:
    session.subscribe(["trades:*"], fields=["price", "size"])
    session.subscribe(["quotes:BTC-USD"])
    session.receive(frame(events(BTC, [1, 2])), NOW)
    session.connection_lost()
    requests = [orjson.loads(r.frame) for r in session.connection_made()]
    assert [{k: v for k, v in r.items() if k != "id"} for r in requests] == [
        {
            "op": "subscribe",
            "channels": ["trades:*"],
            "resume": {BTC: {"epoch": "e1", "seq": 2}},
            "fields": ["price", "size"],
        },
        {"op": "subscribe", "channels": ["quotes:BTC-USD"]},
    ]
    session.unsubscribe(["trades:*"])
    session.subscribe(["trades:*"])
    session.connection_lost()
    (again,) = session.connection_made()
    assert "fields" not in orjson.loads(again.frame)


def test_a_throttled_frame_skips_exactly_its_hole_without_a_gap(session: ClientSession) -> None:
    req = session.subscribe(["trades:*"], max_hz=4)
    assert orjson.loads(req.frame)["max_hz"] == 4 and req.max_hz == 4
    session.receive(frame(events(BTC, [1, 2])), NOW)
    out = session.receive(frame(events(BTC, [9], skipped=6)), NOW)
    assert seqs(out) == [9] and not any(isinstance(m, Gap | ResumeNeeded) for m in out)
    assert isinstance(out[0], EventBatch) and out[0].skipped == 6
    assert session.stats.skipped == 6 and session.positions[BTC] == Position("e1", 9)
    # A frame that skipped less than its hole leaves a hole: a resume is asked for.
    out = session.receive(frame(events(BTC, [20], skipped=3)), NOW)
    assert out == [ResumeNeeded((BTC,), "trades:BTC-USD: seqs 10..16 missing")]
    # Skipped seqs of a frame the client has had already are just a duplicate.
    session.connection_lost()
    (resub,) = session.connection_made()
    assert orjson.loads(resub.frame)["max_hz"] == 4
    out = session.receive(frame(events(BTC, [9], skipped=8), events(BTC, [10])), NOW)
    assert seqs(out) == [10] and session.stats.duplicates == 1


def test_a_throttled_frame_of_a_channel_with_no_position_owes_nothing(
    session: ClientSession,
) -> None:
    session.subscribe(["trades:*"], max_hz=2.5)
    out = session.receive(frame(events(ETH, [40], skipped=39)), NOW)
    assert seqs(out) == [40] and session.stats.skipped == 0
    with pytest.raises(InvalidFrame):
        session.receive(frame(events(ETH, [41], skipped=-1)), NOW)


def test_resubscribe_after_reconnect_keeps_each_patterns_rate(session: ClientSession) -> None:
    session.subscribe(["quotes:*"], max_hz=4)
    session.subscribe(["trades:*"], max_hz=4, fields=["price"])
    session.subscribe(["bars.1s:*"])
    session.connection_lost()
    requests = [orjson.loads(r.frame) for r in session.connection_made()]
    assert [{k: v for k, v in r.items() if k != "id"} for r in requests] == [
        {"op": "subscribe", "channels": ["quotes:*"], "max_hz": 4},
        {"op": "subscribe", "channels": ["trades:*"], "fields": ["price"], "max_hz": 4},
        {"op": "subscribe", "channels": ["bars.1s:*"]},
    ]
    session.unsubscribe(["quotes:*"])
    session.subscribe(["quotes:*"])
    session.connection_lost()
    docs = [orjson.loads(r.frame) for r in session.connection_made()]
    rates = {ch: d.get("max_hz") for d in docs for ch in d["channels"]}
    assert rates == {"quotes:*": None, "trades:*": 4, "bars.1s:*": None}
