from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickwire.core.channels import (
    Channel,
    ChannelPattern,
    bar_interval_ns,
    canonical_interval,
    channel_from_key,
    is_on_demand,
)
from tickwire.core.errors import BarIntervalError, ChannelError, UnknownChannelType


def test_channel_parse_gives_hash_tagged_stream_key() -> None:
    ch = Channel.parse("trades:BTC-USD")
    assert (ch.kind, ch.symbol) == ("trades", "BTC-USD")
    assert ch.stream_key == "tw:{BTC-USD}:trades"
    assert ch.meta_key == "tw:{BTC-USD}:trades:meta"
    assert channel_from_key(ch.stream_key) == ch
    assert Channel.parse("bars.1s:ETH-USD").event_type == "bar"


@pytest.mark.parametrize(
    "name",
    [
        "BTC-USD",
        "trades:",
        "trades:btc-usd",
        "trades:BTC USD",
        "trades:{X}",
        "trades:-X",
        "trades:" + "A" * 33,
        "trades:A:B",
    ],
)
def test_channel_parse_rejects_malformed_names(name: str) -> None:
    with pytest.raises(ChannelError):
        Channel.parse(name)


def test_unknown_channel_type_is_its_own_error() -> None:
    with pytest.raises(UnknownChannelType, match="expected one of"):
        Channel.parse("orders:BTC-USD")


def test_pattern_wildcard_matches_every_symbol_of_its_type() -> None:
    p = ChannelPattern.parse("quotes:*")
    assert p.is_wildcard
    assert p.matches(Channel.parse("quotes:AAPL"))
    assert not p.matches(Channel.parse("trades:AAPL"))
    with pytest.raises(ChannelError):
        Channel.parse("quotes:*")
    with pytest.raises(ChannelError):
        p.as_channel()


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("bars.100ms", 100_000_000),
        ("bars.250ms", 250_000_000),
        ("bars.1500ms", 1_500_000_000),
        ("bars.5s", 5_000_000_000),
        ("bars.90s", 90_000_000_000),
        ("bars.15m", 900_000_000_000),
        ("bars.4h", 14_400_000_000_000),
        ("bars.1d", 86_400_000_000_000),
    ],
)
def test_bar_interval_grammar_accepts_any_interval_in_bounds(name: str, ns: int) -> None:
    ch = Channel.parse(f"{name}:BTC-USD")
    assert ch.event_type == "bar"
    assert ch.stream_key == f"tw:{{BTC-USD}}:{name}"
    assert bar_interval_ns(name.removeprefix("bars.")) == ns
    assert canonical_interval(ns) == name.removeprefix("bars.")
    assert is_on_demand(name)
    assert ChannelPattern.parse(f"{name}:*").is_wildcard


def test_precomputed_bar_intervals_are_not_on_demand() -> None:
    assert not is_on_demand("bars.1s") and not is_on_demand("bars.1m")
    assert not is_on_demand("trades")
    assert Channel.parse("bars.1m:AAPL").event_type == "bar"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bars.50ms", "out of bounds"),
        ("bars.99ms", "out of bounds"),
        ("bars.2d", "out of bounds"),
        ("bars.25h", "out of bounds"),
        ("bars.60s", "written '1m'"),
        ("bars.1000ms", "written '1s'"),
        ("bars.24h", "written '1d'"),
        ("bars.05s", "invalid bar interval"),
        ("bars.0s", "invalid bar interval"),
        ("bars.5", "invalid bar interval"),
        ("bars.5S", "invalid bar interval"),
        ("bars.1w", "invalid bar interval"),
        ("bars.", "invalid bar interval"),
        ("bars.1.5s", "invalid bar interval"),
    ],
)
def test_bar_interval_grammar_refuses_with_its_own_error(name: str, why: str) -> None:
    with pytest.raises(BarIntervalError, match=why):
        ChannelPattern.parse(f"{name}:*")
    with pytest.raises(BarIntervalError):
        Channel.parse(f"{name}:BTC-USD")


@given(st.integers(100, 86_400_000))
def test_every_whole_ms_interval_in_bounds_has_one_name(ms: int) -> None:
    name = canonical_interval(ms * 1_000_000)
    assert bar_interval_ns(name) == ms * 1_000_000
    assert ChannelPattern.parse(f"bars.{name}:*").kind == f"bars.{name}"


@given(st.from_regex(r"\A[0-9]{1,4}(ms|s|m|h|d|x|)\Z"))
def test_an_interval_is_canonical_or_refused(text: str) -> None:
    try:
        ns = bar_interval_ns(text)
    except BarIntervalError:
        return
    assert canonical_interval(ns) == text
