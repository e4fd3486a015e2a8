from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickwire.core.channels import Channel
from tickwire.core.config import AuthConfig, Limits
from tickwire.server import session as session_module
from tickwire.server.auth import Authenticator, key_id
from tickwire.server.session import (
    ClientSession,
    Close,
    ListChannels,
    Rejected,
    Reply,
    Subscribe,
    Unsubscribe,
)


def sent(action: object) -> bytes:
    """The message a reply or a refusal sends."""
    assert isinstance(action, Reply | Rejected), action
    return action.message


def error_code(action: object) -> str:
    assert isinstance(action, Rejected), action
    doc = orjson.loads(action.message)
    assert doc["type"] == "error" and doc["code"] == action.code
    return str(doc["code"])


def send(session: ClientSession, doc: Any, now: float = 0.0) -> object:
    return session.receive(orjson.dumps(doc), now)


def test_subscribe_returns_added_patterns_resume_and_full_set() -> None:
    s = ClientSession(Limits())
    a = send(
        s,
        {
            "op": "subscribe",
            "id": 1,
            "channels": ["trades:BTC-USD", "quotes:*"],
            "snapshot": True,
            "resume": {
                "trades:BTC-USD": {"epoch": "e", "seq": 41},
                "quotes:AAPL": {"epoch": "f", "seq": 2},
            },
        },
    )
    assert isinstance(a, Subscribe)
    assert a.id == 1 and a.snapshot
    assert [p.name for p in a.added] == ["trades:BTC-USD", "quotes:*"]
    assert a.resume == {
        Channel.parse("trades:BTC-USD"): ("e", 41),
        Channel.parse("quotes:AAPL"): ("f", 2),
    }
    b = send(s, {"op": "subscribe", "id": "x", "channels": ["quotes:*", "bars.1s:ETH-USD"]})
    assert isinstance(b, Subscribe)
    assert [p.name for p in b.added] == ["bars.1s:ETH-USD"]
    assert b.all_channels == ("trades:BTC-USD", "quotes:*", "bars.1s:ETH-USD")
    u = send(s, {"op": "unsubscribe", "id": 2, "channels": ["quotes:*", "trades:ETH-USD"]})
    assert isinstance(u, Unsubscribe)
    assert [p.name for p in u.removed] == ["quotes:*"]
    assert u.all_channels == ("trades:BTC-USD", "bars.1s:ETH-USD")
    assert isinstance(send(s, {"op": "list", "id": 3}), ListChannels)
    pong = orjson.loads(sent(s.receive(b'{"op":"ping","id":9}', 0.0, now_ns=77)))
    assert pong == {"type": "pong", "id": 9, "ts": 77}


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"{nope", "bad_request"),
        (b"[1,2]", "bad_request"),
        (b'{"id":1}', "bad_request"),
        (b'{"op":"dance","id":1}', "unknown_op"),
        (b'{"op":"subscribe","id":1}', "bad_request"),
        (b'{"op":"subscribe","id":1,"channels":[]}', "bad_request"),
        (b'{"op":"subscribe","id":1,"channels":["orders:BTC-USD"]}', "unknown_channel"),
        (b'{"op":"subscribe","id":1,"channels":["trades:btc usd"]}', "bad_request"),
        (b'{"op":"subscribe","id":1,"channels":[5]}', "bad_request"),
        (b'{"op":"subscribe","id":1,"channels":["trades:A"],"snapshot":"yes"}', "bad_request"),
        (
            b'{"op":"subscribe","id":1,"channels":["trades:A"],"resume":{"trades:B":{"epoch":"e","seq":1}}}',
            "bad_request",
        ),
        (
            b'{"op":"subscribe","id":1,"channels":["trades:A"],"resume":{"trades:A":{"epoch":"e","seq":-1}}}',
            "bad_request",
        ),
        (
            b'{"op":"subscribe","id":1,"channels":["trades:A"],"resume":{"candles:A":{"epoch":"e","seq":1}}}',
            "unknown_channel",
        ),
        (
            b'{"op":"subscribe","id":1,"channels":["trades:A"],"resume":{"trades:A":{"seq":1}}}',
            "bad_request",
        ),
        (b'{"op":"ping","id":{"a":1}}', "bad_request"),
        (b'{"op":"ping","id":true}', "bad_request"),
        (b"\xff\xfe", "bad_request"),
    ],
)
def test_malformed_requests_get_typed_errors(frame: bytes, code: str) -> None:
    s = ClientSession(Limits())
    assert error_code(s.receive(frame, 0.0)) == code
    assert s.subscriptions == {}


def test_error_echoes_the_request_id() -> None:
    doc = orjson.loads(sent(ClientSession(Limits()).receive(b'{"op":"dance","id":"abc"}', 0.0)))
    assert doc["id"] == "abc"


def test_subscription_cap() -> None:
    s = ClientSession(Limits(max_subscriptions=2))
    assert isinstance(send(s, {"op": "subscribe", "channels": ["trades:A", "trades:B"]}), Subscribe)
    assert (
        error_code(send(s, {"op": "subscribe", "channels": ["trades:C"]}))
        == "too_many_subscriptions"
    )
    assert len(s.subscriptions) == 2


def test_oversized_request() -> None:
    s = ClientSession(Limits(max_message_bytes=100))
    assert error_code(s.receive(b'{"op":"ping","pad":"' + b"x" * 200 + b'"}', 0.0)) == "too_large"


def test_a_failure_of_the_server_is_internal_for_that_request_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(value: Any, limit: int) -> Any:
        raise RuntimeError("a bug in the server")

    s = ClientSession(Limits())
    with monkeypatch.context() as patch:
        patch.setattr(session_module, "_patterns", broken)
        doc = orjson.loads(sent(send(s, {"op": "subscribe", "id": 4, "channels": ["trades:A"]})))
    assert (doc["type"], doc["id"], doc["code"]) == ("error", 4, "internal")
    assert isinstance(send(s, {"op": "subscribe", "id": 5, "channels": ["trades:A"]}), Subscribe)


def test_a_failure_of_the_server_before_auth_closes_1011_not_4001(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"sha256:{key_id('k' * 40)} n *\n", encoding="utf-8")
    authenticator = Authenticator(AuthConfig(api_keys_file=str(keys)))

    def broken(token: str, now: float) -> Any:
        raise RuntimeError("a bug in the server")

    s = ClientSession(Limits(), authenticator)
    monkeypatch.setattr(authenticator, "authenticate", broken)
    # 4001 would send the client for new credentials; its credentials are not the problem.
    assert send(s, {"op": "auth", "token": "k" * 40}) == Close(1011, "internal error")


def test_rate_limit_errors_then_closes_when_it_persists() -> None:
    s = ClientSession(Limits(rate_per_s=10, rate_burst=5, rate_violations_before_close=3))
    results = [send(s, {"op": "ping"}, now=0.0) for _ in range(5)]
    assert all(isinstance(r, Reply) and b"pong" in r.message for r in results)
    assert error_code(send(s, {"op": "ping"}, now=0.0)) == "rate_limited"
    assert isinstance(send(s, {"op": "ping"}, now=0.15), Reply)  # refilled one token
    assert error_code(send(s, {"op": "ping"}, now=0.15)) == "rate_limited"
    closing = send(s, {"op": "ping"}, now=0.15)
    assert closing == Close(1008, "rate limit exceeded")


def test_rate_limit_violations_are_forgotten_after_the_window() -> None:
    """A long-lived client that bursts past its bucket now and then is told `rate_limited` each
    time but never closed; refusals only add up to a close within `rate_violation_window_s`."""
    limits = Limits(rate_per_s=1, rate_burst=1, rate_violations_before_close=3)
    assert limits.rate_violation_window_s == 60.0
    s = ClientSession(limits)
    for burst in range(100):  # a burst of 3 every 61 s, for 100 minutes
        now = burst * 61.0
        answers = [send(s, {"op": "ping"}, now=now + i * 0.001) for i in range(3)]
        assert isinstance(answers[0], Reply) and b"pong" in answers[0].message, burst
        assert [error_code(a) for a in answers[1:]] == ["rate_limited"] * 2, burst
    # Three refusals within the window close, even when spread over most of it; the same three
    # spread a little wider do not. (A slow bucket, so that none refills in between.)
    slow = Limits(rate_per_s=0.01, rate_burst=1, rate_violations_before_close=3)
    for last, expected in ((59.0, Close(1008, "rate limit exceeded")), (61.0, None)):
        s = ClientSession(slow)
        assert orjson.loads(sent(send(s, {"op": "ping"}, now=0.0)))["type"] == "pong"
        assert error_code(send(s, {"op": "ping"}, now=0.0)) == "rate_limited"
        assert error_code(send(s, {"op": "ping"}, now=30.0)) == "rate_limited"
        answer = send(s, {"op": "ping"}, now=last)
        if expected is None:
            assert error_code(answer) == "rate_limited"
        else:
            assert answer == expected


# Flat strategies: hypothesis spends most of its time generating recursive values, and the
# session's parser only ever looks one level into the request (deep nesting is tested below).
scalars = (
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            2**53,
            2**64,
            1.5,
            "",
            "x",
            "trades:A",
            "quotes:*",
            "e",
            [],
            {},
            [1],
            {"a": 1},
        ]
    )
    | st.integers()
    | st.text(max_size=8)
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["subscribe", "unsubscribe", "ping", "list", "x"]) | scalars,
        "id": scalars,
        "channels": st.lists(
            st.sampled_from(
                ["trades:A", "quotes:*", "bars.1s:B", "x:Y", "trades:", "", "trades:a b"]
            )
            | scalars,
            max_size=3,
        )
        | scalars,
        "snapshot": scalars,
        "resume": st.dictionaries(
            st.sampled_from(["trades:A", "quotes:B", "q"]),
            st.fixed_dictionaries({"epoch": scalars, "seq": scalars}) | scalars,
            max_size=2,
        )
        | scalars,
    },
)


def test_deeply_nested_and_huge_requests_get_bad_request() -> None:
    s = ClientSession(Limits(max_message_bytes=1 << 20))
    deep = b'{"op":"subscribe","channels":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert error_code(s.receive(deep, 0.0)) == "bad_request"
    huge = (
        b'{"op":"subscribe","channels":["trades:A"],"resume":{"trades:A":{"epoch":"e","seq":'
        + b"9" * 400
        + b"}}}"
    )
    assert error_code(s.receive(huge, 0.0)) == "bad_request"


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(requests.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)))
def test_fuzzed_frames_never_raise_and_always_get_a_typed_answer(frame: bytes) -> None:
    s = ClientSession(Limits())
    action = s.receive(frame, 0.0)
    if isinstance(action, Reply | Rejected):
        doc = orjson.loads(action.message)
        assert doc["type"] in {"error", "pong"}
        if doc["type"] == "error":
            assert doc["code"] in {
                "bad_request",
                "unknown_op",
                "unknown_channel",
                "too_many_subscriptions",
                "too_large",
            }
    else:
        assert isinstance(action, Subscribe | Unsubscribe | ListChannels)


def test_subscribe_plan_places_followed_channels_and_catches_up_the_rest() -> None:
    from tickwire.core.channels import Channel
    from tickwire.core.stream import StreamPosition
    from tickwire.server.session import FROM_NOW, plan_subscribe

    a, b, c, d = (Channel.parse(f"trades:{s}") for s in ("A", "B", "C", "D"))
    known = {"trades:*": [a, b, c, d]}
    followed = {a: StreamPosition("e1", 7), b: StreamPosition("", 0)}
    s = ClientSession(Limits())
    req = s.receive(
        b'{"op":"subscribe","id":1,"channels":["trades:*"],'
        b'"resume":{"trades:C":{"epoch":"e2","seq":3}}}',
        0.0,
    )
    assert isinstance(req, Subscribe)

    def plan(snapshot_req: Subscribe, up: bool = True):  # type: ignore[no-untyped-def]
        return plan_subscribe(
            snapshot_req,
            lambda p: known[p.name] if p.is_wildcard else [p.as_channel()],
            {d},  # already started on this connection: goes on as it is
            followed.get,
            up,
        )

    p = plan(req)
    # Followed channels are live at once from the follower's position; the resume is a target;
    # a known channel nobody follows yet is caught up from now.
    assert p.placed == {a: StreamPosition("e1", 7), b: StreamPosition("", 0)}
    assert p.targets == {c: StreamPosition("e2", 3)}
    assert p.wildcards == []
    known["trades:*"].append(Channel.parse("trades:E"))
    assert plan(req).targets[Channel.parse("trades:E")] is FROM_NOW
    assert Channel.parse("trades:E") not in plan(req, up=False).targets  # Redis down: no target
    snap = ClientSession(Limits()).receive(
        b'{"op":"subscribe","id":2,"channels":["trades:*"],"snapshot":true}', 0.0
    )
    assert isinstance(snap, Subscribe)
    p = plan(snap)
    assert p.placed == {} and set(p.targets) == {a, b, c, Channel.parse("trades:E")}
    assert all(t is None for t in p.targets.values()) and p.wildcards == list(snap.added)
