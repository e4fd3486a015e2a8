"""`tickwire bench bridge`: events/s and broker → Redis latency through a bridge, beside the direct path.

One run starts a private Redis and a private broker, runs `tickwire feed <broker>` as a process of
its own, and a publishing process sends JSON trades to the broker stamped with the time of
publishing (`T`, ns). A Redis reader subscribed to the live push (what a tickwire server reads)
records each event's arrival. Two phases: throughput (the bridge is stopped while the broker
fills with `--count` trades, then let go: the rate at which they land in Redis), then a steady
`--rate` (latency broker publish → read). The same two phases then run on the simulator's path,
a process feeding the `Publisher` directly, as the baseline (its latency: publish → read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tickwire.bench.brokers import BROKER_PROCESSES, BrokerProcess
from tickwire.bench.harness import cpu_seconds, start_group, stop_group
from tickwire.bench.stats import latency_summary, table
from tickwire.core.argtypes import count, rate, seconds
from tickwire.core.channels import Channel, live_channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_pubsub import RedisSubscription
from tickwire.feeds.publisher import Publisher

TICKWIRE = str(Path(sys.executable).parent / "tickwire")
MAPS = {
    "nats": '[nats]\nstream = "MD"\n\n[[route]]\nsubject = "md.trades.{symbol}"\n',
    "mqtt": '[[route]]\ntopic = "md/{symbol}/trades"\nid_field = "t"\n',
    "rabbitmq": '[rabbitmq]\ndeclare = true\nexchange = "md"\n\n[[route]]\nqueue = "md-trades"\n'
    'routing_key = "trades.{symbol}"\n',
}
ROUTE = {"nats": "md.trades.{}", "mqtt": "md/{}/trades", "rabbitmq": "trades.{}"}
Send = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


def bridge_map(broker: str) -> str:
    return (
        '[bridge]\nname = "bench"\non_unmapped = "skip"\nmax_in_flight = 2000\nbatch = 1000\n\n'
        + MAPS[broker]
        + 'channel = "trades"\nfields = { price = "p", size = "q", trade_id = "t" }\n'
        'ts_field = "T"\n'
    )


class Reader:
    """Reads the live push; records, per phase, each event's arrival minus its `ts`."""

    def __init__(self, sub: RedisSubscription) -> None:
        self.sub = sub
        self.latencies: list[int] = []
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.task = asyncio.create_task(self._run())

    def reset(self) -> None:
        self.latencies, self.count, self.first_ns, self.last_ns = [], 0, 0, 0

    async def _run(self) -> None:
        while True:
            got = self.sub.take()
            if not got:
                await self.sub.wait(1.0)
                continue
            now = time.time_ns()
            for msg in got:
                if msg[0] != b"message":
                    continue
                lines = msg[2].split(b"\n")
                i = 0
                while i < len(lines):
                    n = int(lines[i].rsplit(b" ", 1)[1])
                    for line in lines[i + 1 : i + 1 + n]:
                        self.latencies.append(now - orjson.loads(line)["ts"])
                    i += 1 + n
                    self.count += n
            self.first_ns = self.first_ns or now
            self.last_ns = now

    async def until(self, n: int, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while self.count < n:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def trades(symbols: int, start: int, n: int, route: str) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        body = {"p": 100 + (i % 50) / 4, "q": 1, "side": "buy", "t": i, "T": 0}
        out.append((route.format(f"S{i % symbols}"), orjson.dumps(body)))
    return out


def stamp(payload: bytes) -> bytes:
    """The trade with `T` = now (ns), as the publisher sends it."""
    return payload.replace(b'"T":0', b'"T":%d' % time.time_ns())


async def publish_phase(
    send: Send, msgs: list[tuple[str, bytes]], rate: float | None
) -> tuple[int, int]:
    """Send `msgs` stamped as they go, at `rate` (None: as fast as `send` goes); returns the
    first and last send times (ns)."""
    t0 = time.time_ns()
    if rate is None:
        for i in range(0, len(msgs), 500):
            await send([(r, stamp(p)) for r, p in msgs[i : i + 500]])
        return t0, time.time_ns()
    start = time.monotonic()
    sent = 0
    while sent < len(msgs):
        due = min(len(msgs), int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            await send([(r, stamp(p)) for r, p in msgs[sent:due]])
            sent = due
        await asyncio.sleep(0.001)
    return t0, time.time_ns()


async def child(args: argparse.Namespace) -> None:
    """The publishing side, in a process of its own so that its CPU never delays the reader's
    timestamps: to the broker, or (`--direct`) through the Publisher as the simulator does."""
    route = "D{}" if args.direct else ROUTE[args.broker]
    msgs = trades(args.symbols, args.first, args.count, route)
    rate = args.rate or None
    if args.direct:
        async with Publisher(PublisherConfig(redis_url=args.direct)) as pub:

            async def send_direct(batch: list[tuple[str, bytes]]) -> None:
                out: dict[Channel, list[bytes]] = {}
                pt = time.time_ns()
                for symbol, payload in batch:
                    doc = orjson.loads(payload)
                    fields = {"price": doc["p"], "size": doc["q"], "side": "buy"}
                    fields["trade_id"] = doc["t"]
                    body = encode_body("trade", symbol, doc["T"], pt, fields)
                    out.setdefault(Channel("trades", symbol), []).append(body)
                await pub.publish(out)

            t0, t1 = await publish_phase(send_direct, msgs, rate)
            await pub.flush()
    else:
        async with broker_sender(args.broker, args.url) as send:
            t0, t1 = await publish_phase(send, msgs, rate)
    print(json.dumps({"t0": t0, "t1": t1}), flush=True)


async def run_child(argv: list[str]) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        TICKWIRE, "bench", "bridge", "--child", *argv, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"publisher exited with {proc.returncode}")
    result: dict[str, int] = json.loads(out.splitlines()[-1])
    return result


async def phases(
    reader: Reader, base: list[str], args: argparse.Namespace, bridge: int | None
) -> dict[str, Any]:
    """Throughput (the bridge stopped while the broker fills, then let go: its drain rate), then
    latency at `args.rate`."""
    reader.reset()
    common = [*base, "--symbols", str(args.symbols)]
    if bridge is not None:
        os.kill(bridge, signal.SIGSTOP)
    try:
        sent = await run_child(
            [*common, "--first", "1000000", "--count", str(args.count), "--rate", "0"]
        )
    finally:
        if bridge is not None:
            os.kill(bridge, signal.SIGCONT)
    start = time.time_ns() if bridge is not None else sent["t0"]
    complete = await reader.until(args.count, args.timeout)
    seconds = (reader.last_ns - start) / 1e9
    result: dict[str, Any] = {
        "events": reader.count,
        "complete": complete,
        "events_per_s": round(reader.count / seconds) if seconds > 0 else 0,
        "publish_per_s": round(args.count / ((sent["t1"] - sent["t0"]) / 1e9)),
    }
    reader.reset()
    n = int(args.rate * args.seconds)
    await run_child([*common, "--first", "2000000", "--count", str(n), "--rate", str(args.rate)])
    complete = await reader.until(n, args.timeout)
    result["complete"] = result["complete"] and complete
    result["rate"] = args.rate
    result["latency"] = latency_summary(np.array(reader.latencies, dtype=np.int64))
    return result


@contextlib.asynccontextmanager
async def broker_sender(broker: str, url: str) -> Any:
    """A publishing client for `broker` (what the desk's own publishers would be)."""
    if broker == "nats":
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="MD", subjects=["md.>"])

        async def send_nats(msgs: list[tuple[str, bytes]]) -> None:
            for subject, data in msgs:
                await nc.publish(subject, data)
            await nc.flush()

        yield send_nats
        await nc.close()
    elif broker == "mqtt":
        import aiomqtt

        port = int(url.rsplit(":", 1)[1])
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        async with aiomqtt.Client(
            "127.0.0.1", port, max_inflight_messages=1000, socket_options=nodelay
        ) as client:
            # The bench keeps a few hundred publishes in flight on purpose: no warning for it.
            client.pending_calls_threshold = 1 << 20

            async def send_mqtt(msgs: list[tuple[str, bytes]]) -> None:
                await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in msgs))

            yield send_mqtt
    else:
        import aio_pika

        conn = await aio_pika.connect(url)
        channel = await conn.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange("md", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("md-trades", durable=True)
        await queue.bind(exchange, "trades.*")

        async def send_rabbit(msgs: list[tuple[str, bytes]]) -> None:
            for key, body in msgs:
                await exchange.publish(
                    aio_pika.Message(body, message_id=f"{key}:{body[-24:]!r}"), routing_key=key
                )

        yield send_rabbit
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="tickwire-bench-bridge-"))
    map_path = folder / "map.toml"
    map_path.write_text(bridge_map(args.broker))
    broker: BrokerProcess = BROKER_PROCESSES[args.broker]()
    with RedisProcess() as redis, broker:
        sub = await RedisSubscription.open(redis.url, [live_channel(0)])
        reader = Reader(sub)
        route = ROUTE[args.broker]
        out: dict[str, Any] = {"broker": args.broker, "count": args.count}
        base = ["--broker", args.broker, "--url", broker.url]
        async with broker_sender(args.broker, broker.url) as send:
            log = open(folder / "bridge.log", "wb")  # noqa: SIM115 - closed below
            cmd = [TICKWIRE, "feed", args.broker, "--url", broker.url, "--redis", redis.url]
            proc = start_group([*cmd, "--config", str(map_path)], log)
            try:
                # Warm up (and for MQTT: make the bridge's session exist before the run).
                warm = [(route.format("WARM"), stamp(p)) for _, p in trades(1, 0, 1, route)]
                while reader.count == 0:
                    if proc.poll() is not None:
                        raise SystemExit(f"bridge exited: {(folder / 'bridge.log').read_text()}")
                    await send(warm)
                    await reader.until(1, 0.5)
                cpu0 = cpu_seconds([proc.pid])
                out["bridge"] = await phases(reader, base, args, proc.pid)
                out["bridge"]["bridge_cpu_s"] = round(cpu_seconds([proc.pid]) - cpu0, 2)
            finally:
                stop_group(proc)
                log.close()
        out["direct"] = await phases(reader, [*base, "--direct", redis.url], args, None)
        reader.task.cancel()
        sub.close()
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tickwire bench bridge", description=__doc__)
    p.add_argument("--broker", choices=sorted(BROKER_PROCESSES), required=True)
    p.add_argument("--count", type=count, default=50_000, help="trades in the throughput phase")
    p.add_argument("--symbols", type=count, default=20)
    p.add_argument("--rate", type=rate, default=1000.0, help="events/s in the latency phase")
    p.add_argument("--seconds", type=seconds, default=5.0, help="length of the latency phase")
    p.add_argument("--timeout", type=seconds, default=60.0, help="give up waiting after this")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    # The publishing child's own options.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--direct", metavar="REDIS_URL", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import uvloop

    if args.child:
        uvloop.run(child(args))
        return 0
    out = uvloop.run(run(args))
    b, d = out["bridge"], out["direct"]
    rows = [
        ("events/s (max)", float(b["events_per_s"]), float(d["events_per_s"])),
        *(
            (
                f"latency {k[:-3]} ms @ {args.rate:g}/s",
                b["latency"][k] / 1000,
                d["latency"][k] / 1000,
            )
            for k in ("p50_us", "p99_us", "p99.9_us")
        ),
    ]
    print(table(rows, (f"{args.broker} bridge", "publisher")))
    print(
        f"bridge CPU {b['bridge_cpu_s']} s; broker publisher {b['publish_per_s']:,}/s; "
        f"all stored: {b['complete'] and d['complete']}"
    )
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if b["complete"] and d["complete"] else 1
