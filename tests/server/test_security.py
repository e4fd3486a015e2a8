"""Authentication, entitlements, origin allowlist and connection limits: real server, real
WebSockets, real Redis (plus the sans-I/O parts on their own)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import orjson
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.conftest import eventually
from tickwire.bench.harness import TICKWIRE, ServerProcess
from tickwire.core.channels import Channel, ChannelPattern
from tickwire.core.config import (
    AuthConfig,
    Limits,
    PublisherConfig,
    ServerConfig,
    load_server_config,
)
from tickwire.core.errors import AuthError, ChannelError, ConfigError
from tickwire.core.events import encode_body
from tickwire.core.redis_process import RedisProcess
from tickwire.core.redis_wire import RedisConnection
from tickwire.feeds.publisher import Publisher
from tickwire.server.admission import (
    Admission,
    Refused,
    client_ip,
    handshake_token,
    ip_group,
    same_origin,
)
from tickwire.server.app import TickwireServer
from tickwire.server.auth import ApiKeys, Authenticator, Entitlement, key_id
from tickwire.server.messages import welcome_message
from tickwire.server.session import Authenticated, ClientSession, Close, Rejected, Subscribe

from .conftest import Recorder, server_config

SECRET_ENV = "TICKWIRE_TEST_JWT_SECRET"
SECRET = secrets.token_urlsafe(48)
KEY_ALL = "tw_all_" + secrets.token_urlsafe(24)
KEY_BTC = "tw_btc_" + secrets.token_urlsafe(24)
KEY_QUOTES = "tw_quotes_" + secrets.token_urlsafe(24)
KEY_NEW = "tw_new_" + secrets.token_urlsafe(24)

BTC_Q = Channel.parse("quotes:BTC-USD")
ETH_Q = Channel.parse("quotes:ETH-USD")
BTCX_Q = Channel.parse("quotes:BTCX")
BTC_T = Channel.parse("trades:BTC-USD")


def key_line(key: str, name: str, patterns: str) -> str:
    return f"sha256:{hashlib.sha256(key.encode()).hexdigest()} {name} {patterns}\n"


KEYS = (
    "# test keys\n"
    + key_line(KEY_ALL, "all", "*")
    + key_line(KEY_BTC, "btc", "quotes:BTC-*")
    + key_line(KEY_QUOTES, "quotes", "quotes:*  # every quote")
)


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("jwt") / "public.pem"
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, path


def write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEYS)
    return path


@pytest.fixture
def auth(
    keys_file: Path, rsa_keys: tuple[rsa.RSAPrivateKey, Path], monkeypatch: pytest.MonkeyPatch
) -> AuthConfig:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return AuthConfig(
        api_keys_file=str(keys_file),
        jwt_secret_env=SECRET_ENV,
        jwt_public_key_file=str(rsa_keys[1]),
        timeout_s=5.0,
    )


def hs256(channels: Any, *, exp_in: float = 300.0, **claims: Any) -> str:
    return jwt.encode(
        {"sub": "alice", "exp": time.time() + exp_in, "channels": channels, **claims},
        SECRET,
        algorithm="HS256",
    )


def rs256(private: rsa.RSAPrivateKey, channels: Any, *, exp_in: float = 300.0) -> str:
    return jwt.encode(
        {"sub": "bob", "exp": time.time() + exp_in, "channels": channels},
        private,
        algorithm="RS256",
    )


def forge_hs256(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses a PEM key as an HMAC secret)."""
    b64 = jwt.utils.base64url_encode
    signing = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64(orjson.dumps(claims))
    return (signing + b"." + b64(hmac.new(key, signing, hashlib.sha256).digest())).decode()


def config(redis: RedisProcess, auth: AuthConfig | None = None, **fields: Any) -> ServerConfig:
    base = server_config(redis)
    limits = {k: fields.pop(k) for k in list(fields) if hasattr(base.limits, k)}
    return dataclasses.replace(
        base,
        auth=auth or AuthConfig(),
        limits=dataclasses.replace(base.limits, **limits),
        **fields,
    )


@contextlib.asynccontextmanager
async def client(
    url: str,
    *,
    token: str | None = None,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Recorder]:
    """A recording client that sends `token` as `Authorization: Bearer` (and `headers`), waits
    for welcome."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ws = await websockets.connect(
        url,
        compression=None,
        max_size=None,
        additional_headers=headers,
        origin=Origin(origin) if origin is not None else None,
    )
    rec = Recorder(ws)
    try:
        await rec.wait_for(lambda m: m.get("type") == "welcome")
        yield rec
    finally:
        await rec.close()


async def refused(
    url: str,
    *,
    token: str | None = None,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """The HTTP status of a refused upgrade (fails the test if the upgrade succeeds)."""
    return (await refusal(url, token=token, origin=origin, headers=headers))[0]


async def refusal(
    url: str,
    *,
    token: str | None = None,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """The HTTP status and body of a refused upgrade (fails the test if it succeeds)."""
    with pytest.raises(InvalidStatus) as info:
        async with client(url, token=token, origin=origin, headers=headers):
            pass
    return info.value.response.status_code, bytes(info.value.response.body)


async def wait_closed(rec: Recorder, timeout: float = 10.0) -> tuple[int | None, str | None]:
    async def closed() -> None:
        with contextlib.suppress(AssertionError):
            await rec.wait_for(lambda m: False, timeout=timeout)

    await asyncio.wait_for(closed(), timeout + 1)
    assert rec.closed is not None
    return rec.closed


def quote(ch: Channel, i: int) -> bytes:
    return encode_body(
        "quote", ch.symbol, i, 0, {"bid": 1.25, "bid_size": 1, "ask": 1.5, "ask_size": 2}
    )


def trade(ch: Channel, i: int) -> bytes:
    return encode_body(
        "trade", ch.symbol, i, 0, {"price": 1.5, "size": 1, "side": "buy", "trade_id": i}
    )


async def publish(pub: Publisher, channels: list[Channel], n: int = 5) -> None:
    await pub.publish(
        {
            ch: [(quote if ch.kind == "quotes" else trade)(ch, i) for i in range(n)]
            for ch in channels
        }
    )
    await pub.flush()


@contextlib.asynccontextmanager
async def publisher(redis: RedisProcess) -> AsyncIterator[Publisher]:
    async with Publisher(PublisherConfig(redis_url=redis.url)) as pub:
        yield pub


async def publish_until(
    pub: Publisher, channels: list[Channel], done: Any, timeout: float = 10.0
) -> None:
    """Publish to `channels` until `done()`: a channel is read once the reader has polled it."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "events did not arrive"
        await publish(pub, channels)
        await asyncio.sleep(0.02)


# -- sans-I/O ------------------------------------------------------------------------------------
def test_entitlement_patterns_cover_only_what_lies_inside() -> None:
    btc = Entitlement.parse("quotes:BTC-*")
    assert btc.covers(ChannelPattern.parse("quotes:BTC-USD"))
    assert not btc.covers(ChannelPattern.parse("quotes:BTCX"))
    assert not btc.covers(ChannelPattern.parse("trades:BTC-USD"))
    # A wildcard subscription is wider than any prefix entitlement: refused, never filtered.
    assert not btc.covers(ChannelPattern.parse("quotes:*"))
    assert Entitlement.parse("quotes:*").covers(ChannelPattern.parse("quotes:*"))
    assert not Entitlement.parse("quotes:*").covers(ChannelPattern.parse("trades:*"))
    assert Entitlement.parse("*").covers(ChannelPattern.parse("bars.1m:*"))
    exact = Entitlement.parse("trades:AAPL")
    assert exact.covers(ChannelPattern.parse("trades:AAPL"))
    assert not exact.covers(ChannelPattern.parse("trades:AAPLX"))
    assert [Entitlement.parse(t).name for t in ("*", "quotes:*", "quotes:BTC-*", "trades:A")] == [
        "*",
        "quotes:*",
        "quotes:BTC-*",
        "trades:A",
    ]
    for bad in ("orders:*", "quotes", "quotes:btc-*", "quotes:-*", "*:BTC", "quotes:A B"):
        with pytest.raises(ChannelError):
            Entitlement.parse(bad)


def test_api_key_file_errors_name_the_line() -> None:
    good = key_line(KEY_ALL, "all", "*")
    cases = {
        "sha256:abc all *": "64 hex",
        "md5:" + "a" * 64 + " all *": "64 hex",
        good.strip() + " extra": "expected",
        good + good: "twice",
        key_line(KEY_BTC, "btc", "orders:*"): "unknown channel type",
        key_line(KEY_BTC, "btc", ","): "at least one",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message) as info:
            ApiKeys.parse("# header\n" + text, "keys.txt")
        assert "keys.txt:" in str(info.value)
        assert KEY_ALL not in str(info.value) and KEY_BTC not in str(info.value)
    parsed = ApiKeys.parse(KEYS, "k")
    assert sorted(g.subject for g in parsed.grants.values()) == ["all", "btc", "quotes"]


def test_jwt_checks(auth: AuthConfig, rsa_keys: tuple[rsa.RSAPrivateKey, Path]) -> None:
    private, public_path = rsa_keys
    authn = Authenticator(auth)
    now = time.time()
    grant = authn.authenticate(hs256(["trades:*", "quotes:BTC-*"]), now)
    assert grant.subject == "alice" and grant.names == ["trades:*", "quotes:BTC-*"]
    assert grant.expires_at is not None and now < grant.expires_at <= now + 301
    assert authn.authenticate(rs256(private, "trades:* quotes:AAPL"), now).names == [
        "trades:*",
        "quotes:AAPL",
    ]
    assert authn.authenticate(KEY_BTC, now).names == ["quotes:BTC-*"]
    expired = hs256(["*"], exp_in=-1)
    not_yet = hs256(["*"], nbf=now + 60)
    wrong_secret = jwt.encode({"exp": now + 60}, "x" * 40, algorithm="HS256")
    no_exp = jwt.encode({"channels": ["*"]}, SECRET, algorithm="HS256")
    unsigned = jwt.encode({"exp": now + 60, "channels": ["*"]}, "", algorithm="none")
    hs512 = jwt.encode({"exp": now + 60}, SECRET + "x" * 40, algorithm="HS512")
    # Algorithm confusion: HS256 "signed" with the RSA public key (which is no secret).
    forged = forge_hs256({"exp": now + 60, "channels": ["*"]}, public_path.read_bytes())
    bad_claim = hs256("quotes:not valid")
    for token, why in [
        (expired, "token expired"),
        (not_yet, "not yet valid"),
        (wrong_secret, "invalid token"),
        (no_exp, "'exp'"),
        (unsigned, "algorithm not accepted"),
        (hs512, "algorithm not accepted"),
        (forged, "invalid token"),
        (bad_claim, "bad pattern"),
        ("tw_unknown_key", "invalid credentials"),
        ("", "invalid credentials"),
        ("x" * 9000, "invalid credentials"),
    ]:
        with pytest.raises(AuthError, match=why) as info:
            authn.authenticate(token, now)
        assert token[:40] not in str(info.value) or not token
    # The injected clock decides expiry, not the machine's.
    assert authn.authenticate(expired, now - 10).subject == "alice"
    aud = Authenticator(dataclasses.replace(auth, jwt_audience="tw", jwt_issuer="idp"))
    assert aud.authenticate(hs256(["*"], aud="tw", iss="idp"), now).subject == "alice"
    with pytest.raises(AuthError, match="audience or issuer"):
        aud.authenticate(hs256(["*"], aud="other", iss="idp"), now)


def test_secrets_are_checked_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{SECRET_ENV} is not set"):
        Authenticator(AuthConfig(jwt_secret_env=SECRET_ENV))
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="at least 32"):
        Authenticator(AuthConfig(jwt_secret_env=SECRET_ENV))
    with pytest.raises(ConfigError, match="cannot read API key file"):
        Authenticator(AuthConfig(api_keys_file=str(tmp_path / "missing")))
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Authenticator(AuthConfig(jwt_public_key_file=str(tmp_path / "k.pem")))


def test_session_waits_for_auth_then_checks_entitlements(auth: AuthConfig) -> None:
    from tickwire.core.config import Limits

    authn = Authenticator(auth)
    session = ClientSession(Limits(), authn)
    assert session.awaiting_auth
    # Anything but auth first closes with 4001; so does a bad token.
    assert ClientSession(Limits(), authn).receive('{"op":"ping"}', 0.0, 0) == Close(
        4001, "unauthorized"
    )
    assert ClientSession(Limits(), authn).receive("{nope", 0.0, 0) == Close(4001, "unauthorized")
    bad = ClientSession(Limits(), authn).receive('{"op":"auth","token":"nope"}', 0.0, 0)
    assert bad == Close(4001, "unauthorized")
    now_ns = time.time_ns()
    ok = session.receive(orjson.dumps({"op": "auth", "id": 1, "token": KEY_BTC}), 0.0, now_ns)
    assert isinstance(ok, Authenticated)
    assert orjson.loads(ok.reply) == {
        "type": "authenticated",
        "id": 1,
        "entitlements": ["quotes:BTC-*"],
    }
    forbidden = session.receive('{"op":"subscribe","id":2,"channels":["quotes:*"]}', 0.1, now_ns)
    assert isinstance(forbidden, Rejected) and forbidden.code == "forbidden"
    assert session.subscriptions == {}
    sub = session.receive('{"op":"subscribe","id":3,"channels":["quotes:BTC-USD"]}', 0.2, now_ns)
    assert isinstance(sub, Subscribe)
    # A refresh must cover what is subscribed; a failed one keeps the connection and grant.
    narrower = orjson.dumps({"op": "auth", "id": 4, "token": hs256(["trades:*"])})
    err = session.receive(narrower, 0.3, now_ns)
    assert isinstance(err, Rejected) and err.code == "forbidden"
    err = session.receive('{"op":"auth","id":5,"token":"nope"}', 0.4, now_ns)
    assert isinstance(err, Rejected) and err.code == "unauthorized"
    assert session.grant is not None and session.grant.names == ["quotes:BTC-*"]
    # Without auth configured, auth is a bad request and the welcome says nothing of it.
    plain = ClientSession(Limits())
    err = plain.receive(orjson.dumps({"op": "auth", "token": KEY_ALL}), 0.0, 0)
    assert isinstance(err, Rejected) and err.code == "bad_request"
    assert "auth" not in orjson.loads(welcome_message(Limits(), 5000))


def test_handshake_token_and_client_ip() -> None:
    assert handshake_token({"Authorization": "Bearer abc"}, "/ws?token=def") == "abc"
    assert handshake_token({"Authorization": "bearer  abc "}, "/ws") == "abc"
    assert handshake_token({"Authorization": "Basic xyz"}, "/ws?token=def") == "def"
    assert handshake_token({}, "/ws?a=1&token=a%2Bb") == "a+b"
    assert handshake_token({}, "/ws") is None
    assert handshake_token({}, "/ws?" + "&".join(f"k{i}=1" for i in range(40))) is None
    headers = {"X-Forwarded-For": "6.6.6.6, 10.0.0.9"}
    assert client_ip("127.0.0.1", headers, "X-Forwarded-For") == "10.0.0.9"
    assert client_ip("127.0.0.1", headers, "") == "127.0.0.1"
    assert client_ip("127.0.0.1", {}, "X-Real-IP") == "127.0.0.1"


def test_config_from_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "tw.toml"
    path.write_text(
        'allowed_origins = ["https://a.example", "https://b.example"]\n'
        "allow_missing_origin = false\nmax_connections = 100\nmax_connections_per_ip = 5\n"
        "[limits]\nmax_lifetime_s = 86400\nlifetime_notice_s = 30\n"
        '[auth]\napi_keys_file = "/etc/tw/keys"\njwt_audience = "tw"\ntimeout_s = 3\n'
    )
    cfg = load_server_config(str(path), max_connections=50, auth={"jwt_secret_env": "S"})
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")
    assert not cfg.allow_missing_origin and cfg.max_connections == 50
    assert cfg.max_connections_per_ip == 5 and cfg.limits.max_lifetime_s == 86400.0
    assert cfg.auth == AuthConfig(
        api_keys_file="/etc/tw/keys", jwt_secret_env="S", jwt_audience="tw", timeout_s=3.0
    )
    defaults = load_server_config(None)
    assert not defaults.auth.enabled and defaults.allowed_origins == ()
    assert defaults.max_connections == 0 and defaults.limits.max_lifetime_s == 0
    for text, message in [
        ('allowed_origins = "https://a"', "list of strings"),
        ('allowed_origins = ["https://a/"]', "trailing slash"),
        ("[auth]\nsecret = 'x'", "unknown key"),
        ("[auth]\njwt_secret_env = 'A'\njwt_secret_file = 'B'", "not both"),
        ("ping_interval_s = 0", "ping_interval_s must be positive"),
        ("ping_timeout_s = -1", "ping_timeout_s must be positive"),
        ("redis_reply_timeout_s = 0", "redis_reply_timeout_s must be positive"),
        ("gc_freeze_s = -1", "gc_freeze_s must be 0"),
        ("gc_full_every_s = 0", "gc_full_every_s must be positive"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_server_config(str(path))


# -- authentication over real sockets ------------------------------------------------------------
async def test_header_query_and_message_tokens_each_authenticate(
    redis_server: RedisProcess,
    redis: RedisConnection,
    auth: AuthConfig,
    rsa_keys: tuple[rsa.RSAPrivateKey, Path],
) -> None:
    async with TickwireServer(config(redis_server, auth)) as srv, publisher(redis_server) as pub:
        # Authorization header (API key).
        async with client(srv.url, token=KEY_BTC) as c:
            welcome = c.of_type("welcome")[0]
            assert welcome["auth"] == "ok" and welcome["entitlements"] == ["quotes:BTC-*"]
            assert (await c.request("subscribe", channels=[BTC_Q.name]))["type"] == "subscribed"
            await publish_until(pub, [BTC_Q], lambda: bool(c.events(BTC_Q.name)))
        # ?token= query parameter (HS256 JWT).
        async with client(srv.url + "?token=" + hs256(["quotes:*"])) as c:
            assert c.of_type("welcome")[0]["auth"] == "ok"
            assert (await c.request("subscribe", channels=["quotes:*"]))["type"] == "subscribed"
        # {"op":"auth"} message (RS256 JWT): nothing but welcome comes before it.
        async with client(srv.url) as c:
            welcome = c.of_type("welcome")[0]
            assert welcome["auth"] == "required" and "entitlements" not in welcome
            await publish(pub, [BTC_Q])
            ack = await c.request("auth", token=rs256(rsa_keys[0], ["quotes:BTC-*"]))
            assert ack["type"] == "authenticated" and ack["entitlements"] == ["quotes:BTC-*"]
            assert [m["type"] for m in c.messages] == ["welcome", "authenticated"]
            await c.request("subscribe", channels=[BTC_Q.name], snapshot=True)
            await c.wait_until(lambda: bool(c.events(BTC_Q.name)))
            assert c.checker.ok, c.checker.violations


async def test_data_before_auth_or_a_bad_auth_message_closes_4001(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    async with TickwireServer(config(redis_server, auth)) as srv:
        async with client(srv.url) as c:
            await c.send_raw(orjson.dumps({"op": "subscribe", "channels": ["quotes:*"]}))
            assert await wait_closed(c) == (4001, "unauthorized")
            assert [m["type"] for m in c.messages] == ["welcome"]
        async with client(srv.url) as c:
            await c.send_raw(orjson.dumps({"op": "auth", "token": KEY_BTC + "x"}))
            assert await wait_closed(c) == (4001, "unauthorized")
        async with client(srv.url) as c:
            await c.send_raw(orjson.dumps({"op": "auth", "token": hs256(["*"], exp_in=-5)}))
            assert await wait_closed(c) == (4001, "unauthorized")
        assert srv.metrics.auth_failures == 3


async def test_auth_deadline_missed_closes_4001(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    cfg = config(redis_server, dataclasses.replace(auth, timeout_s=0.3))
    async with TickwireServer(cfg) as srv, client(srv.url) as c:
        opened = time.monotonic()
        assert await wait_closed(c, timeout=5) == (4001, "auth timeout")
        assert time.monotonic() - opened >= 0.25
        assert [m["type"] for m in c.messages] == ["welcome"]


async def test_bad_handshake_tokens_get_401_and_never_reach_the_log(
    redis_server: RedisProcess,
    redis: RedisConnection,
    auth: AuthConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good_jwt = hs256(["*"])
    bad = [KEY_ALL + "x", hs256(["*"], exp_in=-1), good_jwt[:-4] + "AAAA", "not.a.jwt"]
    async with TickwireServer(config(redis_server, auth)) as srv:
        for token in bad:
            assert await refused(srv.url, token=token) == 401
            assert await refused(srv.url + "?token=" + token) == 401
        with pytest.raises(InvalidStatus) as info:
            async with client(srv.url, token=bad[1]):
                pass
        assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        assert info.value.response.body == b"token expired\n"
        # Good tokens in each of the three places, and a message that closes the connection.
        async with client(srv.url, token=KEY_ALL) as c:
            await c.request("ping")
        async with client(srv.url + "?token=" + good_jwt):
            pass
        async with client(srv.url) as c:
            await c.request("auth", token=good_jwt)
        assert srv.metrics.handshakes_refused == {401: 2 * len(bad) + 1}
    server_side = [
        r for r in caplog.records if r.name.startswith(("tickwire", "websockets.server"))
    ]
    assert any("authenticated as" in r.getMessage() for r in server_side)
    text = "\n".join(r.getMessage() for r in server_side)
    for secret in [*bad, good_jwt, KEY_ALL, SECRET]:
        assert secret not in text


async def test_expired_jwt_gets_a_notice_then_4001_token_expired(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    cfg = config(redis_server, auth, lifetime_notice_s=0.4)
    async with TickwireServer(cfg) as srv, client(srv.url, token=hs256(["*"], exp_in=1.2)) as c:
        await c.request("subscribe", channels=["quotes:*"])
        notice = await c.wait_for(lambda m: m.get("type") == "notice", timeout=5)
        assert notice["code"] == "token_expiring" and 0 < notice["close_in_ms"] <= 400
        assert await wait_closed(c, timeout=5) == (4001, "token expired")


async def test_refresh_with_a_new_token_moves_the_expiry(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    cfg = config(redis_server, auth, lifetime_notice_s=0.2)
    async with TickwireServer(cfg) as srv, client(srv.url, token=hs256(["*"], exp_in=0.8)) as c:
        ack = await c.request("auth", token=KEY_ALL)  # an API key does not expire
        assert ack["type"] == "authenticated"
        # Past the first token's expiry (and its notice) the connection still answers.
        await asyncio.sleep(1.2)
        assert (await c.request("ping"))["type"] == "pong"
        assert c.of_type("notice") == [] and c.closed is None


# -- entitlements --------------------------------------------------------------------------------
async def test_no_event_of_a_forbidden_channel_ever_reaches_the_connection(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    async with (
        TickwireServer(config(redis_server, auth)) as srv,
        publisher(redis_server) as pub,
        client(srv.url, token=KEY_ALL) as admin,
        client(srv.url, token=KEY_BTC) as btc,
    ):
        await admin.request("subscribe", channels=["quotes:*", "trades:*"])
        for channels in (
            ["quotes:*"],
            ["trades:*"],
            [ETH_Q.name],
            [BTCX_Q.name],
            [BTC_T.name],
            [BTC_Q.name, ETH_Q.name],  # all or nothing
        ):
            err = await btc.request("subscribe", channels=channels)
            assert err["type"] == "error" and err["code"] == "forbidden", channels
        err = await btc.request(
            "subscribe", channels=[BTC_Q.name], resume={ETH_Q.name: {"epoch": "e", "seq": 1}}
        )
        assert err["code"] == "bad_request"
        ack = await btc.request("subscribe", channels=[BTC_Q.name], snapshot=True)
        assert ack["channels"] == [BTC_Q.name]
        everything = [ETH_Q, BTCX_Q, BTC_T, BTC_Q]
        await publish_until(
            pub,
            everything,
            lambda: all(admin.events(c.name) for c in everything) and bool(btc.events(BTC_Q.name)),
        )
        # Once more: forbidden channels first (seen by admin), then the allowed one as a barrier.
        await publish(pub, [ETH_Q, BTCX_Q, BTC_T])
        target = {c.name: pub.positions[c][1] for c in (ETH_Q, BTCX_Q, BTC_T)}
        await admin.wait_until(lambda: all(admin.last_seq(n) == s for n, s in target.items()))
        await publish(pub, [BTC_Q])
        await btc.wait_until(lambda: btc.last_seq(BTC_Q.name) == pub.positions[BTC_Q][1])
        assert {m["ch"] for m in btc.messages if "ch" in m} == {BTC_Q.name}
        assert btc.checker.ok, btc.checker.violations
        assert (await btc.request("list"))["channels"] == [BTC_Q.name]
        assert (await admin.request("list"))["channels"] == sorted(c.name for c in everything)


async def test_reload_revokes_keys_narrows_grants_and_adds_keys(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig, keys_file: Path
) -> None:
    async with (
        TickwireServer(config(redis_server, auth)) as srv,
        client(srv.url, token=KEY_ALL) as revoked,
        client(srv.url, token=KEY_QUOTES) as narrowed,
        client(srv.url, token=KEY_BTC) as kept,
        client(srv.url, token=hs256(["quotes:*"])) as by_jwt,
    ):
        await narrowed.request("subscribe", channels=["quotes:*"])
        await kept.request("subscribe", channels=[BTC_Q.name])
        await by_jwt.request("subscribe", channels=["quotes:*"])
        assert await refused(srv.url, token=KEY_NEW) == 401
        # A malformed file changes nothing.
        write(keys_file, "garbage\n")
        assert srv.reload_credentials() is False
        assert (await kept.request("ping"))["type"] == "pong"
        write(
            keys_file,
            key_line(KEY_BTC, "btc", "quotes:BTC-*")
            + key_line(KEY_QUOTES, "quotes", "quotes:BTC-*")
            + key_line(KEY_NEW, "new", "trades:*"),
        )
        assert srv.reload_credentials() is True
        assert await wait_closed(revoked) == (4001, "credentials revoked")
        assert await wait_closed(narrowed) == (4003, "forbidden")
        assert (await kept.request("ping"))["type"] == "pong"
        assert (await by_jwt.request("ping"))["type"] == "pong"  # JWTs carry their own grant
        async with client(srv.url, token=KEY_NEW) as new:
            assert new.of_type("welcome")[0]["entitlements"] == ["trades:*"]
        assert await refused(srv.url, token=KEY_ALL) == 401


async def test_sighup_reloads_the_key_file_of_a_server_process(
    redis_server: RedisProcess, redis: RedisConnection, keys_file: Path
) -> None:
    server = ServerProcess(redis_server.url, extra_args=["--api-keys", str(keys_file)])
    await asyncio.to_thread(server.start)
    assert server.proc is not None
    proc, url = server.proc, server.url
    try:
        status = await refused(url, token=KEY_NEW)
        assert status == 401
        async with client(url, token=KEY_ALL):
            pass
        write(keys_file, key_line(KEY_NEW, "new", "*"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # the reload happens on the server's loop, soon after the signal
            try:
                async with client(url, token=KEY_NEW) as c:
                    assert c.of_type("welcome")[0]["entitlements"] == ["*"]
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
                await asyncio.sleep(0.05)
        assert await refused(url, token=KEY_ALL) == 401
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_serve_refuses_to_start_without_its_secret(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        TICKWIRE,
        "serve",
        "--port",
        "0",
        "--jwt-secret-env",
        "TICKWIRE_SURELY_UNSET_VAR",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"TICKWIRE_SURELY_UNSET_VAR is not set" in err


# -- origin and connection caps ------------------------------------------------------------------
async def test_origin_allowlist(redis_server: RedisProcess, redis: RedisConnection) -> None:
    cfg = config(redis_server, allowed_origins=("https://app.example",))
    async with TickwireServer(cfg) as srv:
        async with client(srv.url, origin="https://app.example"):
            pass
        async with client(srv.url):  # no Origin: not a browser, allowed by default
            pass
        assert await refused(srv.url, origin="https://evil.example") == 403
        assert await refused(srv.url, origin="https://app.example.evil") == 403
    strict = dataclasses.replace(cfg, allow_missing_origin=False)
    async with TickwireServer(strict) as srv:
        assert await refused(srv.url) == 403
        async with client(srv.url, origin="https://app.example"):
            pass
        assert srv.metrics.handshakes_refused == {403: 1}


async def test_connection_caps_429_per_ip_503_in_total_and_slots_come_back(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # Loopback clients are not counted per IP (see test_per_ip_cap_counts_ipv6_per_64_and_not_
    # loopback): the clients here say which IP they are through the proxy header.
    cfg = config(redis_server, max_connections_per_ip=2, client_ip_header="X-Forwarded-For")
    ip = {"X-Forwarded-For": "192.0.2.7"}
    async with (
        TickwireServer(cfg) as srv,
        client(srv.url, headers=ip),
        client(srv.url, headers=ip) as second,
    ):
        assert await refused(srv.url, headers=ip) == 429
        await second.close()
        await eventually(lambda: srv.admission.open == 1, "the slot to come back")
        async with client(srv.url, headers=ip):
            pass
    cfg = config(redis_server, max_connections=1)
    async with TickwireServer(cfg) as srv:
        async with client(srv.url):
            assert await refused(srv.url) == 503
        # A client that sends the upgrade request and vanishes gives its slot back too.
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        writer.transport.abort()
        await eventually(
            lambda: srv.admission.open == 0 and not srv.admission.per_ip, what="slot release"
        )
        async with client(srv.url) as c:
            assert (await c.request("ping"))["type"] == "pong"
        assert srv.metrics.handshakes_refused == {503: 1}


# -- per-connection limits -----------------------------------------------------------------------
async def test_max_lifetime_sends_a_notice_then_closes_1001(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = config(redis_server, max_lifetime_s=0.8, lifetime_notice_s=0.3)
    async with TickwireServer(cfg) as srv, client(srv.url) as c:
        opened = time.monotonic()
        notice = await c.wait_for(lambda m: m.get("type") == "notice", timeout=5)
        assert notice == {"type": "notice", "code": "max_lifetime", "close_in_ms": 300}
        assert await wait_closed(c, timeout=5) == (1001, "max lifetime")
        assert time.monotonic() - opened >= 0.7


async def test_persistent_rate_limit_violation_closes_1008(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = config(redis_server, rate_per_s=0.5, rate_burst=3, rate_violations_before_close=4)
    async with TickwireServer(cfg) as srv, client(srv.url) as c:
        for i in range(10):
            with contextlib.suppress(websockets.ConnectionClosed):
                await c.send_raw(orjson.dumps({"op": "ping", "id": i}))
        assert await wait_closed(c) == (1008, "rate limit exceeded")
        assert len(c.of_type("pong")) == 3
        assert [m["code"] for m in c.of_type("error")] == ["rate_limited"] * 3


async def test_subscription_cap_open_timeout_and_ping_timeout(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    cfg = config(
        redis_server,
        max_subscriptions=2,
        open_timeout_s=0.3,
        ping_interval_s=0.2,
        ping_timeout_s=0.2,
        close_timeout_s=0.2,
    )
    async with TickwireServer(cfg) as srv:
        async with client(srv.url) as c:
            await c.request("subscribe", channels=[BTC_Q.name, ETH_Q.name])
            err = await c.request("subscribe", channels=[BTC_T.name])
            assert err["code"] == "too_many_subscriptions"
        # A TCP connection that never sends its handshake is dropped after open_timeout_s.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.2 <= time.monotonic() - started < 3
        writer.close()
        # A client that stops answering pings is closed by the server.
        ws = await websockets.connect(srv.url, compression=None, ping_interval=None)
        ws.transport.pause_reading()
        await eventually(lambda: not srv.connections, "the unresponsive client to go")
        ws.transport.abort()


# -- issue 22: time claims, audience, caps, origins and exposure ---------------------------------
#: JWT time claims that are no date: each must be refused with a reason, never crash or be
#: taken as "never expires" (NaN and Infinity are what Python's JSON reads and writes for them).
BAD_TIME_CLAIMS: list[tuple[dict[str, Any], str]] = [
    ({"exp": 10**400}, "'exp' is out of range"),
    ({"exp": 2**63}, "'exp' is out of range"),
    ({"exp": float("inf")}, "'exp' must be a finite number"),
    ({"exp": float("-inf")}, "'exp' must be a finite number"),
    ({"exp": float("nan")}, "'exp' must be a finite number"),
    ({"exp": -1}, "'exp' is out of range"),
    ({"exp": "4102444800"}, "'exp' must be a number"),
    ({"exp": True}, "'exp' must be a number"),
    ({"nbf": 10**400}, "'nbf' is out of range"),
    ({"nbf": float("nan")}, "'nbf' must be a finite number"),
    ({"nbf": "0"}, "'nbf' must be a number"),
    ({"iat": 10**400}, "'iat' is out of range"),
    ({"iat": float("inf")}, "'iat' must be a finite number"),
    ({"iat": "now"}, "'iat' must be a number"),
    ({"iat": time.time() + 3600}, "issued in the future"),
]


def test_jwt_time_claims_must_be_dates(auth: AuthConfig) -> None:
    authn = Authenticator(dataclasses.replace(auth, jwt_leeway_s=30))
    now = time.time()
    for claims, why in BAD_TIME_CLAIMS:
        with pytest.raises(AuthError, match=why):
            authn.authenticate(hs256(["*"], **claims), now)
    # RFC 7519 NumericDate may have a fraction: finite floats in range are dates.
    grant = authn.authenticate(hs256(["*"], exp=now + 60.25, nbf=now - 0.5, iat=now - 1.5), now)
    assert grant.expires_at == pytest.approx(now + 60.25 + 30)
    # `iat` a little ahead of the server's clock is within the leeway (clock skew).
    assert authn.authenticate(hs256(["*"], iat=int(now) + 20), now).subject == "alice"


def test_credentials_are_the_api_key_or_the_jwt_issuer_and_subject(auth: AuthConfig) -> None:
    """What `max_connections_per_credential` counts connections under."""
    authn = Authenticator(auth)
    now = time.time()

    def credential(token: str) -> str:
        return authn.authenticate(token, now).credential

    assert credential(KEY_BTC) == "key:" + key_id(KEY_BTC) != credential(KEY_ALL)
    # One subject of one issuer, whatever the token.
    assert credential(hs256(["*"], iss="a")) == credential(hs256(["quotes:*"], iss="a", exp_in=9))
    assert credential(hs256(["*"], iss="a:b", sub="c")) != credential(
        hs256(["*"], iss="a", sub="b:c")
    )
    assert credential(hs256(["*"], iss="a")) != credential(hs256(["*"], iss="b"))
    # No subject: the token itself, so that subject-less tokens do not share one count.
    anonymous = [
        jwt.encode({"exp": now + ttl, "channels": ["*"]}, SECRET, algorithm="HS256")
        for ttl in (60, 90)
    ]
    assert len({credential(t) for t in anonymous}) == 2


async def test_jwt_time_claims_that_are_no_dates_get_401_and_unauthorized(
    redis_server: RedisProcess,
    redis: RedisConnection,
    auth: AuthConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with TickwireServer(config(redis_server, auth)) as srv:
        # A refresh on an open connection: the error names the reason, the connection stays.
        async with client(srv.url, token=KEY_ALL) as kept:
            for claims, why in BAD_TIME_CLAIMS:
                # In the handshake: 401 with the reason, never a 500.
                status, body = await refusal(srv.url, token=hs256(["*"], **claims))
                assert status == 401 and why in body.decode(), (claims, status, body)
                err = await kept.request("auth", token=hs256(["*"], **claims))
                assert err["type"] == "error" and err["code"] == "unauthorized", claims
                assert why in err["message"], (claims, err)
            assert (await kept.request("ping"))["type"] == "pong"
        # As the first message: closed 4001 like any bad credential, not 1011.
        for claims, _ in BAD_TIME_CLAIMS[:3]:
            async with client(srv.url) as c:
                await c.send_raw(orjson.dumps({"op": "auth", "token": hs256(["*"], **claims)}))
                assert await wait_closed(c) == (4001, "unauthorized")
        assert srv.metrics.handshakes_refused == {401: len(BAD_TIME_CLAIMS)}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_jwt_for_another_audience_is_refused_when_one_is_configured(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    cfg = config(redis_server, dataclasses.replace(auth, jwt_audience="tickwire"))
    async with TickwireServer(cfg) as srv:
        for claims in ({"aud": "other"}, {}, {"aud": ["other", "x"]}, {"aud": 7}):
            status, body = await refusal(srv.url, token=hs256(["*"], **claims))
            assert status == 401, (claims, status)
            assert body in (
                b"invalid token: no 'aud' claim\n",
                b"invalid token: wrong audience or issuer\n",
            ), body
        async with client(srv.url, token=hs256(["*"], aud="tickwire")):
            pass
        async with client(srv.url, token=hs256(["*"], aud=["other", "tickwire"])):
            pass
        async with client(srv.url) as c:  # the same rule for an `auth` message
            await c.send_raw(orjson.dumps({"op": "auth", "token": hs256(["*"], aud="other")}))
            assert await wait_closed(c) == (4001, "unauthorized")


def test_safe_defaults_and_the_exposure_rule(auth: AuthConfig) -> None:
    defaults = load_server_config(None)
    assert defaults.allowed_origins == () and not defaults.public
    assert defaults.max_connections_per_ip == 1000
    assert defaults.max_connections_per_credential == 100
    # Anyone on a non-loopback address with auth off: only when asked for.
    for host in ("0.0.0.0", "", "::", "192.0.2.1", "example.com"):
        with pytest.raises(ConfigError, match=r"--public.*public = true"):
            load_server_config(None, host=host)
        with pytest.raises(ConfigError, match="--public"):
            TickwireServer(ServerConfig(host=host))
        assert load_server_config(None, host=host, public=True).public
        assert load_server_config(None, host=host, auth={"api_keys_file": "k"}).auth.enabled
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load_server_config(None, host=host).host == host
    with pytest.raises(ConfigError, match="list nothing else"):
        load_server_config(None, allowed_origins=("*", "https://a.example"))
    assert load_server_config(None, allowed_origins=("*",)).allowed_origins == ("*",)


async def test_serve_on_a_public_address_without_auth_refuses_and_names_the_flag() -> None:
    proc = await asyncio.create_subprocess_exec(
        TICKWIRE,
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--workers",
        "1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert b"--public" in err and b"public = true" in err
    help_text = subprocess.run(
        [TICKWIRE, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--public", "--max-connections-per-credential", "--jwt-audience"):
        assert flag in help_text


async def test_default_origin_policy_is_same_origin_and_star_opens_it(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    async with TickwireServer(config(redis_server)) as srv:
        own = f"http://127.0.0.1:{srv.port}"
        async with client(srv.url, origin=own):  # the page the server itself serves
            pass
        async with client(srv.url):  # no Origin: not a browser
            pass
        for origin in (
            "https://evil.example",
            f"http://localhost:{srv.port}",  # another host name is another origin
            "http://127.0.0.1",  # the default port 80, not the server's
            f"http://127.0.0.1:{srv.port + 1}",
            "null",  # a sandboxed frame or a local file
            f"ftp://127.0.0.1:{srv.port}",
            f"http://127.0.0.1:{srv.port}/path",
        ):
            assert await refusal(srv.url, origin=origin) == (403, b"origin not allowed\n"), origin
    # Behind a TLS proxy the Host has no port: https://host and wss default to 443.
    assert same_origin("https://app.example", "app.example")
    assert same_origin("https://app.example:443", "APP.example")
    assert same_origin("http://[::1]:8765", "[::1]:8765")
    assert not same_origin("http://app.example", "app.example:8765")
    assert not same_origin("https://app.example", "app.example:80")
    assert not same_origin("https://app.example", None)
    assert not same_origin("https://app.example:99999", "app.example:99999")
    opened = config(redis_server, allowed_origins=("*",))
    async with TickwireServer(opened) as srv, client(srv.url, origin="https://evil.example"):
        pass


async def test_per_ip_cap_counts_ipv6_per_64_and_not_loopback(
    redis_server: RedisProcess, redis: RedisConnection
) -> None:
    # Loopback peers (this machine: the bench, the demo, a local proxy) are not counted.
    cfg = config(redis_server, max_connections_per_ip=1)
    async with TickwireServer(cfg) as srv, client(srv.url), client(srv.url), client(srv.url):
        assert srv.admission.open == 3 and srv.admission.per_ip == {}
    cfg = config(redis_server, max_connections_per_ip=2, client_ip_header="X-Real-IP")

    def ip(addr: str) -> dict[str, str]:
        return {"X-Real-IP": addr}

    async with (
        TickwireServer(cfg) as srv,
        client(srv.url, headers=ip("2001:db8:0:0::1")),
        client(srv.url, headers=ip("2001:db8::ffff:2")),
    ):
        # A third address of the same /64 is the same subscriber.
        assert await refused(srv.url, headers=ip("2001:db8::abcd:1234:5678:9abc")) == 429
        async with client(srv.url, headers=ip("2001:db8:0:1::1")):  # the next /64
            pass
        async with (
            client(srv.url, headers=ip("192.0.2.1")),
            client(srv.url, headers=ip("::ffff:192.0.2.1")),
        ):
            assert await refused(srv.url, headers=ip("192.0.2.1")) == 429
        await eventually(
            lambda: srv.admission.per_ip == {"2001:db8::/64": 2}, "the other slots to come back"
        )
    assert ip_group("::1") is None and ip_group("127.9.9.9") is None
    assert ip_group("unix") == "unix"


async def test_per_credential_cap_on_handshake_auth_message_and_refresh(
    redis_server: RedisProcess, redis: RedisConnection, auth: AuthConfig
) -> None:
    cfg = config(redis_server, auth, max_connections_per_credential=2)
    async with (
        TickwireServer(cfg) as srv,
        client(srv.url, token=KEY_BTC),
        client(srv.url, token=KEY_BTC) as second,
    ):
        assert await refusal(srv.url, token=KEY_BTC) == (
            429,
            b"too many connections for this credential\n",
        )
        async with client(srv.url) as late:  # the same key in an `auth` message
            await late.send_raw(orjson.dumps({"op": "auth", "token": KEY_BTC}))
            assert await wait_closed(late) == (1013, "too many connections for this credential")
        # Other credentials are not affected; a refresh onto the full one is refused and the
        # connection keeps its grant.
        async with client(srv.url, token=KEY_QUOTES) as other:
            err = await other.request("auth", token=KEY_BTC)
            assert err["code"] == "forbidden" and "too many connections" in err["message"]
            assert (await other.request("subscribe", channels=["quotes:*"]))["type"] == (
                "subscribed"
            )
        # One JWT subject is one credential, whichever token it comes with.
        async with client(srv.url, token=hs256(["*"])), client(srv.url, token=hs256(["*"])):
            assert await refused(srv.url, token=hs256(["quotes:*"], exp_in=99)) == 429
        await second.close()
        await eventually(
            lambda: srv.admission.per_credential.get("key:" + key_id(KEY_BTC)) == 1,
            "the credential's slot to come back",
        )
        async with client(srv.url, token=KEY_QUOTES) as moved:  # a refresh moves the slot
            assert (await moved.request("auth", token=KEY_BTC))["type"] == "authenticated"
            assert srv.admission.per_credential["key:" + key_id(KEY_BTC)] == 2
            assert "key:" + key_id(KEY_QUOTES) not in srv.admission.per_credential
    await eventually(lambda: srv.admission.per_credential == {}, "every credential slot back")
    assert srv.admission.open == 0


# -- fuzzing the auth path (the session fuzz in test_session.py runs with auth off) --------------
@pytest.fixture(scope="module")
def fuzz_authenticator(tmp_path_factory: pytest.TempPathFactory) -> Authenticator:
    keys = tmp_path_factory.mktemp("fuzz") / "keys"
    keys.write_text(KEYS)
    return Authenticator(
        AuthConfig(api_keys_file=str(keys), jwt_secret_env=SECRET_ENV, jwt_leeway_s=5),
        environ={SECRET_ENV: SECRET},
    )


FUZZ_NOW = time.time()
#: What a claim may hold: dates, no dates, and what JSON (as Python writes it) can carry.
#: Time claims at the edges: dates (now, around it), and what is no date (out of range, not
#: finite, not a number) as a careless or hostile issuer could write it.
EDGE_TIMES: list[Any] = [
    FUZZ_NOW - 60,
    FUZZ_NOW + 60,
    int(FUZZ_NOW) + 3600,
    0,
    -1,
    2**53,
    2**63,
    10**400,
    -(10**400),
    float("inf"),
    float("-inf"),
    float("nan"),
    1e308,
    True,
    None,
    "",
    "1",
    [],
    {},
]
claim_values: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(EDGE_TIMES), st.integers(), st.floats(), st.text(max_size=6)
)
# `exp` is there more often than not: without it nothing else is looked at.
jwt_claims = st.fixed_dictionaries(
    {},
    optional={
        "exp": st.sampled_from(EDGE_TIMES) | claim_values,
        "nbf": claim_values,
        "iat": claim_values,
        "sub": claim_values,
        "iss": claim_values,
        "aud": claim_values,
        "channels": st.sampled_from([["*"], "quotes:* trades:BTC-USD", ["orders:*"], [1], "*"])
        | claim_values,
    },
)


def _signed(claims: dict[str, Any]) -> str:
    """An HS256 token signed with the server's secret, made by hand: PyJWT refuses to encode
    some claims (a non-string `iss`), and only `json` writes NaN, the infinities and huge
    integers as a careless or hostile issuer would."""
    b64 = jwt.utils.base64url_encode
    body = json.dumps(claims).encode()
    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(body)
    mac = hmac.new(SECRET.encode(), signing, hashlib.sha256).digest()
    return (signing + b"." + b64(mac)).decode()


def _mangled(claims: dict[str, Any], at: int, char: str) -> str:
    token = _signed(claims)
    at %= len(token)
    return token[:at] + char + token[at + 1 :]


tokens = st.one_of(
    jwt_claims.map(_signed),
    # Signed, in the future, with one time claim at an edge: what reaches the time checks.
    st.builds(
        lambda claim, value: _signed({"exp": FUZZ_NOW + 60, "channels": ["*"], claim: value}),
        st.sampled_from(["exp", "nbf", "iat"]),
        claim_values,
    ),
    st.builds(_mangled, jwt_claims, st.integers(0, 10_000), st.sampled_from("A._-=/+ %~")),
    st.sampled_from([KEY_ALL, KEY_BTC, KEY_ALL + "x", "", "a.b.c", "..", "x" * 9000]),
    # Printable ASCII: what a header can carry (the query string takes anything, encoded).
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)


@settings(max_examples=1500, deadline=None)
@example(token=_signed({"exp": 10**400}), place="bearer", origin=None)
@example(token=KEY_ALL, place="twice", origin=None)
@given(
    token=tokens,
    place=st.sampled_from(["bearer", "query", "both", "twice", "scheme"]),
    origin=st.sampled_from([None, "https://evil.example", "http://127.0.0.1:8765", "null"]),
)
def test_fuzzed_handshake_tokens_get_an_answer_never_an_exception(
    fuzz_authenticator: Authenticator, token: str, place: str, origin: str | None
) -> None:
    admission = Admission(
        ServerConfig(auth=fuzz_authenticator.config, max_connections_per_credential=1),
        fuzz_authenticator,
    )
    pairs = [("Host", "127.0.0.1:8765")]
    if origin is not None:
        pairs.append(("Origin", origin))
    path = "/ws"
    if place in ("bearer", "both", "twice"):
        pairs.append(("Authorization", f"Bearer {token}"))
    if place == "twice":
        pairs.append(("Authorization", f"Bearer {KEY_ALL}"))
    if place == "scheme":
        pairs.append(("Authorization", token))
    if place in ("query", "both"):
        path += "?" + urlencode({"token": token})
    for _ in range(2):  # the second one meets a credential at its cap
        decision = admission.admit(Headers(pairs), path, "192.0.2.1", FUZZ_NOW)
        if isinstance(decision, Refused):
            assert decision.status.value in {400, 401, 403, 429}, decision
            assert decision.reason and (len(token) < 8 or token not in decision.reason)
        else:
            assert origin in (None, "http://127.0.0.1:8765") and place != "twice"
            assert decision.grant is None or decision.grant.credential
    assert 0 <= admission.open <= 2


@settings(max_examples=1500, deadline=None)
@example(token=_signed({"exp": 10**400}), request_id=1, refresh=False)
@example(token=_signed({"exp": FUZZ_NOW + 60, "iat": float("inf")}), request_id=1, refresh=True)
@given(
    token=tokens | st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2),
    request_id=st.none() | st.integers() | st.text(max_size=3) | st.floats(),
    refresh=st.booleans(),
)
def test_fuzzed_auth_messages_get_a_typed_answer_never_an_exception(
    fuzz_authenticator: Authenticator, token: object, request_id: object, refresh: bool
) -> None:
    full = "key:" + key_id(KEY_BTC)  # a credential at its connection cap

    def claim(grant: Any) -> str | None:
        return "too many connections for this credential" if grant.credential == full else None

    session = ClientSession(Limits(), fuzz_authenticator, claim=claim)
    if refresh:  # a connection that has a grant already
        ok = session.receive(orjson.dumps({"op": "auth", "token": KEY_ALL}), 0.0, 0)
        assert isinstance(ok, Authenticated)
    message = json.dumps({"op": "auth", "id": request_id, "token": token})
    now_ns = int(FUZZ_NOW * 1e9)
    for _ in range(2):  # the second time it is a refresh if the first one succeeded
        before = session.grant
        action = session.receive(message, 0.0, now_ns)
        if isinstance(action, Authenticated):
            assert action.grant.credential and action.grant.credential != full
            assert session.grant is action.grant
        elif isinstance(action, Close):
            assert before is None
            assert action in (
                Close(4001, "unauthorized"),
                Close(1013, "too many connections for this credential"),
            )
            return
        else:
            assert isinstance(action, Rejected), action
            doc = orjson.loads(action.message)
            assert before is not None and doc["type"] == "error", doc
            assert doc["code"] in {"unauthorized", "forbidden", "bad_request"}, doc
            assert session.grant is before
