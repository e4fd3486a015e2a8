from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson
import pytest

from tests.conftest import eventually, timeout
from tickwire.bench.proxy import Proxy
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import Arg, RedisReplyError
from tickwire.core.config import PublisherConfig, RetentionConfig
from tickwire.core.errors import RedisUnavailable
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_pubsub import RedisSubscription
from tickwire.core.redis_wire import RedisConnection
from tickwire.core.stream import complete_body
from tickwire.feeds.publisher import APPEND_SHA, Publisher
from tickwire.feeds.store import APPEND_LUA
from tickwire.server.stored import FENCE_LUA

from .conftest import stored_events

CH = Channel.parse("trades:BTC-USD")


Section = tuple[list[Arg], list[Arg]]


def section(
    ch: Channel, first: int, prev: int, tag: str, n: int, tail: tuple[str, int] = ("", 0)
) -> Section:
    """One channel batch of an append call: its keys, and its head and bodies; bare, or with
    the tails of `tail` = (epoch, seq of the first body) as the publisher predicts them."""
    epoch, seq = tail
    out = bodies(tag, n)
    if seq:
        out = [complete_body(b, epoch, seq + i) for i, b in enumerate(out)]
    return [ch.stream_key, ch.meta_key], [1000, "", 0, first, prev, n, epoch, seq, *out]


def append_call(*sections: Section) -> list[Arg]:
    """The append script called directly (publisher id "pub", candidate epoch "ep")."""
    keys = [k for s in sections for k in s[0]]
    args = [a for s in sections for a in s[1]]
    return ["EVALSHA", APPEND_SHA, len(keys), *keys, "ep", "pub", "tw:live:0", *args]


def bodies(tag: str, n: int) -> list[bytes]:
    return [
        encode_body(
            "trade",
            CH.symbol,
            i,
            0,
            {"price": 1.5, "size": 1, "side": "buy", "trade_id": i, "tag": tag},
        )
        for i in range(n)
    ]


async def test_two_concurrent_publishers_keep_seq_dense_and_epoch_shared(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url, max_events_per_flush=50)
    async with Publisher(cfg) as a, Publisher(cfg) as b:

        async def feed(pub: Publisher, tag: str) -> None:
            for _ in range(20):
                await pub.publish({CH: bodies(tag, 37)})
                await asyncio.sleep(0)

        await asyncio.gather(feed(a, "a"), feed(b, "b"))
        await a.flush()
        await b.flush()
    events = await stored_events(redis, CH)
    assert [e["seq"] for e in events] == list(range(1, 2 * 20 * 37 + 1))
    assert len({e["epoch"] for e in events}) == 1
    # Each publisher's own events stay in the order it published them.
    for tag in "ab":
        ids = [e["trade_id"] for e in events if e["tag"] == tag]
        assert ids == list(range(37)) * 20
    assert await redis.execute("SMEMBERS", REGISTRY_KEY) == [b"trades:BTC-USD"]


async def test_seq_continues_after_publisher_restart(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url)
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("x", 5)})
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("y", 5)})
        await pub.flush()
        assert pub.positions[CH][1] == 10
    events = await stored_events(redis, CH)
    assert [e["seq"] for e in events] == list(range(1, 11))
    assert len({e["epoch"] for e in events}) == 1


async def test_epoch_changes_when_stream_deleted(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    epochs = iter(["first", "second", "third", "fourth"])
    async with Publisher(
        PublisherConfig(redis_url=redis_server.url), new_epoch=lambda: next(epochs)
    ) as pub:
        await pub.publish({CH: bodies("x", 3)})
        await pub.flush()
        assert pub.positions[CH] == ("first", 3)
        await redis.execute("DEL", CH.stream_key)
        await pub.publish({CH: bodies("x", 2)})
        await pub.flush()
    events = await stored_events(redis, CH)
    assert [(e["epoch"], e["seq"]) for e in events] == [("second", 1), ("second", 2)]


async def test_epoch_changes_after_redis_restart_without_persistence(
    fresh_redis: RedisProcess,
) -> None:
    async with Publisher(PublisherConfig(redis_url=fresh_redis.url, backoff_initial_s=0.01)) as pub:
        await pub.publish({CH: bodies("x", 3)})
        await pub.flush()
        before = pub.positions[CH]
        fresh_redis.kill()
        fresh_redis.wipe()
        fresh_redis.start()
        await pub.publish({CH: bodies("x", 2)})
        await pub.flush()
        after = pub.positions[CH]
    assert before[1] == 3 and after[1] == 2
    assert before[0] != after[0]


async def test_retention_keeps_at_least_maxlen_entries(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url, retention=RetentionConfig(trades=500))
    async with Publisher(cfg) as pub:
        for _ in range(20):
            await pub.publish({CH: bodies("x", 250)})
    length = await redis.execute("XLEN", CH.stream_key)
    assert 500 <= length < 5000
    first = await redis.execute("XRANGE", CH.stream_key, "-", "+", "COUNT", 1)
    assert first[0][0] == b"%d-0" % (5000 - length + 1)


async def test_publisher_reconnects_after_redis_killed_and_seq_stays_dense(
    fresh_redis: RedisProcess,
) -> None:
    cfg = PublisherConfig(redis_url=fresh_redis.url, backoff_initial_s=0.01, backoff_max_s=0.1)
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("x", 100)})
        await pub.flush()
        fresh_redis.kill()
        for _ in range(5):  # published while Redis is down: held, not lost
            await pub.publish({CH: bodies("y", 10)})
        fresh_redis.start()
        await asyncio.wait_for(pub.flush(), 10)
        assert pub.stats.dropped == 0
        assert pub.stats.reconnects >= 2
    conn = await RedisConnection.open(fresh_redis.url)
    events = await stored_events(conn, CH)
    conn.close()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(e["tag"] == "y" for e in events) == 50


async def test_publisher_drops_oldest_and_counts_when_redis_down_and_buffer_full() -> None:
    port = RedisProcess().port  # nothing listens there
    cfg = PublisherConfig(
        redis_url=f"redis://127.0.0.1:{port}/0",
        max_pending_events=100,
        backoff_initial_s=0.01,
        close_timeout_s=0.1,
    )
    pub = Publisher(cfg)
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        await pub.start()
    await pub.start(require_redis=False)
    try:
        for _ in range(5):
            await pub.publish({CH: bodies("x", 50)})
        assert pub.stats.dropped == 150
        assert pub.stats.published == 0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pub.flush(), 0.2)
    finally:
        await pub.close()


async def test_redis_rollback_starts_a_new_epoch_and_never_reuses_seqs(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({CH: bodies("x", 50)})
        await pub.flush()
        saved = [await redis.execute("DUMP", k) for k in (CH.stream_key, CH.meta_key)]
        await pub.publish({CH: bodies("y", 50)})
        await pub.flush()
        old_epoch = pub.positions[CH][0]
        # As if Redis crashed and its AOF kept only the first 50 events.
        for key, dump in zip((CH.stream_key, CH.meta_key), saved, strict=True):
            await redis.execute("RESTORE", key, 0, dump, "REPLACE")
        await pub.publish({CH: bodies("z", 5)})
        await pub.flush()
    events = await stored_events(redis, CH)
    assert [e["seq"] for e in events] == list(range(1, 56))
    assert {e["epoch"] for e in events[:50]} == {old_epoch}
    assert len({e["epoch"] for e in events[50:]} - {old_epoch}) == 1
    assert await redis.execute("HGET", CH.meta_key, "start") == b"51"


async def test_a_batch_written_again_after_its_reply_was_lost_is_stored_once(
    fresh_redis: RedisProcess,
) -> None:
    cfg = PublisherConfig(
        redis_url=fresh_redis.url, reply_timeout_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.1
    )
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("a", 10)})
        await pub.flush()
        fresh_redis.pause()
        try:
            # The kernel still accepts the writes (and new connections) of a stopped Redis: each
            # unanswered flush is written again on a new connection, and Redis later runs them all.
            await pub.publish({CH: bodies("b", 20)})
            await eventually(lambda: pub.stats.reconnects >= 3, "two flushes to time out")
        finally:
            fresh_redis.resume()
        await pub.publish({CH: bodies("c", 5)})
        await asyncio.wait_for(pub.flush(), 10)
    conn = await RedisConnection.open(fresh_redis.url)
    events = await stored_events(conn, CH)
    conn.close()
    assert [e["tag"] for e in events] == ["a"] * 10 + ["b"] * 20 + ["c"] * 5
    assert [e["seq"] for e in events] == list(range(1, 36))
    assert [e["trade_id"] for e in events[10:30]] == list(range(20))


async def test_two_publishers_numbering_their_own_batches_do_not_skip_each_other(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    cfg = PublisherConfig(redis_url=redis_server.url)
    async with Publisher(cfg) as p1, Publisher(cfg) as p2:
        assert p1.id != p2.id
        await p1.publish({CH: bodies("one", 3)})
        await p1.flush()
        await p2.publish({CH: bodies("two", 3)})  # same indices 1..3, another publisher
        await p2.flush()
    assert [e["tag"] for e in await stored_events(redis, CH)] == ["one"] * 3 + ["two"] * 3


async def test_a_publisher_idle_when_its_connection_is_reset_writes_on_a_new_one_once(
    fresh_redis: RedisProcess,
) -> None:
    # Idle, the publisher writes a batch itself (no flusher round trip): on a connection reset
    # in the meantime it must not write there, nor wait for a reply that cannot come.
    async with Proxy(fresh_redis.port) as proxy:
        cfg = PublisherConfig(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            reply_timeout_s=30,
            backoff_initial_s=0.01,
        )
        async with Publisher(cfg) as pub:
            await pub.publish({CH: bodies("a", 3)})
            await pub.flush()
            assert proxy.reset(refuse_new=False) == 1
            await eventually(lambda: not pub.connected, "the publisher to see the reset")
            await pub.publish({CH: bodies("b", 4)})
            await asyncio.wait_for(pub.flush(), timeout(5))
            assert pub.stats.reconnects == 2
    conn = await RedisConnection.open(fresh_redis.url)
    events = await stored_events(conn, CH)
    conn.close()
    assert [e["tag"] for e in events] == ["a"] * 3 + ["b"] * 4
    assert [e["seq"] for e in events] == list(range(1, 8))


async def test_a_flush_after_redis_lost_its_scripts_loads_them_and_stores_every_event(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    other = Channel.parse("trades:ETH-USD")
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({CH: bodies("a", 2), other: bodies("a", 2)})
        await pub.flush()
        await redis.execute("SCRIPT", "FLUSH")  # as after a restart: NOSCRIPT inside the EXEC
        await pub.publish({CH: bodies("b", 3), other: bodies("b", 1)})
        await pub.flush()
    assert [e["tag"] for e in await stored_events(redis, CH)] == ["a"] * 2 + ["b"] * 3
    assert [e["tag"] for e in await stored_events(redis, other)] == ["a"] * 2 + ["b"]


async def test_a_closed_publisher_leaves_no_mark_behind(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({CH: bodies("a", 3)})
        await pub.flush()
        mark = f"w:{pub.id}".encode()
        assert await redis.execute("HGET", CH.meta_key, mark) == b"3"
    assert await redis.execute("HEXISTS", CH.meta_key, mark) == 0
    assert await redis.execute("HGET", CH.meta_key, "seq") == b"3"


async def test_an_append_whose_predecessor_is_not_applied_is_refused_not_reordered(
    redis: RedisConnection,
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)

    def append(first: int, prev: int, tag: str, n: int) -> list[Arg]:
        return append_call(section(CH, first, prev, tag, n))

    await redis.execute(*append(1, 0, "a", 2))  # indices 1-2 applied
    # Indices 5-6 must follow 4, which never arrived (its flush failed): refused, nothing stored.
    with pytest.raises(RedisReplyError, match="TWBEHIND"):
        await redis.execute(*append(5, 4, "c", 2))
    assert [e["tag"] for e in await stored_events(redis, CH)] == ["a", "a"]
    # In order, both go in; 0 ("follows nothing", after a drop) is never refused.
    await redis.execute(*append(3, 2, "b", 2))
    await redis.execute(*append(5, 4, "c", 2))
    await redis.execute(*append(9, 0, "d", 1))
    tags = [e["tag"] for e in await stored_events(redis, CH)]
    assert tags == ["a", "a", "b", "b", "c", "c", "d"]


async def test_error_replies_with_flushes_in_flight_lose_and_reorder_nothing(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    other = Channel.parse("trades:ETH-USD")
    cfg = PublisherConfig(
        redis_url=redis_server.url, max_events_per_flush=50, backoff_initial_s=0.01,
        backoff_max_s=0.05, max_in_flight=2,
    )  # fmt: skip
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("a", 40), other: bodies("a", 40)})
        await pub.flush()
        # Redis refuses writes (OOM) while many small flushes are on their way.
        await redis.execute("CONFIG", "SET", "maxmemory", 1)
        try:
            for tag in "bcdef":
                await pub.publish({CH: bodies(tag, 30), other: bodies(tag, 20)})
            await eventually(lambda: "OOM" in (pub.stats.last_error or ""), "an OOM reply")
            assert pub.stats.published == 80
        finally:
            await redis.execute("CONFIG", "SET", "maxmemory", 0)
        await asyncio.wait_for(pub.flush(), 10)
        assert pub.stats.published == 80 + 5 * 50
    for channel, n in ((CH, 30), (other, 20)):
        events = await stored_events(redis, channel)
        assert [e["tag"] for e in events] == ["a"] * 40 + [t for t in "bcdef" for _ in range(n)]
        assert [e["seq"] for e in events] == list(range(1, 41 + 5 * n))


async def test_predicted_tails_are_stored_when_right_and_rewritten_when_wrong(
    redis: RedisConnection,
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)

    async def append(first: int, tag: str, n: int, tail: tuple[str, int]) -> None:
        await redis.execute(*append_call(section(CH, first, first - 1, tag, n, tail)))

    await append(1, "a", 2, ("ep", 1))  # a new epoch ("ep"): 1-2
    await append(3, "b", 2, ("ep", 3))  # right: 3-4
    await append(5, "c", 3, ("ep", 98))  # seq wrong, and one digit longer each: 5-7
    await append(8, "d", 1, ("old", 8))  # epoch wrong: 8
    # A retry of indices 8-10 (8 was applied, its reply lost): 9-10 go in, once, as predicted...
    await redis.execute(*append_call(section(CH, 8, 7, "e", 3, ("ep", 8))))
    # ...or not: a retry of 10-12 predicted from a stale position.
    await redis.execute(*append_call(section(CH, 10, 9, "f", 3, ("ep", 4))))
    events = await stored_events(redis, CH)
    assert [(e["tag"], e["seq"], e["epoch"]) for e in events] == [
        *((t, i + 1, "ep") for i, t in enumerate("aabbcccdee")),
        ("f", 11, "ep"),
        ("f", 12, "ep"),
    ]


async def test_seqs_past_ten_to_the_fourteen_stay_integers_in_ids_bodies_and_pushes(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    # Lua writes numbers with "%.14g": 10**14 would become "1e+14" wherever the script turned a
    # seq into text itself.
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)
    big = 10**14 - 1
    first = complete_body(bodies("a", 1)[0], "ep", big)
    await redis.execute("XADD", CH.stream_key, f"{big}-0", "d", first)
    await redis.execute("HSET", CH.meta_key, "epoch", "ep", "seq", big, "start", 1)
    sub = await RedisSubscription.open(redis_server.url, ["tw:live:0"])
    try:
        await redis.execute(*append_call(section(CH, 1, 0, "b", 2)))  # tails built in Lua
        await redis.execute(*append_call(section(CH, 3, 2, "c", 1, ("ep", big + 3))))  # as sent
        await redis.execute(*append_call(section(CH, 4, 3, "d", 1, ("ep", 5))))  # rewritten
        messages: list[Any] = []
        while len(messages) < 3:
            assert await sub.wait(5.0), "pushes missing"
            messages += sub.take()
    finally:
        sub.close()
    events = await stored_events(redis, CH)  # checks each entry ID against its body's seq
    assert [(e["tag"], e["seq"]) for e in events] == [
        ("a", big),
        ("b", big + 1),
        ("b", big + 2),
        ("c", big + 3),
        ("d", big + 4),
    ]
    assert all(isinstance(e["seq"], int) for e in events)
    heads = [m[2].split(b"\n")[0].split(b" ")[2] for m in messages]
    assert heads == [b"%d" % (big + 1), b"%d" % (big + 3), b"%d" % (big + 4)]


async def test_a_call_with_one_batch_out_of_order_writes_none_of_its_batches(
    redis: RedisConnection,
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)
    other = Channel.parse("quotes:BTC-USD")

    await redis.execute(*append_call(section(CH, 1, 0, "a", 2)))
    # `other` may start (follows nothing), but CH's batch must follow index 4, never applied.
    with pytest.raises(RedisReplyError, match="TWBEHIND"):
        await redis.execute(*append_call(section(other, 1, 0, "x", 1), section(CH, 5, 4, "c", 1)))
    assert await stored_events(redis, other) == []
    reply = await redis.execute(
        *append_call(section(other, 1, 0, "x", 1), section(CH, 3, 2, "b", 1))
    )
    # Bare bodies predict nothing: each batch answers (its place, epoch, last seq).
    assert [int(x) for x in reply[::3]] == [1, 2]
    assert [int(x) for x in reply[2::3]] == [1, 3]
    assert [e["tag"] for e in await stored_events(redis, CH)] == ["a", "a", "b"]


async def test_the_append_answers_only_the_batches_that_did_not_end_where_their_tails_said(
    redis: RedisConnection,
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)
    other = Channel.parse("quotes:BTC-USD")
    await redis.execute(*append_call(section(CH, 1, 0, "a", 2), section(other, 1, 0, "x", 1)))
    # Both predicted right (CH's seqs 3-4, other's 2): nothing to answer.
    reply = await redis.execute(
        *append_call(section(CH, 3, 2, "b", 2, ("ep", 3)), section(other, 2, 1, "y", 1, ("ep", 2)))
    )
    assert reply == []
    # The second batch predicts seq 9 where 3 comes: it alone answers, with where it ended.
    reply = await redis.execute(
        *append_call(section(CH, 5, 4, "c", 1, ("ep", 5)), section(other, 3, 2, "z", 1, ("ep", 9)))
    )
    assert reply == [2, b"ep", 3]
    # Numbers framed with leading zeros (as the publisher sends them) read the same.
    keys, args = section(CH, 6, 5, "d", 1, ("ep", 6))
    padded = [b"%016d" % a if isinstance(a, int) and i else a for i, a in enumerate(args)]
    assert await redis.execute(*append_call((keys, padded))) == []
    assert [e["seq"] for e in await stored_events(redis, CH)] == [1, 2, 3, 4, 5, 6]
    assert [e["tag"] for e in await stored_events(redis, other)] == ["x", "y", "z"]


async def test_a_flush_is_one_append_and_one_push_or_one_per_symbol_for_cluster(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    symbols = ["BTC-USD", "ETH-USD", "AAPL"]
    channels = [Channel.parse(f"{k}:{s}") for s in symbols for k in ("trades", "quotes")]
    for per_symbol, calls in ((False, 1), (True, 3)):
        await redis.execute("FLUSHALL")
        sub = await RedisSubscription.open(redis_server.url, ["tw:live:0"])
        try:
            cfg = PublisherConfig(redis_url=redis_server.url, one_call_per_symbol=per_symbol)
            async with Publisher(cfg) as pub:
                await redis.execute("SCRIPT", "LOAD", APPEND_LUA)  # no NOSCRIPT round to count
                await redis.execute("CONFIG", "RESETSTAT")
                await pub.publish({c: bodies(c.kind, i + 1) for i, c in enumerate(channels)})
                await pub.flush()
            stats = (await redis.execute("INFO", "commandstats")).decode()
            assert f"cmdstat_evalsha:calls={calls}," in stats
            messages: list[Any] = []
            while len(messages) < calls:
                assert await sub.wait(5.0), "pushes missing"
                messages += sub.take()
        finally:
            sub.close()
        # Every batch arrived in the pushes, with its seqs, exactly as it was stored.
        lines = b"\n".join(m[2] for m in messages).split(b"\n")
        pushed: dict[str, list[bytes]] = {}
        while lines:
            key, _epoch, first, n = lines[0].split(b" ")
            pushed[key.decode()] = lines[1 : 1 + int(n)]
            assert int(first) == 1
            del lines[: 1 + int(n)]
        for i, c in enumerate(channels):
            stored = await redis.execute("XRANGE", c.stream_key, "-", "+")
            assert pushed[c.stream_key] == [fields[1] for _, fields in stored]
            assert len(stored) == i + 1


async def test_events_acknowledged_then_lost_by_redis_do_not_hold_the_channel_back(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    # A crash (an AOF losing its last second) takes events Redis had acknowledged, and a server
    # that read them fences the channel into a new epoch before this publisher writes again. Its
    # next batch follows one Redis no longer has: refused with TWBEHIND, it would wait for ever.
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({CH: bodies("kept", 2)})
        await pub.publish({CH: bodies("lost", 3)})
        await pub.flush()
        old_epoch = pub.positions[CH].epoch
        # The stream and meta as the AOF had them two events earlier (XDEL would leave the
        # stream's last ID at 5-0; a reloaded AOF does not).
        kept = await redis.execute("XRANGE", CH.stream_key, "-", "2-0")
        await redis.pipeline(
            [
                ["DEL", CH.stream_key],
                *(["XADD", CH.stream_key, entry_id, *fields] for entry_id, fields in kept),
                ["HSET", CH.meta_key, "seq", 2, f"w:{pub.id}", 2],
                ["EVAL", FENCE_LUA, 1, CH.meta_key, old_epoch, 5, "fenced000000"],
            ]
        )
        await pub.publish({CH: bodies("after", 2)})
        await asyncio.wait_for(pub.flush(), timeout(5))
    events = await stored_events(redis, CH)
    assert [(e["tag"], e["epoch"], e["seq"]) for e in events] == [
        ("kept", old_epoch, 1),
        ("kept", old_epoch, 2),
        ("after", "fenced000000", 3),
        ("after", "fenced000000", 4),
    ]


async def test_a_stream_of_another_type_refuses_its_batch_alone(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)
    other = Channel.parse("quotes:BTC-USD")
    await redis.execute(*append_call(section(CH, 1, 0, "a", 2)))
    await redis.execute("DEL", CH.stream_key)
    await redis.execute("SET", CH.stream_key, "someone else's")
    sub = await RedisSubscription.open(redis_server.url, ["tw:live:0"])
    try:
        reply = await redis.execute(
            *append_call(section(CH, 3, 2, "b", 2), section(other, 1, 0, "x", 1))
        )
        assert await sub.wait(5.0), "push missing"
        (push,) = sub.take()
    finally:
        sub.close()
    assert reply[:2] == [-1, b"WRONGTYPE Operation against a key holding the wrong kind of value"]
    assert reply[2:] == [0, 2, b"ep", 1]
    assert await redis.execute("GET", CH.stream_key) == b"someone else's"
    assert [e["tag"] for e in await stored_events(redis, other)] == ["x"]
    assert push[2].split(b"\n")[0] == b"%s ep 1 1" % other.stream_key.encode()
    # A batch behind the refused one does not wait for it (TWBEHIND), and is refused too.
    reply = await redis.execute(*append_call(section(CH, 5, 4, "c", 1)))
    assert reply == [-1, b"WRONGTYPE %s holds a string, not a stream" % CH.stream_key.encode(), 0]


async def test_a_stream_whose_meta_was_deleted_goes_on_after_its_last_id(
    redis: RedisConnection,
) -> None:
    await redis.execute("SCRIPT", "LOAD", APPEND_LUA)
    await redis.execute(*append_call(section(CH, 1, 0, "a", 3)))
    await redis.execute("DEL", CH.meta_key)
    reply = await redis.execute(*append_call(section(CH, 4, 3, "b", 2)))
    assert reply == [1, b"ep", 5]
    assert [(e["tag"], e["seq"]) for e in await stored_events(redis, CH)] == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 4), ("b", 5),
    ]  # fmt: skip
    assert await redis.execute("HGET", CH.meta_key, "start") == b"4"


@pytest.mark.parametrize("key", ["stream", "meta"])
async def test_a_channel_whose_keys_someone_overwrote_holds_back_no_other(
    redis: RedisConnection, redis_server: RedisProcess, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = Channel.parse("quotes:BTC-USD")
    bad = CH.stream_key if key == "stream" else CH.meta_key
    cfg = PublisherConfig(redis_url=redis_server.url, max_events_per_flush=30, max_in_flight=2)
    async with Publisher(cfg) as pub:
        await pub.publish({CH: bodies("a", 5), other: bodies("a", 5)})
        await pub.flush()
        await redis.execute("DEL", bad)
        await redis.execute("SET", bad, "someone else's")
        # Many small flushes in flight: later batches of CH are refused too, not TWBEHIND.
        for tag in "bcdefg":
            await pub.publish({CH: bodies(tag, 10), other: bodies(tag, 10)})
        await asyncio.wait_for(pub.flush(), timeout(10))
        assert pub.stats.refused == 60
        assert pub.stats.published == 10 + 60
        refusals = [r for r in caplog.records if "Redis refused the events of" in r.message]
        assert len(refusals) == 1 and CH.name in refusals[0].message
        # Fixed: the channel stores again, in a new epoch when its history is gone.
        await redis.execute("DEL", bad)
        await pub.publish({CH: bodies("h", 3)})
        await asyncio.wait_for(pub.flush(), timeout(10))
        assert pub.stats.refused == 60 and pub.stats.published == 73
        assert any("stores the events of trades:BTC-USD again" in r.message for r in caplog.records)
    assert [e["tag"] for e in await stored_events(redis, other)] == list("a" * 5) + [
        t for t in "bcdefg" for _ in range(10)
    ]
    assert [e["seq"] for e in await stored_events(redis, other)] == list(range(1, 66))
    mine = await stored_events(redis, CH)
    assert [e["tag"] for e in mine][-3:] == ["h", "h", "h"]
    assert len({e["epoch"] for e in mine[-3:]}) == 1


@pytest.mark.parametrize(
    "edit",
    [
        ["HSET", CH.meta_key, "seq", "abc"],
        ["HSET", CH.meta_key, "start", "1.5e"],
        ["HSET", CH.meta_key, "epoch", "not ours"],
        ["HSET", CH.meta_key, f"w:{'{id}'}", "x"],
        ["XADD", CH.stream_key, "100", "d", "someone else's entry"],
    ],
    ids=["meta seq", "meta start", "meta epoch", "publisher mark", "entry past the meta"],
)
async def test_a_channel_someone_wrote_into_goes_on_in_a_new_epoch_holding_back_no_other(
    redis: RedisConnection, redis_server: RedisProcess, edit: list[str]
) -> None:
    # Not what the append script writes: a Lua error (a number compared with nil) or XADD's
    # "ID equal or smaller" failed every call, and so held back every channel of the publisher.
    other = Channel.parse("quotes:BTC-USD")
    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({CH: bodies("a", 3), other: bodies("a", 3)})
        await pub.flush()
        before = pub.positions[CH].epoch
        await redis.execute(*(part.replace("{id}", pub.id) for part in edit))
        await pub.publish({CH: bodies("b", 2), other: bodies("b", 2)})
        await asyncio.wait_for(pub.flush(), timeout(5))
        assert pub.stats.refused == 0 and pub.stats.published == 10
    entries = await redis.execute("XRANGE", CH.stream_key, "-", "+")
    mine = [orjson.loads(f[1]) for _, f in entries if f[1].startswith(b"{")]
    after = [e for e in mine if e["tag"] == "b"]
    assert [e["tag"] for e in mine] == ["a", "a", "a", "b", "b"]
    assert len({e["epoch"] for e in after}) == 1
    if edit[1] == CH.meta_key and edit[2].startswith("w:"):
        # Its own mark unreadable: as if it had applied nothing there; the epoch holds.
        assert after[0]["epoch"] == before
        assert [e["seq"] for e in after] == [4, 5]
    else:
        # A new epoch, after the stream's last entry.
        assert after[0]["epoch"] != before
        last = 100 if edit[0] == "XADD" else 3
        assert [e["seq"] for e in after] == [last + 1, last + 2]
    assert [e["seq"] for e in await stored_events(redis, other)] == [1, 2, 3, 4, 5]


async def test_publishing_while_the_publisher_closes_crosses_no_replies(
    redis: RedisConnection, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer that goes on publishing while `close` runs (an exception unwinding past the
    publisher, say): the flusher's writes and the close's own (dropping the publisher's marks)
    must not share the connection, whose replies went to the wrong caller (an HDEL's taken for
    an append's: TypeError). What is published once the close has begun is not written, and
    is logged."""
    run = secrets.token_hex(4).upper()  # (the Redis is shared; the test runs on two loops)
    channels = [Channel("trades", f"CLOSE{i}-{run}") for i in range(20)]

    class Racing(Publisher):
        async def _forget_marks(self) -> None:
            # The producer's publish lands just as the close writes.
            await self.publish({c: bodies("late", 1) for c in channels})
            await super()._forget_marks()

    pub = Racing(PublisherConfig(redis_url=redis_server.url))
    await pub.start()
    await pub.publish({c: bodies("a", 1) for c in channels})
    await asyncio.wait_for(pub.close(), 10)
    assert "closing with 20 events not yet written" in caplog.text
    for channel in channels:
        assert [e["tag"] for e in await stored_events(redis, channel)] == ["a"]
        assert await redis.execute("HEXISTS", channel.meta_key, f"w:{pub.id}") == 0
