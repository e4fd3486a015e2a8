from __future__ import annotations

import pytest

from tickwire.core.channels import Channel, ChannelPattern, channel_from_key
from tickwire.core.errors import ChannelError, UnknownChannelType


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
