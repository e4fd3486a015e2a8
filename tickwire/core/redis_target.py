"""Where Redis is: one server, a Redis Cluster (found by itself), or a primary named by Sentinel.

URL forms (`--redis`, `TICKWIRE_REDIS_URL`):
- `redis://[[user]:password@]host[:port][/db]` and `unix:///path/to/redis.sock[?db=N]`: one
  Redis, or any node of a Redis Cluster; several seed nodes as `redis://h1:7000,h2:7001/0`. At
  each connect tickwire asks the node whether cluster mode is on (`INFO cluster`) and, if so,
  loads the slot map (`CLUSTER SLOTS`): nothing else to configure.
- `redis+sentinel://[[user]:password@]s1:26379[,s2:26379…]/SERVICE[/db][?sentinel_password=…]`:
  the primary that the Sentinels know as SERVICE, asked of them at every connect and checked
  with `ROLE`, so a connect during a failover waits for the new primary instead of writing to a
  demoted one. `user:password@` is the data nodes'; Sentinels with a password of their own
  (`requirepass`, or an ACL user) take `sentinel_password` and `sentinel_username`.
- Over TLS: `rediss://…` and `rediss+sentinel://…`, with the `ssl_*` options of
  `tickwire.core.tls` (a cluster's nodes and a Sentinel's primary are reached the same way).

`open_redis` gives a command connection (`RedisConnection`, or `ClusterConnection` for a cluster)
and `open_live` the subscription to the live pushes (one channel on one Redis; on a cluster, the
slot channels each master owns, with sharded pub/sub). Both raise RedisUnavailable when Redis
cannot be reached now; callers retry with backoff, and every retry finds the topology again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlencode, urlparse

from tickwire.core.channels import live_channel
from tickwire.core.commands import Arg, Command, RedisReplyError
from tickwire.core.errors import ConfigError, RedisUnavailable
from tickwire.core.races import AllFailed, all_within_grace, first_success
from tickwire.core.redis_cluster import DOWN_PROBE_S, ClusterConnection, Node, SlotMap
from tickwire.core.redis_pubsub import RedisSubscription, SubscriptionGroup
from tickwire.core.redis_slots import SLOTS, slot_live_channel
from tickwire.core.redis_wire import RedisAddress, RedisConnection
from tickwire.core.tls import TLS_OPTIONS
from tickwire.core.urls import redact_url

SENTINEL_SCHEME = "redis+sentinel"
#: Sentinels and data nodes alike over TLS, with `rediss://`'s options.
TLS_SENTINEL_SCHEME = "rediss+sentinel"
#: What a Sentinel URL's query may say.
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")

#: A connect asks the next seed (or Sentinel) if the last has not answered in this long
#: (seconds), without giving up on it: a hung one (a paused process, a lost host) answers
#: nothing until the whole timeout, and in a failover every reconnect waited that long for it.
SEED_STAGGER_S = 0.25


class RedisLink(Protocol):
    """What the publisher, the reader and the history lanes need of a connection."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def send(self, commands: Sequence[Command]) -> None: ...

    async def replies(self, n: int, timeout: float | None = None) -> list[Any]: ...

    async def pipeline(
        self, commands: Sequence[Command], timeout: float | None = None
    ) -> list[Any]: ...

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any: ...


class LiveSubscription(Protocol):
    def close(self) -> None: ...

    def wake(self) -> None: ...

    def ping(self) -> None: ...

    def take(self) -> list[Any]: ...

    async def wait(self, timeout: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class RedisTarget:
    #: The nodes to try in turn (Sentinels, with `service`); each carries db and credentials.
    seeds: tuple[RedisAddress, ...]
    #: Sentinel's name for the primary; None: the seeds are Redis nodes themselves.
    service: str | None = None
    #: The Sentinels' own credentials (None: asked without).
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str | RedisTarget) -> RedisTarget:
        if isinstance(url, RedisTarget):
            return url
        u = urlparse(url)
        sentinel = u.scheme in (SENTINEL_SCHEME, TLS_SENTINEL_SCHEME)
        if u.scheme == "unix" or ("," not in u.netloc and not sentinel):
            return cls((RedisAddress.parse(url),))
        creds, _, hosts = u.netloc.rpartition("@")
        creds = f"{creds}@" if creds else ""
        path = u.path.strip("/")
        service = None
        options: dict[str, str] = {}
        seed_scheme, seed_query = ("rediss" if u.scheme.startswith("rediss") else "redis"), u.query
        if sentinel:
            options = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
            takes = SENTINEL_OPTIONS + (TLS_OPTIONS if seed_scheme == "rediss" else ())
            unknown = sorted(set(options) - set(takes))
            if unknown:
                raise ConfigError(
                    f"unknown option {', '.join(unknown)} in {redact_url(url)!r} "
                    f"(this Sentinel URL takes {', '.join(takes)})"
                )
            seed_query = urlencode([(k, v) for k, v in options.items() if k in TLS_OPTIONS])
            service, _, path = path.partition("/")
            if not service:
                raise ConfigError(
                    f"no service name in {redact_url(url)!r} (use redis+sentinel://host:26379/SERVICE/db)"
                )
            service = unquote(service)
        elif u.scheme not in ("redis", "rediss"):
            raise ConfigError(f"unsupported Redis URL scheme in {redact_url(url)!r}")
        default_port = 26379 if service else 6379
        seeds = []
        for given in hosts.split(","):
            if not given:
                raise ConfigError(f"empty host in Redis URL {redact_url(url)!r}")
            host = given if ":" in given.rpartition("]")[2] else f"{given}:{default_port}"
            seeds.append(RedisAddress.parse(f"{seed_scheme}://{creds}{host}/{path}?{seed_query}"))
        return cls(
            tuple(seeds),
            service,
            options.get("sentinel_username") or None,
            options.get("sentinel_password") or None,
        )

    @property
    def db(self) -> int:
        return self.seeds[0].db

    def __str__(self) -> str:
        hosts = ",".join(f"{a.host}:{a.port}" for a in self.seeds)
        tls = self.seeds[0].tls is not None
        if self.service is not None:
            scheme = TLS_SENTINEL_SCHEME if tls else SENTINEL_SCHEME
            return f"{scheme}://{hosts}/{self.service}/{self.db}"
        if len(self.seeds) == 1:
            return str(self.seeds[0])
        return f"{'rediss' if tls else 'redis'}://{hosts}/{self.db}"


async def sentinel_primary(target: RedisTarget, timeout: float = 2.0) -> RedisAddress:
    """The primary's address as the first Sentinel to answer that knows `target.service` says
    (the next one asked after `SEED_STAGGER_S` or a failure, as for seeds)."""
    service = target.service
    assert service is not None
    username, password = target.sentinel_username, target.sentinel_password

    async def ask(sentinel: RedisAddress) -> RedisAddress:
        where = f"{sentinel.host}:{sentinel.port}"
        try:
            conn = await RedisConnection.open(
                replace(sentinel, db=0, username=username, password=password), timeout
            )
        except RedisUnavailable as exc:
            raise RedisUnavailable(f"{exc}{_sentinel_auth_hint(exc)}") from None
        try:
            reply = await conn.execute(
                "SENTINEL", "get-master-addr-by-name", service, timeout=timeout
            )
        except (RedisUnavailable, RedisReplyError) as exc:
            raise RedisUnavailable(f"{where}: {exc}{_sentinel_auth_hint(exc)}") from None
        finally:
            conn.close()
        if reply is None:
            raise RedisUnavailable(f"{where} knows no {service!r}")
        return replace(sentinel, host=reply[0].decode(), port=int(reply[1]))

    try:
        return await first_success(
            [partial(ask, s) for s in target.seeds], SEED_STAGGER_S, RedisUnavailable, _keep
        )
    except AllFailed as exc:
        raise RedisUnavailable(f"no Sentinel named the primary of {target}: {exc}") from None


def _sentinel_auth_hint(exc: Exception) -> str:
    """Where a Sentinel's password goes, if `exc` is about one (users put it in `user:pw@`)."""
    said = str(exc).upper()
    if "AUTH" not in said and "WRONGPASS" not in said:
        return ""
    return (
        " (a Sentinel's own password goes in the URL's ?sentinel_password=…, its ACL user in "
        "&sentinel_username=…; user:password@ is the data nodes')"
    )


def _keep(_answer: object) -> None:
    """Nothing to close: a spare answer that is only an address."""


async def _first_node(
    target: RedisTarget, timeout: float, learned: Sequence[RedisAddress] = ()
) -> RedisConnection:
    """A connection to the primary (Sentinel), or to the first seed that answers, then to the
    first node `learned` from a cluster's last slot map (the seeds may be the nodes that
    died)."""
    if target.service is not None:
        addr = await sentinel_primary(target, timeout)
        conn = await RedisConnection.open(addr, timeout)
        try:
            role = await conn.execute("ROLE", timeout=timeout)
        except BaseException:
            conn.close()
            raise
        if role[0] != b"master":
            conn.close()
            raise RedisUnavailable(
                f"{addr} is not a primary yet (role {role[0].decode()}): a failover is under way"
            )
        return conn
    opens = [partial(RedisConnection.open, seed, timeout) for seed in _candidates(target, learned)]
    try:
        return await first_success(opens, SEED_STAGGER_S, RedisUnavailable, RedisConnection.close)
    except AllFailed as exc:
        raise RedisUnavailable(str(exc)) from None


def _candidates(target: RedisTarget, learned: Sequence[RedisAddress]) -> list[RedisAddress]:
    return [*target.seeds, *(a for a in learned if a not in target.seeds)]


async def _cluster_slots(conn: RedisConnection, target: RedisTarget, timeout: float) -> Any:
    """The slot map if `conn`'s node is in cluster mode, else None."""
    info = await conn.execute("INFO", "cluster", timeout=timeout)
    if b"cluster_enabled:1" not in info:
        return None
    if target.db != 0:
        raise ConfigError(f"{target}: a Redis Cluster has only database 0")
    return SlotMap.parse(await conn.execute("CLUSTER", "SLOTS", timeout=timeout))


class RedisTopology:
    """Opens connections to one target, remembering what it found: a target that answered once
    as a single Redis (not a cluster, not Sentinel) is not asked again at each reconnect, so a
    reconnect to a Redis that accepts connections but does not answer (paused, overloaded) fails
    at its first command's timeout, as with a plain connection, not at a probe's."""

    def __init__(self, target: str | RedisTarget, timeout: float = 2.0) -> None:
        self.target = RedisTarget.parse(target)
        self.timeout = timeout
        #: Whether the seed answered as a single Redis (None: not asked yet). Sentinel names a
        #: primary, never a cluster.
        self.single: bool | None = True if self.target.service is not None else None
        #: A cluster's nodes as its last slot map named them.
        self.learned: list[RedisAddress] = []

    def _learn(self, slots: SlotMap) -> None:
        seed = self.target.seeds[0]
        self.learned = [replace(seed, host=h, port=p, db=0) for h, p in slots.nodes]

    async def open(self) -> RedisConnection | ClusterConnection:
        """A command connection: to the one Redis or primary, or to every master of a cluster."""
        t, timeout = self.target, self.timeout
        if self.single:
            return await _first_node(t, timeout, self.learned)
        conn, slots = await self._topology()
        if slots is None:
            return conn
        conn.close()
        return await ClusterConnection.open(slots, t.seeds[0], timeout)

    async def _topology(self) -> tuple[RedisConnection, SlotMap | None]:
        """A connection to the first node that answers, and its cluster's slot map (None: not a
        cluster). A node that takes the connection and answers nothing (a hung host, a paused
        process: the kernel accepts for it) is passed over, as one that refuses it is."""
        t, timeout = self.target, self.timeout
        # (Not with Sentinel, which names a primary, never a cluster: `single` from the start.)

        async def ask(node: RedisAddress) -> tuple[RedisConnection, SlotMap | None]:
            conn = await RedisConnection.open(node, timeout)
            try:
                return conn, await _cluster_slots(conn, t, timeout)
            except RedisUnavailable as exc:
                conn.close()
                raise RedisUnavailable(f"{node}: {exc}") from None
            except BaseException:
                conn.close()
                raise

        asks = [partial(ask, node) for node in _candidates(t, self.learned)]
        try:
            conn, slots = await first_success(asks, SEED_STAGGER_S, RedisUnavailable, _close_answer)
        except AllFailed as exc:
            raise RedisUnavailable(str(exc)) from None
        self.single = slots is None
        if slots is not None:
            self._learn(slots)
        return conn, slots

    async def open_live(self, max_buffer: int = 8 << 20) -> RedisSubscription | SubscriptionGroup:
        """The subscription to every append's live push (see `tickwire.feeds.store`)."""
        t, timeout = self.target, self.timeout
        slots = None
        if t.service is not None:
            addr = await sentinel_primary(t, timeout)
        elif self.single:
            addr = await _answering_seed(t, timeout)
        else:
            conn, slots = await self._topology()
            conn.close()
            if slots is None:
                addr = await _answering_seed(t, timeout)
        if slots is None:
            return await RedisSubscription.open(
                addr, [live_channel(t.db)], timeout=timeout, max_buffer=max_buffer
            )
        group = SubscriptionGroup([], set(range(SLOTS)))
        try:
            await self.follow_unfollowed(group, slots, max_buffer=max_buffer)
        except BaseException:
            group.close()
            raise
        if not group.nodes:
            raise RedisUnavailable(f"no master of the cluster answers: {group.lost}")
        return group

    async def follow_unfollowed(
        self,
        group: SubscriptionGroup,
        slots: SlotMap,
        down: Collection[Node] = (),
        max_buffer: int = 8 << 20,
    ) -> set[int]:
        """Subscribe the group's unfollowed slots on the masters `slots` names for them (those
        not `down`); returns the slots followed now. A master that cannot be subscribed stays
        unfollowed (the group says why in `lost`)."""
        owners: dict[Node, list[int]] = {}
        for slot in sorted(group.unfollowed):
            node = slots.owners[slot]
            if node not in down:
                owners.setdefault(node, []).append(slot)
        followed: set[int] = set()
        subs = await all_within_grace(
            [
                RedisSubscription.open(
                    replace(self.target.seeds[0], host=host, port=port, db=0),
                    [slot_live_channel(s) for s in mine],
                    timeout=self.timeout,
                    max_buffer=max_buffer,
                    sharded=True,
                )
                for (host, port), mine in owners.items()
            ],
            min(self.timeout, DOWN_PROBE_S),
            RedisUnavailable,
            RedisSubscription.close,
        )
        for (node, mine), sub in zip(owners.items(), subs, strict=True):
            if isinstance(sub, RedisSubscription):
                group.add(sub, node, mine)
                followed.update(mine)
            else:
                group.lost = f"{node[0]}:{node[1]}: {sub}"
        return followed


async def open_redis(
    target: str | RedisTarget, timeout: float = 2.0
) -> RedisConnection | ClusterConnection:
    """One command connection, the topology found afresh (see `RedisTopology`)."""
    return await RedisTopology(target, timeout).open()


async def _answering_seed(target: RedisTarget, timeout: float) -> RedisAddress:
    if len(target.seeds) == 1:
        return target.seeds[0]

    async def ask(seed: RedisAddress) -> RedisAddress:
        (await RedisConnection.open(seed, timeout)).close()
        return seed

    asks = [partial(ask, seed) for seed in target.seeds]
    try:
        return await first_success(asks, SEED_STAGGER_S, RedisUnavailable, _keep)
    except AllFailed as exc:
        raise RedisUnavailable(f"no seed of {target} answers: {exc}") from None


def _close_answer(answer: tuple[RedisConnection, SlotMap | None]) -> None:
    answer[0].close()


def live_channel_of(link: RedisLink, db: int, slot: int) -> str:
    """The live channel an append in `slot` pushes on over `link`."""
    return slot_live_channel(slot, db) if isinstance(link, ClusterConnection) else live_channel(db)
