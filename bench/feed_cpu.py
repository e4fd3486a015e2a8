"""Feed CPU bench: the paced simulator feed's CPU, against its loop's floor in the same command.

    tickwire bench feed [--rate 10000] [--symbols 100] [--duration 10] [--warmup 2] [--tick-ms 1]
                        [--tickwire PATH] [--json FILE]

The feed (`tickwire feed sim`, bars on, as it runs by default) publishes into a private Redis in a
process of its own. Its CPU is read from /proc over a window that starts after the warm-up (the
start-up and imports are left out), and its append calls from Redis's `INFO commandstats` over the
same window: a paced feed makes one call a release, and a few more for the bars.

Then the floor runs the same way: a process whose loop only sleeps the tick, writes one small
pre-packed command and settles its reply through the same connection class as the publisher, with
no encoding and no Python per event. That is the least a release costs on this machine at this
hour; the machine drifts 2x through a day, so the feed's figure is read against it. To compare
commits, run the bench in turns with `--tickwire` naming each checkout's `.venv/bin/tickwire`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import orjson
import redis
import uvloop

from tickwire.bench.harness import TICKWIRE, cpu_seconds, start_group, stop_group
from tickwire.core.argtypes import count, rate, seconds, seconds_or_none, tick_ms
from tickwire.core.commands import Packed
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection

#: The floor's command: a SET of a value about one event's size.
FLOOR_COMMAND = Packed(
    b"*3\r\n$3\r\nSET\r\n$8\r\ntw:floor\r\n$200\r\n" + b"x" * 200 + b"\r\n", None
)


@dataclass(frozen=True)
class Window:
    """What a process did over the measured window."""

    cpu_percent: float
    calls_per_s: float

    @property
    def cpu_us_per_call(self) -> float:
        return 1e4 * self.cpu_percent / self.calls_per_s if self.calls_per_s else 0.0


def calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def measure(
    cmd: list[str], client: redis.Redis, command: str, warmup: float, duration: float
) -> Window:
    """Run `cmd`, and read its CPU and the calls of `command` Redis counted over the window."""
    try:
        proc = start_group(cmd, subprocess.DEVNULL)
    except OSError as exc:
        raise SystemExit(f"cannot run {cmd[0]}: {exc.strerror}") from None
    try:
        # A bench's own pacing: the window is wall-clock time by definition.
        time.sleep(warmup)
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode} during the warm-up")
        cpu0, calls0, t0 = cpu_seconds([proc.pid]), calls(client, command), time.monotonic()
        time.sleep(duration)
        cpu1, calls1, t1 = cpu_seconds([proc.pid]), calls(client, command), time.monotonic()
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode} within the window")
    finally:
        stop_group(proc)
    window = t1 - t0
    return Window(100 * (cpu1 - cpu0) / window, (calls1 - calls0) / window)


async def floor_loop(url: str, tick_s: float) -> None:
    """The floor: sleep a tick, write one command, settle its reply as it arrives; for ever."""
    conn = await RedisConnection.open(url)

    def settle() -> None:
        if conn.ready:
            conn.take_ready(conn.ready)

    conn.listen(settle)
    while True:
        conn.send([FLOOR_COMMAND])
        await asyncio.sleep(tick_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tickwire bench feed", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=rate, default=10_000, help="events/s (default 10000)")
    p.add_argument("--symbols", type=count, default=100, help="symbols (default 100)")
    p.add_argument(
        "--duration", type=seconds, default=10.0, help="measured seconds, each (default 10)"
    )
    p.add_argument(
        "--warmup",
        type=seconds_or_none,
        default=2.0,
        help="seconds before the window opens (default 2)",
    )
    p.add_argument(
        "--tick-ms", type=tick_ms, default=1.0, help="the feed's release tick (default 1)"
    )
    p.add_argument(
        "--tickwire",
        default=TICKWIRE,
        metavar="PATH",
        help="the tickwire command that runs the feed (default: this one's)",
    )
    p.add_argument("--json", help="write the results to this file as JSON")
    # Internal: the floor's own process.
    p.add_argument("--floor-loop", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor_loop:
        uvloop.run(floor_loop(args.floor_loop, args.tick_ms / 1000))
        return 0
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be positive and --warmup not negative")

    feed_cmd = [
        args.tickwire, "feed", "sim", "--rate", str(args.rate), "--symbols", str(args.symbols),
        "--duration", str(args.warmup + args.duration + 5),
    ]  # fmt: skip
    if args.tick_ms != 1.0:
        feed_cmd += ["--tick-ms", str(args.tick_ms)]  # older commits lack the option
    with RedisProcess() as server:
        client = redis.Redis.from_url(server.url)
        print(f"feed: {' '.join(feed_cmd)}, {args.duration:g} s after {args.warmup:g} s …")
        feed = measure(
            [*feed_cmd, "--redis", server.url], client, "evalsha", args.warmup, args.duration
        )
        floor_cmd = [
            sys.executable, "-m", "tickwire.bench.feed_cpu", "--floor-loop", server.url,
            "--tick-ms", str(args.tick_ms),
        ]  # fmt: skip
        print("floor: sleep a tick, write one command, settle its reply …")
        floor = measure(floor_cmd, client, "set", args.warmup, args.duration)
        client.close()
    ratio = feed.cpu_us_per_call / floor.cpu_us_per_call if floor.cpu_us_per_call else 0.0
    print(f"{'':8} {'CPU % of a core':>16} {'releases/s':>11} {'CPU µs a release':>17}")
    for name, w in (("feed", feed), ("floor", floor)):
        print(f"{name:8} {w.cpu_percent:16.1f} {w.calls_per_s:11.0f} {w.cpu_us_per_call:17.0f}")
    print(f"feed / floor, CPU a release: {ratio:.2f}x (releases: the feed's append calls)")
    if args.json:
        doc = {
            "feed": {**asdict(feed), "cpu_us_per_call": feed.cpu_us_per_call},
            "floor": {**asdict(floor), "cpu_us_per_call": floor.cpu_us_per_call},
            "feed_per_release_vs_floor": ratio,
            "config": vars(args),
        }
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
