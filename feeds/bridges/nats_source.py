"""NATS JetStream adapter: a durable pull consumer, acknowledged per round after the append.

The id a message is stored once under is its stream sequence, prefixed with the stream's
creation time so that a stream deleted and created again (sequences from 1 again) is never
taken for redeliveries of the old one.

Messages are pulled with JetStream's own requests (`CONSUMER.MSG.NEXT`) on an inbox whose
callback collects them, not with nats-py's `fetch`, which awaits each message through a task
and a `wait_for` of its own: that was most of a draining bridge's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tickwire.core.errors import ConfigError
from tickwire.core.waits import wait_set
from tickwire.feeds.bridges.core import Delivery
from tickwire.feeds.bridges.mapping import BridgeMap

log = logging.getLogger("tickwire.feeds.bridge.nats")
#: Pull request statuses that end a request: no messages (a `no_wait` request found none),
#: request timeout (its `expires` passed), conflict (e.g. the consumer was deleted or changed).
_ENDS_REQUEST = frozenset({"404", "408", "409"})
#: An idle heartbeat or flow control: nothing to do.
_CONTROL = "100"
#: Seconds past a request's `expires` after which it is taken as lost (a reconnection drops it
#: on the server's side without a word).
_LOST_AFTER_S = 1.0

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
        self._sub: Subscription | None = None
        self._js: Any = None
        #: Where pull requests go, and the inbox their messages come to.
        self._next_subject = ""
        self._inbox = ""
        #: Messages pulled and not yet handed out, in stream order.
        self._got: list[Msg] = []
        #: Messages the open pull request may still bring (0: none open), and when it is taken
        #: as lost (monotonic).
        self._owed = 0
        self._lost_at = 0.0
        self._arrived = asyncio.Event()
        self._token = ""
        self._closing = False
        #: The error last logged: one line per outage, not one per reconnection attempt.
        self._last_error = ""

    async def start(self) -> None:
        # nats-py retries even the first connection for ever when told to reconnect for ever:
        # fail at start instead, as the publisher does, if the server cannot be reached.
        async with asyncio.timeout(self.options.connect_timeout_s):
            self._nc = await nats.connect(
                self.url,
                # The map's TLS keys (a private CA); without, a TLS server (or tls://) is
                # checked against the system's CAs.
                tls=self.map_.tls.context() if self.map_.tls is not None else None,
                # Ride out broker restarts: reconnect for ever, quickly; the consumer is durable.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        self._js = self._nc.jetstream()
        info = await self._js.stream_info(self.options.stream)
        if info.created is not None:
            self._token = f"{int(info.created.timestamp() * 1e6):x}:"
        await self._ensure_consumer()
        self._next_subject = (
            f"$JS.API.CONSUMER.MSG.NEXT.{self.options.stream}.{self.options.durable}"
        )
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)

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
        """What has been pulled, up to `limit`: first whatever the stream holds now (a request
        that does not wait), else the first messages a waiting request brings."""
        while not self._got:
            if self._owed and time.monotonic() > self._lost_at:
                self._owed = 0
            if not self._owed:
                try:
                    await self._pull(limit, wait=False)
                    if not self._got:
                        await self._pull(limit, wait=True)
                except nats.errors.Error as exc:
                    # Disconnected: the client reconnects by itself; ask again shortly.
                    log.debug("pull request failed (%s); asking again", exc)
                    await asyncio.sleep(0.1)
                    continue
            if not self._got:
                self._arrived.clear()
                await wait_set(self._arrived, self.options.fetch_timeout_s)
        msgs, self._got = self._got[:limit], self._got[limit:]
        token = self._token
        return [
            Delivery(m.subject, m.data, f"{token}{stream_sequence(m.reply)}", handle=m)
            for m in msgs
        ]

    async def _pull(self, limit: int, *, wait: bool) -> None:
        """Ask for up to `limit` messages; without `wait`, also wait for the answer (JetStream
        sends what it holds at once, then ends the request)."""
        assert self._nc is not None
        expires_s = self.options.fetch_timeout_s
        request: dict[str, Any] = {"batch": limit}
        if wait:
            request["expires"] = int(expires_s * 1e9)
        else:
            request["no_wait"] = True
        self._owed = limit
        self._lost_at = time.monotonic() + expires_s + _LOST_AFTER_S
        self._arrived.clear()
        await self._nc.publish(self._next_subject, orjson.dumps(request), reply=self._inbox)
        if not wait:
            while self._owed and time.monotonic() < self._lost_at:
                self._arrived.clear()
                await wait_set(self._arrived, expires_s + _LOST_AFTER_S)
            self._owed = 0

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            self._got.append(msg)
            self._owed = max(0, self._owed - 1)
        elif status == _CONTROL:
            return
        else:
            if status not in _ENDS_REQUEST:
                log.warning("pull request refused: %s %s", status, headers.get("Description", ""))
            self._owed = 0
        self._arrived.set()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # The consumer acks "this one and every one before it" (AckPolicy.ALL): one ack a round,
        # where one per message cost most of the bridge's CPU.
        try:
            await deliveries[-1].handle.ack()
        except nats.errors.Error as exc:
            # Not acknowledged: JetStream redelivers them and the dedupe drops them.
            log.debug("ack failed (%s); they will be redelivered and dropped", exc)

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        # The messages a waiting pull brought since the round began are held too: JetStream
        # would redeliver them after `ack_wait` behind newer ones.
        for m in [*(d.handle for d in deliveries), *self._got]:
            with contextlib.suppress(nats.errors.Error):
                await m.in_progress()

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
