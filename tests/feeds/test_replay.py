from __future__ import annotations

import io
import time
from pathlib import Path

import orjson
import pytest

from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.errors import ReplayError
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.replay import read_recording, record, replay, resolve_channels
from tickwire.feeds.runner import run_simulator
from tickwire.feeds.simulator import MarketSimulator, make_instruments

from .conftest import stored_events


def trade_line(ts: int, tid: int, sym: str = "BTC-USD") -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "type": "trade",
            "sym": sym,
            "ts": ts,
            "pt": 0,
            "price": 10.5,
            "size": 1,
            "side": "buy",
            "trade_id": tid,
        }
    )


async def test_record_then_replay_preserves_order_and_content(
    redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url)
    sim = MarketSimulator(make_instruments(3, 1), rate=50_000, seed=1)
    async with Publisher(cfg) as pub:
        report = await run_simulator(pub, sim, count=3000, throttle=False)
    assert report.events == 3000
    channels = await resolve_channels(redis, ["trades:*", "quotes:BTC-USD"])
    assert Channel.parse("quotes:BTC-USD") in channels
    assert all(c.kind == "trades" for c in channels if c.name != "quotes:BTC-USD")
    out = io.BytesIO()
    written = await record(redis, channels, out, page=100)
    path = tmp_path / "rec.ndjson"
    path.write_bytes(out.getvalue())
    before = {c: await stored_events(redis, c) for c in channels}
    assert written == sum(len(v) for v in before.values())

    await redis.execute("FLUSHALL")
    async with Publisher(cfg) as pub:
        sent = await replay(pub, path, speed=None)
    assert sent == written
    for c, old in before.items():
        new = await stored_events(redis, c)
        strip = ("pt", "epoch")
        assert [{k: v for k, v in e.items() if k not in strip} for e in new] == [
            {k: v for k, v in e.items() if k not in strip} for e in old
        ]


async def test_replay_keeps_spacing_scaled_by_speed(
    redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    path = tmp_path / "spaced.ndjson"
    # Three events 100 ms apart at venue time; at speed 10 they are due 10 ms apart.
    path.write_bytes(b"\n".join(trade_line(t * 100_000_000, t + 1) for t in range(3)) + b"\n")
    # The publish stamps on the replay's own clock, so each can be held against its due time.
    starts: list[float] = []

    def monotonic() -> float:
        now = time.monotonic()
        starts.append(now)
        return now

    cfg = PublisherConfig(redis_url=redis_server.url)
    async with Publisher(cfg, clock_ns=lambda: int(time.monotonic() * 1e9)) as pub:
        assert await replay(pub, path, speed=10, monotonic=monotonic) == 3
    events = await stored_events(redis, Channel.parse("trades:BTC-USD"))
    assert [e["trade_id"] for e in events] == [1, 2, 3]
    # Never early against the schedule (late is allowed: a busy machine), so the scaled spacing
    # holds from the start however late any one event went out.
    due_ns = [int((starts[0] + i * 0.010) * 1e9) for i in range(3)]
    assert all(e["pt"] >= due for e, due in zip(events, due_ns, strict=True)), [
        e["pt"] - due for e, due in zip(events, due_ns, strict=True)
    ]


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_bytes(trade_line(1, 1) + b"\n{oops\n" + trade_line(2, 2) + b"\n")
    with pytest.raises(ReplayError, match=r"bad.ndjson:2: not valid JSON") as info:
        list(read_recording(path))
    assert info.value.line == 2
    assert [e.fields["trade_id"] for e in read_recording(path, skip_bad=True)] == [1, 2]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b'{"type":"trade","ts":1}', "lacks"),
        (b'{"type":"nope","ts":1}', "unknown event type"),
        (b"[1]", "not a JSON object"),
        (trade_line(1, 1, sym="bad sym"), "invalid symbol"),
    ],
)
def test_replay_rejects_each_kind_of_bad_line(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "x.ndjson"
    path.write_bytes(line + b"\n")
    with pytest.raises(ReplayError, match=reason):
        list(read_recording(path))
