"""The command lines' number types: out-of-bounds values are refused at parse time, saying the
bound, by every command that takes them (the bench's too)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from tickwire.bench.conns import main as conns_main
from tickwire.bench.e2e import main as bench_main
from tickwire.core.argtypes import count, positive, rate, seconds, seconds_or_none, tick_ms


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (count, {"1": 1, "20000": 20000}, {"0": "at least 1", "-3": "at least 1", "1.5": "not a"}),
        (rate, {"0.5": 0.5, "1e6": 1e6}, {"0": "positive", "inf": "positive", "nan": "positive"}),
        (seconds, {"0.1": 0.1}, {"0": "more than 0", "-1": "more than 0", "x": "not a"}),
        (seconds_or_none, {"0": 0.0, "2": 2.0}, {"-0.5": "0 or more", "inf": "0 or more"}),
        (positive, {"1.5": 1.5}, {"0": "positive", "nan": "positive"}),
        (tick_ms, {"1": 1.0, "1000": 1000.0}, {"0.5": "1 to 1000", "1001": "1 to 1000"}),
    ],
)
def test_a_number_type_takes_what_is_in_bounds_and_says_which_bound_refused(
    kind: Callable[[str], float], good: dict[str, float], bad: dict[str, str]
) -> None:
    for text, value in good.items():
        assert kind(text) == value
    for text, says in bad.items():
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            kind(text)


def test_the_bench_refuses_a_load_it_cannot_run_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for main, argv, says in [
        (bench_main, ["--clients", "0"], "argument --clients: 0: at least 1"),
        (bench_main, ["--duration", "0"], "argument --duration: 0 s: more than 0"),
        (conns_main, ["--workers", "0"], "argument --workers: 0: at least 1"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert says in capsys.readouterr().err
