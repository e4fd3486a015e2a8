"""The live path: pushed appends, and the stream reads that cover whatever a push cannot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import complete_body
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import Recorder, recorder, server_config
from .test_faults import E, T, trades_of

Setup = tuple[TickwireServer, Recorder, Publisher]


@pytest.fixture
async def setup(redis_server: RedisProcess, redis: RedisConnection) -> AsyncIterator[Setup]:
    """A server, a client of it and a publisher, on an emptied Redis."""
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        recorder(srv.url) as c,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        yield srv, c, pub


async def test_a_killed_subscription_loses_nothing_the_streams_kept(
    setup: Setup, redis: RedisConnection
) -> None:
    _, c, pub = setup
    await c.request("subscribe", channels=[T.name])
    await pub.publish({T: trades_of(T, 0, 20)})
    await c.wait_until(lambda: c.last_seq(T.name) == 20)
    for round_ in range(3):
        # The server's subscription goes (as when Redis drops a subscriber that fell past
        # its output buffer limit) while events keep coming.
        await redis.execute("CLIENT", "KILL", "TYPE", "pubsub")
        for i in range(5):
            await pub.publish({T: trades_of(T, 20 + 50 * round_ + 10 * i, 10)})
        await pub.flush()
        await c.wait_until(lambda r=round_: c.last_seq(T.name) == 70 + 50 * r, timeout=15)  # type: ignore[misc]
        if round_ == 0:
            # Redis never went away: the first reconnect is not announced as an outage...
            assert c.of_type("status") == []
    # ... but one within QUIET_RETRY_EVERY_S of it is (a connection that keeps dropping).
    await c.wait_for(lambda m: m == {"type": "status", "redis": "up"}, timeout=10)
    assert c.checker.ok, c.checker.violations
    assert [e["seq"] for e in c.events(T.name)] == list(range(1, 171))
    assert [e["trade_id"] for e in c.events(T.name)] == list(range(170))


async def test_pauses_after_every_fan_out_still_deliver_everything_in_order(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # Every fan-out counts as costly: the reader pauses ten times as long after each one.
    cfg = replace(
        server_config(redis_server),
        fanout_pause_after_ms=0,
        fanout_pause_busy=0,
        fanout_pause_ratio=10,
    )
    async with (
        TickwireServer(cfg) as srv,
        recorder(srv.url) as c,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        await c.request("subscribe", channels=[T.name, E.name])
        for i in range(40):
            await pub.publish({T: trades_of(T, 5 * i, 5), E: trades_of(E, 3 * i, 3)})
        await c.wait_until(lambda: c.last_seq(T.name) == 200 and c.last_seq(E.name) == 120)
        assert [e["seq"] for e in c.events(T.name)] == list(range(1, 201))
        assert [e["seq"] for e in c.events(E.name)] == list(range(1, 121))
        assert c.checker.ok, c.checker.violations
        assert srv.metrics.fanout_pauses > 0 and srv.metrics.fanout_pause_seconds > 0


async def test_an_append_that_is_not_pushed_still_arrives(
    setup: Setup, redis: RedisConnection
) -> None:
    _, c, pub = setup
    await c.request("subscribe", channels=[T.name])
    await pub.publish({T: trades_of(T, 0, 3)})
    await c.wait_until(lambda: c.last_seq(T.name) == 3)
    # A writer that stores the next event the way the append does but pushes nothing (an
    # older publisher, a hand repair): the reader finds its stored seq past what it read, and reads the stream.
    epoch = pub.positions[T][0]
    body = complete_body(trades_of(T, 3, 1)[0], epoch, 4)
    await redis.pipeline([["XADD", T.stream_key, "4-0", "d", body], ["HSET", T.meta_key, "seq", 4]])
    await c.wait_until(lambda: c.last_seq(T.name) == 4)
    # Pushed appends carry on after it, with no duplicate.
    await pub.publish({T: trades_of(T, 4, 2)})
    await c.wait_until(lambda: c.last_seq(T.name) == 6)
    assert [e["seq"] for e in c.events(T.name)] == [1, 2, 3, 4, 5, 6]
    assert c.checker.ok, c.checker.violations


async def test_events_published_right_after_the_ack_arrive_on_a_channel_new_to_the_server(
    setup: Setup,
) -> None:
    srv, busy, pub = setup
    # The server already follows one channel and has a position on it.
    await busy.request("subscribe", channels=[E.name])
    await pub.publish({E: trades_of(E, 0, 5), T: trades_of(T, 0, 5)})
    await busy.wait_until(lambda: busy.last_seq(E.name) == 5)
    # A plain subscribe to a channel it does not follow yet: everything published once the
    # client holds the ack reaches it, however late the reader starts following.
    for round_ in range(5):
        other = recorder(srv.url)
        async with other as late:
            await late.request("subscribe", channels=[T.name])
            start = 5 + 10 * round_
            await pub.publish({T: trades_of(T, start, 10)})
            end = start + 10
            await late.wait_until(lambda: late.last_seq(T.name) == end)  # noqa: B023
            assert [e["seq"] for e in late.events(T.name)][:10] == list(
                range(start + 1, start + 11)
            )
            assert late.checker.ok, late.checker.violations
