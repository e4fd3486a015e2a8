"""Fault bench results: one outcome per scenario, the table and the JSON document."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tickwire import __version__

if TYPE_CHECKING:
    from tickwire.bench.fault_stage import Settings


@dataclass
class Outcome:
    scenario: str
    clients: int = 0
    published: int = 0
    delivered: int = 0
    lost_silently: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_events: int = 0
    resets: int = 0
    recover_s: float | None = None
    #: Correctness failures: any of them fails the scenario (and the exit status).
    problems: list[str] = field(default_factory=list)
    #: Targets missed (time, memory): reported, the exit status stays 0.
    misses: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return not self.problems and self.lost_silently == 0 and self.duplicates == 0

    @property
    def verdict(self) -> str:
        if not self.correct:
            return "FAIL"
        return "MISS" if self.misses else "ok"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct, "verdict": self.verdict}


def print_table(outcomes: list[Outcome]) -> None:
    head = (
        f"{'scenario':22} {'published':>9} {'delivered':>10} {'lost silently':>13} "
        f"{'gaps':>5} {'resets':>6} {'recover s':>9}  verdict"
    )
    print(head)
    for o in outcomes:
        rec = "-" if o.recover_s is None else f"{o.recover_s:.2f}"
        print(
            f"{o.scenario:22} {o.published:9d} {o.delivered:10d} {o.lost_silently:13d} "
            f"{o.gaps:5d} {o.resets:6d} {rec:>9}  {o.verdict}"
        )
    for o in outcomes:
        why = "; ".join(o.problems + o.misses)
        notes = ", ".join(f"{k}={v}" for k, v in o.notes.items())
        print(f"  {o.scenario}: {notes}" + (f" | {why}" if why else ""))


def json_report(
    command: str, settings: Settings, seconds: float, outcomes: list[Outcome]
) -> dict[str, Any]:
    """Every figure of a run, as `--json` writes it."""
    return {
        "command": command,
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "version": __version__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "scenarios": [o.to_json() for o in outcomes],
    }
