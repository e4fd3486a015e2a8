"""The broker-independent bridge: map, store once, then acknowledge; one thin adapter per broker.

Each round takes at most `batch` messages the adapter already holds (the broker never hands it
more than `max_in_flight` unacknowledged), maps them, appends the events to Redis in one atomic
call that also drops those already stored (by broker id), and only then acknowledges the round
to the broker. So:

- a crash anywhere loses nothing: what was not acknowledged is redelivered;
- a redelivery stores nothing twice: the append checks each message's id against the channel's
  record of ids already stored (`tw:{SYM}:<type>:seen:<bridge>`, a sorted set of the last
  `dedupe_window` ids by seq, in the channel's hash slot) and adds the new ones, in the same
  Lua call that assigns their seqs;
- Redis slow or down stops consumption: the round is retried with backoff until Redis takes it,
  and no message is asked from the broker meanwhile (bounded by the broker's prefetch);
- a message that does not map is counted, logged with its subject/topic and reason, and
  republished to the dead-letter destination or skipped, per the map; never a crash;
- a message whose channel Redis refuses (its stream or meta key holds another type: someone
  overwrote it) goes the same way, counted apart; the rest of the round is stored, so one
  broken key never stops the bridge;
- on a Redis Cluster with a master down, the other masters' channels are stored and the down
  master's events held by the bridge, in order, and stored with the next rounds once it (or its
  replica) is up. Acknowledgements are cumulative, so the broker is told only of the messages
  before the oldest one held: a crash meanwhile redelivers the rest, and the ids drop what was
  stored. Consumption goes on until `max_in_flight` messages are unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tickwire.core.acl import acl_hint
from tickwire.core.channels import REGISTRY_KEY, Channel
from tickwire.core.commands import Arg, NodeDown, RedisReplyError
from tickwire.core.config import PublisherConfig
from tickwire.core.errors import CodecError, ConfigError, RedisUnavailable
from tickwire.core.redis_cluster import ClusterConnection
from tickwire.core.redis_slots import channel_slot
from tickwire.core.redis_target import RedisLink, RedisTopology, live_channel_of
from tickwire.core.waits import cancel_and_wait
from tickwire.feeds.bridges.mapping import (
    BridgeMap,
    BridgeMapper,
    BridgeOptions,
    MappedEvent,
    Unmapped,
)
from tickwire.feeds.publisher import load_script, random_epoch
from tickwire.feeds.store import APPEND_LUA

log = logging.getLogger("tickwire.feeds.bridge")

#: While events wait for a down cluster master, how long a round waits for messages before it
#: tries them again (seconds): the cluster connection looks for the master as often.
HELD_RETRY_S = 0.25

# The publisher's append, unchanged, as a function of its own KEYS and ARGV (Lua resolves the
# names to the parameters), wrapped by a prelude that drops ids already stored and an epilogue
# that records the new ones: one atomic call, so an event and its id are stored together or not
# at all. The append's writer mark (`w:<id>`, the publisher's retry guard) is removed again at
# the end: here the ids are the guard, and a bridge's restarts must not pile marks up.
#
# KEYS: per batch: stream, meta, seen. ARGV: candidate epoch, writer id, live channel, window;
# then per batch: maxlen, epoch last seen, seq last seen, n, n ids ('' : none), n bare bodies.
# Returns per batch: epoch, last seq, events stored, duplicates dropped; for a batch Redis
# refused (its stream or meta holds another type): Redis's error, -1, 0, 0.
BRIDGE_APPEND_LUA = (
    "local function append(KEYS, ARGV)\n"
    + APPEND_LUA
    + r"""
end
local window = tonumber(ARGV[4])
local akeys, aargv, batches = {}, {ARGV[1], ARGV[2], ARGV[3]}, {}
local a = 5
for k = 1, #KEYS, 3 do
  local meta, seen = KEYS[k + 1], KEYS[k + 2]
  local n = tonumber(ARGV[a + 3])
  local ids, bodies = a + 4, a + 4 + n
  local keep, here, dups = {}, {}, 0
  -- A meta or an id set someone overwrote with another type refuses the batch, as the
  -- append does for its stream and meta; another error fails the call.
  local before = redis.pcall('HGET', meta, 'epoch')
  local refused = type(before) == 'table' and before.err
  for i = 0, n - 1 do
    local id = ARGV[ids + i]
    local hit = here[id]
    if id ~= '' and not hit and not refused then
      hit = redis.pcall('ZSCORE', seen, id)
      if type(hit) == 'table' and hit.err then refused = hit.err end
    end
    if refused then
      break
    elseif id ~= '' and hit then
      dups = dups + 1
    else
      if id ~= '' then here[id] = true end
      keep[#keep + 1] = i
    end
  end
  if refused and string.sub(refused, 1, 9) ~= 'WRONGTYPE' then return {err = refused} end
  local b = {seen = seen, meta = meta, ids = ids, keep = keep, dups = dups, refused = refused}
  if refused then
    b.keep, b.dups = {}, 0
  elseif #keep > 0 then
    b.before = before
    b.at = #akeys / 2
    akeys[#akeys + 1] = KEYS[k]
    akeys[#akeys + 1] = meta
    for _, x in ipairs({ARGV[a], ARGV[a + 1], ARGV[a + 2], 1, 0, #keep, '', 0}) do
      aargv[#aargv + 1] = x
    end
    for _, i in ipairs(keep) do aargv[#aargv + 1] = ARGV[bodies + i] end
  end
  batches[#batches + 1] = b
  a = bodies + n
end
local out = {}
if #akeys > 0 then
  out = append(akeys, aargv)
  if out.err then return out end
end
local result, mark = {}, 'w:' .. ARGV[2]
for _, b in ipairs(batches) do
  local stored = 0
  if b.at and out[b.at * 3 + 1] < 0 then
    -- Its stream or meta holds another type: nothing of it stored, and the rest goes on.
    -- Its duplicates count as refused too: what they duplicate went with the overwritten key.
    b.refused, b.dups = out[b.at * 3 + 2], 0
  end
  if b.refused then
    result[#result + 1] = b.refused
    result[#result + 1] = -1
  elseif not b.at then
    result[#result + 1] = ''
    result[#result + 1] = 0
  else
    stored = #b.keep
    -- Bare bodies predict nothing: the append answers (k, epoch, last seq) for every batch.
    local epoch, last = out[b.at * 3 + 2], out[b.at * 3 + 3]
    -- A new epoch is a new history: ids seen in the old one say nothing about it.
    if epoch ~= b.before then redis.call('DEL', b.seen) end
    local seq = last - #b.keep
    local zadd = {}
    for _, i in ipairs(b.keep) do
      seq = seq + 1
      local id = ARGV[b.ids + i]
      if id ~= '' then
        zadd[#zadd + 1] = seq
        zadd[#zadd + 1] = id
      end
    end
    if #zadd > 0 then
      redis.call('ZADD', b.seen, unpack(zadd))
      redis.call('ZREMRANGEBYRANK', b.seen, 0, -window - 1)
    end
    redis.call('HDEL', b.meta, mark)
    result[#result + 1] = epoch
    result[#result + 1] = last
  end
  result[#result + 1] = stored
  result[#result + 1] = b.dups
end
return result
"""
)


@dataclass(slots=True)
class Delivery:
    """One broker message as the core sees it."""

    #: The subject (NATS), topic (MQTT) or routing key (RabbitMQ) it came on.
    route: str
    payload: bytes
    #: The broker's id for it ('' if the broker gives none): NATS JetStream's stream sequence,
    #: RabbitMQ's message-id property.
    broker_id: str = ""
    #: RabbitMQ: the queue it was consumed from.
    queue: str = ""
    #: The broker client's message object, for the adapter to acknowledge.
    handle: Any = None


class BrokerSource(Protocol):
    """What a broker adapter provides; everything else is the core's."""

    async def receive(self, limit: int) -> list[Delivery]:
        """Wait for at least one message; return up to `limit` of those already here."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge: the broker may forget these (they are in Redis or dead-lettered)."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send the original message to the map's dead-letter destination, with the reason."""
        ...

    async def hold(self, deliveries: Sequence[Delivery]) -> None:
        """Redis is slow: tell the broker these are still being worked on, if it can hear it
        (NATS `in_progress`), so that it does not redeliver them meanwhile."""
        ...


#: Kinds of unmapped reasons counted apart, at most; the rest are counted as "other".
MAX_REASON_KINDS = 64


@dataclass
class BridgeStats:
    """What a bridge did, counted: every message received is stored, a duplicate dropped by
    id, unmapped, or refused by Redis (those two dead-lettered or skipped)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    unmapped: int = 0
    #: Mapped, but Redis refused its channel (see `BridgeStore`).
    refused: int = 0
    dead_lettered: int = 0
    rounds: int = 0
    redis_retries: int = 0
    #: Reasons of unmapped messages, counted (the first words of each, so that a flood of one
    #: kind does not grow it).
    unmapped_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    #: Channels whose events Redis refused, none of them stored, with Redis's error.
    refused: Mapping[Channel, str] = field(default_factory=dict)
    #: Channels whose Redis Cluster master is down: none of their events stored (Redis may have
    #: applied them: written again, each id is stored once).
    held: frozenset[Channel] = frozenset()


class BridgeStore:
    """Appends mapped events to Redis, each broker id once; retries until Redis takes them.

    A channel whose stream or meta key holds another type (someone overwrote it) is refused
    alone: none of its events stored, the rest of the round stored, and the channel named in
    `StoreResult.refused`, logged once until it stores again. Retrying would never succeed
    and held every other channel of the bridge with it."""

    def __init__(
        self,
        config: PublisherConfig,
        options: BridgeOptions,
        *,
        new_epoch: Callable[[], str] = random_epoch,
    ) -> None:
        self.config = config
        self.options = options
        self._new_epoch = new_epoch
        self._redis = RedisTopology(config.redis_url)
        self._db = self._redis.target.db
        self._conn: RedisLink | None = None
        self._sha: str | None = None
        self._registered: set[Channel] = set()
        #: Last (epoch, seq) Redis assigned per channel: lets the append see a rollback.
        self.positions: dict[Channel, tuple[str, int]] = {}
        self.retries = 0
        #: Channels whose last batch Redis refused.
        self.refused: set[Channel] = set()
        #: Whether the last store held channels of a down cluster master (`StoreResult.held`).
        self.holding = False

    async def start(self) -> None:
        """Connect now: fail fast (RedisUnavailable) if Redis is unreachable at start."""
        await self._connect()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connect(self) -> RedisLink:
        if self._conn is None or self._conn.closed:
            self._conn = await self._redis.open()
            self._sha = await load_script(self._conn, BRIDGE_APPEND_LUA)
            self._registered.clear()
        return self._conn

    async def store(
        self,
        events: Sequence[MappedEvent],
        *,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> StoreResult:
        """Append `events` (in order per channel) once; returns only when Redis has them."""
        if not events:
            return StoreResult(0, 0)
        by_channel: dict[Channel, tuple[list[str], list[bytes]]] = {}
        for ev in events:
            ids, bodies = by_channel.setdefault(ev.channel, ([], []))
            ids.append(ev.msg_id)
            bodies.append(ev.body)
        delay = self.config.backoff_initial_s
        failing: str | None = None
        while True:
            try:
                conn = await self._connect()
                result = await self._append(conn, by_channel)
                if failing is not None:
                    log.info("Redis takes appends again")
                return result
            except (RedisUnavailable, RedisReplyError) as exc:
                if isinstance(exc, RedisUnavailable):
                    self.close()
                elif str(exc).startswith("NOSCRIPT"):
                    self._sha = None
                    self.close()
                    continue
                self.retries += 1
                if failing != str(exc):
                    log.warning(
                        "Redis refused or is unreachable (%s)%s: holding %d events, consuming "
                        "paused, retrying with backoff",
                        exc,
                        acl_hint(exc),
                        len(events),
                    )
                    failing = str(exc)
                if on_wait is not None:
                    await on_wait()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)

    async def _append(
        self, conn: RedisLink, by_channel: dict[Channel, tuple[list[str], list[bytes]]]
    ) -> StoreResult:
        epoch_candidate = self._new_epoch()
        assert self._sha is not None
        cluster = isinstance(conn, ClusterConnection)
        groups = self._groups(list(by_channel), cluster)
        commands: list[list[Arg]] = []
        for group in groups:
            keys: list[Arg] = []
            live = live_channel_of(conn, self._db, channel_slot(group[0]))
            args: list[Arg] = [
                epoch_candidate,
                f"bridge:{self.options.name}",
                live,
                self.options.dedupe_window,
            ]
            for channel in group:
                ids, bodies = by_channel[channel]
                epoch, seq = self.positions.get(channel, ("", 0))
                keys += (channel.stream_key, channel.meta_key, seen_key(channel, self.options.name))
                args += (self.config.retention.maxlen(channel.kind), epoch, seq, len(bodies))
                args += ids
                args += bodies
            commands.append(["EVALSHA", self._sha, len(keys), *keys, *args])
        new = [c for c in by_channel if c not in self._registered]
        if new:
            commands.append(["SADD", REGISTRY_KEY, *(c.name for c in new)])
        replies = await conn.pipeline(commands, timeout=self.config.reply_timeout_s)
        for reply in replies:
            if isinstance(reply, RedisReplyError) and not isinstance(reply, NodeDown):
                raise reply
        stored = dups = 0
        refused: dict[Channel, str] = {}
        held: set[Channel] = set()
        for group, out in zip(groups, replies, strict=False):
            if isinstance(out, NodeDown):
                held.update(group)
                continue
            for i, channel in enumerate(group):
                epoch, last, n, d = out[4 * i : 4 * i + 4]
                if last < 0:
                    refused[channel] = epoch.decode()
                    self._refused(channel, refused[channel])
                    continue
                if n:
                    self.positions[channel] = (epoch.decode(), int(last))
                if channel in self.refused:
                    self.refused.discard(channel)
                    log.warning("Redis stores the events of %s again", channel.name)
                stored += n
                dups += d
        if new and not isinstance(replies[-1], NodeDown):
            self._registered.update(new)
        if held and not self.holding:
            log.warning(
                "a Redis Cluster master is down (%s): holding the events of its channels "
                "(e.g. %s), the others are stored",
                next(r for r in replies if isinstance(r, NodeDown)),
                min(c.name for c in held),
            )
        elif self.holding and not held:
            log.info("every channel stores again")
        self.holding = bool(held)
        return StoreResult(stored, dups, refused, frozenset(held))

    def _refused(self, channel: Channel, why: str) -> None:
        if channel not in self.refused:
            self.refused.add(channel)
            log.error(
                "Redis refused the events of %s, which go the unmapped way (%s) until it "
                "stores them again: %s",
                channel.name,
                self.options.on_unmapped,
                why,
            )

    def _groups(self, channels: list[Channel], cluster: bool) -> list[list[Channel]]:
        """The channels of each append call: all in one, or one call per hash slot on a Redis
        Cluster (or with `one_call_per_symbol`), where a call's keys must share a slot (a
        symbol's keys share its hash tag). A round whose calls partly fail is written again
        whole: what carries an id is then stored once, what does not may be stored twice."""
        if not (cluster or self.config.one_call_per_symbol):
            return [channels]
        by_slot: dict[int, list[Channel]] = {}
        for channel in channels:
            by_slot.setdefault(channel_slot(channel), []).append(channel)
        return list(by_slot.values())


def seen_key(channel: Channel, bridge: str) -> str:
    """The sorted set of broker ids a bridge stored on a channel (same hash slot as the stream)."""
    return f"{channel.stream_key}:seen:{bridge}"


async def run_bridge(
    source: BrokerSource,
    mapper: BridgeMapper,
    store: BridgeStore,
    *,
    stats: BridgeStats | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
    stop: asyncio.Event | None = None,
    after_store: Callable[[int], None] | None = None,
) -> BridgeStats:
    """Consume until `stop` is set; `after_store(rounds)` runs between the write and the ack (the
    crash tests' hook)."""
    stats = stats if stats is not None else BridgeStats()
    options = mapper.map_.options
    #: Events of a down cluster master's channels, oldest first, with their messages; and the
    #: messages received and not acknowledged (those from the oldest held one on), in order.
    held: list[tuple[MappedEvent, Delivery]] = []
    unacked: list[Delivery] = []
    #: The broker's next messages, asked for once and waited for across rounds: cancelled in
    #: the middle, a receive could drop messages it had taken.
    receiving: asyncio.Future[list[Delivery]] | None = None
    try:
        while stop is None or not stop.is_set():
            if held and len(unacked) >= options.max_in_flight:
                # As many unacknowledged as the broker hands out: try what is held again.
                got = await _take(None, stop, HELD_RETRY_S)
            else:
                if receiving is None:
                    receiving = asyncio.ensure_future(source.receive(options.batch))
                got = await _take(receiving, stop, HELD_RETRY_S if held else None)
                if receiving.done():
                    receiving = None
            if got is None:
                break
            if not got and not held:
                continue
            held = await bridge_round(source, mapper, store, got, stats, clock_ns(), held)
            if after_store is not None:
                after_store(stats.rounds)
            unacked += got
            cut = len(unacked)
            if held:
                first_held = held[0][1]
                cut = next(i for i, d in enumerate(unacked) if d is first_held)
            if cut:
                await source.ack(unacked[:cut])
                del unacked[:cut]
            if unacked:
                # Stored or held, not acknowledged: no redelivery meanwhile (NATS's `ack_wait`).
                await source.hold(unacked)
    finally:
        if receiving is not None:
            await cancel_and_wait(receiving)
    return stats


async def _take(
    receiving: asyncio.Future[list[Delivery]] | None,
    stop: asyncio.Event | None,
    timeout: float | None,
) -> list[Delivery] | None:
    """`receiving`'s messages once it is done; [] if it is not within `timeout` (it goes on);
    None once `stop` is set."""
    waits: set[asyncio.Future[Any]] = set() if receiving is None else {receiving}
    stopper = None if stop is None else asyncio.ensure_future(stop.wait())
    if stopper is not None:
        waits.add(stopper)
    try:
        if waits:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        elif timeout is not None:
            await asyncio.sleep(timeout)
    finally:
        if stopper is not None:
            stopper.cancel()
    if receiving is not None and receiving.done():
        return receiving.result()
    if stop is not None and stop.is_set():
        return None
    return []


async def bridge_round(
    source: BrokerSource,
    mapper: BridgeMapper,
    store: BridgeStore,
    deliveries: Sequence[Delivery],
    stats: BridgeStats,
    now_ns: int,
    held: Sequence[tuple[MappedEvent, Delivery]] = (),
) -> list[tuple[MappedEvent, Delivery]]:
    """Map, dead-letter or skip what does not map, store the rest, after the events `held`
    from earlier rounds: everything but the ack. Returns the events held now (their cluster
    master is down), oldest first, with the message each came from."""
    options = mapper.map_.options
    stats.received += len(deliveries)
    events: list[MappedEvent] = [e for e, _ in held]
    #: The delivery each event came from.
    origins: list[Delivery] = [d for _, d in held]
    for d in deliveries:
        try:
            events.append(
                mapper.map(d.route, d.payload, now_ns=now_ns, broker_id=d.broker_id, queue=d.queue)
            )
            origins.append(d)
        except (Unmapped, CodecError) as exc:
            reason = str(exc)
            stats.unmapped += 1
            kinds = stats.unmapped_reasons
            kind = " ".join(reason.split()[:3])
            if kind not in kinds and len(kinds) >= MAX_REASON_KINDS:
                kind = "other"
            kinds[kind] = kinds.get(kind, 0) + 1
            where = f"{d.queue}:{d.route}" if d.queue else d.route
            if await _divert(source, options, stats, d, reason):
                log.warning(
                    "unmapped message on %s: %s; dead-lettered to %s (%d unmapped so far)",
                    where,
                    reason,
                    options.dead_letter,
                    stats.unmapped,
                )
            else:
                log.warning(
                    "unmapped message on %s: %s; skipped (%d unmapped so far)",
                    where,
                    reason,
                    stats.unmapped,
                )

    async def hold() -> None:
        stats.redis_retries += 1
        await source.hold([*(d for _, d in held), *deliveries])

    result = await store.store(events, on_wait=hold)
    stats.stored += result.stored
    stats.duplicates += result.duplicates
    if result.refused:
        # Logged by the store, once per channel until it stores again.
        for event, d in zip(events, origins, strict=True):
            why = result.refused.get(event.channel)
            if why is not None:
                stats.refused += 1
                await _divert(source, options, stats, d, f"Redis refused {event.channel}: {why}")
    stats.rounds += 1
    if not result.held:
        return []
    return [(e, d) for e, d in zip(events, origins, strict=True) if e.channel in result.held]


async def _divert(
    source: BrokerSource, options: BridgeOptions, stats: BridgeStats, d: Delivery, reason: str
) -> bool:
    """A message that will not be stored: dead-lettered with `reason`, or skipped, per the map.
    Returns whether it was dead-lettered."""
    if options.on_unmapped != "dead-letter":
        return False
    await source.dead_letter(d, reason)
    stats.dead_lettered += 1
    return True


class ClosableSource(BrokerSource, Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


def open_source(broker: str, url: str, bridge_map: BridgeMap) -> ClosableSource:
    """The adapter for `broker`, its client library imported only now (`tickwire[bridges]`)."""
    try:
        if broker == "nats":
            from tickwire.feeds.bridges.nats_source import NatsSource

            return NatsSource(url, bridge_map)
        if broker == "mqtt":
            from tickwire.feeds.bridges.mqtt_source import MqttSource

            return MqttSource(url, bridge_map)
        if broker == "rabbitmq":
            from tickwire.feeds.bridges.rabbitmq_source import RabbitSource

            return RabbitSource(url, bridge_map)
    except ImportError as exc:
        raise ConfigError(
            f"the {broker} bridge needs its client library ({exc.name}): "
            "pip install 'tickwire[bridges]'"
        ) from None
    raise ConfigError(f"unknown broker {broker!r}")
