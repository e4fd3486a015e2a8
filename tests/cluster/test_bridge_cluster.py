"""A broker bridge's store on a Redis Cluster: one append call per slot, ids stored once."""

from __future__ import annotations

import pytest

from tests.bridges.test_core import MAP, MemorySource, trade
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_process import RedisCluster
from tickwire.core.redis_slots import key_slot
from tickwire.feeds.bridges.core import BridgeStats, BridgeStore, bridge_round
from tickwire.feeds.bridges.mapping import BridgeMapper, parse_bridge_map

from .conftest import stored

pytestmark = pytest.mark.uvloop_only


async def test_a_bridge_stores_symbols_of_several_shards_once_each(
    cluster: RedisCluster, cluster_conn: ClusterConnection
) -> None:
    symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOT-USD"]
    owners = {cluster_conn.slots.owners[key_slot(f"{{{s}}}")] for s in symbols}
    assert len(owners) >= 2  # the round spans shards
    m = parse_bridge_map(MAP, "nats")
    store = BridgeStore(PublisherConfig(redis_url=cluster.url), m.options)
    stats = BridgeStats()
    round_ = [trade(i, symbols[i % len(symbols)]) for i in range(1, 25)]
    try:
        await bridge_round(MemorySource(), BridgeMapper(m), store, round_, stats, 1)
        # Redelivered: every id is known in its own shard.
        await bridge_round(MemorySource(), BridgeMapper(m), store, round_[10:], stats, 2)
    finally:
        store.close()
    assert (stats.stored, stats.duplicates) == (24, 14)
    for k, s in enumerate(symbols):
        events = await stored(cluster_conn, Channel("trades", s))
        assert sorted(seq for _, seq in events) == list(range(1, 5))
        assert len(events) == len([i for i in range(1, 25) if i % len(symbols) == k])
