"""The live page in headless Chromium: against a scripted server, then against the real one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, expect

from tests.conftest import timeout
from tests.contract.schemas import validate_client_message
from tests.contract.serving import serving
from tests.web.harness import (
    MOCK_ORIGIN,
    MockConnection,
    MockServer,
    PageErrors,
    SocketLog,
    serve_web_files,
    snapshot,
    wait_for,
)
from tickwire.core.config import PublisherConfig, ServerConfig
from tickwire.core.redis_process import RedisProcess, TlsFiles
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher

EPOCH = "e0e0e0e0e0e0"
WELCOME = {
    "type": "welcome",
    "protocol": 1,
    "server": "tickwire/mock",
    "heartbeat_ms": 5000,
    "limits": {"max_message_bytes": 16384, "max_resume_events": 100000, "slow_grace_s": 5.0},
}
HOUR_NS = 3600 * 10**9
PRICE = re.compile(r"^\d+(\.\d+)?$")


def trade(sym: str, seq: int, price: float, *, side: str = "buy", **kw: Any) -> dict[str, Any]:
    now = time.time_ns()
    return {
        "v": 1,
        "type": "trade",
        "sym": sym,
        "ts": now,
        "pt": kw.get("pt", now),
        "price": price,
        "size": 0.5,
        "side": side,
        "trade_id": seq,
        "epoch": kw.get("epoch", EPOCH),
        "seq": seq,
    }


def quote(sym: str, seq: int, bid: float, ask: float, **kw: Any) -> dict[str, Any]:
    now = time.time_ns()
    return {
        "v": 1,
        "type": "quote",
        "sym": sym,
        "ts": now,
        "pt": kw.get("pt", now),
        "bid": bid,
        "bid_size": 10,
        "ask": ask,
        "ask_size": 12,
        "epoch": kw.get("epoch", EPOCH),
        "seq": seq,
    }


def events(ch: str, *evs: dict[str, Any], epoch: str = EPOCH) -> dict[str, Any]:
    return {"type": "events", "ch": ch, "epoch": epoch, "events": list(evs)}


def cell(page: Page, sym: str, name: str) -> Any:
    return page.locator(f'#quotes tr[data-sym="{sym}"] .{name}')


async def open_page(page: Page, mock: MockServer, query: str = "") -> MockConnection:
    await serve_web_files(page)
    await mock.install(page)
    await page.goto(f"{MOCK_ORIGIN}/{query}")
    return await mock.next_connection()


async def handshake(
    conn: MockConnection, known: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Welcome the page; answer its list and subscribe requests. Returns (list, subscribe)."""
    conn.send(WELCOME)
    listing = await conn.request("list")
    sub = await conn.request("subscribe")
    conn.send(
        {"type": "subscribed", "id": sub["id"], "channels": sub["channels"]},
        {"type": "channels", "id": listing["id"], "channels": known or []},
    )
    return listing, sub


# -- against a scripted server ---------------------------------------------------------------


async def test_page_shows_batches_drops_duplicates_and_logs_gaps_and_resets(
    page: Page, page_errors: PageErrors, tmp_path: Path
) -> None:
    mock = MockServer()
    conn = await open_page(page, mock)
    _, sub = await handshake(conn, known=["quotes:AAPL", "trades:AAPL", "quotes:BTC-USD"])
    assert sub["channels"] == ["quotes:*", "trades:*"]
    assert sub["snapshot"] is True and "resume" not in sub
    await expect(page.locator("#state")).to_have_text("live")
    await expect(page.locator('#subs .chip[data-confirmed="true"]')).to_have_count(2)
    await expect(page.locator('#known option[value="quotes:AAPL"]')).to_have_count(1)
    await expect(page.locator('#known option[value="trades:*"]')).to_have_count(1)

    # One array frame of two channels (the snapshot: published an hour ago), then an object frame.
    old = time.time_ns() - HOUR_NS
    conn.send(
        events("quotes:AAPL", quote("AAPL", 1, 189.99, 190.01, pt=old)),
        events(
            "trades:AAPL",
            trade("AAPL", 1, 190.01, pt=old),
            trade("AAPL", 2, 189.99, side="sell", pt=old),
        ),
        array=True,
    )
    conn.send(events("quotes:BTC-USD", quote("BTC-USD", 1, 64123.5, 64124.0)))
    await expect(cell(page, "AAPL", "bid")).to_have_text("189.99")
    await expect(cell(page, "AAPL", "ask")).to_have_text("190.01")
    await expect(cell(page, "AAPL", "last")).to_have_text("189.99")
    await expect(cell(page, "AAPL", "side")).to_have_text("sell")
    await expect(cell(page, "BTC-USD", "bid")).to_have_text("64123.5")
    await expect(page.locator("#quotes tbody tr")).to_have_count(2)

    # A duplicate is dropped: the marker quote after it shows, the duplicate's price never does.
    conn.send(events("trades:AAPL", trade("AAPL", 2, 999.0)))
    conn.send(events("quotes:AAPL", quote("AAPL", 2, 190.0, 190.02)))
    await expect(cell(page, "AAPL", "bid")).to_have_text("190")
    await expect(cell(page, "AAPL", "last")).to_have_text("189.99")
    conn.send(events("trades:AAPL", trade("AAPL", 2, 999.0), trade("AAPL", 3, 190.5)))
    await expect(cell(page, "AAPL", "last")).to_have_text("190.5")
    state = await snapshot(page)
    assert state["totals"]["duplicates"] == 2
    assert state["positions"]["trades:AAPL"]["seq"] == 3

    # A gap is logged and moves the position past it: seq 7 follows without complaint.
    conn.send({"type": "gap", "ch": "trades:AAPL", "from_seq": 4, "to_seq": 6, "reason": "trimmed"})
    conn.send(events("trades:AAPL", trade("AAPL", 7, 191.25)))
    await expect(cell(page, "AAPL", "last")).to_have_text("191.25")
    await expect(page.locator("#log")).to_contain_text("trades:AAPL: gap 4..6 (3 events, trimmed)")

    # A reset: the new epoch starts over at seq 1.
    conn.send({"type": "reset", "ch": "quotes:AAPL", "epoch": "e1e1e1e1e1e1"})
    conn.send(
        events(
            "quotes:AAPL",
            quote("AAPL", 1, 150.0, 150.5, epoch="e1e1e1e1e1e1"),
            epoch="e1e1e1e1e1e1",
        )
    )
    await expect(cell(page, "AAPL", "bid")).to_have_text("150")
    await expect(page.locator("#log")).to_contain_text("quotes:AAPL: reset")
    state = await snapshot(page)
    assert state["positions"]["quotes:AAPL"]["epoch"] == "e1e1e1e1e1e1"
    assert state["totals"]["holes"] == 0
    assert state["connects"] == 1

    # Latency counts live events only: the hour-old snapshot would dominate p99 otherwise.
    await expect(page.locator("#lat-n")).to_have_text("5")
    p99 = float(await page.locator("#lat-p99").inner_text())
    assert 0 <= p99 < 10_000
    await expect(cell(page, "AAPL", "chg")).to_have_text("+0.66%")  # 191.25 vs 190.01 first seen

    conn.send({"type": "status", "redis": "down"})
    await expect(page.locator("#state")).to_have_text("live · Redis down")
    conn.send({"type": "heartbeat", "ts": time.time_ns(), "last": {"trades:AAPL": 7}})
    await page.screenshot(path=tmp_path / "mock.png")
    assert mock.count == 1, "the page reconnected without cause"
    assert page_errors.unexpected() == []


async def test_page_resumes_after_a_hole_and_after_the_server_leaves(
    page: Page, page_errors: PageErrors
) -> None:
    mock = MockServer()
    conn = await open_page(page, mock)
    await handshake(conn)
    conn.send(events("trades:AAPL", *(trade("AAPL", s, 190 + s) for s in (1, 2, 3))))
    conn.send(events("quotes:AAPL", quote("AAPL", 1, 189.0, 189.5), quote("AAPL", 2, 189.1, 189.6)))
    await expect(cell(page, "AAPL", "last")).to_have_text("193")
    await expect(cell(page, "AAPL", "bid")).to_have_text("189.1")

    # Seq 4 never announced: the page closes and resumes from 3 on a new connection.
    conn.send(events("trades:AAPL", trade("AAPL", 5, 195.0)))
    code, _ = await asyncio.wait_for(conn.closed, timeout(5))
    assert code == 4000
    await expect(page.locator("#log")).to_contain_text("unannounced hole 4..4; resuming")
    await expect(cell(page, "AAPL", "last")).to_have_text("193")

    conn = await mock.next_connection()
    conn.send(WELCOME)
    await conn.request("list")
    sub = await conn.request("subscribe")
    assert sub["channels"] == ["quotes:*", "trades:*"]
    assert not sub.get("snapshot")
    assert sub["resume"] == {
        "trades:AAPL": {"epoch": EPOCH, "seq": 3},
        "quotes:AAPL": {"epoch": EPOCH, "seq": 2},
    }
    conn.send({"type": "subscribed", "id": sub["id"], "channels": sub["channels"]})
    conn.send(events("trades:AAPL", *(trade("AAPL", s, 190 + s) for s in (3, 4, 5))))
    await expect(cell(page, "AAPL", "last")).to_have_text("195")
    state = await snapshot(page)
    assert state["totals"] == {
        "delivered": 7, "duplicates": 1, "gaps": 0, "resets": 0, "holes": 0, "skipped": 0
    }  # fmt: skip

    # The server goes away (1001). While it is down, connections fail (closed before welcome):
    # the waits between attempts grow.
    await conn.close(1001, "server shutting down")
    await expect(page.locator("#state")).to_have_text("reconnecting")
    opened = []
    for _ in range(4):
        conn = await mock.next_connection()
        opened.append(time.monotonic())
        await conn.close(1011, "not yet")
    waits = [b - a for a, b in itertools.pairwise(opened)]
    assert waits[2] > waits[0], f"no backoff between attempts: {waits}"
    assert waits[0] >= 0.1, waits

    conn = await mock.next_connection(seconds=15)
    conn.send(WELCOME)
    await conn.request("list")
    sub = await conn.request("subscribe")
    assert sub["resume"]["trades:AAPL"] == {"epoch": EPOCH, "seq": 5}
    conn.send({"type": "subscribed", "id": sub["id"], "channels": sub["channels"]})
    await expect(page.locator("#state")).to_have_text("live")

    # Once connected the backoff starts over: the next attempt comes quickly again.
    left = time.monotonic()
    await conn.close(1001, "server shutting down")
    conn = await mock.next_connection()
    assert time.monotonic() - left < timeout(1.0)
    assert mock.count == 8
    assert page_errors.unexpected() == []


async def test_page_lets_the_user_pick_channels(page: Page, page_errors: PageErrors) -> None:
    mock = MockServer()
    conn = await open_page(page, mock)
    await handshake(conn, known=["quotes:AAPL", "trades:AAPL", "trades:MSFT"])
    conn.send(events("trades:AAPL", trade("AAPL", 1, 190.0)))
    conn.send(events("quotes:AAPL", quote("AAPL", 1, 189.0, 189.5)))
    await expect(cell(page, "AAPL", "last")).to_have_text("190")

    await page.locator('#subs .chip[data-channel="trades:*"] button').click()
    unsub = await conn.request("unsubscribe")
    assert unsub["channels"] == ["trades:*"]
    conn.send({"type": "unsubscribed", "id": unsub["id"], "channels": ["quotes:*"]})
    await expect(page.locator("#subs .chip")).to_have_count(1)
    await expect(cell(page, "AAPL", "last")).to_have_text("")
    await expect(cell(page, "AAPL", "bid")).to_have_text("189")

    await page.locator("#channel").fill("trades:MSFT")
    await page.locator("#channel").press("Enter")
    sub = await conn.request("subscribe")
    assert sub["channels"] == ["trades:MSFT"] and sub["snapshot"] is True
    conn.send({"type": "subscribed", "id": sub["id"], "channels": ["quotes:*", "trades:MSFT"]})
    await expect(page.locator('#subs .chip[data-channel="trades:MSFT"]')).to_have_attribute(
        "data-confirmed", "true"
    )
    conn.send(events("trades:MSFT", trade("MSFT", 1, 420.5)))
    await expect(cell(page, "MSFT", "last")).to_have_text("420.5")

    # A malformed name is refused by the page itself; one the server refuses is dropped.
    await page.locator("#channel").fill("nope")
    await page.locator("#channel").press("Enter")
    await expect(page.locator("#log")).to_contain_text("not a channel: nope")
    await page.locator("#channel").fill("bars.1m:ZZZ")
    await page.locator("#channel").press("Enter")
    sub = await conn.request("subscribe")
    conn.send(
        {"type": "error", "id": sub["id"], "code": "too_many_subscriptions", "message": "at most 2"}
    )
    await expect(page.locator("#log")).to_contain_text("subscribe failed: too_many_subscriptions")
    await expect(page.locator('#subs .chip[data-channel="bars.1m:ZZZ"]')).to_have_count(0)
    assert await conn.requests_until_quiet() == []
    assert page_errors.unexpected() == []


async def test_page_channels_come_from_the_query_string(
    page: Page, page_errors: PageErrors
) -> None:
    mock = MockServer()
    conn = await open_page(
        page, mock, "?channels=quotes:AAPL,bars.1s:BTC-USD,bars.1m:BTC-USD&token=s3cret"
    )
    assert conn.route.url == "ws://tickwire.test/ws?token=s3cret"
    _, sub = await handshake(conn)
    assert sub["channels"] == ["quotes:AAPL", "bars.1s:BTC-USD", "bars.1m:BTC-USD"]
    now = time.time_ns()
    bar = {
        "v": 1,
        "type": "bar",
        "sym": "BTC-USD",
        "ts": now,
        "pt": now,
        "interval": "1s",
        "open": 64000.0,
        "high": 64010.5,
        "low": 63990.0,
        "close": 64005.5,
        "volume": 1.25,
        "vwap": 64001.0,
        "trades": 9,
        "start": now - 10**9,
        "end": now,
        "epoch": EPOCH,
        "seq": 1,
    }
    conn.send(events("bars.1s:BTC-USD", bar))
    await expect(cell(page, "BTC-USD", "last")).to_have_text("64005.5")
    await expect(cell(page, "BTC-USD", "size")).to_have_text("1.25")
    # A minute bar does not overwrite the second bars the row shows (an AAPL quote in the same
    # frame, handled after it, says the page has seen it); the next second bar does.
    minute = {**bar, "interval": "1m", "close": 63000.0, "volume": 80.0}
    conn.send(
        events("bars.1m:BTC-USD", minute),
        events("quotes:AAPL", quote("AAPL", 1, 189.99, 190.01)),
        array=True,
    )
    await expect(cell(page, "AAPL", "bid")).to_have_text("189.99")
    assert await cell(page, "BTC-USD", "last").text_content() == "64005.5"
    second = {**bar, "seq": 2, "close": 64007.0, "volume": 0.5}
    conn.send(events("bars.1s:BTC-USD", second))
    await expect(cell(page, "BTC-USD", "last")).to_have_text("64007")
    await expect(cell(page, "BTC-USD", "size")).to_have_text("0.5")
    assert page_errors.unexpected() == []


# -- against the real server -----------------------------------------------------------------


async def test_page_streams_from_the_server_and_survives_a_restart(
    page: Page,
    page_errors: PageErrors,
    redis: RedisConnection,
    redis_server: RedisProcess,
    tmp_path: Path,
) -> None:
    from tickwire.feeds.runner import run_simulator
    from tickwire.feeds.simulator import MarketSimulator, make_instruments

    symbols = ["BTC-USD", "ETH-USD", "AAPL", "EUR-USD"]
    sim = MarketSimulator(make_instruments(symbols, seed=7), rate=300.0, seed=7)
    sockets = SocketLog()
    sockets.attach(page)
    config = ServerConfig(redis_url=redis_server.url, port=0)

    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        feed = asyncio.create_task(run_simulator(pub, sim))
        try:
            await wait_for("the feed to publish", lambda: pub.stats.published > 50)
            async with serving(config) as srv:
                config = replace(config, port=srv.port)  # the restarted server takes the same
                await page.goto(srv.http_url)
                await expect(page.locator("#state")).to_have_text("live", timeout=timeout(10_000))
                await wait_for("a subscribe request", lambda: sockets.requests("subscribe"))
                [sub] = sockets.requests("subscribe")
                assert sub["channels"] == ["quotes:*", "trades:*"] and sub["snapshot"] is True
                await expect(page.locator("#quotes tbody tr")).to_have_count(
                    len(symbols), timeout=timeout(10_000)
                )
                await expect(page.locator('#known option[value="trades:BTC-USD"]')).to_have_count(1)
                await changing_prices(page, symbols)
                before = (await snapshot(page))["positions"]

            # The server is gone; the feed goes on. The page must notice and retry.
            await expect(page.locator("#state")).to_have_text(
                "reconnecting", timeout=timeout(10_000)
            )
            await wait_for("events published while the server was down", pub_moved(pub, 300))
            async with serving(config):
                await expect(page.locator("#state")).to_have_text("live", timeout=timeout(15_000))
                await wait_for("a resubscribe", lambda: bool(sockets.requests("subscribe")))
                [resub] = sockets.requests("subscribe")
                assert resub["channels"] == ["quotes:*", "trades:*"]
                assert "snapshot" not in resub
                for ch, pos in before.items():
                    assert resub["resume"][ch]["epoch"] == pos["epoch"]
                    assert resub["resume"][ch]["seq"] >= pos["seq"]
                await changing_prices(page, symbols)
                await page.screenshot(path=tmp_path / "page.png", full_page=True)

                # Stop the feed: the page must end exactly where Redis ended, on every channel,
                # having seen each seq once (no hole, no duplicate counted as delivered).
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed
                await pub.flush()
                final = {ch.name: pos for ch, pos in pub.positions.items()}

                async def caught_up() -> bool:
                    got = (await snapshot(page))["positions"]
                    return all(
                        ch in got and [got[ch]["epoch"], got[ch]["seq"]] == list(pos)
                        for ch, pos in final.items()
                    )

                await wait_for("the page to reach the last published seq", caught_up, 15)
                state = await snapshot(page)
                assert state["connects"] >= 2
                assert state["totals"]["holes"] == 0
                for ch, c in state["positions"].items():
                    span = c["seq"] - c["first"] + 1
                    assert c["delivered"] + c["gapped"] == span, f"{ch}: {c}"
        finally:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed

    # Everything the page sent is a valid v1 request; it read what the server sent as frames.
    assert len(sockets.sent) >= 2
    for requests in sockets.sent:
        for request in requests:
            validate_client_message(request)
    assert sum(map(len, sockets.received)) > 10
    assert page_errors.unexpected("WebSocket connection to") == []
    assert (tmp_path / "page.png").stat().st_size > 10_000


async def changing_prices(page: Page, symbols: list[str]) -> None:
    """Every symbol shows a bid, and the table's prices change while we watch."""
    for sym in symbols:
        await expect(cell(page, sym, "bid")).to_have_text(PRICE, timeout=timeout(10_000))

    async def table() -> list[str]:
        return await page.locator("#quotes tbody .num").all_inner_texts()

    first = await table()

    async def changed() -> bool:
        return await table() != first

    await wait_for("prices to change", changed)
    received: int = (await snapshot(page))["received"]

    async def more() -> bool:
        now: int = (await snapshot(page))["received"]
        return now > received + 20

    await wait_for("more events", more)


def pub_moved(pub: Publisher, n: int) -> Callable[[], bool]:
    """True once `pub` has published `n` more events than now."""
    start = pub.stats.published
    return lambda: pub.stats.published >= start + n


async def test_page_charts_a_symbols_bars_live_and_stays_responsive(
    page: Page, page_errors: PageErrors, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    """Click a symbol: its 1 s bars (snapshot, then live) are drawn as candles; new bars move
    the chart on, the interval can be changed (the chart's own subscription follows), to an
    on-demand one too (250 ms, made by the bar maker), and the page answers at once meanwhile."""
    from tickwire.feeds.bar_maker import BarMaker, BarMakerConfig
    from tickwire.feeds.runner import run_simulator
    from tickwire.feeds.simulator import MarketSimulator, make_instruments

    sim = MarketSimulator(make_instruments(["BTC-USD", "ETH-USD"], seed=3), rate=1000.0, seed=3)
    config = ServerConfig(redis_url=redis_server.url, port=0)

    async def chart() -> dict[str, Any]:
        result: dict[str, Any] = await page.evaluate("() => window.tickwire.chart()")
        return result

    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        feed = asyncio.create_task(run_simulator(pub, sim, bar_intervals=("1s", "1m")))
        bar_maker = asyncio.create_task(
            BarMaker(BarMakerConfig(redis_url=redis_server.url, close_delay_s=0.05), pub).run()
        )
        try:
            async with serving(config) as srv:
                await page.goto(srv.http_url)
                await expect(page.locator("#quotes tbody tr")).to_have_count(
                    2, timeout=timeout(10_000)
                )
                await page.locator('th.sym:text-is("BTC-USD")').click()
                await expect(page.locator("#chart-panel")).to_be_visible()
                await wait_for("candles", lambda: _has_bars(chart, 2), 15)
                first = await chart()
                assert first["channel"] == "bars.1s:BTC-USD"
                await wait_for("a newer candle", lambda: _moved_on(chart, first), 15)
                # Drawn: the canvas holds candle-coloured pixels, not just its background.
                painted = await page.evaluate(
                    """() => { const c = document.querySelector('#chart');
                               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                               let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] > 150 || d[i + 1] > 150)) n++;
                               return n; }"""
                )
                assert painted > 50
                # Responsive while events flow: a round trip into the page takes little time.
                t0 = time.monotonic()
                for _ in range(20):
                    await page.evaluate("() => 1")
                assert time.monotonic() - t0 < timeout(2.0)
                # Another interval: the chart follows bars.1m of the same symbol.
                await page.select_option("#chart-interval", "1m")
                await wait_for("the 1 min chart", lambda: _channel_is(chart, "bars.1m:BTC-USD"), 10)
                # (A 1 min bar closes at the next minute: the subscription is what is checked.)
                wanted = (await snapshot(page))["wanted"]
                assert "bars.1m:BTC-USD" in wanted and "bars.1s:BTC-USD" not in wanted
                # An on-demand interval: the server records the demand, `tickwire bars` (here
                # its loop in this process) makes the 250 ms bars, the chart draws them.
                await page.select_option("#chart-interval", "250ms")
                await wait_for(
                    "the 250 ms chart", lambda: _channel_is(chart, "bars.250ms:BTC-USD"), 10
                )
                await wait_for("250 ms candles", lambda: _has_bars(chart, 3), 15)
                await page.locator("#chart-close").click()
                await expect(page.locator("#chart-panel")).to_be_hidden()
                assert "bars.1m:BTC-USD" not in (await snapshot(page))["wanted"]
        finally:
            for task in (feed, bar_maker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert page_errors.unexpected() == []


async def _has_bars(chart: Callable[[], Any], n: int) -> bool:
    return bool((await chart())["bars"] >= n)


async def _moved_on(chart: Callable[[], Any], before: dict[str, Any]) -> bool:
    return bool((await chart())["lastStart"] > before["lastStart"])


async def _channel_is(chart: Callable[[], Any], channel: str) -> bool:
    return bool((await chart())["channel"] == channel)


async def test_page_rate_selector_resubscribes_at_that_rate(
    page: Page, page_errors: PageErrors
) -> None:
    mock = MockServer()
    conn = await open_page(page, mock)
    await handshake(conn, known=["quotes:AAPL", "trades:AAPL"])
    conn.send(events("trades:AAPL", trade("AAPL", 1, 190.0)))
    await expect(cell(page, "AAPL", "last")).to_have_text("190")

    await page.locator("#max-hz").select_option("4")
    unsub = await conn.request("unsubscribe")
    assert sorted(unsub["channels"]) == ["quotes:*", "trades:*"]
    subs = [await conn.request("subscribe") for _ in range(2)]
    assert all(s["max_hz"] == 4 for s in subs)
    # The delivered channel is resumed where the page stands, the other one snapshotted.
    resumed = next(s for s in subs if "resume" in s)
    assert resumed["resume"] == {"trades:AAPL": {"epoch": EPOCH, "seq": 1}}
    # A throttled frame's skipped seqs are no hole: the page shows it and asks for nothing.
    conn.send({**events("trades:AAPL", trade("AAPL", 9, 191.0)), "skipped": 7})
    await expect(cell(page, "AAPL", "last")).to_have_text("191")
    assert await conn.requests_until_quiet() == []
    assert page_errors.unexpected() == []


async def test_page_served_over_https_streams_over_wss(
    browser: Browser,
    redis: RedisConnection,
    redis_server: RedisProcess,
    tls_files: TlsFiles,
) -> None:
    """`tickwire serve --tls-cert`: the page comes over https:// and opens wss:// itself."""
    from tickwire.feeds.runner import run_simulator
    from tickwire.feeds.simulator import MarketSimulator, make_instruments

    symbols = ["BTC-USD", "ETH-USD"]
    sim = MarketSimulator(make_instruments(symbols, seed=3), rate=200.0, seed=3)
    # The test's CA is not the browser's: told to accept it, as a user adding it would.
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    errors = PageErrors()
    errors.attach(page)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    config = ServerConfig(redis_url=redis_server.url, port=0, tls_cert_file=str(tls_files.cert))
    try:
        async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
            feed = asyncio.create_task(run_simulator(pub, sim))
            try:
                await wait_for("the feed to publish", lambda: pub.stats.published > 20)
                async with serving(config) as srv:
                    assert srv.http_url.startswith("https://")
                    await page.goto(srv.http_url)
                    await expect(page.locator("#state")).to_have_text(
                        "live", timeout=timeout(10_000)
                    )
                    await expect(page.locator("#quotes tbody tr")).to_have_count(
                        len(symbols), timeout=timeout(10_000)
                    )
            finally:
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed
        assert sockets and all(u.startswith(f"wss://127.0.0.1:{srv.port}/") for u in sockets)
        assert not errors.unexpected(), errors.unexpected()
    finally:
        await context.close()
