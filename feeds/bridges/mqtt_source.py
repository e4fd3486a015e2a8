"""MQTT adapter (aiomqtt, MQTT 5, QoS 1): a persistent session, PUBACK only after the append.

MQTT gives a message no id that survives a redelivery (the packet id is per connection), so a
message stored and not yet acknowledged when the bridge dies is stored again when the broker
resends it, unless the route names a unique message field (`id_field`, e.g. the trade id):
with it, exactly once; without it, at least once (the start-up log says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tickwire.core.errors import ConfigError
from tickwire.core.urls import redact_url
from tickwire.feeds.bridges.core import Delivery
from tickwire.feeds.bridges.mapping import BridgeMap

#: URL schemes of MQTT over TLS (`ssl://` as paho and mosquitto's tools spell it).
TLS_SCHEMES = ("mqtts", "ssl")

log = logging.getLogger("tickwire.feeds.bridge.mqtt")


@dataclass(frozen=True, slots=True)
class MqttOptions:
    """The map's `[mqtt]` table."""

    #: The session's client id (default `tickwire-<bridge name>`): keep it stable, the broker
    #: keeps the subscriptions and the messages queued for it under this name.
    client_id: str
    #: How long the broker keeps the session (and queues messages) while the bridge is away.
    session_expiry_s: int = 7 * 24 * 3600
    #: Seconds between attempts to reconnect.
    reconnect_s: float = 0.25

    @classmethod
    def of(cls, bridge_map: BridgeMap) -> MqttOptions:
        table = dict(bridge_map.broker_options)
        client_id = str(table.pop("client_id", f"tickwire-{bridge_map.options.name}"))
        expiry = int(table.pop("session_expiry_s", 7 * 24 * 3600))
        reconnect_s = float(table.pop("reconnect_s", 0.25))
        if table:
            raise ConfigError(f"[mqtt]: unknown key(s) {', '.join(sorted(table))}")
        return cls(client_id, expiry, reconnect_s)


class MqttSource:
    """Subscribes to the routes' topics at QoS 1 and acknowledges by hand."""

    def __init__(self, url: str, bridge_map: BridgeMap) -> None:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "tcp", "", *TLS_SCHEMES):
            raise ConfigError(
                f"MQTT URL {redact_url(url)!r}: expected mqtt://[user:password@]host[:port] "
                "or, over TLS, mqtts://…"
            )
        tls = bridge_map.over_tls(url, TLS_SCHEMES)
        #: TLS: the map's keys, or the system's CAs; None: plain TCP.
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.tls = bridge_map.tls.context() if bridge_map.tls else ssl.create_default_context()
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (8883 if tls else 1883)
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self.map_ = bridge_map
        self.options = MqttOptions.of(bridge_map)
        self.topics = list(
            dict.fromkeys(r.template.subscription for r in bridge_map.routes if r.template)
        )
        self._client: aiomqtt.Client | None = None
        #: Which connection a delivery came on: packet ids mean nothing on another one.
        self._generation = 0
        missing = [r.template.text for r in bridge_map.routes if not r.id_field and r.template]
        if missing:
            log.warning(
                "MQTT routes without id_field (%s): a message stored and not yet acknowledged "
                "when the bridge dies is stored again when the broker resends it (at least "
                "once); name a unique message field as id_field for exactly once",
                ", ".join(missing),
            )

    async def start(self) -> None:
        await self._connect()

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by a round (the broker sends no more than the
        receive maximum unacknowledged)."""
        return len(self._client.messages) if self._client is not None else 0

    async def _connect(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.options.session_expiry_s
        # The broker sends at most this many unacknowledged messages: the in-flight bound.
        props.ReceiveMaximum = min(self.map_.options.max_in_flight, 65_535)  # MQTT's maximum
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.options.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            # paho opens its own socket: without this, Nagle holds PUBACKs back.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            tls_context=self.tls,
        )
        # aiomqtt has no manual acknowledgement of its own; paho's, underneath it, does.
        client._client.manual_ack_set(True)
        await client.__aenter__()
        for topic in self.topics:
            await client.subscribe(topic, qos=1)
        self._client = client
        self._generation += 1
        return client

    async def _reconnect(self) -> aiomqtt.Client:
        await self._drop()
        while True:
            try:
                client = await self._connect()
            except aiomqtt.MqttError as exc:
                log.debug("MQTT reconnect failed: %s", exc)
                await asyncio.sleep(self.options.reconnect_s)
                continue
            log.info("MQTT: reconnected to %s:%d", self.host, self.port)
            return client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def close(self) -> None:
        await self._drop()

    async def receive(self, limit: int) -> list[Delivery]:
        while True:
            client = self._client or await self._reconnect()
            try:
                first = await anext(client.messages)
                msgs = [first]
                while len(msgs) < limit:
                    if not len(client.messages):
                        # A turn of the loop lets messages already read land (larger rounds).
                        await asyncio.sleep(0)
                        if not len(client.messages):
                            break
                    msgs.append(await anext(client.messages))
            except aiomqtt.MqttError as exc:
                # What this connection delivered and we did not acknowledge, the broker sends
                # again on the next one (the session persists).
                log.warning("MQTT: %s; reconnecting", exc)
                await self._reconnect()
                continue
            gen = self._generation
            return [
                Delivery(str(m.topic), _bytes(m.payload), handle=(gen, m.mid, m.qos)) for m in msgs
            ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        client = self._client
        if client is None:
            return
        for d in deliveries:
            gen, mid, qos = d.handle
            if gen == self._generation and qos > 0:
                client._client.ack(mid, qos)

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        # MQTT redelivers only on a new connection: nothing to tell the broker meanwhile.
        return None

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [
            ("tickwire-reason", reason[:1000]),
            ("tickwire-topic", delivery.route),
        ]
        while True:
            client = self._client or await self._reconnect()
            try:
                await client.publish(
                    self.map_.options.dead_letter, delivery.payload, qos=1, properties=props
                )
                return
            except aiomqtt.MqttError as exc:
                log.warning("MQTT: dead-lettering failed (%s); reconnecting", exc)
                await self._reconnect()


def _bytes(payload: object) -> bytes:
    # paho hands bytes; aiomqtt's type also allows the str/number a publisher may pass.
    return payload if isinstance(payload, bytes) else str(payload).encode()
