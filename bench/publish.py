"""Publish bench: events/s into Redis by one process, tickwire's publisher against redis-py baselines.

    tickwire bench publish [--events 500000] [--symbols 100] [--redis URL] [--json FILE]

Every variant publishes simulator events into a freshly emptied Redis with `MAXLEN ~` retention;
ratios are against the redis-py pipeline of 1000 measured in the same run. Every variant runs on
uvloop, as `tickwire feed` does. The publisher's row takes bodies encoded beforehand; the feed
sim row is `tickwire feed sim --max` end to end (generate, encode, publish, bars) and is compared
with it; the ceiling row is `redis-benchmark -P 100` of bare `XADD MAXLEN ~` of the same size
over as many streams (when `redis-benchmark` is installed), compared with the publisher.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import orjson
import uvloop

from tickwire.core.argtypes import count
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisAddress, RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.feeds.runner import run_simulator
from tickwire.feeds.simulator import Chunk, MarketSimulator, make_instruments

PUBLISHER = "tickwire publisher (pre-encoded)"
FEED_SIM = "feed sim --max end to end"
CEILING = "redis-benchmark -P 100 XADD (ceiling)"


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def make_chunks(events: int, symbols: int, seed: int = 1) -> tuple[MarketSimulator, list[Chunk]]:
    sim = MarketSimulator(make_instruments(symbols, seed), rate=1_000_000, seed=seed)
    chunks = []
    left = events
    while left > 0:
        chunks.append(sim.next_chunk(min(4096, left)))
        left -= len(chunks[-1])
    return sim, chunks


def pre_encode(sim: MarketSimulator, chunks: list[Chunk]) -> list[dict[Channel, list[bytes]]]:
    return [sim.encode(chunk, time.time_ns()) for chunk in chunks]


async def run_tickwire(url: str, batches: list[dict[Channel, list[bytes]]]) -> Result:
    t0 = time.perf_counter()
    async with Publisher(PublisherConfig(redis_url=url)) as pub:
        for batch in batches:
            await pub.publish(batch)
        await pub.flush()
    events = sum(len(b) for batch in batches for b in batch.values())
    return Result(PUBLISHER, events, time.perf_counter() - t0)


async def run_feed_sim(url: str, events: int, symbols: int) -> Result:
    """What `tickwire feed sim --max` does, timed from the first chunk to the last write."""
    sim = MarketSimulator(
        make_instruments(symbols, 3), rate=1_000_000, seed=3, start_ns=time.time_ns()
    )
    async with Publisher(PublisherConfig(redis_url=url)) as pub:
        report = await run_simulator(pub, sim, bar_intervals=("1s",), count=events, throttle=False)
    return Result(FEED_SIM, report.events, report.seconds)


def run_ceiling(url: str, events: int, streams: int, size: int) -> Result:
    """`redis-benchmark -P 100` of bare `XADD MAXLEN ~` with a field of `size` bytes over
    `streams` streams: what Redis takes at most, one entry per event, on this machine."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return Result(CEILING, 0, 0.0, "redis-benchmark is not installed (apt install redis-tools)")
    address = RedisAddress.parse(url)
    target = ["-s", address.path] if address.path else ["-h", address.host, "-p", str(address.port)]
    command = [binary, *target, *_benchmark_auth(address)]
    command += ["-n", str(events), "-P", "100", "-r", str(streams), "--csv"]
    command += ["XADD", "tw:bench:__rand_int__", "MAXLEN", "~", "100000", "*", "d", "x" * size]
    t0 = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    seconds = time.perf_counter() - t0
    rows = list(csv.reader(out.stdout.splitlines()))
    rps = float(rows[-1][1])
    # redis-benchmark's own rate, as seconds for the events (its start-up left out).
    return Result(CEILING, events, events / rps if rps > 0 else seconds)


def _benchmark_auth(address: RedisAddress) -> list[str]:
    """redis-benchmark's options for the URL's credentials and TLS, as tickwire connects."""
    args = []
    if address.password is not None:
        args += ["-a", address.password]
        if address.username:
            args += ["--user", address.username]
    tls = address.tls
    if tls is not None:
        args += ["--tls", "--sni", address.host]
        args += ["--cacert", tls.ca_file] if tls.ca_file else []
        args += (
            ["--cert", tls.cert_file, "--key", tls.key_file or tls.cert_file]
            if tls.cert_file
            else []
        )
        args += [] if tls.verify else ["--insecure"]
    return args


async def run_redis_py(
    url: str, sim: MarketSimulator, chunks: list[Chunk], pipeline: int
) -> Result:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    n = 0
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for chunk in chunks:
        for channel, bodies in sim.encode(chunk, time.time_ns()).items():
            for body in bodies:
                n += 1
                if pipeline <= 1:
                    await r.xadd(
                        channel.stream_key, {"d": body + b"}"}, maxlen=100_000, approximate=True
                    )
                    continue
                pipe.xadd(channel.stream_key, {"d": body + b"}"}, maxlen=100_000, approximate=True)
                if len(pipe) >= pipeline:
                    await pipe.execute()
    if len(pipe):
        await pipe.execute()
    seconds = time.perf_counter() - t0
    await r.aclose()
    name = "redis-py await xadd" if pipeline <= 1 else f"redis-py pipeline {pipeline}"
    return Result(name, n, seconds)


def generation_rate(events: int, symbols: int) -> Result:
    sim = MarketSimulator(make_instruments(symbols, 2), rate=1_000_000, seed=2)
    t0 = time.perf_counter()
    n = 0
    while n < events:
        n += len(sim.next_chunk(4096))
    return Result("simulator generation (numpy, no encoding)", n, time.perf_counter() - t0)


async def measure(url: str, events: int, symbols: int, baseline_events: int) -> list[Result]:
    conn = await RedisConnection.open(url)

    async def fresh(run: Callable[[], Awaitable[Result]]) -> Result:
        await conn.execute("FLUSHDB")
        return await run()

    sim, chunks = make_chunks(events, symbols)
    batches = pre_encode(sim, chunks)
    # The stored size: body, tail (`,"epoch":"<12>","seq":<n>}`, about 30 bytes) and all.
    bodies = [b for batch in batches[:4] for bs in batch.values() for b in bs]
    size = round(sum(map(len, bodies)) / max(1, len(bodies))) + 30
    _, small = make_chunks(baseline_events, symbols)
    _, tiny = make_chunks(max(1000, baseline_events // 10), symbols)
    results = [
        await fresh(lambda: run_tickwire(url, batches)),
        await fresh(lambda: run_feed_sim(url, events, symbols)),
        await fresh(lambda: run_redis_py(url, sim, small, pipeline=1000)),
        await fresh(lambda: run_redis_py(url, sim, tiny, pipeline=1)),
    ]
    await conn.execute("FLUSHDB")
    results.append(run_ceiling(url, events, 2 * symbols, size))
    await conn.execute("FLUSHDB")
    conn.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tickwire bench publish", description=__doc__.split("\n")[0])
    p.add_argument(
        "--events",
        type=count,
        default=500_000,
        help="events for tickwire's publisher (default 500000)",
    )
    p.add_argument(
        "--baseline-events",
        type=count,
        default=100_000,
        help="events for the redis-py pipeline baseline",
    )
    p.add_argument("--symbols", type=count, default=100, help="symbols (streams = 2 per symbol)")
    p.add_argument("--redis", help="use this Redis (it is FLUSHDB'd!) instead of a private one")
    p.add_argument("--json", help="write the results to this file as JSON")
    args = p.parse_args(argv)

    gen = generation_rate(max(args.events, 1_000_000), args.symbols)
    if args.redis:
        results = uvloop.run(measure(args.redis, args.events, args.symbols, args.baseline_events))
    else:
        with RedisProcess() as proc:
            results = uvloop.run(measure(proc.url, args.events, args.symbols, args.baseline_events))
    by_name = {r.name: r for r in results}
    base = by_name["redis-py pipeline 1000"].rate
    print(f"{'variant':44} {'events':>9} {'seconds':>8} {'events/s':>11} {'vs pipeline':>11}")
    for r in [*results, gen]:
        if r.note:
            print(f"{r.name:44} {r.note}")
            continue
        print(f"{r.name:44} {r.events:9d} {r.seconds:8.3f} {r.rate:11,.0f} {r.rate / base:10.2f}x")
    publisher, ceiling = by_name[PUBLISHER].rate, by_name[CEILING].rate
    ratios = {"feed_sim_vs_publisher": by_name[FEED_SIM].rate / publisher}
    if ceiling > 0:
        ratios["publisher_vs_ceiling"] = publisher / ceiling
    for name, value in ratios.items():
        print(f"{name.replace('_', ' ')}: {value:.2f}x")
    if args.json:
        doc = {
            "results": [
                {**asdict(r), "rate": r.rate, "ratio_vs_pipeline": r.rate / base}
                for r in [*results, gen]
            ],
            "ratios": ratios,
            "config": vars(args),
            "python": sys.version,
        }
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
