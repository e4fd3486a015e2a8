"""Each process runs as a Redis ACL user given only its role's rules (`tickwire acl ROLE`): a
feed, a bridge, a bar maker and a server together, through a snapshot, a resume, on-demand bars
and a rollback's fence, with not one command, key or channel refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

import pytest

from tests.bridges.test_core import MemorySource, parts
from tests.bridges.test_core import trade as bridge_trade
from tests.conftest import eventually
from tickwire.cli import main
from tickwire.core.acl import ROLES, acl_rules
from tickwire.core.channels import Channel
from tickwire.core.commands import Arg
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
from tickwire.feeds.bridges.core import BridgeStats, bridge_round
from tickwire.feeds.publisher import Publisher
from tickwire.server.app import TickwireServer

from .conftest import recorder, server_config

BTC = Channel("trades", "BTC-USD")
BARS = Channel("bars.250ms", "BTC-USD")


def trades(first: int, n: int) -> list[bytes]:
    return [
        encode_body(
            "trade",
            BTC.symbol,
            time.time_ns(),
            time.time_ns(),
            {"price": 100.0 + i, "size": 1, "side": "buy", "trade_id": i},
        )
        for i in range(first, first + n)
    ]


async def test_every_process_runs_on_its_own_acl_rules_alone(fresh_redis: RedisProcess) -> None:
    admin = await RedisConnection.open(fresh_redis.url)
    for role in ROLES:
        await admin.execute("ACL", "SETUSER", role, *acl_rules(role), "on", ">pw")
    # The default user off: nothing can pass for want of a rule through it.
    await admin.execute("ACL", "SETUSER", "default", "off")

    def url(role: str) -> str:
        return f"redis://{role}:pw@127.0.0.1:{fresh_redis.port}/0"

    try:
        async with (
            TickwireServer(replace(server_config(fresh_redis), redis_url=url("server"))) as srv,
            recorder(srv.url) as rec,
            Publisher(PublisherConfig(redis_url=url("feed"))) as feed,
            Publisher(PublisherConfig(redis_url=url("bars"))) as bars_out,
        ):
            await rec.request("subscribe", channels=["trades:*", BARS.name])
            await feed.publish({BTC: trades(1, 5)})
            await rec.wait_until(lambda: rec.last_seq(BTC.name) == 5)
            # A bridge's events, each message id once.
            mapper, store = parts(url("bridge"))
            try:
                deliveries = [bridge_trade(n, "ETH-USD") for n in (1, 2, 3, 3)]
                await bridge_round(MemorySource(), mapper, store, deliveries, BridgeStats(), 1)
            finally:
                store.close()
            await rec.wait_until(lambda: rec.last_seq("trades:ETH-USD") == 3)
            # A resume and a snapshot, read from the streams.
            async with recorder(srv.url) as late:
                epoch = rec.events(BTC.name)[0]["epoch"]
                ack = await late.request(
                    "subscribe", channels=[BTC.name], resume={BTC.name: {"epoch": epoch, "seq": 2}}
                )
                assert ack["type"] == "subscribed"
                await late.wait_until(lambda: late.last_seq(BTC.name) == 5)
                assert [e["seq"] for e in late.events(BTC.name)] == [3, 4, 5]
                snap = await late.request("subscribe", channels=["trades:ETH-USD"], snapshot=True)
                assert snap["type"] == "subscribed"
                await late.wait_until(lambda: late.last_seq("trades:ETH-USD") == 3)
            # On-demand bars: the server records the demand, the maker leases and makes them.
            # (A short lease: renewed every 0.1 s, the renewal's PEXPIRE runs too.)
            cfg = BarMakerConfig(redis_url=url("bars"), close_delay_s=0.05, lease_s=0.3)
            maker = BarMaker(cfg, bars_out)
            making = asyncio.create_task(maker.run())
            try:
                # Trades until one comes past the end of a bar's interval, which closes it.
                for n in range(6, 100):
                    await feed.publish({BTC: trades(n, 1)})
                    with contextlib.suppress(TimeoutError):
                        await rec.wait_until(lambda: bool(rec.events(BARS.name)), timeout=0.2)
                        break
                assert rec.events(BARS.name), f"no bar made: {maker.stats}"
                renewed = maker.jobs[BARS].renewed
                await feed.publish({BTC: trades(100, 1)})
                await rec.wait_until(lambda: maker.jobs[BARS].renewed > renewed)
            finally:
                making.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await making
                await maker.close()
            # A tail Redis lost (what a lagging replica holds): the server fences it.
            last = rec.last_seq(BTC.name)
            kept = await admin.execute("XRANGE", BTC.stream_key, "-", f"{last - 2}-0")
            commands: list[list[Arg]] = [
                ["DEL", BTC.stream_key],
                ["HSET", BTC.meta_key, "seq", last - 2],
            ]
            commands += [["XADD", BTC.stream_key, entry_id, *fields] for entry_id, fields in kept]
            await admin.pipeline(commands)
            await rec.wait_for(lambda m: m.get("type") == "reset")
            assert srv.metrics.rollbacks_fenced == 1
        assert not rec.checker.violations, rec.checker.violations[:5]
        # Not one command, key or channel refused on any path.
        assert await admin.execute("ACL", "LOG") == []
    finally:
        admin.close()


def test_the_acl_command_prints_the_redis_command_for_a_role(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["acl", "feed", "--user", "md-feed"]) == 0
    out = capsys.readouterr().out
    assert out == f"ACL SETUSER md-feed {' '.join(acl_rules('feed'))} on\n"
    assert out.startswith("ACL SETUSER md-feed reset ~tw:* &tw:* +ping")


async def test_a_refused_command_is_logged_with_where_to_find_the_rules(
    fresh_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, the append is retried: granting the rule is enough, nothing is lost."""
    admin = await RedisConnection.open(fresh_redis.url)
    lacking = [r for r in acl_rules("feed") if r != "+evalsha"]
    await admin.execute("ACL", "SETUSER", "thin", *lacking, "on", ">pw")
    url = f"redis://thin:pw@127.0.0.1:{fresh_redis.port}/0"
    try:
        async with Publisher(PublisherConfig(redis_url=url, backoff_max_s=0.1)) as pub:
            await pub.publish({BTC: trades(1, 3)})
            await eventually(lambda: pub.stats.last_error is not None, "the append refused")
            assert "NOPERM" in str(pub.stats.last_error)
            assert pub.stats.published == 0
            await admin.execute("ACL", "SETUSER", "thin", "+evalsha")
            await asyncio.wait_for(pub.flush(), 10)
            assert pub.stats.published == 3
        assert await admin.execute("XLEN", BTC.stream_key) == 3
    finally:
        admin.close()
    logged = [r.getMessage() for r in caplog.records if "NOPERM" in r.getMessage()]
    assert logged and all("`tickwire acl ROLE` prints each role's rules" in m for m in logged)
