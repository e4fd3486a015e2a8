"""Percentiles over all latency samples, and the ratio table the bench prints."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def latency_summary(ns: npt.NDArray[np.int64]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max in microseconds over every sample (exact, not bucketed)."""
    if ns.size == 0:
        return {
            "samples": 0,
            **{f"p{p:g}_us": float("nan") for p in PERCENTILES},
            "max_us": float("nan"),
        }
    us = ns.astype(np.float64) / 1000.0
    values = np.percentile(us, PERCENTILES)
    out: dict[str, float] = {"samples": int(ns.size)}
    out.update({f"p{p:g}_us": round(float(v), 1) for p, v in zip(PERCENTILES, values, strict=True)})
    out["max_us"] = round(float(us.max()), 1)
    return out


def ratio(a: float, b: float) -> float | None:
    if not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def table(rows: Sequence[tuple[str, float | None, float | None]], names: tuple[str, str]) -> str:
    """Rows of (figure, tickwire, baseline) → aligned text with a ratio column."""
    lines = [f"{'figure':28} {names[0]:>14} {names[1]:>14} {'ratio':>8}"]
    for label, a, b in rows:
        r = ratio(a, b) if a is not None and b is not None else None
        lines.append(
            f"{label:28} {_fmt(a):>14} {_fmt(b):>14} {f'{r:.2f}x' if r is not None else '-':>8}"
        )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v != int(v) else f"{int(v)}"


def histogram(text: str, name: str) -> tuple[list[float], list[int]]:
    """Bucket upper bounds and cumulative counts of one Prometheus histogram in `text`."""
    prefix = f'{name}_bucket{{le="'
    bounds: list[float] = []
    counts: list[int] = []
    for line in text.splitlines():
        if line.startswith(prefix):
            le, _, value = line[len(prefix) :].partition('"} ')
            bounds.append(float(le))
            counts.append(int(float(value)))
    return bounds, counts


def histogram_quantile(bounds: list[float], cumulative: list[int], q: float) -> float:
    """Quantile `q`, interpolated linearly inside the bucket that holds it, as Prometheus's
    `histogram_quantile` does (the bucket's upper bound alone made a change of a few tens of
    microseconds invisible). In the last, unbounded bucket: the highest finite bound."""
    if not cumulative or cumulative[-1] <= 0:
        return float("nan")
    target = q * cumulative[-1]
    lower, before = 0.0, 0
    for bound, run in zip(bounds, cumulative, strict=True):
        if run >= target:
            if bound == float("inf"):
                return lower
            inside = run - before
            return lower + (bound - lower) * ((target - before) / inside if inside else 1.0)
        lower, before = bound, run
    return float("inf")


def server_share(before: str, after: str) -> dict[str, float]:
    """The server's own latency over a window, from two `/metrics` scrapes (empty if none)."""
    out: dict[str, float] = {}
    for name, label, qs in (
        ("tickwire_publish_to_read_seconds", "publish→read", (0.5, 0.99)),
        ("tickwire_read_to_write_seconds", "read→write", (0.5, 0.99)),
        ("tickwire_publish_to_write_seconds", "publish→write", (0.5, 0.99)),
    ):
        b1, c1 = histogram(after, name)
        b0, c0 = histogram(before, name)
        if not b1:
            continue
        if b0 != b1:
            c0 = [0] * len(c1)
        delta = [x - y for x, y in zip(c1, c0, strict=True)]
        for q in qs:
            out[f"{label} p{q * 100:g}_us"] = histogram_quantile(b1, delta, q) * 1e6
    return out
