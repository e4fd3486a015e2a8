"""The bridge map and the mapping of messages to event bodies, without a broker."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickwire.core.channels import Channel
from tickwire.core.errors import ConfigError
from tickwire.core.events import decode_event
from tickwire.core.stream import complete_body
from tickwire.feeds.bridges.mapping import (
    BridgeMapper,
    Broker,
    Template,
    Unmapped,
    parse_bridge_map,
)

QUOTES = {
    "channel": "quotes",
    "topic": "fx/{symbol}/q",
    "fields": {"bid": "b.px", "bid_size": "b.sz", "ask": "a.px", "ask_size": "a.sz"},
    "ts_field": "",
    "id_field": "n",
}


def mapper(broker: Broker, *routes: dict[str, Any], **bridge: Any) -> BridgeMapper:
    return BridgeMapper(
        parse_bridge_map(
            {"bridge": {"on_unmapped": "skip", **bridge}, "route": list(routes)}, broker
        )
    )


@pytest.mark.parametrize(
    ("broker", "text", "route", "symbol"),
    [
        ("nats", "md.trades.{symbol}", "md.trades.BTC-USD", "BTC-USD"),
        ("nats", "md.*.{symbol}", "md.x.AAPL", "AAPL"),
        ("nats", "md.{symbol}.>", "md.AAPL.a.b", "AAPL"),
        ("nats", "md.{symbol}.>", "md.AAPL", None),
        ("nats", "md.trades.{symbol}", "md.trades.BTC-USD.x", None),
        ("nats", "md.trades.{symbol}", "md.quotes.BTC-USD", None),
        ("mqtt", "md/+/{symbol}", "md/venue/ETH-USD", "ETH-USD"),
        ("mqtt", "md/#", "md/a/b", ""),
        ("rabbitmq", "trades.{symbol}", "trades.AAPL", "AAPL"),
        ("rabbitmq", "trades.#", "trades.AAPL.x", ""),
    ],
)
def test_template_matches_levels_and_captures_the_symbol(
    broker: str, text: str, route: str, symbol: str | None
) -> None:
    sep, one, rest = {
        "nats": (".", "*", ">"),
        "mqtt": ("/", "+", "#"),
        "rabbitmq": (".", "*", "#"),
    }[broker]
    assert Template(text, sep, one, rest).match(route) == symbol


def test_template_subscription_uses_the_broker_wildcard() -> None:
    assert Template("md/{symbol}/trades", "/", "+", "#").subscription == "md/+/trades"
    assert Template("md.{symbol}.>", ".", "*", ">").subscription == "md.*.>"


@given(st.from_regex(r"[A-Z0-9](?:[A-Z0-9_-]{0,10}[A-Z0-9])?", fullmatch=True))
def test_template_captures_any_symbol_without_the_separator(symbol: str) -> None:
    assert Template("md.t.{symbol}", ".", "*", ">").match(f"md.t.{symbol}") == symbol


def test_map_quote_from_nested_fields_with_an_id_and_the_receive_time() -> None:
    m = mapper("mqtt", QUOTES)
    payload = orjson.dumps({"b": {"px": "1.0841", "sz": 1e6}, "a": {"px": 1.0843, "sz": 2}, "n": 7})
    ev = m.map("fx/EUR-USD/q", payload, now_ns=123)
    assert ev.channel == Channel("quotes", "EUR-USD")
    assert ev.msg_id == "7"
    q = decode_event(complete_body(ev.body, "e", 1))
    assert (q.ts, q.pt, q.sym) == (123, 123, "EUR-USD")
    assert orjson.loads(complete_body(ev.body, "e", 1))["bid"] == 1.0841
    # The event model's key order, whatever the message's.
    assert list(orjson.loads(complete_body(ev.body, "e", 1)))[5:9] == [
        "bid",
        "bid_size",
        "ask",
        "ask_size",
    ]


def test_map_symbol_from_a_field_and_bar_interval_from_the_channel() -> None:
    route = {"channel": "bars.1m", "subject": "bars", "symbol_field": "s", "ts_unit": "ms"}
    bar = {"s": "AAPL", "ts": 5, "open": 1, "high": 2, "low": 1, "close": 2, "volume": 3}
    bar |= {"vwap": 1.5, "trades": 4, "start": 0, "end": 60}
    ev = mapper("nats", route).map("bars", orjson.dumps(bar), now_ns=9, broker_id="42")
    doc = orjson.loads(complete_body(ev.body, "e", 1))
    assert ev.channel == Channel("bars.1m", "AAPL")
    assert (doc["interval"], doc["ts"], ev.msg_id) == ("1m", 5_000_000, "42")


def test_map_constants_fill_what_the_messages_lack() -> None:
    route = {"channel": "trades", "subject": "t.{symbol}", "const": {"side": "buy"}}
    body = {"price": 1, "size": 2, "trade_id": "17", "ts": 1}
    ev = mapper("nats", route).map("t.X", orjson.dumps(body), now_ns=1)
    doc = orjson.loads(complete_body(ev.body, "e", 1))
    assert (doc["side"], doc["trade_id"]) == ("buy", 17)


@pytest.mark.parametrize(
    ("route", "payload", "reason"),
    [
        ("fx/EUR-USD/q", b"\xff", "not valid JSON"),
        ("fx/EUR-USD/q", b"3", "not a JSON object"),
        ("fx/eur/q", b"{}", "invalid symbol"),
        ("other/EUR-USD", b"{}", "no route matches"),
        ("fx/EUR-USD/q", b'{"b": {"px": 1, "sz": 1}, "a": {"px": 1}}', "no 'a.sz'"),
        ("fx/EUR-USD/q", b'{"b": {"px": "x", "sz": 1}, "a": {"px": 1, "sz": 1}}', "bid is not"),
        ("fx/EUR-USD/q", b'{"b": {"px": "inf", "sz": 1}, "a": {"px": 1, "sz": 1}}', "finite"),
        ("fx/EUR-USD/q", b'{"b": {"px": 1, "sz": 1}, "a": {"px": 1, "sz": true}}', "not a"),
        ("fx/EUR-USD/q", b'{"b": {"px": 1, "sz": 1}, "a": {"px": 1, "sz": 1}}', "no id"),
    ],
)
def test_map_says_why_a_message_does_not_map(route: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Unmapped, match=reason):
        mapper("mqtt", QUOTES).map(route, payload, now_ns=1)


def test_map_rejects_a_bad_side_and_a_missing_venue_time() -> None:
    m = mapper("nats", {"channel": "trades", "subject": "t.{symbol}"})
    body = {"price": 1, "size": 2, "trade_id": 1, "side": "up", "ts": 1}
    with pytest.raises(Unmapped, match="side"):
        m.map("t.X", orjson.dumps(body), now_ns=1)
    with pytest.raises(Unmapped, match="venue time"):
        m.map("t.X", orjson.dumps({**body, "side": "sell", "ts": "now"}), now_ns=1)


def test_rabbitmq_routes_are_chosen_by_queue_then_routing_key() -> None:
    m = mapper(
        "rabbitmq",
        {"channel": "trades", "queue": "a", "routing_key": "t.{symbol}"},
        {"channel": "quotes", "queue": "b", "symbol_field": "s"},
    )
    assert m.route_of("t.X", "a")[0].channel == "trades"
    assert m.route_of("anything", "b")[0].channel == "quotes"
    with pytest.raises(Unmapped, match="queue 'c'"):
        m.route_of("t.X", "c")


@pytest.mark.parametrize(
    ("broker", "data", "message"),
    [
        ("nats", {"route": []}, "no \\[\\[route\\]\\]"),
        ("nats", {"route": [{"channel": "trades"}]}, "name the subject"),
        ("nats", {"route": [{"channel": "nope", "subject": "x"}]}, "unknown channel type"),
        ("nats", {"route": [{"channel": "trades", "topic": "x"}]}, "'topic' is not a nats key"),
        ("nats", {"route": [{"channel": "trades", "subject": "x"}]}, "exactly one place"),
        (
            "nats",
            {"route": [{"channel": "trades", "subject": "{symbol}", "symbol_field": "s"}]},
            "exactly one place",
        ),
        ("nats", {"route": [{"channel": "trades", "subject": "a.>.{symbol}"}]}, "may only end"),
        ("rabbitmq", {"route": [{"channel": "trades", "symbol_field": "s"}]}, "name the queue"),
        (
            "mqtt",
            {"route": [{"channel": "trades", "topic": "{symbol}", "fields": {"px": "p"}}]},
            "px not a field of trade",
        ),
        ("mqtt", {"bridge": {"batch": 0}, "route": [QUOTES]}, "batch must be at least 1"),
        ("mqtt", {"bridge": {"batch": "9"}, "route": [QUOTES]}, "batch must be int"),
        ("mqtt", {"bridge": {"name": "a.b"}, "route": [QUOTES]}, "name must be"),
        ("mqtt", {"bridge": {"on_unmapped": "dead-letter"}, "route": [QUOTES]}, "dead_letter ="),
        ("mqtt", {"kafka": {}, "route": [QUOTES]}, "unknown table"),
        (
            "mqtt",
            {"mqtt": {"tls_key_file": "/k.pem"}, "route": [QUOTES]},
            r"tls_key_file without tls_cert_file in map \[mqtt\]",
        ),
        (
            "nats",
            {
                "nats": {"tls_ca_file": "/nowhere/ca.pem"},
                "route": [{"channel": "trades", "subject": "md.{symbol}"}],
            },
            r"cannot set up TLS for map \[nats\]",
        ),
    ],
)
def test_map_errors_say_what_is_wrong(broker: Broker, data: dict[str, Any], message: str) -> None:
    data = {"bridge": {"on_unmapped": "skip"}, **data}
    with pytest.raises(ConfigError, match=message):
        parse_bridge_map(data, broker)


def test_remembered_routes_answer_as_matching_does_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tickwire.feeds.bridges import mapping

    monkeypatch.setattr(mapping, "ROUTE_CACHE_SIZE", 8)
    m = mapper(
        "nats",
        {"channel": "trades", "subject": "md.trades.{symbol}"},
        {"channel": "quotes", "subject": "md.quotes.{symbol}"},
    )
    keys = [f"md.{kind}.S{i % 11}" for i in range(60) for kind in ("trades", "quotes")]
    for key in keys:
        route, plan, symbol = m.route_of(key)
        assert (route, plan, symbol) == m._match(key, "")
        assert route.channel == key.split(".")[1] and symbol == key.split(".")[2]
        assert len(m._routes) <= 8
    # What matches nothing is refused each time, not remembered as something else.
    for _ in range(2):
        with pytest.raises(Unmapped, match="no route"):
            m.route_of("md.bars.S1")
