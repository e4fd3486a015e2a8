"""Every request frame the Python client builds is valid against docs/asyncapi.yaml."""

from __future__ import annotations

import orjson

from tests.contract.schemas import validate_client_message
from tickwire.clients.session import ClientSession, Request
from tickwire.core.events import encode_body
from tickwire.core.stream import complete_body


def check(requests: list[Request]) -> list[Request]:
    for r in requests:
        validate_client_message(orjson.loads(r.frame))
    return requests


def test_every_kind_of_client_request_matches_the_contract() -> None:
    s = ClientSession()
    check(s.connection_made())
    sub = s.subscribe(["trades:BTC-USD", "quotes:*"], snapshot=True)
    check([sub, s.ping(), s.list_channels()])
    body = encode_body(
        "trade", "BTC-USD", 1, 2, {"price": 1.5, "size": 1, "side": "buy", "trade_id": 1}
    )
    events = [orjson.loads(complete_body(body, "e1", seq)) for seq in (1, 2)]
    s.receive(
        orjson.dumps(
            {"type": "subscribed", "id": sub.id, "channels": ["trades:BTC-USD", "quotes:*"]}
        ),
        0,
    )
    s.receive(
        orjson.dumps({"type": "events", "ch": "trades:BTC-USD", "epoch": "e1", "events": events}), 0
    )
    s.connection_lost()
    again = check(s.connection_made())  # the resuming subscribe after a reconnect
    assert any(r.resume for r in again)
    check([s.unsubscribe(["quotes:*"])])
    projected = check([s.subscribe(["bars.1s:*"], fields=["close", "volume"])])
    assert orjson.loads(projected[0].frame)["fields"] == ["close", "volume"]
    s.connection_lost()
    again = check(s.connection_made())  # the projected pattern keeps its fields on reconnect
    assert [orjson.loads(r.frame).get("fields") for r in again] == [None, ["close", "volume"]]
    throttled = check([s.subscribe(["quotes:*"], max_hz=4)])
    assert orjson.loads(throttled[0].frame)["max_hz"] == 4
    s.connection_lost()
    again = check(s.connection_made())  # the throttled pattern keeps its rate on reconnect
    assert sorted(str(orjson.loads(r.frame).get("max_hz")) for r in again) == ["4", "None", "None"]
