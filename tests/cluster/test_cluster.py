"""Redis Cluster found by itself: appends per slot, live pushes per shard, reads per slot."""

from __future__ import annotations

import asyncio
import functools
import io
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.feeds.test_bar_maker import publish_trades as bar_trades
from tests.server.conftest import Recorder, recorder
from tickwire.core.channels import Channel
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster, redis_cli
from tickwire.core.redis_pubsub import SubscriptionGroup
from tickwire.core.redis_slots import key_slot
from tickwire.core.redis_target import RedisTarget, RedisTopology, open_redis
from tickwire.core.stream import parse_push
from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.replay import record, replay, resolve_channels
from tickwire.server.app import TickwireServer

from .conftest import (
    publish_trades,
    publisher_config,
    server_config,
    stored,
    symbols_on_each_master,
    trade,
    until,
)

pytestmark = pytest.mark.uvloop_only


def _reached(rec: Recorder, channel: str, seq: int) -> bool:
    return rec.last_seq(channel) == seq


async def test_any_node_or_several_seeds_find_the_cluster(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    replica = cluster.replica_of(cluster.masters()[0])
    for url in (cluster.url, f"redis://127.0.0.1:{replica.port}/0", cluster.seeds_url):
        conn = await open_redis(url)
        try:
            assert isinstance(conn, ClusterConnection)
            assert conn.slots.masters == cluster_conn.slots.masters
            # Keys of every slot, in one pipeline: each goes to its owner.
            replies = await conn.pipeline([["SET", f"k{i}", i] for i in range(50)])
            assert replies == [b"OK"] * 50
            assert await conn.execute("GET", "k42") == b"42"
        finally:
            conn.close()
    assert len(RedisTarget.parse(cluster.seeds_url).seeds) == len(cluster.nodes)


async def test_streams_spread_over_every_master_and_clients_get_every_event_in_order(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 3)
    async with TickwireServer(server_config(cluster.url)) as srv, recorder(srv.url) as rec:
        ack = await rec.request("subscribe", channels=["trades:*"])
        assert ack["type"] == "subscribed"
        async with Publisher(publisher_config(cluster.url)) as pub:
            await publish_trades(pub, symbols, 200)
        await rec.wait_until(
            lambda: all(rec.last_seq(f"trades:{s}") == 200 for s in symbols), timeout=20
        )
        assert not rec.checker.violations
        assert rec.checker.duplicates == 0 and rec.checker.lost == 0
        assert srv.metrics.deliveries > 0
    for s in symbols:
        ch = Channel("trades", s)
        events = await stored(cluster_conn, ch)
        assert sorted(seq for _, seq in events) == list(range(1, 201))
    # Every master holds streams: count each master's keys directly.
    per_master = [int(n) for n in await cluster_conn.execute_on_all("DBSIZE")]
    assert all(n >= 6 for n in per_master), per_master  # 3 symbols x (stream + meta) each


async def test_a_wildcard_picks_up_a_new_symbol_on_any_shard(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    async with TickwireServer(server_config(cluster.url)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=["trades:*"])
        symbols = symbols_on_each_master(cluster_conn, 1)
        async with Publisher(publisher_config(cluster.url)) as pub:
            for s in symbols:
                # One symbol at a time: each is new to the server when it appears.
                await publish_trades(pub, [s], 5)
                await rec.wait_until(functools.partial(_reached, rec, f"trades:{s}", 5))
        owners = {cluster_conn.slots.owners[key_slot(f"{{{s}}}")] for s in symbols}
        assert len(owners) == len(cluster_conn.slots.masters)
        assert not rec.checker.violations


async def test_catch_up_reads_per_slot_resume_a_client_across_shards(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 2)
    async with Publisher(publisher_config(cluster.url)) as pub:
        await publish_trades(pub, symbols, 50)
        async with TickwireServer(server_config(cluster.url)) as srv, recorder(srv.url) as rec:
            # Resume every channel from seq 10: the history comes from each channel's
            # shard, then the live pushes continue it.
            resume = {}
            for s in symbols:
                ((epoch, _), *_) = await stored(cluster_conn, Channel("trades", s))
                resume[f"trades:{s}"] = {"epoch": epoch, "seq": 10}
            ack = await rec.request("subscribe", channels=list(resume), resume=resume)
            assert ack["type"] == "subscribed"
            await publish_trades(pub, symbols, 30)
            await rec.wait_until(
                lambda: all(rec.last_seq(f"trades:{s}") == 80 for s in symbols), timeout=20
            )
            for s in symbols:
                seqs = [e["seq"] for e in rec.events(f"trades:{s}")]
                assert seqs == list(range(11, 81))
            assert not rec.checker.violations
    assert srv.metrics.events_read > 0


async def test_each_append_is_pushed_on_its_shard_with_sharded_pub_sub(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    sub = await RedisTopology(cluster.url).open_live()
    try:
        assert isinstance(sub, SubscriptionGroup)
        async with Publisher(publisher_config(cluster.url)) as pub:
            await publish_trades(pub, symbols, 3)
        keys: set[bytes] = set()
        kinds: set[bytes] = set()

        async def pushed_all() -> bool:
            await sub.wait(0.1)
            for kind, _channel, payload in sub.take():
                kinds.add(kind)
                sections, whole = parse_push(payload)
                assert whole
                keys.update(section.key for section in sections)
            return keys == {Channel("trades", s).stream_key.encode() for s in symbols}

        await until(pushed_all, "a push of every symbol")
        assert kinds == {b"smessage"}
    finally:
        sub.close()


async def test_record_reads_every_shard_and_replay_writes_it_back_per_slot(
    cluster: RedisCluster, cluster_conn: ClusterConnection, tmp_path: Path
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    async with Publisher(publisher_config(cluster.url)) as pub:
        await publish_trades(pub, symbols, 25)
    channels = await resolve_channels(cluster_conn, ["trades:*"])
    assert sorted(c.symbol for c in channels) == sorted(symbols)
    out = io.BytesIO()
    assert await record(cluster_conn, channels, out) == 25 * len(symbols)
    recorded = out.getvalue().splitlines()
    await cluster_conn.execute_on_all("FLUSHALL")
    path = tmp_path / "rec.ndjson"
    path.write_bytes(out.getvalue())
    async with Publisher(publisher_config(cluster.url)) as pub:
        assert await replay(pub, path, speed=None) == len(recorded)
    for s in symbols:
        assert len(await stored(cluster_conn, Channel("trades", s))) == 25


async def test_on_demand_bars_are_made_per_shard_from_the_stored_trades(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    now = time.time_ns() // 10**9 * 10**9
    ms = 1_000_000
    cfg = replace(server_config(cluster.url), bar_retention_s=30.0)
    async with (
        TickwireServer(cfg, demand_clock=lambda: now / 1e9) as srv,
        recorder(srv.url) as rec,
        Publisher(publisher_config(cluster.url)) as pub,
    ):
        maker = BarMaker(
            BarMakerConfig(redis_url=cluster.url, close_delay_s=0.05),
            pub,
            clock_ns=lambda: clock[0],
            maker_id="maker",
        )
        clock = [now]
        try:
            for s in symbols:  # a trades channel on every shard: the wildcard's symbols
                await bar_trades(pub, s, [(now + 10 * ms, 100.0, 1.0)])
            await rec.request("subscribe", channels=["bars.250ms:*"])
            await until(lambda: srv.demand.recorded, "demand recorded")
            await maker.step()
            assert {c.symbol for c in maker.jobs} == set(symbols)
            for s in symbols:
                await bar_trades(pub, s, [(now + 300 * ms, 101.0, 2.0)])
            clock[0] = now + 600 * ms
            await maker.step()
            await pub.flush()
            await rec.wait_until(
                lambda: all(len(rec.events(f"bars.250ms:{s}")) == 2 for s in symbols)
            )
        finally:
            await maker.close()
    for s in symbols:
        bars = rec.events(f"bars.250ms:{s}")
        assert [(b["start"], b["open"], b["volume"], b["trades"]) for b in bars] == [
            (now, 100.0, 1.0, 1),
            (now + 250 * ms, 101.0, 2.0, 1),
        ]
    assert rec.checker.ok


async def test_an_ask_is_followed_without_taking_replies_owed_to_later_commands(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    moving = "ask{moving}"
    slot = key_slot(moving)
    src_node = cluster_conn.slots.owners[slot]
    dst_node = next(m for m in cluster_conn.slots.masters if m != src_node)
    src, dst = cluster.node_at(src_node[1]), cluster.node_at(dst_node[1])
    on_dst = [
        f"k{i}" for i in range(200) if cluster_conn.slots.owners[key_slot(f"k{i}")] == dst_node
    ]
    await cluster_conn.execute("SET", moving, "here")
    src_id = redis_cli(src.port, "CLUSTER", "MYID").strip()
    dst_id = redis_cli(dst.port, "CLUSTER", "MYID").strip()
    redis_cli(dst.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    redis_cli(src.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    redis_cli(src.port, "MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", moving)
    try:
        # The GET meets ASK (its key moved on); the second batch's commands on the target are
        # sent before the first batch's replies are read, so their replies are owed meanwhile.
        cluster_conn.send([["SET", on_dst[0], "a"], ["GET", moving]])
        cluster_conn.send([["SET", on_dst[1], "b"], ["GET", on_dst[0]]])
        assert await cluster_conn.replies(2, timeout=5) == [b"OK", b"here"]
        assert await cluster_conn.replies(2, timeout=5) == [b"OK", b"a"]
    finally:
        for node in cluster.masters():
            redis_cli(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        cluster.wait_ok()


async def test_a_busy_symbols_slot_migrates_with_clients_attached_nothing_lost_or_repeated(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    # Last in this module: it leaves the slot map changed.
    (busy,) = symbols_on_each_master(cluster_conn, 1)[:1]
    ch = Channel("trades", busy)
    owner = cluster_conn.slots.owners[key_slot(ch.stream_key)]
    target = next(n for n in cluster.masters() if ("127.0.0.1", n.port) != owner)
    async with (
        TickwireServer(server_config(cluster.url)) as srv,
        recorder(srv.url) as rec,
        Publisher(publisher_config(cluster.url)) as pub,
    ):
        await rec.request("subscribe", channels=[ch.name])
        sent = 0
        stop = asyncio.Event()

        async def flow() -> None:
            nonlocal sent
            while not stop.is_set():
                await pub.publish({ch: [trade(busy, sent)]})
                sent += 1
                await asyncio.sleep(0.002)

        flowing = asyncio.create_task(flow())
        await rec.wait_until(lambda: rec.last_seq(ch.name) >= 50)
        # One key per MIGRATE: appends meet the slot half moved (TRYAGAIN, ASK) for a while.
        await asyncio.to_thread(cluster.migrate_slot, key_slot(ch.stream_key), target, 1)
        moved_at = sent
        await until(lambda: sent >= moved_at + 100, "events after the move")
        stop.set()
        await flowing
        await pub.flush()
        await rec.wait_until(lambda: rec.last_seq(ch.name) == sent, timeout=30)
    events = rec.events(ch.name)
    assert [e["seq"] for e in events] == list(range(1, sent + 1))
    assert len({e["epoch"] for e in events}) == 1 and not rec.of_type("reset")
    assert not rec.checker.violations
    conn = await open_redis(cluster.url)
    try:
        assert isinstance(conn, ClusterConnection)
        assert conn.slots.owners[key_slot(ch.stream_key)] == ("127.0.0.1", target.port)
        assert len(await stored(conn, ch)) == sent
    finally:
        conn.close()
