"""The bridge bench's own pieces: its maps, its trades, what the bridge makes of them."""

from __future__ import annotations

import time
import tomllib

import orjson
import pytest

from tickwire.bench.bridge import ROUTE, bridge_map, stamp, trades
from tickwire.feeds.bridges.mapping import BridgeMapper, Broker, parse_bridge_map


@pytest.mark.parametrize("broker", ["nats", "rabbitmq", "mqtt"])
def test_bench_trades_map_to_events_stamped_at_publishing(broker: Broker) -> None:
    mapper = BridgeMapper(parse_bridge_map(tomllib.loads(bridge_map(broker)), broker))
    (route, payload), *_ = trades(3, 7, 1, ROUTE[broker])
    before = time.time_ns()
    stamped = stamp(payload)
    queue = "md-trades" if broker == "rabbitmq" else ""
    ev = mapper.map(route, stamped, now_ns=1, queue=queue, broker_id="x")
    doc = orjson.loads(ev.body + b"}")
    assert (ev.channel.name, doc["trade_id"]) == ("trades:S1", 7)
    assert before <= doc["ts"] <= time.time_ns()
    assert ev.msg_id == ("7" if broker == "mqtt" else "x")
