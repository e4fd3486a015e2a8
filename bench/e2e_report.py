"""End-to-end bench results: steps and runs, the judgement of a step, the table, the plot, the JSON."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tickwire import __version__
from tickwire.bench.stats import ratio, table

if TYPE_CHECKING:
    from tickwire.bench.e2e_run import Scenario


@dataclass
class Step:
    """One measured window at one publish rate."""

    rate: float
    latency: dict[str, float] = field(default_factory=dict)
    #: The same events' latency from their venue time `ts` instead of `pt`: for the simulator,
    #: when the event was due, so this adds the feed's own wait before it stamps `pt`.
    from_event: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    correctness: dict[str, Any] = field(default_factory=dict)
    #: The server's own view over the window (tickwire only): read→write and publish→write.
    server: dict[str, float] = field(default_factory=dict)
    latency_file: str = ""
    #: How old a client's view of a channel was when a message updated it (µs percentiles):
    #: the latency of the oldest event the message covered, skipped (throttled) ones included.
    view_age: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        c = self.correctness
        return not (
            c.get("lost") or c.get("duplicates") or c.get("tail_lost") or c.get("violations")
        )


def median_step(steps: list[Step]) -> Step:
    """Rounds of one target as one step: every latency and figure the median over the rounds.

    Single runs of the same scenario spread widely on a small shared machine (p99 by a factor
    of two between runs), so a ratio of one run each can say what one wants; the median of
    alternated rounds is what to quote. Counts (events sampled, lost, …) are summed over the
    rounds and examples kept: a round that lost an event fails the whole.
    """
    if len(steps) == 1:
        return steps[0]

    def medians(dicts: list[dict[str, float]]) -> dict[str, float]:
        keys = [k for k in dicts[0] if all(k in d for d in dicts)]
        return {k: float(np.median([d[k] for d in dicts])) for k in keys}

    correctness: dict[str, Any] = {}
    for st in steps:
        for key, value in st.correctness.items():
            if isinstance(value, list):
                correctness[key] = (correctness.get(key, []) + value)[:5]
            elif isinstance(value, int | float) and key != "sampled_connections":
                correctness[key] = correctness.get(key, 0) + value
            else:
                correctness.setdefault(key, value)
    return Step(
        steps[0].rate,
        latency=medians([st.latency for st in steps]),
        from_event=medians([st.from_event for st in steps]),
        figures=medians([st.figures for st in steps]),
        correctness=correctness,
        server=medians([st.server for st in steps]) if all(st.server for st in steps) else {},
    )


def compared(runs: list[Run]) -> str:
    """The target tickwire is compared with: the baseline, or tickwire over TLS (`--tls`)."""
    return next((r.target for r in runs if r.target != "tickwire"), "baseline")


def rounds_report(runs: list[Run]) -> str:
    """One line per round: each target's p50/p99/p99.9 and the p99 ratio of that round."""
    other = compared(runs)
    tw = [r.result for r in runs if r.target == "tickwire" and r.steps]
    base = [r.result for r in runs if r.target == other and r.steps]

    def ms(st: Step) -> str:
        return "/".join(
            f"{st.latency.get(k, math.nan) / 1000:.2f}" for k in ("p50_us", "p99_us", "p99.9_us")
        )

    out = []
    for i, t in enumerate(tw):
        line = f"round {i + 1}: tickwire p50/p99/p99.9 {ms(t)}"
        if i < len(base):
            b = base[i]
            line += f" ms, {other} {ms(b)}"
            r = ratio(t.latency.get("p99_us", math.nan), b.latency.get("p99_us", math.nan))
            line += f" ms, p99 ratio {r:.2f}x" if r is not None else " ms"
        out.append(line)
    return "\n".join(out)


@dataclass
class Run:
    target: str
    scenario: Scenario
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps)

    @property
    def result(self) -> Step:
        """The step the run is judged by: the highest sustained one when saturating."""
        if self.scenario.saturate:
            good = [s for s in self.steps if breach(s, self.scenario) is None]
            if good:
                return good[-1]
        return self.steps[-1]


def breach(step: Step, s: Scenario) -> str | None:
    """Why a saturation step is not sustainable, or None."""
    if not step.passed:
        return "silent loss or duplicates"
    if step.correctness.get("closed") or step.correctness.get("client_errors"):
        return "clients closed or failed"
    if step.latency.get("p99_us", math.inf) > s.max_p99_ms * 1000:
        return f"p99 {step.latency.get('p99_us', math.nan) / 1000:.1f} ms > {s.max_p99_ms:g} ms"
    if step.figures["events_published_per_s"] < 0.9 * step.rate:
        return "the publisher fell more than 10% short of the rate"
    if step.figures.get("delivered_percent", 100.0) < 90:
        return (
            f"clients received {step.figures['delivered_percent']:.0f}% of what was "
            "published to them (the rest queued)"
        )
    return None


def report(runs: list[Run]) -> str:
    other = compared(runs)
    tw = next((r.result for r in runs if r.target == "tickwire" and r.steps), None)
    base = next((r.result for r in runs if r.target == other and r.steps), None)
    out: list[str] = []
    saturate = any(r.scenario.saturate for r in runs)
    if saturate:
        for r in runs:
            out.append(f"{r.target}: saturation steps")
            out.append(
                f"  {'rate':>10} {'published/s':>12} {'deliveries/s':>13} {'MB/s':>7} "
                f"{'p99 ms':>8} {'cpu %':>6}  verdict"
            )
            for st in r.steps:
                f = st.figures
                out.append(
                    f"  {st.rate:>10,.0f} {f['events_published_per_s']:>12,.0f} "
                    f"{f['deliveries_per_s']:>13,.0f} {f['egress_MB_per_s']:>7.1f} "
                    f"{st.latency.get('p99_us', math.nan) / 1000:>8.2f} "
                    f"{f['server_cpu_percent']:>6.0f}  {breach(st, r.scenario) or 'sustained'}"
                )
        out.append("highest sustained step:")
    rows: list[tuple[str, float | None, float | None]] = []
    if saturate:
        rows.append(("rate", tw.rate if tw else None, base.rate if base else None))
    for key in ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "samples"):
        rows.append(
            (
                f"latency {key}",
                tw.latency.get(key) if tw else None,
                base.latency.get(key) if base else None,
            )
        )
    # From the event's venue time: adds the feed's wait for its release (same for both).
    for key in ("p50_us", "p99_us", "p99.9_us"):
        rows.append(
            (
                f"from event ts {key}",
                tw.from_event.get(key) if tw else None,
                base.from_event.get(key) if base else None,
            )
        )
    for key in (
        "events_published_per_s",
        "deliveries_per_s",
        "delivered_percent",
        "frames_per_s",
        "egress_MB_per_s",
        "server_cpu_percent",
        "redis_cpu_percent",
        "feed_cpu_percent",
        "load_cpu_percent",
        "machine_cpu_percent",
    ):
        rows.append(
            (key, tw.figures.get(key) if tw else None, base.figures.get(key) if base else None)
        )
    if tw is not None and tw.server:
        for key, value in tw.server.items():
            rows.append((f"server {key}", value, None))
    for key in ("sampled_events", "lost", "duplicates", "tail_lost", "gaps_announced"):
        rows.append(
            (
                key,
                tw.correctness.get(key) if tw else None,
                base.correctness.get(key) if base else None,
            )
        )
    out.append(table(rows, ("tickwire", other)))
    for r in runs:
        verdict = "PASSED" if r.passed else "FAILED (silent loss or duplicates)"
        out.append(f"{r.target}: {verdict}")
        for st in r.steps:
            for key in ("violations", "client_errors", "closed"):
                if st.correctness.get(key):
                    out.append(f"  at {st.rate:,.0f}/s {key}: {st.correctness[key]}")
    return "\n".join(out)


def plot(runs: list[Run], path: str) -> None:
    """The latency percentile curve of each target's judged step (the samples of every round
    pooled), log-log, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'tickwire[bench]' (or matplotlib)"
        ) from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    # x = 1/(1-q): equal room for 90, 99, 99.9, 99.99 %, the way HdrHistogram plots tails.
    q = 1 - np.logspace(0, -5, 400)
    q = q[q < 1 - 1e-9]
    for target in dict.fromkeys(r.target for r in runs):
        mine = [r.result for r in runs if r.target == target and r.steps]
        if not mine:
            continue
        lat = np.concatenate([np.load(st.latency_file) for st in mine])
        if lat.size == 0:
            continue
        ms = np.percentile(lat / 1e6, q * 100)
        ax.plot(1 / (1 - q), ms, label=f"{target} ({mine[0].rate:,.0f} events/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("publish → client receive (ms)")
    s = runs[0].scenario
    ax.set_title(
        f"tickwire bench: {s.symbols} symbols, {s.clients} clients x {s.channels_per_client} "
        "channels"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(runs: list[Run]) -> dict[str, float | None]:
    other = compared(runs)
    tw = next((r.result for r in runs if r.target == "tickwire" and r.steps), None)
    base = next((r.result for r in runs if r.target == other and r.steps), None)
    if tw is None or base is None:
        return {}
    out = {k: ratio(v, base.latency.get(k, float("nan"))) for k, v in tw.latency.items()}
    out.update({k: ratio(v, base.figures.get(k, float("nan"))) for k, v in tw.figures.items()})
    if tw.rate != base.rate:
        out["rate"] = ratio(tw.rate, base.rate)
    return out


def json_report(config: dict[str, Any], runs: list[Run], rounds: list[Run]) -> dict[str, Any]:
    """Every figure, the configuration and versions, as `--json` writes them."""
    return {
        "config": config,
        "runs": [
            {
                "target": r.target,
                "passed": r.passed,
                "latency": r.result.latency,
                "from_event": r.result.from_event,
                "figures": r.result.figures,
                "server": r.result.server,
                "correctness": r.result.correctness,
                "steps": [
                    {k: v for k, v in asdict(st).items() if k != "latency_file"} for st in r.steps
                ],
            }
            for r in runs
            if r.steps
        ],
        "ratios": ratios(runs),
        "rounds": [
            {"target": r.target, "latency": r.result.latency, "figures": r.result.figures}
            for r in rounds
            if r.steps
        ],
        "versions": {
            "tickwire": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
