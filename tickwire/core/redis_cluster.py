"""A Redis Cluster as one connection: each command goes to the master that owns its slot.

`ClusterConnection` has the interface of `RedisConnection` (send, replies, pipeline, execute),
so the publisher, the server's reader and its history lanes use a cluster exactly as they use
one Redis: commands are written to their slots' masters in one write per master, and replies come
back in the order the commands were sent.

A master that cannot be reached (at open, or its connection fails or stops answering) is *down*:
the commands of its slots are answered with `NodeDown` in place of their replies, at once, and
the other masters go on. `refresh` asks a live node for the slot map again and connects to the
masters it names, so a failover's promoted replica takes its slots over. `refresh_soon` does that
in a task of its own, at most every `CLUSTER_REFRESH_S`, so that no caller waits on a master that
does not answer (a dead host takes the whole connect timeout); `generation` counts the refreshes
that changed something. `pipeline` and `execute` call it while a master is down, so an occasional
user (history reads) needs nothing more; the publisher and the reader, which write with `send`,
call it themselves. A caller that treats `NodeDown` as the `RedisUnavailable` it also is
reconnects, as before.

Other topology changes are handled by throwing the connection away, as after any failure:
- `MOVED` (the slot has a new owner: a finished migration, or a failover seen first from a live
  node) comes back to the caller as the error reply it is, and marks the connection closed; the
  caller's usual reconnect loads the slot map again.
- `ASK` (the slot is migrating and this key is already on the target) is followed here at once:
  `ASKING` and the command again on the target, whose reply takes the place of the error.
The connection is closed once every master is down.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from tickwire.core.commands import Arg, Command, NodeDown, RedisReplyError
from tickwire.core.errors import RedisUnavailable
from tickwire.core.races import all_within_grace
from tickwire.core.redis_slots import SLOTS, command_slot
from tickwire.core.redis_wire import RedisAddress, RedisConnection

Node = tuple[str, int]

#: How often a caller with a master down asks for the slot map again (`refresh`): a failover
#: promotes a replica within about `cluster-node-timeout` plus a second, and a refresh costs a
#: connection and one CLUSTER SLOTS.
CLUSTER_REFRESH_S = 0.25
#: A master that has not answered this long after the other masters of the same pipeline did
#: is taken for down then, not at the caller's reply timeout (seconds): a hung host or a lost
#: network leaves its connection open and silent, and every master's replies waited for it.
#: Redis answers in microseconds to milliseconds; one stalled this long (a fork, a slow disk
#: under `appendfsync always`) costs a reconnect and its commands answered `NodeDown`, which
#: callers write again once it is up.
STRAGGLER_S = 1.0
#: How long a refresh waits for a master that was down already to answer, and an open or a
#: refresh for one after another has answered (seconds, or the connection's timeout if
#: shorter). A dead one refuses at once; a hung one (a paused process, a lost network) held each
#: refresh for the whole timeout, and with it the next one, the one that finds a failover's
#: promoted replica; and every reconnect during the failover as long. A master up answers a
#: PING in well under this.
DOWN_PROBE_S = 0.5


class SlotMap:
    """Which master owns each slot, from `CLUSTER SLOTS`."""

    def __init__(self, owners: list[Node], nodes: Sequence[Node] = ()) -> None:
        if len(owners) != SLOTS:
            raise ValueError("a slot map covers every slot")
        self.owners = owners
        #: Every node the map names, replicas too: where to ask next time if the seeds are gone.
        self.nodes = sorted(set(nodes) | set(owners))

    @classmethod
    def parse(cls, reply: list[Any]) -> SlotMap:
        owners: list[Node | None] = [None] * SLOTS
        nodes: set[Node] = set()
        for start, end, master, *replicas in reply:
            node = (master[0].decode(), int(master[1]))
            nodes.update((r[0].decode(), int(r[1])) for r in replicas)
            for slot in range(int(start), int(end) + 1):
                owners[slot] = node
        uncovered = sum(o is None for o in owners)
        if uncovered:
            # cluster_state is fail while slots are unassigned; so is every command on them.
            raise RedisUnavailable(f"the cluster does not cover {uncovered} slots")
        return cls([o for o in owners if o is not None], sorted(nodes))

    @property
    def masters(self) -> list[Node]:
        return sorted(set(self.owners))

    def slots_of(self, node: Node) -> list[int]:
        return [s for s, o in enumerate(self.owners) if o == node]


class ClusterConnection:
    """Connections to every master of a cluster, used by one task at a time."""

    def __init__(
        self,
        slots: SlotMap,
        nodes: dict[Node, RedisConnection],
        template: RedisAddress,
        down: dict[Node, str] | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.slots = slots
        self._nodes = nodes
        self._template = template
        self._timeout = timeout
        #: Masters that cannot be reached now, and why.
        self.down: dict[Node, str] = dict(down or {})
        #: Counts the refreshes that brought a master up or changed the slot map: a caller
        #: that compares it knows when to read again what it skipped.
        self.generation = 0
        #: When `refresh_soon` may start the next refresh (`time.monotonic`), the one running,
        #: and why the last one failed (None: it did not).
        self._refresh_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self.refresh_error: str | None = None
        #: Where each command sent and not yet answered went, in order: its master and the
        #: connection it was written on (None: the master was down, nothing was written).
        self._order: deque[tuple[Node, RedisConnection | None, Command]] = deque()
        #: Set by a MOVED reply: the slot map is out of date.
        self._stale = False
        #: Connections for commands sent again after an ASK, by target node.
        self._asking: dict[Node, RedisConnection] = {}
        self._closed = False
        #: See `STRAGGLER_S` (None: wait for every master up to the reply timeout).
        self.straggler_s: float | None = STRAGGLER_S

    @classmethod
    async def open(
        cls, slots: SlotMap, template: RedisAddress, timeout: float = 2.0
    ) -> ClusterConnection:
        """Connections to the masters that answer a PING (all at once: a dead host takes the
        whole connect timeout, a hung one the PING's); RedisUnavailable if none does."""
        nodes, down = await _open_masters(template, slots.masters, timeout)
        if not nodes:
            raise RedisUnavailable(f"no master of the cluster answers: {'; '.join(down.values())}")
        return cls(slots, nodes, template, down, timeout)

    @staticmethod
    async def _connect(template: RedisAddress, node: Node, timeout: float) -> RedisConnection:
        return await RedisConnection.open(
            replace(template, host=node[0], port=node[1], db=0), timeout
        )

    @property
    def closed(self) -> bool:
        return self._closed or self._stale or len(self.down) >= len(self.slots.masters)

    def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        for c in (*self._nodes.values(), *self._asking.values()):
            c.close()

    def node_of(self, command: Command) -> Node:
        slot = command_slot(command)
        if slot is not None:
            return self.slots.owners[slot]
        # A command without a key: any master that is up.
        down = self.down
        return next((n for n in self.slots.masters if n not in down), self.slots.masters[0])

    def slot_down(self, slot: int) -> bool:
        """Whether the master that owns `slot` is down."""
        return bool(self.down) and self.slots.owners[slot] in self.down

    async def refresh(self) -> bool:
        """Load the slot map from a master that is up (or any node the map names) and connect
        to the masters it names that are down or new (a failover's promoted replica). Returns
        whether a master came up or the map changed. Commands sent before keep their nodes."""
        reply = None
        problems: list[str] = []
        candidates = [n for n in self.slots.masters if n not in self.down]
        candidates += [n for n in self.slots.nodes if n not in candidates]
        for node in candidates:
            try:
                conn = await self._connect(self._template, node, self._timeout)
            except RedisUnavailable as exc:
                problems.append(str(exc))
                continue
            try:
                reply = await conn.execute("CLUSTER", "SLOTS", timeout=self._timeout)
                break
            except (RedisUnavailable, RedisReplyError) as exc:
                problems.append(f"{node[0]}:{node[1]}: {exc}")
            finally:
                conn.close()
        if reply is None:
            raise RedisUnavailable(f"no node gave the slot map: {'; '.join(problems)}")
        slots = SlotMap.parse(reply)
        changed = slots.owners != self.slots.owners
        wanted = [
            node
            for node in slots.masters
            if node in self.down or (known := self._nodes.get(node)) is None or known.closed
        ]
        opened, down = await _open_masters(self._template, wanted, self._timeout, self.down)
        if self._closed:
            for conn in opened.values():
                conn.close()
            opened = {}
        self._nodes.update(opened)
        came_up = bool(opened)
        self.slots = slots
        self.down = down
        if changed or came_up:
            self.generation += 1
        return changed or came_up

    def refresh_soon(self, *, force: bool = False) -> None:
        """Start a `refresh` in a task of its own, if a master is down (or `force`), none is
        running and the last began `CLUSTER_REFRESH_S` ago or more. Its outcome shows in
        `generation`, `down` and `refresh_error`; the caller never waits for it."""
        if self._closed or not (force or self.down):
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        now = time.monotonic()
        if now < self._refresh_at:
            return
        self._refresh_at = now + CLUSTER_REFRESH_S
        self._refreshing = asyncio.create_task(self._refresh(), name="tickwire-cluster-refresh")

    async def _refresh(self) -> None:
        try:
            await self.refresh()
            self.refresh_error = None
        except RedisUnavailable as exc:
            self.refresh_error = str(exc)

    def lose(self, node: Node, why: str) -> None:
        """Take `node` for down (also when another link to it found it so): its commands are
        answered `NodeDown` until a refresh finds it, or the new master of its slots, up."""
        self.down[node] = why
        conn = self._nodes.get(node)
        if conn is not None:
            conn.close()

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any:
        (reply,) = await self.pipeline([args], timeout=timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def execute_on_all(self, *args: Arg, timeout: float | None = None) -> list[Any]:
        """One command on every master that is up (SCRIPT LOAD: each keeps its own script
        cache; a master that comes up later answers NOSCRIPT, and the caller loads it again)."""
        if self._order:
            raise RuntimeError("replies are owed: the masters' connections are not idle")
        out = []
        for node in self.slots.masters:
            if node in self.down:
                continue
            try:
                out.append(await self._nodes[node].execute(*args, timeout=timeout))
            except RedisUnavailable as exc:
                self.lose(node, str(exc))
                raise NodeDown(node, str(exc)) from None
        return out

    async def pipeline(
        self, commands: Sequence[Command], timeout: float | None = None
    ) -> list[Any]:
        if self.down:
            self.refresh_soon()
        self.send(commands)
        return await self.replies(len(commands), timeout)

    def send(self, commands: Sequence[Command]) -> None:
        if self.closed:
            raise RedisUnavailable(
                "cluster connection is closed (every master was lost, or a slot moved)"
            )
        per_node: dict[Node, list[Command]] = {}
        order = self._order
        down, nodes = self.down, self._nodes
        for command in commands:
            node = self.node_of(command)
            if node in down:
                order.append((node, None, command))
            else:
                order.append((node, nodes[node], command))
                per_node.setdefault(node, []).append(command)
        for node, batch in per_node.items():
            try:
                nodes[node].send(batch)
            except RedisUnavailable as exc:
                # Its replies are owed by a closed connection: NodeDown, in `replies`.
                self.lose(node, str(exc))
            except BaseException:
                self.close()
                raise

    async def replies(self, n: int, timeout: float | None = None) -> list[Any]:
        """The next `n` replies; a master that fails or does not answer within `timeout`
        answers `NodeDown` for its share (and for everything sent to it until `refresh`)."""
        if n > len(self._order):
            raise RuntimeError(f"{n} replies asked for, {len(self._order)} owed")
        taken = [self._order.popleft() for _ in range(n)]
        counts: dict[tuple[Node, RedisConnection | None], int] = {}
        for node, conn, _ in taken:
            counts[node, conn] = counts.get((node, conn), 0) + 1
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        got: dict[tuple[Node, RedisConnection | None], deque[Any]] = {}
        straggler = self.straggler_s
        #: The masters whose replies were taken.
        answered: set[Node] = set()
        try:
            for (node, conn), k in counts.items():
                why = self.down.get(node, "its connection was lost")
                if conn is not None:
                    # (A connection lost since still gives the replies it read before.)
                    # After another master's timeout, a short grace: what is here is taken.
                    if straggler is not None and await self._silent(
                        counts, node, conn, deadline, answered, straggler
                    ):
                        why = f"no reply within {straggler} s of the other masters'"
                        conn.close()
                        if self._nodes.get(node) is conn:
                            self.lose(node, why)
                        got[node, conn] = deque(NodeDown(node, why) for _ in range(k))
                        continue
                    left = None if deadline is None else max(deadline - loop.time(), 0.05)
                    try:
                        got[node, conn] = deque(await conn.replies(k, timeout=left))
                        answered.add(node)
                        continue
                    except RedisUnavailable as exc:
                        why = str(exc)
                        if self._nodes.get(node) is conn:
                            self.lose(node, why)
                got[node, conn] = deque(NodeDown(node, why) for _ in range(k))
            out = [got[node, conn].popleft() for node, conn, _ in taken]
            for i, reply in enumerate(out):
                if isinstance(reply, RedisReplyError) and not isinstance(reply, NodeDown):
                    out[i] = await self._redirected(reply, taken[i][2])
        except BaseException:
            self.close()
            raise
        if len(self.down) >= len(self.slots.masters):
            self.close()
            raise RedisUnavailable(
                f"every master of the cluster is down: {'; '.join(self.down.values())}"
            )
        return out

    async def _silent(
        self,
        counts: dict[tuple[Node, RedisConnection | None], int],
        node: Node,
        conn: RedisConnection,
        deadline: float | None,
        answered: set[Node],
        straggler: float,
    ) -> bool:
        """Wait for `node`'s replies on `conn`: True once the other masters have answered and it
        has not, `straggler` seconds on; False when they are in, or the deadline is near enough
        for the reply timeout to decide. A pipeline to `node` alone asks another master for a
        PING instead: whether the cluster answers, and this master does not."""
        loop = asyncio.get_running_loop()
        k = counts[node, conn]
        while deadline is None or deadline - loop.time() > straggler:
            if await conn.wait_ready(k, straggler):
                return False
            if _others_answered(counts, node, answered):
                return True
            alone = not any(n != node and c is not None for n, c in counts)
            if alone and await self._another_answers(node, straggler) and conn.ready < k:
                return True
        return False

    async def _another_answers(self, silent: Node, timeout: float) -> bool:
        """Whether a master up other than `silent` answers a PING within `timeout`, on a
        connection of its own (those in use may owe replies)."""
        for node in self.slots.masters:
            if node == silent or node in self.down:
                continue
            try:
                (await _answering(self._template, node, timeout)).close()
                return True
            except (RedisUnavailable, RedisReplyError):
                continue
        return False

    async def _redirected(self, error: RedisReplyError, command: Command) -> Any:
        """The reply in place of an ASK (asked again where the key now is), or the error as it
        is (a MOVED also marks the slot map out of date)."""
        text = str(error)
        if text.startswith("MOVED "):
            self._stale = True
            return error
        if not text.startswith("ASK "):
            return error
        host, _, port = text.split()[2].rpartition(":")
        node = (host, int(port))
        # A connection of its own per target: the target's pipelined connection may owe
        # replies to commands sent after this one, which ASKING's would be taken for.
        conn = self._asking.get(node)
        if conn is None or conn.closed:
            conn = self._asking[node] = await RedisConnection.open(
                replace(self._template, host=host, port=int(port), db=0)
            )
        _, reply = await conn.pipeline([["ASKING"], command])
        return reply


def _others_answered(
    counts: dict[tuple[Node, RedisConnection | None], int], straggler: Node, taken: set[Node]
) -> bool:
    """Whether every other master written to in the pipeline has answered (its replies
    `taken`, or all arrived) or lost its connection, one at least answering: then `straggler`
    alone is silent."""
    some = False
    for (node, conn), k in counts.items():
        if node == straggler or conn is None:
            continue
        if node in taken or conn.ready >= k:
            some = True
        elif not conn.closed:
            return False
    return some


async def _open_masters(
    template: RedisAddress,
    nodes: Sequence[Node],
    timeout: float,
    down_before: Collection[Node] = (),
) -> tuple[dict[Node, RedisConnection], dict[Node, str]]:
    """Connections to those of `nodes` that answer a PING, and why each other does not. All at
    once, not in turn: a dead host takes the whole connect timeout, a hung one the PING's.
    Those `down_before`, and all once one has answered, get `DOWN_PROBE_S` at most."""
    probe = min(timeout, DOWN_PROBE_S)
    opened = await all_within_grace(
        [_answering(template, node, probe if node in down_before else timeout) for node in nodes],
        probe,
        RedisUnavailable,
        RedisConnection.close,
    )
    conns: dict[Node, RedisConnection] = {}
    down: dict[Node, str] = {}
    for node, conn_or_error in zip(nodes, opened, strict=True):
        if isinstance(conn_or_error, RedisConnection):
            conns[node] = conn_or_error
        elif isinstance(conn_or_error, RedisUnavailable):
            down[node] = str(conn_or_error)
        else:  # cut off (TimeoutError)
            down[node] = f"{node[0]}:{node[1]}: {conn_or_error}"
    return conns, down


async def _answering(template: RedisAddress, node: Node, timeout: float) -> RedisConnection:
    """A connection to `node` that has answered a PING: a paused or overloaded master accepts
    connections (the kernel does) and answers nothing."""
    conn = await ClusterConnection._connect(template, node, timeout)
    try:
        await conn.execute("PING", timeout=timeout)
    except BaseException:
        conn.close()
        raise
    return conn
