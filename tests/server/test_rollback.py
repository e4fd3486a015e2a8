"""A channel whose stored tail Redis lost (a failover to a lagging replica, an AOF crash) gets a
new epoch from the server that read the lost events: nobody reuses their seqs."""

from __future__ import annotations

from tickwire.core.channels import Channel
from tickwire.core.commands import Arg
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

T = Channel.parse("trades:BTC-USD")


def trades(tag: str, n: int) -> list[bytes]:
    return [
        encode_body(
            "trade",
            T.symbol,
            i,
            0,
            {"price": 1.0, "size": 1, "side": "buy", "trade_id": i, "tag": tag},
        )
        for i in range(n)
    ]


async def test_a_lost_tail_is_fenced_with_a_new_epoch_and_a_fresh_publisher_continues_it(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with TickwireServer(server_config(redis_server)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=[T.name])
        async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
            await pub.publish({T: trades("kept", 7) + trades("lost", 3)})
        await rec.wait_until(lambda: rec.last_seq(T.name) == 10)
        first_epoch = rec.events(T.name)[0]["epoch"]
        # What a promoted replica that lacked the last three appends holds.
        kept = await redis.execute("XRANGE", T.stream_key, "-", "7-0")
        commands: list[list[Arg]] = [["DEL", T.stream_key], ["HSET", T.meta_key, "seq", 7]]
        commands += [["XADD", T.stream_key, entry_id, *fields] for entry_id, fields in kept]
        await redis.pipeline(commands)
        # The client hears of it at once, not with the channel's next event (none comes yet).
        reset = await rec.wait_for(lambda m: m.get("type") == "reset")
        assert srv.metrics.rollbacks_fenced == 1
        # A publisher with no memory of seqs 8-10 appends after the meta it finds.
        async with Publisher(PublisherConfig(redis_url=redis_server.url)) as fresh:
            await fresh.publish({T: trades("after", 3)})
        await rec.wait_until(lambda: sum(e["tag"] == "after" for e in rec.events(T.name)) == 3)
    events = rec.events(T.name)
    assert [(e["tag"], e["seq"]) for e in events] == [("kept", s) for s in range(1, 8)] + [
        ("lost", 8),
        ("lost", 9),
        ("lost", 10),
        ("after", 8),
        ("after", 9),
        ("after", 10),
    ]
    second_epoch = events[-1]["epoch"]
    assert second_epoch != first_epoch
    assert rec.of_type("reset") == [reset]
    assert reset["ch"] == T.name and reset["epoch"] == second_epoch
    assert not rec.checker.violations
    meta = await redis.execute("HMGET", T.meta_key, "epoch", "start")
    assert meta == [second_epoch.encode(), b"8"]
