"""Option types for the command lines: numbers within bounds, refused with a message saying
which bound, before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

_N = TypeVar("_N", int, float)


def bounded(
    kind: Callable[[str], _N], what: str, unit: str, ok: Callable[[_N], bool], rule: str
) -> Callable[[str], _N]:
    """An option's type: `kind` of the text (`what` it must be), for which `ok` holds (NaN
    never does), or an error saying `rule`."""

    def parse(value: str) -> _N:
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{value}{unit}: {rule}")
        return x

    return parse


#: How many of something there must be one at least of: symbols, clients, processes, rounds.
count = bounded(int, "a whole number", "", lambda n: n >= 1, "at least 1")
port = bounded(
    int, "a port number", "", lambda n: 0 <= n <= 65535, "a port is 0 to 65535 (0: any free one)"
)
# Not zero, not infinite: the simulator's clock advances by 1 / rate.
rate = bounded(
    float, "a number of events/s", " events/s", lambda x: 0 < x < math.inf, "a positive number"
)
# Shorter sleeps make uvloop spin (its timers have millisecond resolution).
tick_ms = bounded(float, "a number of ms", " ms", lambda x: 1 <= x <= 1000, "use 1 to 1000")
#: A length of time that must pass (a measured window).
seconds = bounded(float, "a number of seconds", " s", lambda x: 0 < x < math.inf, "more than 0")
#: A length of time that may be none (a warm-up).
seconds_or_none = bounded(
    float, "a number of seconds", " s", lambda x: 0 <= x < math.inf, "0 or more"
)
milliseconds = bounded(float, "a number of ms", " ms", lambda x: 0 < x < math.inf, "more than 0")
milliseconds_or_none = bounded(
    float, "a number of ms", " ms", lambda x: 0 <= x < math.inf, "0 or more"
)
#: A positive number of anything else (a rate of updates, a factor).
positive = bounded(float, "a number", "", lambda x: 0 < x < math.inf, "a positive number")
