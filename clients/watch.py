"""`tickwire watch`: a live terminal table of channels, or their events as JSON lines.

    tickwire watch trades:BTC-USD quotes:*            # table refreshing in place
    tickwire watch 'trades:*' --json | jq .price      # one event per line, for piping

The table shows, per symbol: bid/ask, the last trade, its change since the watch began, events
per second and publish → receive latency (p50/p99 over the last events). Notices (gaps, resets,
Redis status, reconnections) go to the status line, or to stderr with `--json`. Ctrl-C exits.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import orjson

from tickwire.clients.connection import Disconnected, Feed, Reconnected, connect
from tickwire.clients.errors import (
    AuthenticationFailed,
    CertificateRefused,
    ConnectFailed,
    ServerError,
)
from tickwire.clients.messages import EventBatch, Gap, Received, Reset, Status, event_to_dict
from tickwire.core.channels import ChannelPattern
from tickwire.core.errors import ChannelError
from tickwire.core.events import Bar, Quote, Trade
from tickwire.core.waits import cancel_and_wait

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
PROG = "tickwire watch"
REFRESH_S = 0.25
LATENCY_WINDOW = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Watch channels live: a table refreshing in place, or one JSON event per line.",
    )
    p.add_argument(
        "channels",
        nargs="+",
        metavar="CHANNEL",
        help="channels or patterns: trades:BTC-USD, quotes:AAPL, bars.1s:*, ...",
    )
    p.add_argument(
        "--url",
        type=ws_url,
        default=os.environ.get("TICKWIRE_URL", DEFAULT_URL),
        help=f"server WebSocket URL (default: $TICKWIRE_URL or {DEFAULT_URL})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print each event as one JSON line on stdout (notices go to stderr)",
    )
    p.add_argument("--token", default=None, help="bearer token, if the server asks for one")
    p.add_argument(
        "--cafile",
        default=None,
        metavar="PEM",
        help="for a wss:// URL, the CA that signed the server's certificate (default: the "
        "system's CAs)",
    )
    p.add_argument(
        "--cert",
        default=None,
        metavar="PEM",
        help="for a wss:// URL, a client certificate to present (where the server takes them "
        "as credentials), with its key unless --key gives it",
    )
    p.add_argument(
        "--key", default=None, metavar="PEM", help="the private key of --cert, if not in it"
    )
    p.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="start with live events only (default: the latest event of each channel first)",
    )
    p.add_argument(
        "--max-hz",
        type=float,
        default=None,
        metavar="HZ",
        help="at most HZ updates a second per channel: the latest quote or bar, every trade"
        " (0.1 to 1000; default: every update)",
    )
    return p


# --- JSON lines ----------------------------------------------------------------------------------


def json_line(item: Received) -> str:
    """The event as the server sent it (with `keep_raw`), else rebuilt in wire order."""
    doc = item.raw if item.raw is not None else event_to_dict(item.event)
    return orjson.dumps(doc).decode()


def notice_line(msg: object) -> str | None:
    """A one-line description of a notice for humans, or None for what is not a notice."""
    if isinstance(msg, Gap):
        n = msg.count
        return (
            f"gap: {msg.channel} seq {msg.from_seq}..{msg.to_seq} "
            f"({n} event{'s' if n != 1 else ''}) not delivered: {msg.reason}"
        )
    if isinstance(msg, Reset):
        return f"reset: {msg.channel} starts again in epoch {msg.epoch}"
    if isinstance(msg, Status):
        return "server lost Redis; waiting" if not msg.redis_up else "server has Redis again"
    if isinstance(msg, Disconnected):
        return f"connection lost ({msg.reason}); reconnecting in {msg.retry_in_s:.1f} s"
    if isinstance(msg, Reconnected):
        return "reconnected; resuming where we were"
    if isinstance(msg, ServerError):
        return f"server error: {msg.code}: {msg.message}"
    return None


# --- The table ------------------------------------------------------------------------------------


@dataclass
class Row:
    """What the table shows for one symbol."""

    symbol: str
    bid: float | None = None
    ask: float | None = None
    last: float | None = None
    side: str = ""
    first_last: float | None = None  # first `last` seen: the base of the change
    first_mid: float | None = None  # first mid seen: the base when there are no trades
    events: int = 0
    counted: int = 0  # `events` at the last rate computation
    rate: float = 0.0
    latencies: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    @property
    def mid(self) -> float | None:
        if self.bid is None or self.ask is None:
            return None
        return (self.bid + self.ask) / 2

    @property
    def change_pct(self) -> float | None:
        """Change of the last trade (or of the mid, with quotes only) since the watch began."""
        now: float | None
        base: float | None
        if self.last is not None:
            now, base = self.last, self.first_last
        else:
            now, base = self.mid, self.first_mid
        if now is None or not base:
            return None
        return (now - base) / base * 100.0

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        # Nearest rank: the smallest value with at least q of the sample at or below it.
        rank = max(math.ceil(q * len(ordered)), 1)
        return ordered[rank - 1] / 1e6


class Board:
    """The watcher's state, fed messages, rendered as a rich Table (no I/O, no clock of its own)."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        self.rows: dict[str, Row] = {}
        self.status = "connecting"
        self.gaps = 0
        self.resets = 0
        self._rated_at: float | None = None

    def add(self, item: Received) -> None:
        event = item.event
        row = self.rows.get(event.sym)
        if row is None:
            row = self.rows[event.sym] = Row(event.sym)
        row.events += 1
        row.latencies.append(item.latency_ns)
        if isinstance(event, Quote):
            row.bid, row.ask = event.bid, event.ask
            if row.first_mid is None:
                row.first_mid = row.mid
        elif isinstance(event, Trade):
            row.last, row.side = event.price, event.side or ""
            if row.first_last is None:
                row.first_last = event.price
        elif isinstance(event, Bar) and not row.side:
            # No trades on this symbol: the bars' close stands for the last price.
            row.last = event.close
            if row.first_last is None:
                row.first_last = event.open

    def note(self, msg: object) -> None:
        """Take a notice into the status line."""
        if isinstance(msg, Gap):
            self.gaps += 1
        elif isinstance(msg, Reset):
            self.resets += 1
        line = notice_line(msg)
        if isinstance(msg, Reconnected):
            self.status = "connected (resumed)"
        elif line is not None and not isinstance(msg, Gap | Reset):
            self.status = line

    def tick(self, now_s: float) -> None:
        """Recompute events/s per row since the previous tick."""
        if self._rated_at is not None and now_s > self._rated_at:
            dt = now_s - self._rated_at
            for row in self.rows.values():
                row.rate = (row.events - row.counted) / dt
        for row in self.rows.values():
            row.counted = row.events
        self._rated_at = now_s

    def render(self) -> Table:
        from rich.table import Table

        table = Table(title=self.title, title_justify="left", expand=False)
        for name in ("symbol", "bid", "ask", "last", "chg %", "ev/s", "p50 ms", "p99 ms"):
            table.add_column(name, justify="left" if name == "symbol" else "right")
        for sym in sorted(self.rows):
            row = self.rows[sym]
            chg = row.change_pct
            chg_text = "" if chg is None else f"{chg:+.2f}"
            if chg is not None and chg != 0:
                chg_text = f"[{'green' if chg > 0 else 'red'}]{chg_text}[/]"
            last = _num(row.last)
            if row.side:
                last = f"[{'green' if row.side == 'buy' else 'red'}]{last}[/]"
            table.add_row(
                sym,
                _num(row.bid),
                _num(row.ask),
                last,
                chg_text,
                f"{row.rate:,.0f}",
                _ms(row.latency_ms(0.5)),
                _ms(row.latency_ms(0.99)),
            )
        extra = []
        if self.gaps:
            extra.append(f"{self.gaps} gap{'s' if self.gaps != 1 else ''}")
        if self.resets:
            extra.append(f"{self.resets} reset{'s' if self.resets != 1 else ''}")
        table.caption = self.status + (f" · {', '.join(extra)}" if extra else "")
        table.caption_justify = "left"
        return table


def _num(x: float | None) -> str:
    return "" if x is None else repr(x) if isinstance(x, float) else str(x)


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


# --- Running --------------------------------------------------------------------------------------


def _say(err: TextIO, text: str) -> None:
    print(f"{PROG}: {text}", file=err, flush=True)


async def print_json(feed: Feed, out: TextIO, err: TextIO) -> int:
    """Write each event as a JSON line, flushing once per server frame; notices to `err`.

    A lost connection is said once (not once per attempt), and so is its return.
    """
    down = False
    async for msg in feed.batches():
        if isinstance(msg, EventBatch):
            out.write("".join(json_line(item) + "\n" for item in msg))
            out.flush()
            continue
        if isinstance(msg, Disconnected):
            if down:
                continue
            down = True
        elif isinstance(msg, Reconnected):
            down = False
        line = notice_line(msg)
        if line is not None:
            _say(err, line)
    return 0


async def show_table(feed: Feed, board: Board, clock: Callable[[], float] = time.monotonic) -> int:
    from rich.console import Console
    from rich.live import Live

    board.status = f"connected to {feed.url}"
    with Live(board.render(), console=Console(), auto_refresh=False) as live:

        async def refresh() -> None:
            while True:
                await asyncio.sleep(REFRESH_S)
                board.tick(clock())
                live.update(board.render(), refresh=True)

        refresher = asyncio.create_task(refresh())
        try:
            async for msg in feed:
                if isinstance(msg, Received):
                    board.add(msg)
                else:
                    board.note(msg)
        finally:
            await cancel_and_wait(refresher)
    return 0


async def watch(
    channels: list[str],
    url: str,
    *,
    as_json: bool = False,
    token: str | None = None,
    snapshot: bool = True,
    max_hz: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    **options: Any,
) -> int:
    """Watch `channels` on `url` until interrupted; returns the exit status.

    `options` go to `connect()` (ClientConfig fields, e.g. `backoff_max_s`).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        async with connect(url, token, keep_raw=as_json, **options) as feed:
            try:
                await feed.subscribe(*channels, snapshot=snapshot, max_hz=max_hz)
            except ServerError as exc:
                _say(err, f"{url} refused {' '.join(channels)}: {exc.message}")
                return 1
            if as_json:
                return await print_json(feed, out, err)
            return await show_table(feed, Board(f"{' '.join(channels)} · {url}"))
    except AuthenticationFailed as exc:
        _say(err, str(exc))
    except CertificateRefused as exc:
        _say(err, str(exc))
    except ConnectFailed as exc:
        _say(err, f"{exc} (is `tickwire serve` running?)")
    except TimeoutError:
        _say(err, f"{url} did not answer in time")
    return 1


def ws_url(value: str) -> str:
    """`--url`: a WebSocket URL, refused here rather than by a connect that says 'is the server
    running?'."""
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{value!r}: a WebSocket URL, ws://host:port/ws or wss://…"
        )
    return value


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """`connect()`'s `ssl` option from `--cafile`, `--cert` and `--key` (none without the first
    two), or ValueError saying which file cannot be loaded and why."""
    if args.key and not args.cert:
        raise ValueError("--key needs --cert (the certificate it is the key of)")
    if not (args.cafile or args.cert):
        return {}
    try:
        ctx = ssl.create_default_context(cafile=args.cafile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ValueError(f"cannot read --cafile {args.cafile}: {exc}") from None
    if args.cert:
        try:
            ctx.load_cert_chain(args.cert, args.key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load --cert {args.cert}: {exc}") from None
    return {"ssl": ctx}


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def main(argv: list[str] | None = None) -> int:
    """`tickwire watch CHANNEL... [--url URL] [--json] [--max-hz HZ]`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        channels = [ChannelPattern.parse(c).name for c in args.channels]
    except ChannelError as exc:
        _say(sys.stderr, str(exc))
        return 2
    try:
        tls = tls_options(args)
    except ValueError as exc:
        _say(sys.stderr, str(exc))
        return 2
    try:
        return _run(
            watch(
                channels,
                args.url,
                as_json=args.json,
                token=args.token,
                snapshot=args.snapshot,
                max_hz=args.max_hz,
                **tls,
            )
        )
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader of our output went away (`| head`): nothing more to say to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
