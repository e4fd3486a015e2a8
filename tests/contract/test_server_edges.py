"""The contract at the server's edges: frames, sizes, close codes, heartbeat `last`, error codes
and request limits, each as both documents state it and as a real server does it."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import timeout
from tests.contract.schemas import DOCUMENT_PATH, Contract
from tests.contract.serving import serving
from tests.contract.test_server_conformance import Conversation
from tests.server.test_abuse import CLOSE, PING, PONG, TEXT, abuse_frames, frame, raw_ws
from tickwire.core.config import AuthConfig, Limits, PublisherConfig, ServerConfig
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.server import session as session_module
from tickwire.server.app import TickwireServer
from tickwire.server.auth import MAX_TOKEN_CHARS, key_id

#: A small `limits.max_message_bytes`, so that frames around it and twice it are quick to send.
MAX = 1024
PROTOCOL_MD = DOCUMENT_PATH.parent / "protocol.md"


def server_config(redis_server: RedisProcess, **changes: Any) -> ServerConfig:
    config = ServerConfig(
        redis_url=redis_server.url,
        port=0,
        registry_poll_s=0.05,
        heartbeat_ms=60_000,
        limits=Limits(max_message_bytes=MAX),
    )
    return dataclasses.replace(config, **changes)


@asynccontextmanager
async def talking(config: ServerConfig) -> AsyncIterator[tuple[TickwireServer, Conversation]]:
    """A server and a client conversation with it, past `welcome`."""
    async with serving(config) as srv, connect(srv.url) as ws:
        talk = Conversation(ws)
        assert (await talk.until("welcome", lambda m: True))["type"] == "welcome"
        yield srv, talk


def padded_ping(size: int, request_id: int) -> bytes:
    """A ping request of exactly `size` bytes of JSON."""
    empty = orjson.dumps({"op": "ping", "id": request_id, "pad": ""})
    return orjson.dumps({"op": "ping", "id": request_id, "pad": "x" * (size - len(empty))})


def flat(text: str) -> str:
    """`text` with its line breaks and runs of spaces as single spaces."""
    return " ".join(text.split())


def frames_section(contract: Contract) -> str:
    """The asyncapi document's `## Frames` section, flattened."""
    text: str = contract.document["info"]["description"]
    return flat(text[text.index("## Frames") :].split("\n## ", maxsplit=1)[0])


def protocol_intro() -> str:
    """docs/protocol.md before its first `##` section, flattened."""
    return flat(PROTOCOL_MD.read_text(encoding="utf-8").split("\n## ")[0])


def protocol_requests() -> str:
    """docs/protocol.md's `## Client → server` section, flattened."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    return flat(text[text.index("## Client → server\n") :].split("\n## ")[0])


def close_codes(contract: Contract) -> dict[int, str]:
    """The asyncapi document's close codes, with their descriptions."""
    schemas = contract.document["components"]["schemas"]
    return {alt["const"]: alt["description"] for alt in schemas["CloseCode"]["oneOf"]}


def protocol_close_row(code: int) -> str:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    table = text[text.index("## Close codes\n") :].split("\n## ")[0]
    row = re.search(rf"^\| {code} \|.*$", table, re.M)
    assert row is not None, f"close code {code} is not in docs/protocol.md"
    return row.group(0)


# -- binary frames -------------------------------------------------------------------------------
async def test_binary_frame_of_utf8_json_is_a_request_as_both_documents_say(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    for text in (frames_section(contract), protocol_intro()):
        assert "**binary** frame" in text and "gets `bad_request`" in text, text
    async with talking(server_config(redis_server)) as (_, talk):
        await talk.ws.send(orjson.dumps({"op": "ping", "id": 1}))  # bytes: a binary frame
        await talk.reply(1, "pong")
        # Not UTF-8 JSON: `bad_request` (unlike a text frame, which would close with 1007).
        await talk.ws.send(b"\xff\xfe{")
        bad = await talk.until("an error", lambda m: m["type"] == "error")
        assert bad["code"] == "bad_request" and bad["id"] is None
        await talk.send({"op": "ping", "id": 2})
        await talk.reply(2, "pong")


# -- sizes ---------------------------------------------------------------------------------------
async def test_request_over_max_message_bytes_gets_too_large_and_twice_that_closes_1009(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    assert "twice" in close_codes(contract)[1009] and "twice" in protocol_close_row(1009)
    async with talking(server_config(redis_server)) as (_, talk):
        await talk.ws.send(padded_ping(MAX, 1).decode())
        await talk.reply(1, "pong")
        for size in (MAX + 1, 2 * MAX):
            await talk.ws.send(padded_ping(size, 2).decode())
            error = await talk.until("too_large", lambda m: m["type"] == "error")
            # Not read, so not answered with the request's id.
            assert error["code"] == "too_large" and error["id"] is None, error
        # The connection stays.
        await talk.send({"op": "ping", "id": 3})
        await talk.reply(3, "pong")
        await talk.ws.send(padded_ping(2 * MAX + 1, 4).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await talk.until("the close", lambda m: False)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# -- internal ------------------------------------------------------------------------------------
async def test_a_request_the_server_fails_on_gets_internal_and_the_connection_stays(
    redis: RedisConnection, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(value: Any, limit: int) -> Any:
        raise RuntimeError("a bug in the server")

    async with talking(server_config(redis_server)) as (_, talk):
        with monkeypatch.context() as patch:
            patch.setattr(session_module, "_patterns", broken)
            await talk.send({"op": "subscribe", "id": 1, "channels": ["trades:BTC-USD"]})
            failed = await talk.reply(1, "error")
        assert failed["code"] == "internal"
        # The request may be retried, on the same connection.
        await talk.send({"op": "subscribe", "id": 2, "channels": ["trades:BTC-USD"]})
        await talk.reply(2, "subscribed")


# -- close codes ---------------------------------------------------------------------------------
CLOSING_FRAMES: list[tuple[int, str, bytes]] = [
    (1002, "protocol error", frame(TEXT, b'{"op":"ping"}', masked=False)),
    (1002, "protocol error", frame(0x3, b"{}")),  # a reserved opcode
    (1002, "protocol error", frame(CLOSE, b"\x03\xed")),  # close code 1005 may not be sent
    (1007, "not valid utf-8", frame(TEXT, b'{"op":"ping","id":"\xff"}')),
    (1007, "not valid utf-8", frame(CLOSE, b"\x03\xe8\xff")),  # a close reason
]


async def test_misbehaving_clients_get_the_documented_close_codes(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    for code, why, _ in CLOSING_FRAMES:
        assert why in close_codes(contract)[code].lower(), code
        assert why in protocol_close_row(code).lower(), code
    async with serving(server_config(redis_server)) as srv:
        got = [(await abuse_frames(srv.port, raw))[0] for _, _, raw in CLOSING_FRAMES]
    assert got == [code for code, _, _ in CLOSING_FRAMES]


async def test_a_client_answering_pings_stays_while_a_silent_one_is_closed_1011(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    # The server pings every connection from one task: each ping's pong must reach its own
    # connection's waiter, or the answering client would be closed after the timeout too.
    config = server_config(redis_server, ping_interval_s=0.05, ping_timeout_s=0.1)
    async with serving(config) as srv, raw_ws(srv.port) as silent, raw_ws(srv.port) as answering:
        payloads: list[bytes] = []
        while len(payloads) < 8:  # 8 intervals: 4 times the timeout
            opcode, payload = await asyncio.wait_for(answering.read_frame(), timeout(5))
            assert opcode != CLOSE, f"closed although it answered: {payload!r}"
            if opcode == PING:
                payloads.append(payload)
                await answering.send(frame(PONG, payload))
        assert len(set(payloads)) == len(payloads)  # a fresh payload for every ping
        assert await silent.close_code() == (1011, "keepalive ping timeout")


async def test_client_that_never_answers_pings_is_closed_1011_as_documented(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    why = "`keepalive ping timeout`"
    assert why in close_codes(contract)[1011] and why in protocol_close_row(1011)
    config = server_config(redis_server, ping_interval_s=0.1, ping_timeout_s=0.2)
    async with serving(config) as srv, raw_ws(srv.port) as ws:
        # The raw client reads the server's pings and never answers them.
        assert await ws.close_code() == (1011, "keepalive ping timeout")
        assert PING in ws.skipped


# -- heartbeat -----------------------------------------------------------------------------------
async def test_heartbeat_last_holds_only_seqs_sent_on_the_connection(
    redis: RedisConnection, redis_server: RedisProcess
) -> None:
    from tickwire.core.channels import Channel
    from tickwire.feeds.publisher import Publisher

    btc = Channel.parse("trades:BTC-USD")

    def trade(i: int) -> bytes:
        fields = {"price": 100.5, "size": 1, "side": "buy", "trade_id": i}
        return encode_body("trade", btc.symbol, i, 0, fields)

    async with Publisher(PublisherConfig(redis_url=redis_server.url)) as pub:
        await pub.publish({btc: [trade(i) for i in range(1, 4)]})
        await pub.flush()
        async with talking(server_config(redis_server, heartbeat_ms=100)) as (_, talk):
            # An idle subscribe (nothing is sent: the client starts at seq 3) and two resume
            # points claimed on channels with no stream, one of them 0 ("nothing yet").
            await talk.send(
                {
                    "op": "subscribe",
                    "id": 1,
                    "channels": ["trades:BTC-USD", "trades:ZZZ", "trades:YYY"],
                    "resume": {
                        "trades:ZZZ": {"epoch": "e1", "seq": 41},
                        "trades:YYY": {"epoch": "e2", "seq": 0},
                    },
                }
            )
            await talk.reply(1, "subscribed")
            # Every frame is checked against the contract: a 0 in `last` fails `Seq` here.
            idle = await talk.until("a heartbeat", lambda m: m["type"] == "heartbeat")
            assert idle["last"] == {}, idle
            assert not [m for m in talk.messages if m["type"] == "events"]

            await pub.publish({btc: [trade(4)]})
            await pub.flush()
            event = await talk.until("the next event", lambda m: m["type"] == "events")
            assert [e["seq"] for e in event["events"]] == [4]
            after = await talk.until("a heartbeat", lambda m: m["type"] == "heartbeat")
            assert after["last"] == {"trades:BTC-USD": 4}, after


# -- resume keys ---------------------------------------------------------------------------------
async def test_resume_of_an_unknown_channel_type_gets_unknown_channel(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    codes = {alt["const"]: alt["description"] for alt in _error_codes(contract)}
    assert "`resume`" in codes["unknown_channel"]
    async with talking(server_config(redis_server)) as (_, talk):
        request = {
            "op": "subscribe",
            "id": 1,
            "channels": ["trades:BTC-USD"],
            "resume": {"candles:BTC-USD": {"epoch": "e1", "seq": 5}},
        }
        await talk.send(request, valid=False)
        assert (await talk.reply(1, "error"))["code"] == "unknown_channel"
        # Nothing of the request was added.
        await talk.send({"op": "unsubscribe", "id": 2, "channels": ["trades:BTC-USD"]})
        assert (await talk.reply(2, "unsubscribed"))["channels"] == []


def _error_codes(contract: Contract) -> list[dict[str, Any]]:
    codes: list[dict[str, Any]] = contract.document["components"]["schemas"]["ErrorCode"]["oneOf"]
    return codes


# -- request limits ------------------------------------------------------------------------------
IDS_WITHIN = [2**53 - 1, -(2**53 - 1), 0, "x" * 64, ""]
IDS_BEYOND = [2**53, -(2**53), "x" * 65, True, 1.5, [1], {"a": 1}]


async def test_request_id_limits_are_the_servers_in_both_documents(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess
) -> None:
    schema = contract.schema_validator("RequestId")
    assert all(schema.is_valid(i) for i in IDS_WITHIN)
    assert not any(schema.is_valid(i) for i in IDS_BEYOND)
    for text in (frames_section(contract), protocol_requests()):
        assert "at most 64 characters" in text and "magnitude is below 2^53" in text, text
    async with talking(server_config(redis_server)) as (_, talk):
        for request_id in IDS_WITHIN:
            await talk.send({"op": "ping", "id": request_id})
            assert (await talk.until("pong", lambda m: m["type"] == "pong"))["id"] == request_id
        for request_id in IDS_BEYOND:
            await talk.send({"op": "ping", "id": request_id}, valid=False)
            error = await talk.until("an error", lambda m: m["type"] in ("error", "pong"))
            assert error["type"] == "error" and error["code"] == "bad_request", error
            assert error["id"] is None


async def test_token_limit_is_the_servers_in_both_documents(
    contract: Contract, redis: RedisConnection, redis_server: RedisProcess, tmp_path: Path
) -> None:
    auth = contract.document["components"]["messages"]["Auth"]["payload"]
    assert auth["properties"]["token"]["maxLength"] == MAX_TOKEN_CHARS
    limit = f"at most {MAX_TOKEN_CHARS} characters"
    assert limit in frames_section(contract) and limit in protocol_requests()
    # Two API keys that differ only in length: the longest allowed, and one character more.
    longest, too_long = "k" * MAX_TOKEN_CHARS, "k" * (MAX_TOKEN_CHARS + 1)
    keys = tmp_path / "keys"
    keys.write_text(
        "".join(f"sha256:{key_id(k)} n{len(k)} *\n" for k in (longest, too_long)),
        encoding="utf-8",
    )
    # The default message limit (16 KiB) holds an `auth` request with the longest token.
    config = ServerConfig(
        redis_url=redis_server.url, port=0, auth=AuthConfig(api_keys_file=str(keys))
    )
    async with serving(config) as srv:
        for token, accepted in ((longest, True), (too_long, False)):
            async with connect(srv.url) as ws:
                talk = Conversation(ws)
                assert (await talk.until("welcome", lambda m: True))["auth"] == "required"
                await talk.send({"op": "auth", "id": 1, "token": token}, valid=accepted)
                if accepted:
                    await talk.reply(1, "authenticated")
                    continue
                with pytest.raises(ConnectionClosed) as closed:
                    await talk.until("the close", lambda m: False)
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "unauthorized")
