"""A Redis connection in pub/sub mode: pushes are parsed as they arrive and taken in bulk.

A protocol, not a stream reader: the subscriber takes every message that has arrived in one call,
with no await per message, and waits only when there is nothing to take. What it has not taken is
bounded: past `max_buffer` bytes it stops reading the socket, so Redis holds the rest in its own
output buffer and, past `client-output-buffer-limit pubsub`, drops the connection. A subscriber
that falls that far behind is told so (RedisUnavailable) and catches up from the streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis

from tickwire.core.commands import Arg, RedisReplyError
from tickwire.core.errors import RedisTimeout, RedisUnavailable
from tickwire.core.redis_wire import RedisAddress


class _Pushes(asyncio.Protocol):
    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max_buffer
        self.transport: asyncio.BaseTransport | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.lost: str | None = None
        #: Bytes received in all: that they grow proves Redis still serves the connection.
        self.received = 0
        #: Resolved True by `wake`, False by the timer of `RedisSubscription.wait`.
        self.waiter: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        if self.buffered > self.max_buffer and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[attr-defined]
        self.wake()

    def eof_received(self) -> bool | None:
        self.lost = "Redis closed the connection"
        self.wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"lost connection to Redis: {exc or 'closed'}"
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None:
            _resolve(self.waiter, True)


def _resolve(waiter: asyncio.Future[bool], result: bool) -> None:
    if not waiter.done():
        waiter.set_result(result)


class RedisSubscription:
    """One connection subscribed to pub/sub channels; one task takes what arrives."""

    def __init__(self, transport: asyncio.Transport, protocol: _Pushes) -> None:
        self._transport = transport
        self._protocol = protocol
        self._parser = hiredis.Reader(replyError=RedisReplyError)
        #: Messages that came in with the set-up replies, for the first `take`.
        self._early: list[Any] = []

    @classmethod
    async def open(
        cls,
        url: str | RedisAddress,
        channels: list[str],
        *,
        timeout: float = 2.0,
        max_buffer: int = 8 << 20,
        sharded: bool = False,
    ) -> RedisSubscription:
        """Connect, authenticate and subscribe; returns once Redis has confirmed every channel,
        so anything published from then on will arrive.

        `sharded`: SSUBSCRIBE (Redis Cluster's sharded pub/sub) instead of SUBSCRIBE, one
        command per channel (the channels of one SSUBSCRIBE must share a slot)."""
        addr = url if isinstance(url, RedisAddress) else RedisAddress.parse(url)
        transport, protocol = await addr.connect(lambda: _Pushes(max_buffer), timeout)
        sub = cls(transport, protocol)
        try:
            auth = addr.auth_command()
            if auth is not None:
                sub._send(auth)
                (reply,) = await sub._replies(1, timeout)
                if isinstance(reply, RedisReplyError):
                    raise RedisUnavailable(f"{addr} refused the connection set-up: {reply}")
            if sharded:
                sub._send_all([["SSUBSCRIBE", c] for c in channels])
            else:
                sub._send(["SUBSCRIBE", *channels])
            await sub._confirmations(
                b"ssubscribe" if sharded else b"subscribe", len(channels), timeout
            )
        except BaseException:
            sub.close()
            raise
        return sub

    def close(self) -> None:
        # Once: asyncio's TLS transport, closed again, drops its protocol (CPython 3.11), and
        # a `take` after that would fail inside the TLS layer.
        if not self._transport.is_closing():
            self._transport.close()

    def wake(self) -> None:
        """End a `wait` now, as if something had arrived."""
        self._protocol.wake()

    def ping(self) -> None:
        """Ask for a `pong` push: proof, when it comes, that Redis still serves this connection."""
        self._send(["PING"])

    @property
    def received(self) -> int:
        """Bytes received so far, taken or not."""
        return self._protocol.received

    def take(self) -> list[Any]:
        """Every message that has arrived, in order ([] if none); raises RedisUnavailable once
        the connection is gone and everything before that has been taken."""
        p = self._protocol
        if p.chunks:
            parser = self._parser
            for chunk in p.chunks:
                parser.feed(chunk)
            p.chunks.clear()
            p.buffered = 0
            if p.paused and p.lost is None:
                p.paused = False
                self._transport.resume_reading()
        out, self._early = self._early, []
        try:
            while (reply := self._parser.gets()) is not False:
                out.append(reply)
        except hiredis.ProtocolError as exc:
            self.close()
            raise RedisUnavailable(f"bad data from Redis: {exc}") from None
        if not out and p.lost is not None:
            raise RedisUnavailable(p.lost)
        return out

    async def wait(self, timeout: float) -> bool:
        """Wait until something arrives, the connection is lost or `wake` is called; False
        after `timeout`."""
        return await _wait_any([self._protocol], timeout)

    def _send(self, command: list[Arg]) -> None:
        self._send_all([command])

    def _send_all(self, commands: list[list[Arg]]) -> None:
        if self._transport.is_closing():
            raise RedisUnavailable(self._protocol.lost or "connection is closed")
        pack = hiredis.pack_command
        self._transport.write(b"".join([pack(tuple(c)) for c in commands]))  # type: ignore[arg-type]

    async def _confirmations(self, kind: bytes, n: int, timeout: float) -> None:
        """Wait for `n` confirmations of `kind`. Messages of the channels confirmed first may
        come between them (a busy channel, when one command subscribes thousands): they are
        kept, in order, for the first `take`."""
        early: list[Any] = []
        confirmed = 0
        try:
            async with asyncio.timeout(timeout):
                while confirmed < n:
                    got = self.take()
                    if not got:
                        await self.wait(timeout)
                    for reply in got:
                        if isinstance(reply, RedisReplyError):
                            raise RedisUnavailable(f"Redis refused the subscription: {reply}")
                        if confirmed < n and reply[0] == kind:
                            confirmed += 1
                        else:
                            early.append(reply)
        except TimeoutError:
            raise RedisTimeout(f"no reply from Redis within {timeout} s") from None
        self._early = early

    async def _replies(self, n: int, timeout: float) -> list[Any]:
        out: list[Any] = []
        try:
            async with asyncio.timeout(timeout):
                while len(out) < n:
                    got = self.take()
                    if not got:
                        await self.wait(timeout)
                    out += got
        except TimeoutError:
            raise RedisTimeout(f"no reply from Redis within {timeout} s") from None
        # Messages published right after the subscription may follow in the same read.
        self._early = out[n:]
        return out[:n]


class SubscriptionGroup:
    """Subscriptions to several Redis nodes (a cluster's masters) taken and waited on as one.

    Each subscription follows the live channels of some hash slots. One that is lost (its
    master died, or dropped it past its output buffer limit) leaves the group: its slots are
    `unfollowed` and the others go on, until the caller subscribes them again where the slot
    map now puts them (`RedisTopology.follow_unfollowed`). Only when every subscription is lost
    does `take` raise RedisUnavailable.

    A `sunsubscribe` push means a live node gave up a slot (a migration moved it): what came
    before it is taken as usual, and the next `take` raises RedisUnavailable, so the caller
    subscribes again on the new slot map and catches up from the streams.

    A hung master (a paused process, a lost network) keeps its connection open and silent, and
    the others' pushes keep the group from ever being idle: `watch` pings each subscription
    that has received nothing lately and drops one that stays silent while the others answer.
    """

    def __init__(
        self,
        subs: list[tuple[RedisSubscription, tuple[str, int], list[int]]],
        unfollowed: set[int] | None = None,
    ) -> None:
        #: Each subscription, its node, and the slots it follows.
        self._subs = subs
        self.unfollowed: set[int] = set(unfollowed or ())
        self._moved: str | None = None
        #: Why the last subscription was lost.
        self.lost: str | None = None
        #: For `watch`: each subscription's bytes received at the last watch, and, for one
        #: pinged since, when and what the others had received by then.
        self._heard: dict[RedisSubscription, int] = {}
        self._pinged: dict[RedisSubscription, tuple[float, int]] = {}

    @property
    def nodes(self) -> set[tuple[str, int]]:
        """The nodes subscribed to."""
        return {node for _, node, _ in self._subs}

    def add(self, sub: RedisSubscription, node: tuple[str, int], slots: list[int]) -> None:
        self._subs.append((sub, node, slots))
        self.unfollowed.difference_update(slots)

    def drop(self, nodes: set[tuple[str, int]], why: str) -> None:
        """Close the subscriptions to `nodes`; their slots are unfollowed."""
        for entry in [e for e in self._subs if e[1] in nodes]:
            self._lose(entry, why)

    def _lose(self, entry: tuple[RedisSubscription, tuple[str, int], list[int]], why: str) -> None:
        sub, _, slots = entry
        sub.close()
        self._subs.remove(entry)
        self._heard.pop(sub, None)
        self._pinged.pop(sub, None)
        self.unfollowed.update(slots)
        self.lost = why

    def watch(self, now: float, silent_s: float) -> list[tuple[str, int]]:
        """Ping each subscription that has received nothing since the last watch; drop one
        that has received nothing `silent_s` after its PING while another received something
        (one alone, or all silent, is left to the caller's own PING deadline: a pause of
        Redis as a whole, or of this process). Call it every fraction of `silent_s`; `now` is
        any monotonic clock's. Returns the nodes dropped."""
        total = sum(sub.received for sub, _, _ in self._subs)
        dropped: list[tuple[str, int]] = []
        for entry in list(self._subs):
            sub, node, _ = entry
            got = sub.received
            if got != self._heard.get(sub):
                self._heard[sub] = got
                self._pinged.pop(sub, None)
                continue
            pinged = self._pinged.get(sub)
            if pinged is None:
                try:
                    sub.ping()
                except RedisUnavailable as exc:
                    self._lose(entry, str(exc))
                    continue
                self._pinged[sub] = (now, total - got)
            elif now - pinged[0] >= silent_s and total - got > pinged[1]:
                self._lose(
                    entry, f"no reply to PING within {silent_s:g} s, the other masters answering"
                )
                dropped.append(node)
        return dropped

    def close(self) -> None:
        for s, _, _ in self._subs:
            s.close()

    def wake(self) -> None:
        for s, _, _ in self._subs:
            s.wake()

    def ping(self) -> None:
        for entry in list(self._subs):
            try:
                entry[0].ping()
            except RedisUnavailable as exc:
                self._lose(entry, str(exc))

    def take(self) -> list[Any]:
        if self._moved is not None:
            raise RedisUnavailable(self._moved)
        out: list[Any] = []
        for entry in list(self._subs):
            try:
                out += entry[0].take()
            except RedisUnavailable as exc:
                self._lose(entry, str(exc))
        if not self._subs:
            raise RedisUnavailable(self.lost or "no subscription left")
        for message in out:
            if len(message) == 3 and message[0] == b"sunsubscribe":
                self._moved = f"a slot moved away from its node ({message[1]!r})"
        return out

    async def wait(self, timeout: float) -> bool:
        if self._moved is not None:
            return True
        return await _wait_any([s._protocol for s, _, _ in self._subs], timeout)


async def _wait_any(protocols: list[_Pushes], timeout: float) -> bool:
    """Until one of `protocols` has data, is lost or is woken; False after `timeout`."""
    if any(p.chunks or p.lost is not None for p in protocols):
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    for p in protocols:
        p.waiter = waiter
    # A timer handle, not asyncio.timeout: the reader waits here once per push (thousands
    # a second), and the timeout context's bookkeeping was ~5 % of the server's CPU.
    timer = loop.call_later(timeout, _resolve, waiter, False)
    try:
        return await waiter
    finally:
        timer.cancel()
        for p in protocols:
            p.waiter = None
