"""Client load for the bench: one process holding many WebSocket clients.

Run by `tickwire bench` as a separate process (so the load generator does not share the server's
event loop). Every client is a light `sink.py` connection counting frames, bytes and events;
sampled ones also parse every message: latency (receive time minus publish time `pt`, and minus
the event's own venue time `ts`), the seq invariant, and the age of the client's view that each
message ends (receive time minus the `pt` of the oldest event it covers). With `--max-hz` the
clients are throttled, and one extra unthrottled client (not counted) records every event's `pt`
so that the age covers the events a throttled message skipped.
Driven by commands on stdin (see `main_async`); prints one JSON line per report.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from tickwire.bench.invariant import InvariantChecker
from tickwire.bench.sink import EventCounter, SinkProtocol, connect_sink
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.runtime import tune_gc


def spread_channels(channels: list[str], clients: int, per: int) -> list[list[str]]:
    """A plan: `per` consecutive channels for each of `clients` clients, wrapping round the list,
    so that every channel has about as many subscribers as any other."""
    per = min(per, len(channels))
    return [[channels[(i * per + j) % len(channels)] for j in range(per)] for i in range(clients)]


def concrete(names: list[str], known: Iterable[str]) -> list[str]:
    """`names` with each pattern (`quotes:*`) replaced by the `known` channels it covers."""
    patterns = [ChannelPattern.parse(n) for n in names if n.endswith(":*")]
    if not patterns:
        return names
    plain = [n for n in names if not n.endswith(":*")]
    return plain + sorted(
        {k for k in known if any(p.matches(Channel.parse(k)) for p in patterns)} - set(plain)
    )


def view_age_file(latency_file: str) -> str:
    """Where a load process writes its view ages (ns) beside its latency samples."""
    return latency_file.removesuffix(".npy") + "-age.npy"


@dataclass
class ClientStats:
    sampled: bool
    latencies: list[int] = field(default_factory=list)
    #: Receive time minus the event's venue time `ts`, for the same events as `latencies`.
    since_event: list[int] = field(default_factory=list)
    checker: InvariantChecker = field(default_factory=InvariantChecker)
    error: str | None = None
    close_code: int | None = None
    live_from: int = 0
    #: Per `events` message of the window: (channel, oldest seq it covers, receive ns), and the
    #: view ages (ns) of those whose oldest event's `pt` it carried itself.
    covered: list[tuple[str, int, int]] = field(default_factory=list)
    ages: list[int] = field(default_factory=list)


def checking(stats: ClientStats, measure_from: list[int]) -> Callable[[bytes, int], None]:
    """The message handler of a sampled connection: latency of every event, the invariant, and
    the age of the view each message ends."""
    feed = stats.checker.feed
    latencies = stats.latencies
    since_event = stats.since_event
    covered = stats.covered
    ages = stats.ages

    def on_message(payload: bytes, now: int) -> None:
        doc = orjson.loads(payload)
        start = measure_from[0]
        for m in doc if isinstance(doc, list) else (doc,):
            if m.get("type") == "events":
                events = m["events"]
                for ev in events:
                    pt = ev["pt"]
                    if pt >= start:
                        latencies.append(now - pt)
                        since_event.append(now - ev["ts"])
                first = events[0]
                if first["pt"] >= start:
                    skipped = m.get("skipped", 0)
                    if skipped:
                        covered.append((m["ch"], first["seq"] - skipped, now))
                    else:
                        ages.append(now - first["pt"])
            feed(m)

    return on_message


def recording(published: dict[tuple[str, int], int]) -> Callable[[bytes, int], None]:
    """The message handler of the reference connection: every event's `pt` by (channel, seq)."""

    def on_message(payload: bytes, now: int) -> None:
        doc = orjson.loads(payload)
        for m in doc if isinstance(doc, list) else (doc,):
            if m.get("type") == "events":
                ch = m["ch"]
                for ev in m["events"]:
                    published[ch, ev["seq"]] = ev["pt"]

    return on_message


class Load:
    """Every client of this process, and the counters a step reports."""

    def __init__(
        self,
        url: str,
        plan: list[list[str]],
        sample_every: int,
        max_hz: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        #: For a wss:// URL: the context that trusts the server's certificate.
        self.tls = tls
        self.plan = plan
        self.max_hz = max_hz
        #: The reference connection's `pt` of every event (throttled loads only).
        self.published: dict[tuple[str, int], int] = {}
        self.reference: SinkProtocol | None = None
        self.stats = [ClientStats(sampled=i % sample_every == 0) for i in range(len(plan))]
        self.sinks: list[SinkProtocol | None] = [None] * len(plan)
        self.measure_from = [2**62]
        self.tasks: list[asyncio.Task[None]] = []
        self._mark: dict[str, int] = {}
        #: One for every sink of the process: in a broadcast they all get the same frames.
        self.counter = EventCounter()

    async def open(self) -> None:
        connected = [asyncio.Event() for _ in self.plan]
        if self.max_hz is not None and self.plan:
            # Unthrottled, on the same channels as the first client: the publish time of the
            # events throttled messages skip. Its frames count in no figure.
            msg = orjson.dumps({"op": "subscribe", "id": 1, "channels": self.plan[0]})
            self.reference = await connect_sink(
                self.url, msg, recording(self.published), EventCounter(), self.tls
            )
        for i, channels in enumerate(self.plan):
            self.tasks.append(asyncio.create_task(self._client(i, channels, connected[i])))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # don't SYN-flood the accept queue
        await asyncio.gather(*(c.wait() for c in connected))

    async def _client(self, i: int, channels: list[str], connected: asyncio.Event) -> None:
        request: dict[str, object] = {"op": "subscribe", "id": 1, "channels": channels}
        if self.max_hz is not None:
            request["max_hz"] = self.max_hz
        msg = orjson.dumps(request)
        stats = self.stats[i]
        handler = checking(stats, self.measure_from) if stats.sampled else None
        try:
            sink = await connect_sink(self.url, msg, handler, self.counter, self.tls)
        except (OSError, TimeoutError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            connected.set()
        self.sinks[i] = sink
        await sink.closed
        stats.close_code = sink.close_code

    def totals(self) -> dict[str, int]:
        out = {"frames": 0, "bytes": 0, "events": 0}
        for sink in self.sinks:
            if sink is not None:
                out["frames"] += sink.frames
                out["bytes"] += sink.bytes
                out["events"] += sink.events
        return out

    def go(self, measure_from: int) -> None:
        """Start a step: latency and counts from `measure_from` (unix ns, after the warm-up)."""
        self.measure_from[0] = measure_from
        for s in self.stats:
            s.latencies.clear()
            s.since_event.clear()
            s.covered.clear()
            s.ages.clear()
            s.live_from = 0
        self._mark = self.totals()
        delay = max(0.0, (measure_from - time.time_ns()) / 1e9)
        asyncio.get_running_loop().call_later(delay, self._start_counting)

    def _start_counting(self) -> None:
        self._mark = self.totals()

    def live(self) -> dict[str, float]:
        """Events so far this step, and p99 (µs) over the samples since the last call."""
        fresh: list[int] = []
        for s in self.stats:
            if s.sampled:
                fresh.extend(s.latencies[s.live_from :])
                s.live_from = len(s.latencies)
        p99 = float(np.percentile(fresh, 99)) / 1000 if fresh else float("nan")
        return {"events": self.totals()["events"] - self._mark.get("events", 0), "p99_us": p99}

    def report(self, latency_file: str) -> dict[str, object]:
        """The step's figures; its latency samples (ns) go to `latency_file`: one row from
        `pt`, one from `ts`, of the same events."""
        lat = [x for s in self.stats for x in s.latencies]
        since = [x for s in self.stats for x in s.since_event]
        np.save(latency_file, np.array([lat, since], dtype=np.int64).reshape(2, -1))
        ages = [x for s in self.stats for x in s.ages]
        published = self.published
        for s in self.stats:
            for ch, seq, at in s.covered:
                pt = published.get((ch, seq))
                if pt is not None:
                    ages.append(at - pt)
        np.save(view_age_file(latency_file), np.array(ages, dtype=np.int64))
        now = self.totals()
        sampled = [s for s in self.stats if s.sampled]
        # Per sampled (client, channel): the last seq seen, to count a lost tail against Redis.
        last_seqs = [
            [ch, t.last] for s in sampled for ch, t in s.checker.channels.items() if t.last
        ]
        return {
            "clients": len(self.stats),
            "sampled": len(sampled),
            "errors": [s.error for s in self.stats if s.error][:5],
            "closed": [s.close_code for s in self.stats if s.close_code is not None][:5],
            **{k: now[k] - self._mark.get(k, 0) for k in now},
            "sampled_events": sum(s.checker.delivered for s in sampled),
            "lost": sum(s.checker.lost for s in sampled),
            "duplicates": sum(s.checker.duplicates for s in sampled),
            "gaps": sum(s.checker.gaps_announced for s in sampled),
            "gap_events": sum(s.checker.gap_events for s in sampled),
            "resets": sum(s.checker.resets for s in sampled),
            "violations": [v for s in sampled for v in s.checker.violations][:5],
            "last_seqs": last_seqs,
        }

    async def close(self) -> None:
        for sink in [*self.sinks, self.reference]:
            if sink is not None:
                sink.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def main_async(args: argparse.Namespace, plan: list[list[str]]) -> None:
    """Commands on stdin, one per line: `go <unix ns>` starts a step (latency counted from then),
    `report <file.npy>` ends it (prints its figures as one JSON line), `stop` exits. While a step
    runs, a `{"live": …}` line each second feeds the bench's progress bar."""
    tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    load = Load(args.url, plan, args.sample_every, args.max_hz, tls)
    await load.open()
    tune_gc()  # the same for both targets: collector pauses would show as their latency
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ticker: asyncio.Task[None] | None = None

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            print(orjson.dumps({"live": load.live()}).decode(), flush=True)

    try:
        while line := (await reader.readline()).decode().split():
            if line[0] == "go":
                load.go(int(line[1]) if len(line) > 1 else time.time_ns())
                ticker = ticker or asyncio.create_task(tick())
            elif line[0] == "report":
                if ticker is not None:
                    ticker.cancel()
                    ticker = None
                print(orjson.dumps({"report": load.report(line[1])}).decode(), flush=True)
            elif line[0] == "stop":
                break
    finally:
        await load.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--plan", required=True, help="JSON file: a list of channels per client")
    p.add_argument("--sample-every", type=int, default=1)
    p.add_argument("--max-hz", type=float, default=None, help="throttle every client to this")
    p.add_argument("--cafile", default=None, help="for a wss:// URL: the CA to trust (PEM)")
    args = p.parse_args(argv)
    plan = orjson.loads(Path(args.plan).read_bytes())
    import uvloop

    uvloop.run(main_async(args, plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
