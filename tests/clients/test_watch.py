"""The terminal watcher: JSON-lines formatting, notices, the table's arithmetic, exits."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import orjson
import pytest
from rich.console import Console
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response

from tickwire.clients import watch as watch_mod
from tickwire.clients.connection import Disconnected, Reconnected
from tickwire.clients.errors import ServerError
from tickwire.clients.messages import Gap, Received, Reset, Status
from tickwire.clients.watch import Board, build_parser, json_line, main, notice_line, watch
from tickwire.core.events import Bar, Quote, Trade
from tickwire.core.redis_process import free_port

WELCOME = {"type": "welcome", "protocol": 1, "server": "fake", "heartbeat_ms": 5000, "limits": {}}


def wire_trade(seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "trade",
        "sym": "BTC-USD",
        "ts": 1764230400000000000,
        "pt": 1764230400000120000,
        "price": 64123.5,
        "size": 0.0123,
        "side": "buy",
        "trade_id": 88121,
        **extra,
        "epoch": "9f2c1ab04e11",
        "seq": seq,
    }


def as_trade(doc: dict[str, Any]) -> Trade:
    return Trade(
        doc["sym"],
        doc["ts"],
        doc["pt"],
        doc["seq"],
        doc["epoch"],
        doc["v"],
        doc["price"],
        doc["size"],
        doc["side"],
        doc["trade_id"],
    )


# --- JSON lines ------------------------------------------------------------------------------


def test_json_line_is_the_event_as_the_server_sent_it() -> None:
    doc = wire_trade(1041, venue="X")
    item = Received("trades:BTC-USD", as_trade(doc), 5, raw=doc)
    assert json_line(item) == orjson.dumps(doc).decode()
    assert '"venue":"X"' in json_line(item)
    assert "\n" not in json_line(item)


def test_json_line_without_raw_is_rebuilt_in_wire_order() -> None:
    doc = wire_trade(1041)
    line = json_line(Received("trades:BTC-USD", as_trade(doc), 5))
    assert line == (
        '{"v":1,"type":"trade","sym":"BTC-USD","ts":1764230400000000000,'
        '"pt":1764230400000120000,"price":64123.5,"size":0.0123,"side":"buy",'
        '"trade_id":88121,"epoch":"9f2c1ab04e11","seq":1041}'
    )


def test_notices_read_as_one_line_each() -> None:
    assert notice_line(Gap("trades:BTC-USD", 5, 9, "trimmed")) == (
        "gap: trades:BTC-USD seq 5..9 (5 events) not delivered: trimmed"
    )
    assert notice_line(Gap("quotes:AAPL", 3, 3, "conflated")) == (
        "gap: quotes:AAPL seq 3..3 (1 event) not delivered: conflated"
    )
    assert notice_line(Reset("trades:BTC-USD", "abc")) == (
        "reset: trades:BTC-USD starts again in epoch abc"
    )
    assert notice_line(Status("down")) == "server lost Redis; waiting"
    assert notice_line(Status("up")) == "server has Redis again"
    assert notice_line(Disconnected("connection refused", 1.25, 3)) == (
        "connection lost (connection refused); reconnecting in 1.2 s"
    )
    assert notice_line(Reconnected("ws://x/ws", 2)) == "reconnected; resuming where we were"
    assert notice_line(ServerError("rate_limited", "slow down", 3)) == (
        "server error: rate_limited: slow down"
    )
    assert notice_line(object()) is None


# --- The table -------------------------------------------------------------------------------


def quote(sym: str, bid: float, ask: float, pt: int = 0) -> Quote:
    return Quote(sym, 0, pt, 1, "e", 1, bid, 1.0, ask, 1.0)


def trade(sym: str, price: float, side: str = "buy") -> Trade:
    return Trade(sym, 0, 0, 1, "e", 1, price, 1.0, side, 1)


def test_board_tracks_prices_change_rate_and_latency() -> None:
    board = Board()
    board.add(Received("quotes:AAPL", quote("AAPL", 99.0, 101.0), 1_000_000))
    board.add(Received("quotes:AAPL", quote("AAPL", 101.0, 103.0), 3_000_000))
    aapl = board.rows["AAPL"]
    assert (aapl.bid, aapl.ask, aapl.last) == (101.0, 103.0, None)
    assert aapl.change_pct == pytest.approx(2.0)  # mid 100 → 102, no trades yet
    board.add(Received("trades:AAPL", trade("AAPL", 200.0), 2_000_000))
    board.add(Received("trades:AAPL", trade("AAPL", 150.0, "sell"), 4_000_000))
    assert (aapl.last, aapl.side) == (150.0, "sell")
    assert aapl.change_pct == pytest.approx(-25.0)  # trades now: 200 → 150
    assert aapl.latency_ms(0.5) == pytest.approx(2.0)
    assert aapl.latency_ms(0.99) == pytest.approx(4.0)
    board.tick(10.0)
    board.add(Received("trades:AAPL", trade("AAPL", 150.0), 0))
    board.add(Received("trades:AAPL", trade("AAPL", 150.0), 0))
    board.tick(10.5)
    assert aapl.rate == pytest.approx(4.0)
    board.tick(11.5)
    assert aapl.rate == 0.0


def test_board_uses_bars_when_there_are_no_trades() -> None:
    board = Board()
    bar = Bar("ETH-USD", 0, 0, 1, "e", 1, "1s", 10.0, 12.0, 9.0, 11.0, 3.0, 10.5, 4, 0, 1)
    board.add(Received("bars.1s:ETH-USD", bar, 0))
    assert board.rows["ETH-USD"].last == 11.0
    assert board.rows["ETH-USD"].change_pct == pytest.approx(10.0)


def test_board_status_line_and_render() -> None:
    board = Board("trades:* · ws://h/ws")
    board.add(Received("trades:BTC-USD", trade("BTC-USD", 64123.5), 1_500_000))
    board.note(Gap("trades:BTC-USD", 1, 2, "trimmed"))
    board.note(Disconnected("connection refused", 0.5, 2))
    console = Console(record=True, width=120, color_system=None)
    console.print(board.render())
    text = " ".join(console.export_text().split())
    assert "BTC-USD" in text and "64123.5" in text and "1.50" in text
    assert "connection lost (connection refused); reconnecting in 0.5 s · 1 gap" in text
    board.note(Reconnected("ws://h/ws", 2))
    assert board.status == "connected (resumed)"


# --- Running ---------------------------------------------------------------------------------


def test_malformed_channel_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["candles:BTC-USD"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tickwire watch: unknown channel type")


def test_unreachable_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    assert main(["trades:BTC-USD", "--url", url, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"tickwire watch: cannot connect to {url}: connection refused "
        "(is `tickwire serve` running?)\n"
    )


def test_a_url_that_is_not_a_websocket_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for url in ("http://127.0.0.1:8765/ws", "127.0.0.1:8765", "ws://"):
        with pytest.raises(SystemExit) as exited:
            main(["trades:BTC-USD", "--url", url])
        assert exited.value.code == 2
        assert f"argument --url: {url!r}: a WebSocket URL" in capsys.readouterr().err


def test_ctrl_c_at_the_prompt_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(coro: Coroutine[Any, Any, int]) -> int:
        coro.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(watch_mod, "_run", interrupted)
    assert main(["trades:BTC-USD"]) == 0


async def test_json_mode_prints_events_and_puts_notices_on_stderr() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(orjson.dumps(WELCOME))
        req = orjson.loads(await ws.recv())
        assert req["snapshot"] is True
        sub = {"type": "subscribed", "id": req["id"], "channels": req["channels"]}
        frame = [
            sub,
            {
                "type": "gap",
                "ch": "trades:BTC-USD",
                "from_seq": 1,
                "to_seq": 1,
                "reason": "trimmed",
            },
            {
                "type": "events",
                "ch": "trades:BTC-USD",
                "epoch": "9f2c1ab04e11",
                "events": [wire_trade(2, venue="X"), wire_trade(3)],
            },
        ]
        await ws.send(orjson.dumps(frame))
        await ws.close(4003, "go away")  # ends the watch, as a refused token would

    out, err = io.StringIO(), io.StringIO()
    async with serve(handler, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws"
        status = await asyncio.wait_for(
            watch(["trades:BTC-USD"], url, as_json=True, out=out, err=err), 10
        )
    assert status == 1
    assert out.getvalue().splitlines() == [
        orjson.dumps(wire_trade(2, venue="X")).decode(),
        orjson.dumps(wire_trade(3)).decode(),
    ]
    assert err.getvalue().splitlines() == [
        "tickwire watch: gap: trades:BTC-USD seq 1..1 (1 event) not delivered: trimmed",
        f"tickwire watch: {url} closed the connection: 4003 go away",
    ]


async def test_json_mode_says_once_that_the_server_is_gone_and_once_that_it_is_back() -> None:
    attempts = 0

    def flaky(conn: ServerConnection, request: WsRequest) -> Response | None:
        nonlocal attempts
        attempts += 1
        if 2 <= attempts <= 4:  # the server is away for three attempts
            return conn.respond(503, "restarting\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.send(orjson.dumps(WELCOME))
        req = orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "subscribed", "id": req["id"], "channels": []}))
        msg = {"type": "events", "ch": "trades:BTC-USD", "epoch": "9f2c1ab04e11"}
        if attempts == 1:
            await ws.send(orjson.dumps({**msg, "events": [wire_trade(1)]}))
            ws.transport.abort()
            return
        assert req["resume"] == {"trades:BTC-USD": {"epoch": "9f2c1ab04e11", "seq": 1}}
        await ws.send(orjson.dumps({**msg, "events": [wire_trade(2)]}))
        await ws.close(4003, "bye")

    out, err = io.StringIO(), io.StringIO()
    async with serve(handler, "127.0.0.1", 0, process_request=flaky) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws"
        status = await asyncio.wait_for(
            watch(
                ["trades:BTC-USD"],
                url,
                as_json=True,
                out=out,
                err=err,
                backoff_initial_s=0.01,
                backoff_max_s=0.02,
            ),
            10,
        )
    assert status == 1 and attempts == 5
    assert [orjson.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 2]
    lines = err.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("tickwire watch: connection lost (connection lost); reconnecting in")
    assert lines[1:] == [
        "tickwire watch: reconnected; resuming where we were",
        f"tickwire watch: {url} closed the connection: 4003 bye",
    ]


async def test_refused_subscription_is_one_line() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(orjson.dumps(WELCOME))
        req = orjson.loads(await ws.recv())
        err = {"type": "error", "id": req["id"], "code": "unknown_channel", "message": "no such"}
        await ws.send(orjson.dumps(err))
        await ws.wait_closed()

    err = io.StringIO()
    async with serve(handler, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws"
        status = await watch(["quotes:*"], url, as_json=True, out=io.StringIO(), err=err)
    assert status == 1
    assert err.getvalue() == f"tickwire watch: {url} refused quotes:*: no such\n"


async def test_ctrl_c_while_watching_exits_cleanly() -> None:
    """A real process, a real SIGINT: exit status 0, nothing on stderr, events on stdout."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(orjson.dumps(WELCOME))
        req = orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "subscribed", "id": req["id"], "channels": []}))
        msg = {"type": "events", "ch": "trades:BTC-USD", "epoch": "9f2c1ab04e11"}
        await ws.send(orjson.dumps({**msg, "events": [wire_trade(1)]}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws"
        code = "import sys; from tickwire.clients.watch import main; sys.exit(main(sys.argv[1:]))"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            "trades:BTC-USD",
            "--url",
            url,
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd="/",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert orjson.loads(line) == wire_trade(1)
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), 15)
        stderr = await proc.stderr.read()
    assert rc == 0, stderr
    assert stderr == b""


async def test_max_hz_goes_into_the_subscribe_request() -> None:
    seen: list[dict[str, object]] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send(orjson.dumps(WELCOME))
        req = orjson.loads(await ws.recv())
        seen.append(req)
        await ws.send(
            orjson.dumps({"type": "subscribed", "id": req["id"], "channels": req["channels"]})
        )
        await ws.close(4003, "go away")

    out, err = io.StringIO(), io.StringIO()
    async with serve(handler, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws"
        args = build_parser().parse_args(["quotes:*", "--max-hz", "4", "--json"])
        await asyncio.wait_for(
            watch(["quotes:*"], url, as_json=True, max_hz=args.max_hz, out=out, err=err), 10
        )
    assert seen[0]["max_hz"] == 4.0
