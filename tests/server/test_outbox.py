from __future__ import annotations

from typing import Any

import orjson

from tickwire.bench.invariant import InvariantChecker
from tickwire.core.channels import Channel
from tickwire.core.events import encode_body
from tickwire.core.stream import StreamPosition, complete_body
from tickwire.server.batch import Batch
from tickwire.server.outbox import Outbox

FIELDS: dict[str, dict[str, object]] = {
    "trades": {"price": 1.5, "size": 1, "side": "buy", "trade_id": 1},
    "quotes": {"bid": 1.5, "bid_size": 1, "ask": 1.75, "ask_size": 1},
}
T = Channel.parse("trades:BTC-USD")
Q = Channel.parse("quotes:BTC-USD")


def batch(ch: Channel, first: int, n: int, epoch: str = "e1") -> Batch:
    events = [
        complete_body(
            encode_body(ch.event_type, ch.symbol, 0, 0, {**FIELDS[ch.kind], "x": i}),
            epoch,
            first + i,
        )
        for i in range(n)
    ]
    return Batch(ch, epoch, first, events)


def drain(box: Outbox) -> list[dict[str, Any]]:
    data = box.take()
    if data is None:
        return []
    doc = orjson.loads(data)
    return doc if isinstance(doc, list) else [doc]


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for m in messages if m["type"] == "events" for e in m["events"]]


def test_overlapping_batches_are_cut_and_holes_announced_once() -> None:
    box = Outbox(1 << 20)
    box.expect(T, "e1", 3)
    assert not box.add(batch(T, 1, 3))  # all already delivered
    assert box.add(batch(T, 2, 4))  # 2..5: 4 and 5 are new
    assert box.add(batch(T, 9, 2))  # hole 6..8
    out = drain(box)
    assert seqs(out) == [4, 5, 9, 10]
    gaps = [m for m in out if m["type"] == "gap"]
    assert gaps == [{"type": "gap", "ch": T.name, "from_seq": 6, "to_seq": 8, "reason": "trimmed"}]
    checker = InvariantChecker()
    checker.expect_from(T.name, "e1", 3)
    for m in out:
        checker.feed(m)
    assert checker.ok, checker.violations


def test_new_epoch_is_announced_with_a_reset() -> None:
    box = Outbox(1 << 20)
    box.add(batch(T, 1, 2))
    box.add(batch(T, 1, 2, epoch="e2"))
    out = drain(box)
    assert [m["type"] for m in out] == ["events", "reset", "events"]
    assert out[1]["epoch"] == "e2"


def test_control_messages_go_first_and_one_frame_holds_everything() -> None:
    box = Outbox(1 << 20)
    box.add(batch(T, 1, 1))
    box.control(b'{"type":"pong","id":1,"ts":0}')
    raw = box.take()
    assert raw is not None and raw.startswith(b"[")
    assert [m["type"] for m in orjson.loads(raw)] == ["pong", "events"]
    assert box.take() is None and box.nbytes == 0


def test_slow_client_quotes_conflate_to_latest_with_gap() -> None:
    box = Outbox(2000)
    for first in range(1, 200, 10):
        box.add(batch(Q, first, 10))
    assert box.over_limit
    box.shed()
    out = drain(box)
    events = [m for m in out if m["type"] == "events"]
    assert seqs(out)[-1] == 200
    assert any(m.get("conflated") for m in events)
    checker = InvariantChecker()
    for m in out:
        checker.feed(m)
    assert checker.ok, checker.violations
    assert checker.gap_events + checker.delivered == 200
    assert box.stats.conflated_events == checker.gap_events


def test_slow_client_trades_dropped_as_one_gap_and_counted() -> None:
    box = Outbox(2000)
    for first in range(1, 300, 10):
        box.add(batch(T, first, 10))
        if box.over_limit:
            box.shed()
    out = drain(box)
    checker = InvariantChecker()
    for m in out:
        checker.feed(m)
    assert checker.ok, checker.violations
    assert checker.gap_events + checker.delivered == 300
    assert all(g["reason"] == "slow_consumer" for g in out if g["type"] == "gap")
    assert box.stats.dropped_events == checker.gap_events > 0


def test_forget_drops_queued_data_and_position() -> None:
    box = Outbox(1 << 20)
    box.add(batch(T, 1, 5))
    box.forget(T)
    assert box.take() is None
    box.add(batch(T, 50, 1))  # no gap: the client no longer had a position
    assert [m["type"] for m in drain(box)] == ["events"]


def test_resume_of_a_channel_already_followed_does_not_rewind() -> None:
    from tickwire.server.catchup import _start
    from tickwire.server.hub import Subscriber

    box = Outbox(1 << 20)
    box.add(batch(T, 1, 3))
    drain(box)
    box.add(batch(T, 4, 2))
    sub = Subscriber(box, lambda: None)
    after = _start(sub, T, StreamPosition("e1", 3), ("e1", 20, 1), max_events=10)
    assert after == 5
    out = drain(box)
    assert seqs(out) == [4, 5] and [m for m in out if m["type"] == "gap"] == []


def test_last_sent_leaves_out_positions_that_were_claimed_not_sent() -> None:
    box = Outbox(1 << 20)
    box.expect(T, "e1", 41)  # a resume point
    box.expect(Q, "e1", 0)  # a subscription's start on a channel with nothing yet
    assert box.last_sent() == {}
    assert box.add(batch(T, 42, 2))
    assert box.last_sent() == {T: 43}
    box.gap(Q, 1, 5, "trimmed")  # the end of a gap is a seq the client was given
    assert box.last_sent() == {T: 43, Q: 5}
    box.forget(T)
    box.expect(T, "e1", 50)  # claimed again after an unsubscribe: not sent on this subscription
    assert box.last_sent() == {Q: 5}
    box.reset(Q, "e2", 0)  # a new epoch: nothing of it sent yet
    assert box.last_sent() == {}
    assert box.add(batch(Q, 1, 1, epoch="e2"))
    assert box.last_sent() == {Q: 1}
