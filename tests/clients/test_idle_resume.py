"""Resume of channels that were idle since the subscribe: the `subscribed` ack's positions.

A channel that had no event since the client subscribed has no delivered position; without the
ack's, a reconnect would subscribe again "from now" and silently skip what was published while
the client was away.
"""

from __future__ import annotations

from tickwire.clients import Gap, connect
from tickwire.core.channels import Channel
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server.app import TickwireServer

from .test_integration import (
    AAA,
    BBB,
    Collector,
    TcpProxy,
    fast_backoff,
    publish,
    publisher,
    server_config,
    wait_known,
)

NEW = Channel.parse("trades:NEW")


async def test_idle_channel_resumes_after_a_server_restart(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with publisher(redis_server) as pub:
        await publish(pub, AAA, 105)  # seqs 1..105, before the subscribe
        first = TickwireServer(server_config(redis_server))
        await first.start()
        async with TcpProxy(first.port) as proxy, connect(proxy.url, **fast_backoff()) as feed:
            got = Collector(feed)
            ack = await feed.subscribe(AAA.name)
            assert ack.positions[AAA.name].seq == 105  # idle: no event follows the ack
            await first.close()
            await publish(pub, AAA, 105, 105)  # seqs 106..210 while no server runs
            async with TickwireServer(server_config(redis_server)) as second:
                proxy.target_port = second.port
                await got.wait(lambda: got.last(AAA) == 210)
                await publish(pub, AAA, 5, 210)
                await got.wait(lambda: got.last(AAA) == 215)
            await got.stop()
    assert got.only_seqs(AAA) == list(range(106, 216))
    assert got.gaps == [] and got.resets == []


async def test_idle_channels_under_a_wildcard_resume_after_a_cut_connection(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, AAA, 10)
        await publish(pub, BBB, 3)
        await wait_known(feed, [AAA, BBB])
        got = Collector(feed)
        ack = await feed.subscribe("trades:*")
        assert {ch: p.seq for ch, p in ack.positions.items()} == {AAA.name: 10, BBB.name: 3}
        proxy.refuse = True
        assert proxy.cut() == 1
        await publish(pub, AAA, 20, 10)  # 11..30 while away
        await publish(pub, BBB, 4, 3)  # 4..7
        proxy.refuse = False
        await got.wait(lambda: got.last(AAA) == 30 and got.last(BBB) == 7)
        await got.stop()
    assert got.only_seqs(AAA) == list(range(11, 31))
    assert got.only_seqs(BBB) == list(range(4, 8))
    assert got.gaps == [] and got.resets == []


async def test_channel_with_no_stream_yet_gets_all_of_its_first_events_after_a_cut(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        got = Collector(feed)
        ack = await feed.subscribe(NEW.name)
        assert ack.positions[NEW.name].seq == 0 and ack.positions[NEW.name].epoch == ""
        proxy.refuse = True
        assert proxy.cut() == 1
        await publish(pub, NEW, 12)  # the channel's very first events, while away
        proxy.refuse = False
        await got.wait(lambda: got.last(NEW) == 12)
        await got.stop()
    assert got.only_seqs(NEW) == list(range(1, 13))
    assert got.gaps == [] and got.resets == []


async def test_idle_channel_trimmed_while_away_gets_the_exact_gap(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        TcpProxy(srv.port) as proxy,
        publisher(redis_server) as pub,
        connect(proxy.url, **fast_backoff()) as feed,
    ):
        await publish(pub, AAA, 50)
        got = Collector(feed)
        await feed.subscribe(AAA.name)
        proxy.refuse = True
        assert proxy.cut() == 1
        await publish(pub, AAA, 150, 50)  # 51..200
        await redis.execute("XTRIM", AAA.stream_key, "MAXLEN", "20")  # keep 181..200
        proxy.refuse = False
        await got.wait(lambda: got.last(AAA) == 200)
        await got.stop()
    assert got.gaps == [Gap(AAA.name, 51, 180, "trimmed")]
    assert got.only_seqs(AAA) == list(range(181, 201))
