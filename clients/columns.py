"""Events as numpy columns, for analysis in bulk; numpy is imported only when these are called.

    >>> cols = trades_to_numpy(trades)          # list of Trade
    >>> cols["price"].mean(), cols["size"].sum()
    >>> batch.to_numpy()                        # an EventBatch, whatever its type

Every result is a dict of equal-length 1-D arrays: `sym`, `ts`, `pt`, `seq`, `epoch`, then the
type's own fields (less any that a projection left out of some event). Timestamps, seqs and
counts are int64, prices and sizes float64, text is a numpy unicode array.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from tickwire.core.events import FIELDS_OF, Bar, Event, Quote, Trade

if TYPE_CHECKING:
    from numpy.typing import NDArray

Columns = dict[str, "NDArray[Any]"]

_INT_FIELDS = frozenset({"ts", "pt", "seq", "trade_id", "trades", "start", "end"})
_STR_FIELDS = frozenset({"sym", "epoch", "side", "interval"})


def quotes_to_numpy(quotes: Sequence[Quote]) -> Columns:
    return _columns(quotes, "quote")


def trades_to_numpy(trades: Sequence[Trade]) -> Columns:
    return _columns(trades, "trade")


def bars_to_numpy(bars: Sequence[Bar]) -> Columns:
    return _columns(bars, "bar")


def events_to_numpy(events: Sequence[Event]) -> Columns:
    """Columns of events that are all of one type (ValueError for a mix; an empty input gives {})."""
    if not events:
        return {}
    kind = events[0].type
    if any(e.type != kind for e in events):
        raise ValueError("events_to_numpy needs events of one type; group them first")
    return _columns(events, kind)


def _columns(events: Sequence[Event], kind: str) -> Columns:
    import numpy as np

    for e in events:
        if e.type != kind:
            raise ValueError(f"expected {kind} events, got a {e.type}")
    n = len(events)
    out: Columns = {}
    for name in ("sym", "ts", "pt", "seq", "epoch", *FIELDS_OF[kind]):
        get = attrgetter(name)
        if name in FIELDS_OF[kind] and any(get(e) is None for e in events):
            continue  # a field projected away (`fields=`) from some of these events
        if name in _STR_FIELDS:
            out[name] = np.array([get(e) for e in events], dtype=np.str_)
        elif name in _INT_FIELDS:
            out[name] = np.fromiter(map(get, events), dtype=np.int64, count=n)
        else:
            out[name] = np.fromiter(map(get, events), dtype=np.float64, count=n)
    return out
