"""Failover bench: a Redis Cluster master killed under load, and what clients see, timed.

    tickwire bench failover [--node-timeout-ms 2000] [--rate 2000] [--symbols 12] [--behind]
                            [--no-full-coverage] [--hang]

Starts a private 3-master, 3-replica cluster, one `tickwire serve` on it, a publisher (in this
process) at `--rate` events/s spread over symbols on every master, and one WebSocket client
subscribed to `trades:*`. After a warm-up it kills one master with SIGKILL (with `--behind`, its
replica is first stopped until the master holds appends the replica never got, so that they are
really lost) and keeps publishing until every channel flows again. It reports, for the channels
of the dead master and for the others: how long live events paused at the client, the time to
the replica's promotion, the `reset`s, the events the client saw that Redis lost, and the
`(channel, epoch, seq)` that name two events (must be 0).

With Redis's default `cluster-require-full-coverage yes`, every master refuses commands
(CLUSTERDOWN) from the moment the dead one is marked failed until its replica is promoted, so
the other shards pause for that window too; `--no-full-coverage` runs the cluster with it off,
where they should not pause at all.

`--hang` stops the master with SIGSTOP instead of killing it: a hung host or a lost network,
whose connections stay open and answer nothing (a killed process's are closed at once). It
stays so until the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

from tickwire.bench.harness import ServerProcess
from tickwire.core.argtypes import count, rate, seconds_or_none
from tickwire.core.channels import Channel
from tickwire.core.config import PublisherConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_cluster import ClusterConnection, Node, SlotMap
from tickwire.core.redis_process import RedisCluster, pending_to_replicas
from tickwire.core.redis_slots import channel_slot
from tickwire.core.redis_target import open_redis
from tickwire.core.waits import wait_set
from tickwire.feeds.publisher import Publisher


@dataclass
class Seen:
    """What the client got, with arrival times (monotonic)."""

    events: dict[str, list[tuple[float, str, int, bytes]]] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)
    status: list[tuple[float, str]] = field(default_factory=list)
    #: Set once every channel of `waiting` got an event after `since`.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: set[str] = field(default_factory=set)
    since: float = float("inf")


async def watch(url: str, seen: Seen, ready: asyncio.Event) -> None:
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channels": ["trades:*"]}))
        async for frame in ws:
            now = time.monotonic()
            doc = orjson.loads(frame)
            for m in doc if isinstance(doc, list) else [doc]:
                kind = m.get("type")
                if kind == "subscribed":
                    ready.set()
                elif kind == "events":
                    got = seen.events.setdefault(m["ch"], [])
                    for e in m["events"]:
                        got.append((now, e["epoch"], e["seq"], orjson.dumps(e)))
                    if now > seen.since and seen.waiting:
                        seen.waiting.discard(m["ch"])
                        if not seen.waiting:
                            seen.flowing.set()
                elif kind == "reset":
                    seen.resets[m["ch"]] = seen.resets.get(m["ch"], 0) + 1
                elif kind == "status":
                    seen.status.append((now, m.get("redis", "")))


def symbols_per_master(slots: SlotMap, per_master: int, prefix: str = "F") -> dict[str, Node]:
    """`per_master` symbols (`<prefix><n>`) owned by each master of `slots`, with their owner."""
    want = {m: per_master for m in slots.masters}
    out: dict[str, Node] = {}
    i = 0
    while any(want.values()):
        s = f"{prefix}{i}"
        owner = slots.owners[channel_slot(Channel("trades", s))]
        if want[owner]:
            want[owner] -= 1
            out[s] = owner
        i += 1
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with RedisCluster(
        node_timeout_ms=args.node_timeout_ms, full_coverage=args.full_coverage
    ) as cluster:
        conn = await open_redis(cluster.url)
        assert isinstance(conn, ClusterConnection)
        owners = symbols_per_master(conn.slots, max(1, args.symbols // len(conn.slots.masters)))
        victim_node = next(iter(owners.values()))
        victim = cluster.node_at(victim_node[1])
        replica = cluster.replica_of(victim)
        doomed = {f"trades:{s}" for s, o in owners.items() if o == victim_node}
        server = ServerProcess(cluster.seeds_url).start(log=args.server_log or subprocess.DEVNULL)
        seen = Seen()
        try:
            ready = asyncio.Event()
            watcher = asyncio.create_task(watch(server.url, seen, ready))
            async with asyncio.timeout(10):
                await ready.wait()
            cfg = PublisherConfig(redis_url=cluster.seeds_url, backoff_max_s=0.2)
            stop = asyncio.Event()
            sent = 0

            async def flow(pub: Publisher) -> None:
                nonlocal sent
                interval = len(owners) / args.rate
                next_at = time.monotonic()
                while not stop.is_set():
                    sent += 1
                    await pub.publish({Channel("trades", s): [trade(s, sent)] for s in owners})
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))

            async with Publisher(cfg) as pub:
                flowing = asyncio.create_task(flow(pub))
                await asyncio.sleep(args.warmup)
                if args.behind:
                    replica.pause()
                    try:
                        while pending_to_replicas(victim.port) < 1 << 20:
                            await pub.publish(
                                {
                                    Channel("trades", s): [trade(s, i) for i in range(200)]
                                    for s, o in owners.items()
                                    if o == victim_node
                                }
                            )
                        await pub.flush()
                        await asyncio.sleep(0.5)  # the client takes them
                        killed_at = time.monotonic()
                        if args.hang:
                            victim.pause()
                        else:
                            victim.kill()
                    finally:
                        replica.resume()
                else:
                    killed_at = time.monotonic()
                    if args.hang:
                        victim.pause()
                    else:
                        victim.kill()
                how = "stopped" if args.hang else "killed"
                say(f"{how} master :{victim.port} (replica :{replica.port})")
                await asyncio.to_thread(cluster.wait_ok, 120)
                promoted_at = time.monotonic()

                say(f"replica promoted after {promoted_at - killed_at:.2f} s")
                seen.waiting = {f"trades:{s}" for s in owners}
                seen.since = promoted_at
                if not await wait_set(seen.flowing, 60):
                    say(f"no events after the promotion on {sorted(seen.waiting)}")

                await asyncio.sleep(args.after)
                stop.set()
                await flowing
            if args.hang:
                victim.kill()  # hung until now, as a host that never comes back
            await asyncio.sleep(1.0)  # the last events reach the client
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        finally:
            server.stop()
        stored: dict[str, dict[tuple[str, int], bytes]] = {}
        fresh = await open_redis(cluster.seeds_url)
        try:
            for s in owners:
                ch = Channel("trades", s)
                entries = await fresh.execute("XRANGE", ch.stream_key, "-", "+")
                stored[ch.name] = {}
                for _id, fields in entries:
                    doc = orjson.loads(fields[1])
                    stored[ch.name][(doc["epoch"], doc["seq"])] = fields[1]
        finally:
            fresh.close()
            conn.close()
    return figures(seen, stored, doomed, killed_at, promoted_at)


def figures(
    seen: Seen,
    stored: dict[str, dict[tuple[str, int], bytes]],
    doomed: set[str],
    killed_at: float,
    promoted_at: float,
) -> dict[str, Any]:
    pauses: dict[str, float] = {}
    lost = reused = 0
    lost_without_reset = 0
    for ch, got in seen.events.items():
        # The longest silence from shortly before the kill on (what was in flight at the
        # kill arrives just after it).
        times = [t for t, *_ in got if t > killed_at - 1.0]
        if len(times) > 1:
            pauses[ch] = max(b - a for a, b in itertools.pairwise(times))
        gone = 0
        for _t, epoch, seq, body in got:
            have = stored.get(ch, {}).get((epoch, seq))
            if have is None:
                gone += 1
            elif orjson.loads(have) != orjson.loads(body):
                reused += 1
        lost += gone
        if gone and not seen.resets.get(ch):
            lost_without_reset += gone

    def worst(chs: set[str]) -> float:
        return max((pauses[c] for c in chs if c in pauses), default=float("nan"))

    others = set(seen.events) - doomed
    down = [t for t, s in seen.status if s == "down"]
    return {
        "promotion_s": round(promoted_at - killed_at, 3),
        "pause_dead_shard_s": round(worst(doomed), 3),
        "pause_other_shards_s": round(worst(others), 3),
        "status_down_after_s": round(down[0] - killed_at, 3) if down else None,
        "resets_dead_shard": sum(seen.resets.get(c, 0) for c in doomed),
        "resets_other_shards": sum(seen.resets.get(c, 0) for c in others),
        "seen_then_lost": lost,
        "lost_without_reset": lost_without_reset,
        "seq_naming_two_events": reused,
        # Channels that got no event once the replica was promoted (must be 0).
        "not_flowing_again": len(seen.waiting),
    }


def trade(symbol: str, n: int) -> bytes:
    return encode_body(
        "trade",
        symbol,
        time.time_ns(),
        0,
        {"price": 100.0 + n % 7, "size": 1, "side": "buy", "trade_id": n},
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire bench failover",
        description="Kill a Redis Cluster master under load; time what clients see.",
    )
    p.add_argument(
        "--node-timeout-ms",
        type=count,
        default=2000,
        help="cluster-node-timeout of the private cluster (default 2000; Redis's own is 15000)",
    )
    p.add_argument("--rate", type=rate, default=2000, help="events/s published (default 2000)")
    p.add_argument("--symbols", type=count, default=12, help="symbols over the 3 masters")
    p.add_argument("--warmup", type=seconds_or_none, default=2.0, help="seconds before the kill")
    p.add_argument(
        "--after", type=seconds_or_none, default=2.0, help="seconds of flow after recovery"
    )
    p.add_argument(
        "--behind",
        action="store_true",
        help="stop the replica first until the master holds appends it never got (real loss)",
    )
    p.add_argument(
        "--no-full-coverage",
        dest="full_coverage",
        action="store_false",
        help="cluster-require-full-coverage no: the masters up keep serving during a failover",
    )
    p.add_argument(
        "--hang",
        action="store_true",
        help="stop the master (SIGSTOP: its connections stay open and silent, as a hung host's) "
        "instead of killing it",
    )
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--server-log", type=Path, help="append the server's output to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(run(args))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    ok = (
        result["seq_naming_two_events"] == 0
        and result["lost_without_reset"] == 0
        and result["not_flowing_again"] == 0
    )
    print("PASSED" if ok else "FAILED")
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(
                orjson.dumps({"config": vars(args), "figures": result, "passed": ok}, default=str)
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
