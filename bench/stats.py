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
