"""Keys under tickwire's names that someone else wrote (by hand, another program): the server
serves every other channel on, and the channel itself once its key is put right."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import eventually
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

GOOD = Channel.parse("quotes:AAA")
STRING_STREAM = Channel.parse("quotes:CCC")
STRING_META = Channel.parse("quotes:EEE")


def quote(symbol: str, ts: int) -> bytes:
    fields = {"bid": 1.0, "ask": 2.0, "bid_size": 1.0, "ask_size": 1.0}
    return encode_body("quote", symbol, ts, ts, fields)


async def test_a_key_of_another_type_holds_back_no_other_channel(
    redis_server: RedisProcess, redis: RedisConnection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
        recorder(srv.url) as rec,
    ):
        await rec.request("subscribe", channels=["quotes:*"])
        await pub.publish({GOOD: [quote("AAA", 1)]})
        await rec.wait_for(lambda m: m.get("ch") == GOOD.name)
        # A stream key and a meta key that hold strings, for channels in the registry: the
        # server's XREAD naming the first, and its meta read of the second, were refused
        # whole, and it reconnected in a loop (status down, every channel stalled).
        await redis.pipeline(
            [
                ["SET", STRING_STREAM.stream_key, "someone else's"],
                ["SET", STRING_META.meta_key, "someone else's"],
                ["SADD", REGISTRY_KEY, STRING_STREAM.name, STRING_META.name],
            ]
        )

        def warned(*words: str) -> bool:
            return any(all(w in r.getMessage() for w in words) for r in caplog.records)

        await eventually(
            lambda: (
                warned("holds a string", STRING_STREAM.stream_key)
                and warned("not ones tickwire writes", STRING_META.meta_key)
            ),
            "the server to find both keys",
        )
        for ts in range(2, 40):
            await pub.publish({GOOD: [quote("AAA", ts)]})
            await pub.flush()
        await rec.wait_until(lambda: rec.last_seq(GOOD.name) == 39)
        assert [e["seq"] for e in rec.events(GOOD.name)] == list(range(1, 40))
        assert not rec.of_type("status"), "the server took a foreign key for Redis down"
        assert srv.health()["status"] == "ok"
        # Put right, the channel is read again (within `meta_recheck_s`) and served.
        await redis.execute("DEL", STRING_STREAM.stream_key, STRING_META.meta_key)
        await pub.publish({STRING_STREAM: [quote("CCC", 1)], STRING_META: [quote("EEE", 1)]})
        await pub.flush()
        await rec.wait_until(
            lambda: rec.last_seq(STRING_STREAM.name) == 1 and rec.last_seq(STRING_META.name) == 1
        )


async def test_a_stream_key_of_another_type_holds_back_no_catch_up_of_the_same_client(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with (
        TickwireServer(server_config(redis_server)) as srv,
        Publisher(PublisherConfig(redis_url=redis_server.url)) as pub,
    ):
        await pub.publish({GOOD: [quote("AAA", 1)], STRING_STREAM: [quote("CCC", 1)]})
        await pub.flush()
        await redis.execute("DEL", STRING_STREAM.stream_key)
        await redis.execute("SET", STRING_STREAM.stream_key, "someone else's")
        async with recorder(srv.url) as rec:
            # Its snapshot read (XRANGE) was refused and retried for ever, and the client's
            # catch-up, one channel at a time, served nothing after it: no ack of its next
            # subscribe, no snapshot of the other channel.
            first = await rec.request("subscribe", channels=[STRING_STREAM.name], snapshot=True)
            assert first["type"] == "subscribed"
            then = await rec.request("subscribe", channels=[GOOD.name], snapshot=True)
            assert then["type"] == "subscribed"
            await rec.wait_until(lambda: rec.last_seq(GOOD.name) == 1)
            await pub.publish({GOOD: [quote("AAA", 2)]})
            await rec.wait_until(lambda: rec.last_seq(GOOD.name) == 2)
            assert not rec.events(STRING_STREAM.name)
            # Put right, it is served too: its next append starts a new epoch (its meta
            # says seq 1, its stream is gone), announced by a reset.
            await redis.execute("DEL", STRING_STREAM.stream_key)
            await pub.publish({STRING_STREAM: [quote("CCC", 2)]})
            await rec.wait_until(lambda: bool(rec.events(STRING_STREAM.name)))
