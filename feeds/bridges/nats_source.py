"""NATS JetStream adapter: a durable pull consumer, acknowledged per message after the append.

The id a message is stored once under is its stream sequence, prefixed with the stream's
creation time so that a stream deleted and created again (sequences from 1 again) is never
taken for redeliveries of the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tickwire.core.errors import ConfigError
from tickwire.feeds.bridges.core import Delivery
from tickwire.feeds.bridges.mapping import BridgeMap

log = logging.getLogger("tickwire.feeds.bridge.nats")
#: Tokens of a JetStream reply subject in its first form: `$JS.ACK.<stream>.<consumer>.
#: <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`; the later form adds a domain
#: and an account hash after `ACK` (and a token at the end): `Msg.Ack`'s indices.
_V1_TOKENS = 9


def stream_sequence(reply: str) -> int:
    """A JetStream message's stream sequence, read off its reply subject as nats-py's
    `Msg.metadata` reads it, without the timestamp and the objects that builds for every
    message (a seventh of a draining bridge's CPU)."""
    tokens = reply.split(".")
    if len(tokens) < _V1_TOKENS or tokens[0] != Msg.Ack.Prefix0 or tokens[1] != Msg.Ack.Prefix1:
        raise nats.errors.NotJSMessageError
    return int(tokens[5] if len(tokens) == _V1_TOKENS else tokens[Msg.Ack.StreamSeq])


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """The map's `[nats]` table."""

    stream: str
    #: The durable consumer's name (default: the bridge's name).
    durable: str
    #: Only these subjects of the stream (default: the routes' subjects when there is one route;
    #: the whole stream otherwise, and subjects that match no route are unmapped).
    filter_subject: str
    #: How long JetStream waits for an ack before redelivering; while Redis is down the bridge
    #: keeps telling it the messages are in progress, so this only matters for a dead bridge.
    ack_wait_s: float = 30.0
    #: Seconds one fetch waits for messages before asking again.
    fetch_timeout_s: float = 2.0
    #: Seconds to reach the server at start.
    connect_timeout_s: float = 5.0

    @classmethod
    def of(cls, bridge_map: BridgeMap) -> NatsOptions:
        table = dict(bridge_map.broker_options)
        stream = table.pop("stream", "")
        if not isinstance(stream, str) or not stream:
            raise ConfigError("[nats] stream = the JetStream stream to consume is required")
        subjects = list(
            dict.fromkeys(r.template.subscription for r in bridge_map.routes if r.template)
        )
        durable = str(table.pop("durable", bridge_map.options.name))
        filter_subject = str(table.pop("filter_subject", subjects[0] if len(subjects) == 1 else ""))
        ack_wait_s = float(table.pop("ack_wait_s", 30.0))
        fetch_timeout_s = float(table.pop("fetch_timeout_s", 2.0))
        connect_timeout_s = float(table.pop("connect_timeout_s", 5.0))
        if table:
            raise ConfigError(f"[nats]: unknown key(s) {', '.join(sorted(table))}")
        return cls(stream, durable, filter_subject, ack_wait_s, fetch_timeout_s, connect_timeout_s)


class NatsSource:
    """Consumes one JetStream stream through a durable pull consumer."""

    def __init__(self, url: str, bridge_map: BridgeMap) -> None:
        self.url = url
        self.map_ = bridge_map
        self.options = NatsOptions.of(bridge_map)
        self._nc: NatsClient | None = None
        self._sub: Any = None
        self._js: Any = None
        self._token = ""
        self._closing = False
        #: The error last logged: one line per outage, not one per reconnection attempt.
        self._last_error = ""

    async def start(self) -> None:
        # nats-py retries even the first connection for ever when told to reconnect for ever:
        # fail at start instead, as the publisher does, if the server cannot be reached.
        self._nc = await asyncio.wait_for(
            nats.connect(
                self.url,
                # Ride out broker restarts: reconnect for ever, quickly; the consumer is durable.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            ),
            self.options.connect_timeout_s,
        )
        self._js = self._nc.jetstream()
        info = await self._js.stream_info(self.options.stream)
        if info.created is not None:
            self._token = f"{int(info.created.timestamp() * 1e6):x}:"
        await self._ensure_consumer()
        self._sub = await self._js.pull_subscribe_bind(
            durable=self.options.durable, stream=self.options.stream
        )

    async def _ensure_consumer(self) -> None:
        """Create the durable consumer, or restart it from its ack floor when it has messages
        delivered and not acknowledged (a bridge died holding them).

        JetStream would redeliver those only after `ack_wait`, behind newer messages: events of
        one symbol would be stored out of order. Starting again from the ack floor delivers
        them first, in stream order; those already stored are dropped by the dedupe."""
        opts = self.options
        config = ConsumerConfig(
            durable_name=opts.durable,
            ack_policy=AckPolicy.ALL,
            ack_wait=opts.ack_wait_s,
            max_ack_pending=self.map_.options.max_in_flight,
            filter_subject=opts.filter_subject or None,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            info = await self._js.consumer_info(opts.stream, opts.durable)
        except nats.js.errors.NotFoundError:
            await self._js.add_consumer(opts.stream, config)
            return
        if not info.num_ack_pending:
            return
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        log.warning(
            "consumer %s holds %d unacknowledged messages: restarting it after stream seq %d "
            "so that they come first, in order",
            opts.durable,
            info.num_ack_pending,
            floor,
        )
        await self._js.delete_consumer(opts.stream, opts.durable)
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = floor + 1
        await self._js.add_consumer(opts.stream, config)

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None:
            await self._nc.close()

    async def receive(self, limit: int) -> list[Delivery]:
        while True:
            try:
                msgs: list[Msg] = await self._sub.fetch(limit, timeout=self.options.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                # Disconnected: the client reconnects by itself; ask again shortly.
                log.debug("fetch failed (%s); asking again", exc)
                await asyncio.sleep(0.1)
                continue
            if msgs:
                token = self._token
                return [
                    Delivery(m.subject, m.data, f"{token}{stream_sequence(m.reply)}", handle=m)
                    for m in msgs
                ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # The consumer acks "this one and every one before it" (AckPolicy.ALL): one ack a round,
        # where one per message cost most of the bridge's CPU.
        try:
            await deliveries[-1].handle.ack()
        except nats.errors.Error as exc:
            # Not acknowledged: JetStream redelivers them and the dedupe drops them.
            log.debug("ack failed (%s); they will be redelivered and dropped", exc)

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            with contextlib.suppress(nats.errors.Error):
                await d.handle.in_progress()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = {"Tickwire-Reason": reason[:1000], "Tickwire-Subject": delivery.route}
        target = self.map_.options.dead_letter
        try:
            await self._js.publish(target, delivery.payload, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            # No stream keeps the dead-letter subject: plain NATS, to whoever listens.
            assert self._nc is not None
            await self._nc.publish(target, delivery.payload, headers=headers)
            await self._nc.flush()

    async def _on_error(self, exc: Exception) -> None:
        if str(exc) != self._last_error:
            self._last_error = str(exc)
            log.warning("NATS: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("NATS: disconnected from %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        self._last_error = ""
        log.info("NATS: reconnected")
