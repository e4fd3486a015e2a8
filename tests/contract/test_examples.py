"""docs/asyncapi.yaml against itself and against docs/protocol.md: examples, samples, drift."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.contract.schemas import (
    DOCUMENT_PATH,
    Contract,
    ContractViolation,
    load_contract,
    validate_client_message,
    validate_server_frame,
    validate_server_message,
)

PROTOCOL_MD = DOCUMENT_PATH.parent / "protocol.md"
_CONTRACT = load_contract()  # at import, to parametrize over the document's own examples


def protocol_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of one `## title` section of docs/protocol.md."""
    text = protocol_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def consts(contract: Contract, schema: str) -> set[Any]:
    return {alt["const"] for alt in contract.document["components"]["schemas"][schema]["oneOf"]}


# -- the document covers protocol.md, and no more


def test_contract_messages_are_the_protocol_md_requests_and_replies(contract: Contract) -> None:
    client_ops = set(re.findall(r'\{"op":"(\w+)"', section("Client → server")))
    server_types = set(re.findall(r'\{"type":"(\w+)"', section("Server → client")))
    assert client_ops == {"subscribe", "unsubscribe", "ping", "list", "auth"}
    assert len(server_types) == 13
    assert {"authenticated", "notice"} <= server_types
    assert set(contract.client) == client_ops
    assert set(contract.server) == server_types


def test_contract_error_codes_gap_reasons_and_close_codes_match_protocol_md(
    contract: Contract,
) -> None:
    text = protocol_text()
    errors_par = text[text.index("Error codes:") :].split("\n\n")[0]
    # The codes, not the names in the parentheses that say when each is sent.
    error_codes = set(re.findall(r"`(\w+)`", re.sub(r"\([^()]*\)", "", errors_par)))
    reasons_cell = text[text.index("Reasons:") :].split("\n")[0]
    reasons = set(re.findall(r"`(\w+)` \(", reasons_cell))
    close_codes = {int(c) for c in re.findall(r"^\| (\d{4}) \|", section("Close codes"), re.M)}
    assert len(error_codes) == 9 and len(reasons) == 4 and len(close_codes) == 10
    assert {"forbidden", "unauthorized"} <= error_codes and {4001, 4003} <= close_codes
    assert consts(contract, "ErrorCode") == error_codes
    assert consts(contract, "GapReason") == reasons
    assert consts(contract, "CloseCode") == close_codes


def test_close_code_tables_of_both_documents_are_the_same(contract: Contract) -> None:
    row = re.compile(r"^\| \d{4} \|.*$", re.M)
    in_md = row.findall(section("Close codes"))
    in_contract = row.findall(contract.document["channels"]["ws"]["description"])
    assert in_md == in_contract
    assert [int(r.split("|")[1]) for r in in_md] == sorted(consts(contract, "CloseCode"))


def test_every_request_operation_replies_with_its_answer_or_error(contract: Contract) -> None:
    expected = {
        "subscribe": {"subscribed", "error"},
        "unsubscribe": {"unsubscribed", "error"},
        "ping": {"pong", "error"},
        "list": {"channels", "error"},
        "auth": {"authenticated", "error"},
    }
    seen = {}
    for op in contract.document["operations"].values():
        if op["action"] != "receive":
            continue
        [request] = [ref["$ref"].rsplit("/", 1)[1] for ref in op["messages"]]
        seen[request] = {ref["$ref"].rsplit("/", 1)[1] for ref in op["reply"]["messages"]}
    assert seen == expected


def test_ws_binding_declares_the_token_query_parameter_and_bearer_header(
    contract: Contract,
) -> None:
    binding = contract.document["channels"]["ws"]["bindings"]["ws"]
    assert contract.document["channels"]["ws"]["address"] == "/ws"
    assert binding["query"]["properties"]["token"]["type"] == "string"
    assert "token" not in binding["query"].get("required", [])
    authorization = binding["headers"]["properties"]["Authorization"]
    assert authorization["type"] == "string"
    assert re.match(authorization["pattern"], "Bearer abc.def.ghi")
    assert not re.match(authorization["pattern"], "Basic dXNlcjpwYXNz")
    assert "Authorization" not in binding["headers"].get("required", [])


def test_close_codes_and_notice_codes_match_protocol_md(contract: Contract) -> None:
    schemas = contract.document["components"]["schemas"]
    described = {alt["const"]: alt["description"] for alt in schemas["CloseCode"]["oneOf"]}
    for code, reason in [
        (1001, "max lifetime"),
        (4001, "unauthorized"),
        (4001, "auth timeout"),
        (4001, "token expired"),
        (4001, "credentials revoked"),
        (4003, "forbidden"),
        (1013, "too many connections for this credential"),
    ]:
        assert f"`{reason}`" in described[code], (code, reason)
        row = re.search(rf"^\| {code} \|.*$", section("Close codes"), re.M)
        assert row is not None and f"`{reason}`" in row.group(0), (code, reason)
    server_md = section("Server → client")
    notice_row = next(line for line in server_md.splitlines() if '"type":"notice"' in line)
    assert consts(contract, "NoticeCode") == set(re.findall(r"`(\w+)` \(", notice_row))
    assert consts(contract, "NoticeCode") == {"max_lifetime", "token_expiring"}


# -- every example in the document matches its schema


@pytest.mark.parametrize(
    ("direction", "key", "example"),
    list(_CONTRACT.all_examples()),
    ids=[f"{d}-{k}-{i}" for i, (d, k, _) in enumerate(_CONTRACT.all_examples())],
)
def test_message_example_matches_its_schema(
    contract: Contract, direction: str, key: str, example: Any
) -> None:
    if direction == "client":
        contract.validate_client_message(example)
    else:
        contract.validate_server_message(example)
    assert example.get("op" if direction == "client" else "type") == key


def test_every_message_has_an_example(contract: Contract) -> None:
    specs = [*contract.client.values(), *contract.server.values()]
    assert len(specs) == 18
    assert [s.name for s in specs if not s.examples] == []


@pytest.mark.parametrize(
    "name",
    [
        name
        for name, schema in _CONTRACT.document["components"]["schemas"].items()
        if "examples" in schema
    ],
)
def test_schema_examples_match_their_schema(contract: Contract, name: str) -> None:
    schema = contract.document["components"]["schemas"][name]
    validator = contract.schema_validator(name)
    for example in schema["examples"]:
        errors = [e.message for e in validator.iter_errors(example)]
        assert errors == [], f"{name} example {example!r}: {errors}"


# -- samples written by hand from docs/protocol.md

TRADE = {
    "v": 1,
    "type": "trade",
    "sym": "BTC-USD",
    "ts": 1764230400000000000,
    "pt": 1764230400000120000,
    "price": 64123.5,
    "size": 0.0123,
    "side": "buy",
    "trade_id": 88121,
    "epoch": "9f2c1ab04e11",
    "seq": 1041,
}
QUOTE = {
    "v": 1,
    "type": "quote",
    "sym": "AAPL",
    "ts": 1764230400000000000,
    "pt": 1764230400000100000,
    "bid": 190.01,
    "bid_size": 100,
    "ask": 190.02,
    "ask_size": 300,
    "epoch": "a1b2c3d4e5f6",
    "seq": 7,
}
BAR = {
    "v": 1,
    "type": "bar",
    "sym": "ETH-USD",
    "ts": 1764230401000000000,
    "pt": 1764230401000050000,
    "interval": "1s",
    "open": 3100.05,
    "high": 3101.0,
    "low": 3099.5,
    "close": 3100.5,
    "volume": 4.25,
    "vwap": 3100.31,
    "trades": 12,
    "start": 1764230400000000000,
    "end": 1764230401000000000,
    "epoch": "0011aabbccdd",
    "seq": 60,
}

CLIENT_SAMPLES: list[dict[str, Any]] = [
    {
        "op": "subscribe",
        "id": 1,
        "channels": ["trades:BTC-USD", "quotes:*"],
        "snapshot": True,
        "resume": {"trades:BTC-USD": {"epoch": "9f2c1ab04e11", "seq": 1041}},
    },
    {"op": "subscribe", "channels": ["bars.1m:EUR/USD", "bars.1s:BRK.B"]},
    {"op": "subscribe", "channels": ["bars.250ms:BTC-USD", "bars.15m:*", "bars.1d:AAPL"]},
    {"op": "unsubscribe", "id": 2, "channels": ["quotes:*"]},
    {"op": "ping", "id": 3},
    {"op": "list", "id": "four"},
    {"op": "auth", "id": 5, "token": "k-1f2e3d"},
    {"op": "auth", "token": "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"},
]

SERVER_SAMPLES: list[dict[str, Any]] = [
    {
        "type": "welcome",
        "protocol": 1,
        "server": "tickwire/0.1.0",
        "heartbeat_ms": 5000,
        "limits": {"max_message_bytes": 16384, "max_resume_events": 100000, "slow_grace_s": 5},
    },
    {"type": "subscribed", "id": 1, "channels": ["trades:BTC-USD", "quotes:*"]},
    {"type": "unsubscribed", "id": 2, "channels": ["trades:BTC-USD"]},
    {"type": "pong", "id": 3, "ts": 1764230400000000000},
    {"type": "channels", "id": 4, "channels": ["quotes:AAPL", "trades:BTC-USD"]},
    {"type": "events", "ch": "trades:BTC-USD", "epoch": "9f2c1ab04e11", "events": [TRADE]},
    {
        "type": "events",
        "ch": "quotes:AAPL",
        "epoch": "a1b2c3d4e5f6",
        "conflated": True,
        "events": [QUOTE],
    },
    {"type": "events", "ch": "bars.1s:ETH-USD", "epoch": "0011aabbccdd", "events": [BAR]},
    {"type": "gap", "ch": "trades:BTC-USD", "from_seq": 5, "to_seq": 9, "reason": "trimmed"},
    {"type": "gap", "ch": "quotes:AAPL", "from_seq": 3, "to_seq": 3, "reason": "conflated"},
    {"type": "reset", "ch": "trades:BTC-USD", "epoch": "0c4e7d2a9b13"},
    {"type": "status", "redis": "down"},
    {"type": "status", "redis": "up"},
    {"type": "heartbeat", "ts": 1764230400000000000, "last": {"trades:BTC-USD": 1041}},
    {"type": "heartbeat", "ts": 1764230400000000000, "last": {}},
    {"type": "error", "id": 1, "code": "rate_limited", "message": "too many requests"},
    {"type": "error", "id": None, "code": "bad_request", "message": "not valid JSON"},
    {
        "type": "welcome",
        "protocol": 1,
        "server": "tickwire/0.1.0",
        "heartbeat_ms": 5000,
        "limits": {"max_message_bytes": 16384, "max_resume_events": 100000, "slow_grace_s": 5},
        "auth": "required",
    },
    {
        "type": "welcome",
        "protocol": 1,
        "server": "tickwire/0.1.0",
        "heartbeat_ms": 5000,
        "limits": {"max_message_bytes": 16384, "max_resume_events": 100000, "slow_grace_s": 5},
        "auth": "ok",
        "entitlements": ["*", "trades:*", "quotes:BTC-*", "bars.1m:EUR/USD"],
    },
    {"type": "authenticated", "id": 5, "entitlements": ["quotes:BTC-*"]},
    {"type": "authenticated", "id": None, "entitlements": []},
    {"type": "notice", "code": "max_lifetime", "close_in_ms": 10000},
    {"type": "notice", "code": "token_expiring", "close_in_ms": 0},
    {"type": "error", "id": 1, "code": "forbidden", "message": "not entitled to quotes:*"},
    {"type": "error", "id": 5, "code": "unauthorized", "message": "token expired"},
]


@pytest.mark.parametrize("msg", CLIENT_SAMPLES, ids=lambda m: str(m["op"]))
def test_protocol_md_client_sample_is_valid(msg: dict[str, Any]) -> None:
    validate_client_message(msg)


@pytest.mark.parametrize("msg", SERVER_SAMPLES, ids=lambda m: str(m["type"]))
def test_protocol_md_server_sample_is_valid(msg: dict[str, Any]) -> None:
    validate_server_message(msg)


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def events_of(*events: dict[str, Any], ch: str = "trades:BTC-USD") -> dict[str, Any]:
    return {"type": "events", "ch": ch, "epoch": "9f2c1ab04e11", "events": list(events)}


INVALID_CLIENT: list[tuple[str, Any]] = [
    ("not an object", ["subscribe"]),
    ("unknown op", {"op": "publish", "channels": ["trades:X"]}),
    ("no channels", {"op": "subscribe", "id": 1}),
    ("empty channels", {"op": "subscribe", "channels": []}),
    ("lower-case symbol", {"op": "subscribe", "channels": ["trades:btc-usd"]}),
    ("unknown channel type", {"op": "subscribe", "channels": ["candles:BTC-USD"]}),
    ("symbol ends with -", {"op": "subscribe", "channels": ["trades:BTC-"]}),
    ("snapshot not bool", {"op": "subscribe", "channels": ["trades:X"], "snapshot": 1}),
    (
        "resume of a pattern",
        {
            "op": "subscribe",
            "channels": ["trades:*"],
            "resume": {"trades:*": {"epoch": "e", "seq": 1}},
        },
    ),
    (
        "resume without seq",
        {"op": "subscribe", "channels": ["trades:X"], "resume": {"trades:X": {"epoch": "e"}}},
    ),
    ("float id", {"op": "ping", "id": 1.5}),
    ("undeclared field", {"op": "ping", "id": 1, "extra": True}),
    ("bar interval without a unit", {"op": "subscribe", "channels": ["bars.5:BTC-USD"]}),
    ("bar interval of zero", {"op": "subscribe", "channels": ["bars.0s:BTC-USD"]}),
    ("max_hz zero", {"op": "subscribe", "channels": ["quotes:*"], "max_hz": 0}),
    ("max_hz above 1000", {"op": "subscribe", "channels": ["quotes:*"], "max_hz": 1001}),
    ("max_hz a string", {"op": "subscribe", "channels": ["quotes:*"], "max_hz": "4"}),
    ("auth without token", {"op": "auth", "id": 5}),
    ("auth token not a string", {"op": "auth", "id": 5, "token": 42}),
]

INVALID_SERVER: list[tuple[str, Any]] = [
    ("no type", {"redis": "down"}),
    ("unknown type", {"type": "hello"}),
    ("welcome of protocol 2", with_(SERVER_SAMPLES[0], protocol=2)),
    ("welcome without limits", with_(SERVER_SAMPLES[0], limits=...)),
    (
        "welcome limits lack slow_grace_s",
        with_(SERVER_SAMPLES[0], limits={"max_message_bytes": 1, "max_resume_events": 1}),
    ),
    ("undeclared field in a reply", {"type": "pong", "id": 3, "ts": 1, "extra": 1}),
    ("error code not in the list", {"type": "error", "id": 1, "code": "nope", "message": "x"}),
    (
        "gap reason not in the list",
        {"type": "gap", "ch": "trades:X", "from_seq": 1, "to_seq": 2, "reason": "lost"},
    ),
    (
        "gap backwards",
        {"type": "gap", "ch": "trades:X", "from_seq": 5, "to_seq": 4, "reason": "trimmed"},
    ),
    (
        "gap from seq 0",
        {"type": "gap", "ch": "trades:X", "from_seq": 0, "to_seq": 4, "reason": "trimmed"},
    ),
    ("status sideways", {"type": "status", "redis": "maybe"}),
    ("events of a pattern", events_of(TRADE, ch="trades:*")),
    ("empty events", events_of()),
    ("event without v", events_of(with_(TRADE, v=...))),
    ("event of v 2", events_of(with_(TRADE, v=2))),
    ("event with string seq", events_of(with_(TRADE, seq="1041"))),
    ("event with fractional ts", events_of(with_(TRADE, ts=1764230400.5))),
    ("trade side up", events_of(with_(TRADE, side="up"))),
    ("quote without ask", events_of(with_(QUOTE, ask=...), ch="quotes:AAPL")),
    ("bar of 5m", events_of(with_(BAR, interval="5m"), ch="bars.1s:ETH-USD")),
    ("event of another symbol", events_of(with_(TRADE, sym="ETH-USD"))),
    ("event of another type", events_of(QUOTE, ch="trades:AAPL")),
    ("event of another epoch", events_of(with_(TRADE, epoch="other"))),
    ("seqs not consecutive", events_of(TRADE, with_(TRADE, seq=1043))),
    ("seqs repeated", events_of(TRADE, TRADE)),
    ("skipped zero", {**events_of(TRADE), "skipped": 0}),
    ("skipped fractional", {**events_of(TRADE), "skipped": 1.5}),
    ("heartbeat last of a pattern", {"type": "heartbeat", "ts": 1, "last": {"trades:*": 1}}),
    ("welcome auth sideways", with_(SERVER_SAMPLES[0], auth="maybe")),
    ("welcome auth ok without entitlements", with_(SERVER_SAMPLES[0], auth="ok")),
    (
        "welcome entitlements with auth required",
        with_(SERVER_SAMPLES[0], auth="required", entitlements=["*"]),
    ),
    ("welcome entitlements without auth", with_(SERVER_SAMPLES[0], entitlements=["*"])),
    ("authenticated without entitlements", {"type": "authenticated", "id": 5}),
    ("entitlement of an unknown type", {"type": "authenticated", "entitlements": ["candles:*"]}),
    ("entitlement wildcard inside", {"type": "authenticated", "entitlements": ["quotes:B*D"]}),
    ("entitlements repeated", {"type": "authenticated", "entitlements": ["*", "*"]}),
    ("notice code not in the list", {"type": "notice", "code": "bored", "close_in_ms": 1}),
    ("notice without close_in_ms", {"type": "notice", "code": "max_lifetime"}),
    (
        "notice close_in_ms in seconds",
        {"type": "notice", "code": "max_lifetime", "close_in_ms": 1.5},
    ),
    ("notice close_in_ms negative", {"type": "notice", "code": "max_lifetime", "close_in_ms": -1}),
]


@pytest.mark.parametrize(("why", "msg"), INVALID_CLIENT, ids=[w for w, _ in INVALID_CLIENT])
def test_invalid_client_message_is_rejected(why: str, msg: Any) -> None:
    with pytest.raises(ContractViolation):
        validate_client_message(msg)


@pytest.mark.parametrize(("why", "msg"), INVALID_SERVER, ids=[w for w, _ in INVALID_SERVER])
def test_invalid_server_message_is_rejected(why: str, msg: Any) -> None:
    with pytest.raises(ContractViolation):
        validate_server_message(msg)


# -- strictness and frames


def test_unknown_reply_field_fails_strict_but_passes_lenient(
    contract: Contract, lenient_contract: Contract
) -> None:
    msg = {"type": "pong", "id": 3, "ts": 1, "server_load": 0.5}
    with pytest.raises(ContractViolation, match="server_load"):
        contract.validate_server_message(msg)
    lenient_contract.validate_server_message(msg)


def test_added_event_field_is_valid_v1_in_strict_mode(contract: Contract) -> None:
    contract.validate_server_message(events_of(with_(TRADE, venue="XNAS")))


def test_server_frame_may_be_an_object_or_an_array() -> None:
    batch = [SERVER_SAMPLES[1], SERVER_SAMPLES[5], {"type": "status", "redis": "up"}]
    assert validate_server_frame(orjson.dumps(batch)) == batch
    assert validate_server_frame(orjson.dumps(SERVER_SAMPLES[3]).decode()) == [SERVER_SAMPLES[3]]
    with pytest.raises(ContractViolation, match="empty array"):
        validate_server_frame(b"[]")
    with pytest.raises(ContractViolation, match="not JSON"):
        validate_server_frame(b'{"type":')
    with pytest.raises(ContractViolation, match="the contract knows"):
        validate_server_frame(orjson.dumps([SERVER_SAMPLES[3], {"type": "hello"}]))


def test_violation_message_says_where(contract: Contract) -> None:
    with pytest.raises(ContractViolation, match=r"at /events/0/seq"):
        contract.validate_server_message(events_of(with_(TRADE, seq=0)))


def test_contract_of_another_file_is_loaded_from_that_file(tmp_path: Path) -> None:
    text = DOCUMENT_PATH.read_text(encoding="utf-8").replace(
        "enum: [down, up]", "enum: [down, up, degraded]"
    )
    path = tmp_path / "asyncapi.yaml"
    path.write_text(text, encoding="utf-8")
    load_contract(path).validate_server_message({"type": "status", "redis": "degraded"})
    with pytest.raises(ContractViolation):
        validate_server_message({"type": "status", "redis": "degraded"})
