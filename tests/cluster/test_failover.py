"""A master killed while its replica is behind: writes are lost, a (channel, epoch, seq) is never
reused, and every lost event a client saw is followed by `reset`. One cluster for this module:
the test leaves it with a master gone."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.server.conftest import Recorder, recorder
from tickwire.core.channels import Channel
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster
from tickwire.core.redis_target import RedisLink, open_redis
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import (
    kill_with_replica_behind,
    publish_trades,
    publisher_config,
    server_config,
    split,
    stored,
    symbols_on_each_master,
)

pytestmark = pytest.mark.uvloop_only


def tagged(rec: Recorder, channel: str, tag: str) -> int:
    return sum(1 for e in rec.events(channel) if e.get("tag") == tag)


async def check_no_reuse_and_resets(
    url: str, rec: Recorder, symbols: list[str]
) -> dict[str, list[tuple[str, int]]]:
    """Every event a client saw that is still stored (in the Redis at `url`) is stored with the
    same content; the ones Redis lost are returned per channel, each checked to be followed by
    a `reset`."""
    conn = await open_redis(url)
    try:
        return await _lost_and_reset(conn, rec, symbols)
    finally:
        conn.close()


async def _lost_and_reset(
    conn: RedisLink, rec: Recorder, symbols: list[str]
) -> dict[str, list[tuple[str, int]]]:
    lost: dict[str, list[tuple[str, int]]] = {}
    for s in symbols:
        name = f"trades:{s}"
        store = await stored(conn, Channel("trades", s))
        messages = [m for m in rec.messages if m.get("ch") == name]
        gone: list[tuple[str, int]] = []
        last_gone_at = -1
        for i, m in enumerate(messages):
            if m["type"] != "events":
                continue
            for ev in m["events"]:
                key = (ev["epoch"], ev["seq"])
                body: Any = store.get(key)
                if body is None:
                    gone.append(key)
                    last_gone_at = i
                else:
                    assert orjson.loads(body) == ev, f"{name} {key} names two events"
        if gone:
            after = [m["type"] for m in messages[last_gone_at + 1 :]]
            assert after and after[0] == "reset", f"{name}: lost {gone[:3]}… then {after[:3]}"
        lost[name] = gone
    return lost


async def test_a_master_killed_with_its_replica_behind_never_reuses_a_seq(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = symbols_on_each_master(cluster_conn, 2)
    victim, doomed, _ = split(cluster, cluster_conn, symbols)
    replica = cluster.replica_of(victim)
    # Everything is pointed at the node that dies: the slot map names the others.
    url = f"redis://127.0.0.1:{victim.port}/0"
    async with TickwireServer(server_config(url)) as srv, recorder(srv.url) as rec:
        await rec.request("subscribe", channels=["trades:*"])
        pub = Publisher(publisher_config(url))
        await pub.start()
        await publish_trades(pub, symbols, 20, "before")
        await kill_with_replica_behind(pub, rec, victim, replica, doomed, 20)
        await pub.close()
        await asyncio.to_thread(cluster.wait_ok, 60)
        # A publisher started after the failover has no memory of the lost tail: the append
        # script must see the promotion by itself. (A new process is given every node as a
        # seed: the one it would otherwise know is dead.)
        async with Publisher(publisher_config(cluster.seeds_url)) as fresh:
            await publish_trades(fresh, symbols, 10, "after")
        await rec.wait_until(
            lambda: all(tagged(rec, f"trades:{s}", "after") == 10 for s in symbols), timeout=60
        )
        assert not rec.checker.violations, rec.checker.violations[:5]
    lost = await check_no_reuse_and_resets(cluster.seeds_url, rec, symbols)
    assert all(lost[f"trades:{s}"] for s in doomed), "the test meant to lose writes"
    assert not any(lost[f"trades:{s}"] for s in symbols if s not in doomed)
    # Only the channels of the dead master began a new epoch.
    assert {m["ch"] for m in rec.of_type("reset")} == {f"trades:{s}" for s in doomed}
