"""The fault scenarios: Redis killed, paused or cut off, a worker killed, a storm, a slow consumer."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from tickwire.bench.fault_clients import Watch
from tickwire.bench.fault_report import Outcome
from tickwire.bench.fault_stage import Settings, Stage, expect_status, say, stage, until
from tickwire.bench.harness import HealthProbe
from tickwire.bench.proxy import Proxy

#: The issue's targets.
STORM_RESUME_S = 10.0
HEALTHZ_MS = 100.0
#: Server memory growth we still call bounded while one client does not read.
RSS_GROWTH_MB = 100.0
SLOW_MIN_RATE = 2000.0  # events/s the slow-consumer scenario publishes at least


async def restart_redis(s: Stage, out: Outcome, clients: Sequence[Watch]) -> None:
    """After 2 s without Redis, start it again; time the recovery, stream on, count, and check
    every client was told `down` then `up`."""
    await asyncio.sleep(2.0)  # the outage
    await asyncio.to_thread(s.redis.start)
    out.recover_s = await s.recovered(s.mark())
    await s.steady()
    await s.finish(out)
    expect_status(out, clients)


def aof_tail(data_dir: Path) -> Path | None:
    """The AOF file Redis is appending to (Redis 7: appendonlydir/*.incr.aof)."""
    files = sorted((data_dir / "appendonlydir").glob("*.incr.aof"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


async def redis_kill_aof(st: Settings, workdir: Path, *, crash: bool = False) -> Outcome:
    out = Outcome("redis-crash-aof" if crash else "redis-kill-aof")
    async with stage(st, out.scenario, workdir, rate=st.kill_rate) as s:
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        tail = aof_tail(s.redis.data_dir)
        size = tail.stat().st_size if tail is not None else 0
        if crash:
            await asyncio.sleep(1.0)  # the second of writes the crash will take away
        say("  kill -9 redis-server (AOF, appendfsync everysec), restart in 2 s")
        await asyncio.to_thread(s.redis.kill)
        acked = dict(s.flow.pub.positions)
        if crash and tail is not None:
            # What a machine crash under everysec may do: the last second never reached disk.
            # Redis loads a truncated AOF up to its last whole command (aof-load-truncated).
            out.notes["aof_bytes_dropped"] = tail.stat().st_size - size
            os.truncate(tail, size)
        await restart_redis(s, out, clients)
        kept, _ = await s.kept()
        lost_by_redis = sum(
            max(0, seq - kept.get((ch.name, epoch), 0)) for ch, (epoch, seq) in acked.items()
        )
        # Acknowledged before the kill and gone after the restart.
        out.notes["acked_then_lost_by_redis"] = lost_by_redis
        out.notes["channel_subscriptions_reset"] = sum(len(c.reset_channels) for c in clients)
        if crash and lost_by_redis == 0:
            out.problems.append("the crash lost nothing: the rollback path was not exercised")
        if lost_by_redis and not out.resets:
            out.problems.append("Redis lost acknowledged events and no client was told (reset)")
        out.notes["rate"] = st.kill_rate
    return out


async def redis_crash_aof(st: Settings, workdir: Path) -> Outcome:
    return await redis_kill_aof(st, workdir, crash=True)


async def redis_kill_nopersist(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("redis-kill-nopersist")
    async with stage(st, out.scenario, workdir, appendonly=False) as s:
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say("  kill -9 redis-server (no persistence), restart empty in 2 s")
        await asyncio.to_thread(s.redis.kill)
        await asyncio.to_thread(s.redis.wipe)
        await restart_redis(s, out, clients)
        unreset = sum(len(set(c.channels) - c.reset_channels) for c in clients)
        out.notes["channel_subscriptions_reset"] = sum(len(c.reset_channels) for c in clients)
        if unreset:
            out.problems.append(f"{unreset} channel subscriptions got no reset after the data loss")
    return out


async def redis_pause(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("redis-pause")
    async with stage(st, out.scenario, workdir) as s:
        await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say(f"  SIGSTOP redis-server for {st.pause_s:g} s, polling /healthz every 100 ms")
        with HealthProbe(s.server.port) as probe:
            s.redis.pause()
            await asyncio.sleep(st.pause_s)  # the outage
            s.redis.resume()
            since = s.mark()
            out.recover_s = await s.recovered(since)
            await s.steady()
        await s.finish(out)
        worst = max(probe.times_ms, default=0.0)
        out.notes["healthz_probes"] = len(probe.times_ms)
        out.notes["healthz_max_ms"] = round(worst, 1)
        out.notes["healthz_statuses"] = {str(k): v for k, v in probe.statuses.items()}
        out.notes["status_messages"] = sorted({tuple(c.statuses) for c in s.clients})[:3]
        if probe.errors:
            out.misses.append(f"/healthz failed {probe.errors} times")
        if worst > HEALTHZ_MS:
            out.misses.append(f"/healthz took {worst:.0f} ms (target {HEALTHZ_MS:.0f})")
    return out


async def proxy_scenario(
    st: Settings, workdir: Path, name: str, fault: Callable[[Proxy], None], what: str
) -> Outcome:
    out = Outcome(name)
    async with stage(st, name, workdir, proxy=True) as s:
        assert s.proxy is not None
        clients = await s.add_raw(st.clients)
        await s.warm()
        await s.steady()
        say(f"  {what} for {st.hold_s:g} s")
        fault(s.proxy)
        await asyncio.sleep(st.hold_s)  # the fault
        s.proxy.pass_through()
        since = s.mark()
        out.recover_s = await s.recovered(since)
        await s.steady()
        await s.finish(out)
        stats = s.proxy.stats
        out.notes["proxy"] = {
            "resets": stats.resets,
            "refused": stats.refused,
            "bytes_dropped": stats.bytes_dropped,
        }
        out.notes["clients_told_down"] = sum("down" in c.statuses for c in clients)
        if name == "proxy-delay" and out.notes["clients_told_down"]:
            out.misses.append("status went down under 50-200 ms of delay")
        if name == "proxy-reset" or (name == "proxy-blackhole" and st.hold_s > 6):
            # A black hole shows only when the idle subscription's PING goes unanswered (5 s).
            expect_status(out, clients)
    return out


async def proxy_delay(st: Settings, workdir: Path) -> Outcome:
    return await proxy_scenario(
        st, workdir, "proxy-delay", lambda p: p.delay(0.05, 0.15), "delay Redis 50-200 ms each way"
    )


async def proxy_blackhole(st: Settings, workdir: Path) -> Outcome:
    return await proxy_scenario(
        st, workdir, "proxy-blackhole", lambda p: p.blackhole(), "black-hole the Redis link"
    )


async def proxy_reset(st: Settings, workdir: Path) -> Outcome:
    def fault(p: Proxy) -> None:
        p.reset(refuse_new=True)

    return await proxy_scenario(
        st, workdir, "proxy-reset", fault, "RST every Redis connection and refuse new ones"
    )


async def worker_kill(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("worker-kill")
    async with stage(st, out.scenario, workdir, workers=2) as s:
        clients = await s.add_library(st.clients)
        await s.warm()
        await s.steady()
        load = s.server.connections_by_worker()
        victim = max(load, key=lambda pid: load[pid])
        say(f"  kill -9 worker {victim} ({load[victim]} of {len(clients)} clients on it)")
        os.kill(victim, signal.SIGKILL)
        since = s.mark()
        out.recover_s = await s.recovered(since)
        await s.steady()
        await s.finish(out)
        moved = [c for c in clients if c.reconnects]
        out.notes["clients_on_killed_worker"] = load[victim]
        out.notes["clients_reconnected"] = len(moved)
        out.notes["workers_after"] = len(s.server.worker_pids())
        if not moved:
            out.problems.append("no client was on the killed worker: nothing was tested")
    return out


async def storm(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("storm")
    async with stage(st, out.scenario, workdir) as s:
        clients = await s.add_raw(st.storm_clients)
        await s.warm()
        await s.steady()
        dropped = clients[::3]
        say(f"  drop {len(dropped)} of {len(clients)} connections at once; they resume")
        since = s.mark(dropped)
        for c in dropped:
            c.drop()
        out.recover_s = await s.recovered(since, dropped)
        await s.steady()
        await s.finish(out)
        back = [c for c in dropped if c.connects >= 2]
        out.notes["dropped"] = len(dropped)
        out.notes["resumed"] = len(back)
        if len(back) < len(dropped):
            out.problems.append(f"{len(dropped) - len(back)} dropped clients never came back")
        if out.recover_s is None or out.recover_s > STORM_RESUME_S:
            out.misses.append(f"not every dropped client resumed within {STORM_RESUME_S:g} s")
    return out


async def slow_consumer(st: Settings, workdir: Path) -> Outcome:
    out = Outcome("slow-consumer")
    # The kernel's socket buffers hold megabytes: below ~2 000 events/s the stalled client would
    # not back up into the server's outbox within the scenario's time, at any --scale.
    async with stage(st, out.scenario, workdir, rate=max(st.rate, SLOW_MIN_RATE)) as s:
        fast = await s.add_raw(st.slow_clients)
        everything = [c.name for c in s.flow.channels]
        (slow,) = await s.add_raw(1, resume=False, channels=everything, rcvbuf=16384)
        await s.warm(fast)
        await s.steady()
        base = s.server.rss_mb()
        say(f"  one client stops reading among {len(fast)}; server RSS {base:.0f} MB")
        slow.reading.clear()
        t0 = time.monotonic()
        peak = base
        closed_after: float | None = None
        while time.monotonic() - t0 < 90:
            peak = max(peak, s.server.rss_mb())
            if await asyncio.to_thread(s.server.metric, "slow_disconnects_total") >= 1:
                closed_after = time.monotonic() - t0
                break
            await asyncio.sleep(0.25)  # sampling memory while the socket fills
        slow.reading.set()
        await s.steady()
        peak = max(peak, s.server.rss_mb())
        await until(lambda: slow.task is not None and slow.task.done(), 15)
        await s.finish(out, fast)
        shed = [g for g in slow.gaps if g[3] in ("slow_consumer", "conflated")]
        for name in ("dropped_events", "conflated_events"):
            # Shed from the slow client's outbox before it was closed (it never saw the gaps).
            out.notes[f"server_outbox_{name}"] = int(
                await asyncio.to_thread(s.server.metric, f"outbox_{name}_total")
            )
        out.notes["rss_mb_before"] = round(base, 1)
        out.notes["rss_mb_peak"] = round(peak, 1)
        out.notes["slow_closed_after_s"] = None if closed_after is None else round(closed_after, 1)
        out.notes["slow_close_codes"] = slow.close_codes
        out.notes["slow_gaps_seen"] = len(shed)
        fast_gaps = sum(len(c.gaps) for c in fast)
        out.notes["fast_clients_gaps"] = fast_gaps
        if closed_after is None and not shed:
            out.problems.append("the slow consumer was neither conflated nor closed")
        if fast_gaps:
            out.misses.append(f"fast clients got {fast_gaps} gaps")
        if peak - base > RSS_GROWTH_MB:
            out.misses.append(f"server RSS grew {peak - base:.0f} MB")
    return out


Scenario = Callable[[Settings, Path], Awaitable[Outcome]]
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "redis-kill-aof": (
        redis_kill_aof,
        "kill -9 Redis (AOF everysec) at --kill-rate, restart after 2 s",
    ),
    "redis-crash-aof": (
        redis_crash_aof,
        "the same, and the AOF loses its last second, as a machine crash under everysec may",
    ),
    "redis-kill-nopersist": (
        redis_kill_nopersist,
        "kill -9 Redis without persistence, restart empty: every client gets reset",
    ),
    "redis-pause": (redis_pause, "SIGSTOP Redis for --pause s; /healthz must answer throughout"),
    "proxy-delay": (proxy_delay, "server's Redis link delayed 50-200 ms each way for --hold s"),
    "proxy-blackhole": (proxy_blackhole, "server's Redis link black-holed for --hold s"),
    "proxy-reset": (proxy_reset, "server's Redis connections RST, new ones refused, --hold s"),
    "worker-kill": (worker_kill, "kill -9 one of 2 workers; library clients resume elsewhere"),
    "storm": (storm, "a third of --storm-clients drop at once and resume"),
    "slow-consumer": (slow_consumer, "one client stops reading among --slow-clients"),
}
