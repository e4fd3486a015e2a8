"""RabbitMQ adapter (aio-pika): consumes the routes' queues with a bounded prefetch, acks after
the append.

The id a message is stored once under is its `message_id` property (or the route's `id_field`).
A message without either is stored once only if it is delivered once: RabbitMQ marks every
redelivery (`redelivered`), and such messages are counted, since they may be stored twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tickwire.core.errors import ConfigError
from tickwire.feeds.bridges.core import Delivery
from tickwire.feeds.bridges.mapping import BridgeMap

log = logging.getLogger("tickwire.feeds.bridge.rabbitmq")


@dataclass(frozen=True, slots=True)
class RabbitOptions:
    """The map's `[rabbitmq]` table."""

    #: Declare the routes' queues (durable) if missing; with `exchange`, bind them to it with
    #: their routing keys (`{symbol}` as `*`).
    declare: bool = False
    exchange: str = ""

    @classmethod
    def of(cls, bridge_map: BridgeMap) -> RabbitOptions:
        table = dict(bridge_map.broker_options)
        declare = bool(table.pop("declare", False))
        exchange = str(table.pop("exchange", ""))
        if table:
            raise ConfigError(f"[rabbitmq]: unknown key(s) {', '.join(sorted(table))}")
        return cls(declare, exchange)


class RabbitSource:
    """A robust connection (it reconnects and consumes again by itself), one channel."""

    def __init__(self, url: str, bridge_map: BridgeMap) -> None:
        self.url = url
        self.map_ = bridge_map
        self.options = RabbitOptions.of(bridge_map)
        bridge_map.over_tls(url, ("amqps",))  # refuses tls_* keys with a plain amqp:// URL
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        # Never more than the prefetch: RabbitMQ sends no more until some are acknowledged.
        self._inbox: asyncio.Queue[tuple[str, aio_pika.abc.AbstractIncomingMessage]] = (
            asyncio.Queue()
        )
        self.redelivered_without_id = 0
        #: Queues whose routes all take the id from the message (`id_field`).
        self._ids_in_body = {
            q
            for q in bridge_map.queues
            if all(r.id_field for r in bridge_map.routes if r.queue == q)
        }

    async def start(self) -> None:
        tls = self.map_.tls
        self._conn = await aio_pika.connect_robust(
            self.url,
            reconnect_interval=0.5,
            # amqps:// without the map's TLS keys: the system's CAs.
            ssl_context=tls.context() if tls is not None else None,
        )
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=self.map_.options.max_in_flight)
        self._channel = channel
        exchange: Any = None
        if self.options.exchange:
            exchange = await channel.declare_exchange(
                self.options.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        for name in self.map_.queues:
            queue: aio_pika.abc.AbstractQueue
            if self.options.declare:
                queue = await channel.declare_queue(name, durable=True)
                if exchange is not None:
                    for route in self.map_.routes:
                        if route.queue == name:
                            key = route.template.subscription if route.template else "#"
                            await queue.bind(exchange, key)
            else:
                queue = await channel.get_queue(name, ensure=True)
            await queue.consume(self._consumer(name))

    @property
    def buffered(self) -> int:
        """Deliveries received and not yet taken by a round (at most the prefetch)."""
        return self._inbox.qsize()

    def _consumer(
        self, queue: str
    ) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
        # A message does not say which queue it came from: its consumer does.
        async def put(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self._inbox.put_nowait((queue, message))

        return put

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def receive(self, limit: int) -> list[Delivery]:
        inbox = self._inbox
        msgs = [await inbox.get()]
        while len(msgs) < limit:
            if inbox.empty():
                # aio-pika hands deliveries over one task each: a turn of the loop lets those
                # already read land. Without it rounds held ~7 messages (a Redis call and an
                # ack each) and the bridge did 2 k/s.
                await asyncio.sleep(0)
                if inbox.empty():
                    break
            msgs.append(inbox.get_nowait())
        out = []
        for queue, m in msgs:
            msg_id = m.message_id or ""
            if not msg_id and m.redelivered and queue not in self._ids_in_body:
                self.redelivered_without_id += 1
                if self.redelivered_without_id % 1000 == 1:
                    log.warning(
                        "%d messages redelivered without a message_id: if they were stored "
                        "before, they are stored again (publishers should set message_id, or "
                        "the map an id_field)",
                        self.redelivered_without_id,
                    )
            out.append(Delivery(m.routing_key or "", m.body, msg_id, queue=queue, handle=m))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # One basic.ack per channel and round: "this tag and every one before it". Acking each
        # message was most of the bridge's CPU in `tickwire bench bridge`.
        last: dict[int, aio_pika.abc.AbstractIncomingMessage] = {}
        for d in deliveries:
            last[id(d.handle.channel)] = d.handle
        for m in last.values():
            try:
                await m.ack(multiple=True)
            except (
                aiormq.exceptions.AMQPError,
                aio_pika.exceptions.AMQPException,
                RuntimeError,
            ) as exc:
                # The channel they came on is gone: RabbitMQ requeued them; the dedupe drops
                # those already stored.
                log.debug("ack failed (%s); they will be redelivered", exc)

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        # RabbitMQ redelivers only when the channel closes: nothing to tell it meanwhile.
        return None

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        assert self._channel is not None
        m = delivery.handle
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                delivery.payload,
                headers={
                    "tickwire-reason": reason[:1000],
                    "tickwire-queue": delivery.queue,
                    "tickwire-routing-key": delivery.route,
                },
                message_id=m.message_id,
                content_type=m.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.map_.options.dead_letter,
        )
