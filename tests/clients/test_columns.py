"""Events as numpy columns, and numpy staying out of `import tickwire.clients`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tickwire.clients.columns import (
    bars_to_numpy,
    events_to_numpy,
    quotes_to_numpy,
    trades_to_numpy,
)
from tickwire.clients.messages import EventBatch
from tickwire.core.events import Bar, Quote, Trade


def trade(seq: int, price: float, side: str = "buy") -> Trade:
    return Trade("BTC-USD", 100 + seq, 200 + seq, seq, "ep", 1, price, 0.5 * seq, side, 7000 + seq)


def test_trades_become_typed_columns() -> None:
    cols = trades_to_numpy([trade(1, 64123.5), trade(2, 64124.0, "sell")])
    assert list(cols) == [
        "sym",
        "ts",
        "pt",
        "seq",
        "epoch",
        "price",
        "size",
        "side",
        "trade_id",
    ]
    assert cols["price"].dtype == np.float64 and cols["price"].tolist() == [64123.5, 64124.0]
    assert cols["seq"].dtype == np.int64 and cols["seq"].tolist() == [1, 2]
    assert cols["ts"].tolist() == [101, 102] and cols["pt"].tolist() == [201, 202]
    assert cols["side"].tolist() == ["buy", "sell"] and cols["side"].dtype.kind == "U"
    assert cols["trade_id"].dtype == np.int64 and cols["sym"].tolist() == ["BTC-USD"] * 2


def test_quotes_and_bars_become_columns() -> None:
    q = quotes_to_numpy([Quote("AAPL", 1, 2, 3, "e", 1, 189.5, 100, 189.52, 300)])
    assert q["ask"].tolist() == [189.52] and q["bid_size"].dtype == np.float64
    bar = Bar("ETH-USD", 1, 2, 5, "e", 1, "1s", 10.0, 12.0, 9.0, 11.0, 3.0, 10.5, 4, 0, 10**9)
    b = bars_to_numpy([bar])
    assert b["interval"].tolist() == ["1s"] and b["trades"].dtype == np.int64
    assert b["end"].tolist() == [10**9] and b["vwap"].tolist() == [10.5]


def test_batch_to_numpy_and_mixed_types_are_refused() -> None:
    batch = EventBatch("trades:BTC-USD", "ep", (trade(1, 1.0), trade(2, 2.0)), 0)
    assert batch.to_numpy()["price"].sum() == 3.0
    assert events_to_numpy([]) == {}
    assert trades_to_numpy([])["price"].shape == (0,)
    quote = Quote("BTC-USD", 1, 2, 3, "e", 1, 1.0, 1.0, 2.0, 1.0)
    with pytest.raises(ValueError):
        events_to_numpy([trade(1, 1.0), quote])


def test_importing_the_client_loads_neither_numpy_nor_redis() -> None:
    code = (
        "import sys, tickwire.clients\n"
        "heavy = {'numpy', 'redis', 'rich'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=60)
