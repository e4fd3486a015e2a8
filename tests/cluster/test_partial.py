"""A Redis Cluster with a master down: the other masters' channels go on, and the down one's
resume once it is back, nothing lost or repeated. The cluster has no replicas and does not
require full coverage, so a killed master stays down until the test restarts it: what happens
meanwhile does not race a failover. (With replicas and full coverage, `test_failover` and
`tickwire bench failover`.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.bridges.conftest import stored as bridge_stored
from tests.bridges.test_core import MemorySource, parts
from tests.bridges.test_core import trade as bridge_trade
from tests.server.conftest import Recorder, http_get, recorder
from tickwire.bench.failover import symbols_per_master
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import NodeDown
from tickwire.core.errors import RedisUnavailable
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster
from tickwire.core.redis_pubsub import SubscriptionGroup
from tickwire.core.redis_slots import key_slot
from tickwire.core.redis_target import RedisTarget, RedisTopology, open_redis
from tickwire.feeds.bridges.core import BridgeStats, run_bridge
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import (
    publish_trades,
    publisher_config,
    server_config,
    split,
    stored,
    symbols_on_each_master,
    trade,
    until,
)

pytestmark = pytest.mark.uvloop_only


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0, full_coverage=False) as c:
        yield c


def trade_ids(events: dict[tuple[str, int], bytes]) -> list[int]:
    docs = sorted((orjson.loads(b) for b in events.values()), key=lambda d: d["seq"])
    assert [d["seq"] for d in docs] == list(range(1, len(docs) + 1)), "seqs not dense"
    assert len({d["epoch"] for d in docs}) <= 1
    return [d["trade_id"] for d in docs]


async def test_a_cluster_connection_answers_node_down_for_a_dead_master_and_comes_back(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    keys = [Channel("trades", s).stream_key for s in symbols]
    victim_node = cluster_conn.slots.owners[key_slot(keys[0])]
    victim = cluster.node_at(victim_node[1])
    for key in keys:
        await cluster_conn.execute("XADD", key, "*", "d", "x")
    victim.kill()
    replies = await cluster_conn.pipeline([["XLEN", k] for k in keys], timeout=2.0)
    assert isinstance(replies[0], NodeDown) and replies[0].node == victim_node
    assert replies[1:] == [1, 1]
    assert not cluster_conn.closed and cluster_conn.slot_down(key_slot(keys[0]))
    # Opened while it is down: the others answer, from the slot map any node gives.
    fresh = await open_redis(cluster.seeds_url)
    assert isinstance(fresh, ClusterConnection) and set(fresh.down) == {victim_node}
    assert (await fresh.pipeline([["XLEN", k] for k in keys[1:]])) == [1, 1]
    fresh.close()
    victim.start()
    await until(cluster_conn.refresh, "the master back in the slot map")
    assert not cluster_conn.down
    await until(
        lambda: cluster_conn.pipeline([["XLEN", keys[0]]]),
        "the restarted master answering",
    )


async def test_a_master_silent_while_the_others_answer_is_down_before_the_reply_timeout(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    """A hung host or a lost network leaves the connection open and silent (here SIGSTOP): the
    other masters' replies do not wait the whole reply timeout for it (`STRAGGLER_S`)."""
    symbols = symbols_on_each_master(cluster_conn, 1)
    keys = [Channel("trades", s).stream_key for s in symbols]
    victim_node = cluster_conn.slots.owners[key_slot(keys[0])]
    victim = cluster.node_at(victim_node[1])
    for key in keys:
        await cluster_conn.execute("DEL", key)
    # Asked alone (another master is asked for a PING), then with the others.
    for asked in ([keys[0]], keys):
        victim.pause()
        try:
            # Bounded well below the reply timeout: only the straggler rule answers in time.
            replies = await asyncio.wait_for(
                cluster_conn.pipeline([["XLEN", k] for k in asked], timeout=120.0), 30
            )
        finally:
            victim.resume()
        assert isinstance(replies[0], NodeDown) and "no reply within" in str(replies[0])
        assert replies[1:] == [0] * (len(asked) - 1)
        assert not cluster_conn.closed and cluster_conn.slot_down(key_slot(keys[0]))
        await until(cluster_conn.refresh, "the master answering again")
        assert await cluster_conn.pipeline([["XLEN", k] for k in keys]) == [0, 0, 0]


async def test_a_refresh_does_not_wait_the_whole_timeout_for_a_master_hung_already(
    cluster: RedisCluster,
) -> None:
    """A master found down and still hung is asked again only briefly (`DOWN_PROBE_S`): a
    refresh held for the connection's whole timeout would hold the next one, the one that
    finds a failover's promoted replica, as long."""
    conn = await open_redis(cluster.seeds_url, timeout=120.0)
    assert isinstance(conn, ClusterConnection)
    try:
        symbols = symbols_on_each_master(conn, 1)
        keys = [Channel("trades", s).stream_key for s in symbols]
        victim_node = conn.slots.owners[key_slot(keys[0])]
        victim = cluster.node_at(victim_node[1])
        victim.pause()
        try:
            replies = await asyncio.wait_for(
                conn.pipeline([["XLEN", k] for k in keys], timeout=120.0), 30
            )
            assert isinstance(replies[0], NodeDown)
            assert conn.down.keys() == {victim_node}
            # Bounded far below the connection's timeout: only the short probe returns.
            assert not await asyncio.wait_for(conn.refresh(), 30)
            assert conn.down.keys() == {victim_node}
        finally:
            victim.resume()
        await until(conn.refresh, "the master answering again")
        assert not conn.down
        assert await conn.pipeline([["XLEN", k] for k in keys]) == [0, 0, 0]
    finally:
        conn.close()


async def test_a_connection_opens_past_a_seed_that_takes_it_and_answers_nothing(
    cluster: RedisCluster,
) -> None:
    """A hung node's kernel still accepts connections: the first seed paused, the topology is
    read from the next one, asked a moment later (`SEED_STAGGER_S`), and the paused master is
    left down once the others have answered (`DOWN_PROBE_S`), its subscription too: neither
    waits the whole timeout (far longer here) for it."""
    first = RedisTarget.parse(cluster.seeds_url).seeds[0]
    node = cluster.node_at(first.port)
    paused = (first.host, first.port)
    node.pause()
    try:
        conn = await asyncio.wait_for(open_redis(cluster.seeds_url, timeout=120), 30)
        live = await asyncio.wait_for(RedisTopology(cluster.seeds_url, 120).open_live(), 30)
    finally:
        node.resume()
    try:
        assert isinstance(conn, ClusterConnection) and paused in conn.slots.masters
        assert set(conn.down) == {paused}
        assert "within 0.5 s of the first" in conn.down[paused]
        assert isinstance(live, SubscriptionGroup)
        assert live.nodes == set(conn.slots.masters) - {paused}
        owned = {slot for slot, owner in enumerate(conn.slots.owners) if owner == paused}
        assert live.unfollowed == owned
    finally:
        conn.close()
        live.close()


async def test_a_publisher_stores_the_other_masters_channels_while_one_is_down(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 2)
    victim, doomed, others = split(cluster, cluster_conn, symbols)
    async with Publisher(publisher_config(cluster.seeds_url)) as pub:
        await publish_trades(pub, symbols, 5)
        victim.kill()
        for i in range(5, 25):
            await pub.publish({Channel("trades", s): [trade(s, i)] for s in symbols})
        # The others' events are all stored while the master is down; its channels' are held.
        for s in others:
            await until(
                lambda s=s: _count(cluster.seeds_url, s, 25), f"trades:{s} stored", limit=20
            )
        assert pub.pending_events == 20 * len(doomed)
        assert not pub._idle.is_set()
        victim.start()  # its data is gone (no persistence): the held events start a new epoch
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.pending_events == 0
    conn = await open_redis(cluster.seeds_url)
    try:
        for s in others:
            assert trade_ids(await stored(conn, Channel("trades", s))) == list(range(25))
        for s in doomed:
            assert trade_ids(await stored(conn, Channel("trades", s))) == list(range(5, 25))
    finally:
        conn.close()


async def _count(url: str, symbol: str, n: int) -> bool:
    try:
        conn = await open_redis(url)
    except RedisUnavailable:
        return False  # the first seed that accepts may be the master that does not answer
    try:
        return bool(await conn.execute("XLEN", Channel("trades", symbol).stream_key) == n)
    finally:
        conn.close()


async def test_past_the_bound_a_down_masters_oldest_events_are_dropped_not_the_others(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    victim_node = cluster_conn.slots.owners[key_slot(f"{{{symbols[0]}}}")]
    victim = cluster.node_at(victim_node[1])
    config = replace(publisher_config(cluster.seeds_url), max_pending_events=10)
    async with Publisher(config) as pub:
        await publish_trades(pub, symbols, 1)
        victim.kill()
        for i in range(1, 31):
            # Never held back: the bound is kept by dropping the held events.
            await asyncio.wait_for(
                pub.publish({Channel("trades", s): [trade(s, i)] for s in symbols}), 5
            )
        for s in symbols[1:]:
            await until(lambda s=s: _count(cluster.seeds_url, s, 31), f"trades:{s} stored")
        # At least what is over the bound (events in flight to the others count too).
        dropped = pub.stats.dropped
        assert dropped >= 20 and pub.pending_events <= 10
        victim.start()
        await asyncio.wait_for(pub.flush(), 30)
    conn = await open_redis(cluster.seeds_url)
    try:
        # The newest held, in order (the one stored before the kill went with the restart).
        kept = list(range(1 + dropped, 31))
        assert trade_ids(await stored(conn, Channel("trades", symbols[0]))) == kept
        for s in symbols[1:]:
            assert trade_ids(await stored(conn, Channel("trades", s))) == list(range(31))
    finally:
        conn.close()


def tagged(rec: Recorder, symbols: list[str], tag: str) -> list[int]:
    """How many events tagged `tag` the client got on each symbol's trades."""
    return [sum(e.get("tag") == tag for e in rec.events(f"trades:{s}")) for s in symbols]


async def test_clients_get_the_other_masters_events_live_while_one_is_down(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 2)
    victim, doomed, others = split(cluster, cluster_conn, symbols)
    config = server_config(cluster.seeds_url)
    async with (
        TickwireServer(config) as srv,
        recorder(srv.url) as rec,
        contextlib.AsyncExitStack() as stack,
    ):
        await rec.request("subscribe", channels=["trades:*"])
        async with Publisher(publisher_config(cluster.seeds_url)) as pub:
            await publish_trades(pub, symbols, 5, "before")
            await rec.wait_until(lambda: tagged(rec, symbols, "before") == [5] * 6, timeout=20)
            victim.kill()
            for i in range(20):
                await pub.publish({Channel("trades", s): [trade(s, i, "down")] for s in symbols})
            # Live, while the master is down: its channels wait, Redis as a whole is up.
            await rec.wait_until(lambda: tagged(rec, others, "down") == [20] * 4, timeout=20)
            assert tagged(rec, doomed, "down") == [0, 0]
            # (A gauge: it follows the reader's slot-map refreshes, every 0.25 s.)
            await until(lambda: srv.metrics.redis_masters_down == 1, "the master counted down")
            assert rec.of_type("status") == []
            health = await http_json(srv.port, "/healthz")
            assert (health["status"], health["redis_masters_down"]) == ("degraded", 1)
            # A client resuming meanwhile, and asking for snapshots, on channels of the master
            # that is down and of one that is up: acknowledged at once, placed on the channels
            # up (the ack leaves the others out), their history and snapshots come at once; the
            # down master's, once it is back.
            late = await stack.enter_async_context(recorder(srv.url))
            up, gone = f"trades:{others[0]}", f"trades:{doomed[1]}"
            resumed = await late.request(
                "subscribe",
                channels=[up, gone],
                resume={
                    up: {"epoch": rec.events(up)[0]["epoch"], "seq": 3},
                    gone: {"epoch": rec.events(gone)[0]["epoch"], "seq": 2},
                },
            )
            assert (resumed["type"], list(resumed["positions"])) == ("subscribed", [up])
            await late.wait_until(lambda: late.last_seq(up) == 25)
            snapshots = await late.request(
                "subscribe", channels=[f"trades:{others[1]}", f"trades:{doomed[0]}"], snapshot=True
            )
            assert list(snapshots["positions"]) == [f"trades:{others[1]}"]
            await late.wait_until(lambda: late.last_seq(f"trades:{others[1]}") == 25)
            assert tagged(late, doomed, "down") == [0, 0]
            victim.start()  # empty (no persistence): its channels begin a new epoch
            await asyncio.wait_for(pub.flush(), 30)
            await rec.wait_until(lambda: tagged(rec, doomed, "down") == [20, 20], timeout=30)
            # The resume is reset to the new epoch and gets all of it; the snapshot, its latest.
            await late.wait_until(lambda: tagged(late, doomed, "down")[1] == 20, timeout=30)
            await late.wait_until(lambda: late.last_seq(f"trades:{doomed[0]}") == 20, timeout=30)
            assert [m["ch"] for m in late.of_type("reset")] == [gone]
            assert not late.checker.violations, late.checker.violations[:5]
        assert not rec.checker.violations, rec.checker.violations[:5]
        assert not rec.contract_errors
        assert {m["ch"] for m in rec.of_type("reset")} == {f"trades:{s}" for s in doomed}
        await until(lambda: srv.metrics.redis_masters_down == 0, "no master counted down")
        assert (await http_json(srv.port, "/healthz"))["status"] == "ok"


async def test_a_server_started_while_the_registrys_master_is_down_serves_the_others(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 1)
    registry_master = cluster_conn.slots.owners[key_slot(REGISTRY_KEY)]
    victim, doomed, others = split(cluster, cluster_conn, symbols, registry_master)
    async with Publisher(publisher_config(cluster.seeds_url)) as pub:
        victim.kill()
        config = server_config(cluster.seeds_url)
        async with TickwireServer(config) as srv, recorder(srv.url) as rec:
            await rec.request("subscribe", channels=[f"trades:{s}" for s in others])
            for i in range(5):  # not flushed: the dead master's are held
                await pub.publish({Channel("trades", s): [trade(s, i)] for s in symbols})
            # The registry unread, the masters up serve their channels (and none is "down").
            await rec.wait_until(lambda: [rec.last_seq(f"trades:{s}") for s in others] == [5, 5])
            assert srv.reader.up and rec.of_type("status") == []
            victim.start()
            await asyncio.wait_for(pub.flush(), 30)
            await rec.request("subscribe", channels=[f"trades:{doomed[0]}"])
            await publish_trades(pub, symbols, 3, "after")
            await rec.wait_until(lambda: tagged(rec, symbols, "after") == [3, 3, 3], timeout=30)
            assert not rec.checker.violations, rec.checker.violations[:5]


async def http_json(port: int, path: str) -> Any:
    status, body, _ = await http_get(port, path)
    assert status == 200, status
    return orjson.loads(body)


async def test_a_master_that_stops_answering_is_held_like_a_dead_one(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    """Paused (SIGSTOP), a master accepts connections and answers nothing, as a dead host's
    does not even accept them: it is found down once the others have answered and it has not
    (the reply timeout is far longer here), not taken for up again because a connection opens,
    and the others are stored meanwhile."""
    symbols = symbols_on_each_master(cluster_conn, 1)
    victim, _, others = split(cluster, cluster_conn, symbols)
    config = replace(publisher_config(cluster.seeds_url), reply_timeout_s=120.0)
    async with Publisher(config) as pub:
        await publish_trades(pub, symbols, 1)
        victim.pause()
        try:
            for i in range(1, 21):
                await pub.publish({Channel("trades", s): [trade(s, i)] for s in symbols})
            for s in others:
                await until(lambda s=s: _count(cluster.seeds_url, s, 21), f"trades:{s} stored")
            assert pub.pending_events == 20
        finally:
            victim.resume()
        await asyncio.wait_for(pub.flush(), 30)
    conn = await open_redis(cluster.seeds_url)
    try:
        for s in symbols:
            assert trade_ids(await stored(conn, Channel("trades", s))) == list(range(21))
    finally:
        conn.close()


async def test_the_server_finds_a_hung_master_down_and_catches_up_once_it_answers(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    """Paused (SIGSTOP), a master's subscription stays open and silent while the others push:
    the reader finds it down (counted, health degraded) instead of waiting on it unseen, and
    once it answers again its channels are read from where they were: nothing lost or
    repeated, and no reset (it kept everything). The metas are not rechecked meanwhile: a
    recheck's reads would find it down too, but only every `meta_recheck_s` (5 s by default)."""
    symbols = symbols_on_each_master(cluster_conn, 2)
    victim, doomed, others = split(cluster, cluster_conn, symbols)
    async with (
        TickwireServer(server_config(cluster.seeds_url, meta_recheck_s=600.0)) as srv,
        recorder(srv.url) as rec,
        Publisher(publisher_config(cluster.seeds_url)) as pub,
    ):
        await rec.request("subscribe", channels=["trades:*"])
        await publish_trades(pub, symbols, 5, "before")
        await rec.wait_until(lambda: tagged(rec, symbols, "before") == [5] * 6, timeout=20)
        victim.pause()
        try:
            for i in range(20):
                await pub.publish({Channel("trades", s): [trade(s, i, "hung")] for s in symbols})
            await rec.wait_until(lambda: tagged(rec, others, "hung") == [20] * 4, timeout=20)
            await until(lambda: srv.metrics.redis_masters_down == 1, "the hung master counted")
            health = await http_json(srv.port, "/healthz")
            assert (health["status"], health["redis_masters_down"]) == ("degraded", 1)
            assert tagged(rec, doomed, "hung") == [0, 0]
        finally:
            victim.resume()
        await asyncio.wait_for(pub.flush(), 30)
        await rec.wait_until(lambda: tagged(rec, doomed, "hung") == [20, 20], timeout=30)
        await until(lambda: srv.metrics.redis_masters_down == 0, "no master counted down")
        assert (await http_json(srv.port, "/healthz"))["status"] == "ok"
    assert rec.of_type("reset") == []
    assert not rec.checker.violations, rec.checker.violations[:5]
    assert not rec.contract_errors


async def test_a_bridge_stores_the_other_masters_channels_while_one_is_down(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    """The bridge holds the down master's events and stores the others'; the broker is told
    only of the messages before the oldest one held (acknowledgements are cumulative)."""
    symbols = list(symbols_per_master(cluster_conn.slots, 1, "BR"))
    victim, doomed, others = split(cluster, cluster_conn, symbols)
    mapper, store = parts(cluster.seeds_url)
    source = MemorySource()
    stop = asyncio.Event()
    stats = BridgeStats()
    task = asyncio.create_task(run_bridge(source, mapper, store, stats=stats, stop=stop))

    def put(first: int) -> None:
        """Five trades on each symbol, interleaved, the down master's first."""
        for n in range(first, first + 5):
            for s in symbols:
                source.queue.put_nowait(bridge_trade(n, s, f"{s}-{n}"))

    try:
        put(1)
        await until(lambda: len(source.acked) == 15, "the first trades acknowledged")
        victim.kill()
        put(6)
        for s in others:
            await until(lambda s=s: _count(cluster.seeds_url, s, 10), f"trades:{s} stored")
        assert len(source.acked) == 15 and source.held > 0
        # Tried again every 0.25 s meanwhile, without a receive given up half way.
        rounds = stats.rounds
        await until(lambda: stats.rounds >= rounds + 2, "the held events tried again")
        assert source.cancelled == 0
        victim.start()  # empty (no persistence): its channel begins a new epoch
        await until(lambda: len(source.acked) == 30, "everything acknowledged once it is back")
    finally:
        stop.set()
        await task
        store.close()
    conn = await open_redis(cluster.seeds_url)
    try:
        for s in others:
            assert [e["trade_id"] for e in await bridge_stored(conn, Channel("trades", s))] == list(
                range(1, 11)
            )
        (s,) = doomed
        assert [e["trade_id"] for e in await bridge_stored(conn, Channel("trades", s))] == list(
            range(6, 11)
        )
    finally:
        conn.close()
