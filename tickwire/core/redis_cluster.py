"""A Redis Cluster as one connection: each command goes to the master that owns its slot.

`ClusterConnection` has the interface of `RedisConnection` (send, replies, pipeline, execute),
so the publisher, the server's reader and its history lanes use a cluster exactly as they use
one Redis: commands are written to their slots' masters in one write per master, and replies come
back in the order the commands were sent.

Topology changes are handled by throwing the connection away, as after any failure:
- `MOVED` (the slot has a new owner: a failover or a finished migration) comes back to the caller
  as the error reply it is, and marks the connection closed; the caller's usual reconnect loads
  the slot map again.
- `ASK` (the slot is migrating and this key is already on the target) is followed here at once:
  `ASKING` and the command again on the target, whose reply takes the place of the error.
A failure on any master's connection closes them all: the replies still owed could not be put
back in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tickwire.core.commands import Arg, Command, RedisReplyError
from tickwire.core.errors import RedisTimeout, RedisUnavailable
from tickwire.core.redis_slots import SLOTS, command_slot
from tickwire.core.redis_wire import RedisAddress, RedisConnection

Node = tuple[str, int]


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
        self, slots: SlotMap, nodes: dict[Node, RedisConnection], template: RedisAddress
    ) -> None:
        self.slots = slots
        self._nodes = nodes
        self._template = template
        #: Where each command sent and not yet answered went, in order.
        self._order: deque[tuple[Node, Command]] = deque()
        self._any = slots.masters[0]
        #: Set by a MOVED reply: the slot map is out of date.
        self._stale = False
        #: Connections for commands sent again after an ASK, by target node.
        self._asking: dict[Node, RedisConnection] = {}
        self._closed = False

    @classmethod
    async def open(
        cls, slots: SlotMap, template: RedisAddress, timeout: float = 2.0
    ) -> ClusterConnection:
        nodes: dict[Node, RedisConnection] = {}
        try:
            for host, port in slots.masters:
                nodes[(host, port)] = await RedisConnection.open(
                    replace(template, host=host, port=port, db=0), timeout
                )
        except BaseException:
            for c in nodes.values():
                c.close()
            raise
        return cls(slots, nodes, template)

    @property
    def closed(self) -> bool:
        return self._closed or self._stale or any(c.closed for c in self._nodes.values())

    def close(self) -> None:
        self._closed = True
        for c in (*self._nodes.values(), *self._asking.values()):
            c.close()

    def node_of(self, command: Command) -> Node:
        slot = command_slot(command)
        return self._any if slot is None else self.slots.owners[slot]

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any:
        (reply,) = await self.pipeline([args], timeout=timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def execute_on_all(self, *args: Arg, timeout: float | None = None) -> list[Any]:
        """One command on every master (SCRIPT LOAD: each keeps its own script cache)."""
        if self._order:
            raise RuntimeError("replies are owed: the masters' connections are not idle")
        return [await c.execute(*args, timeout=timeout) for c in self._nodes.values()]

    async def pipeline(
        self, commands: Sequence[Command], timeout: float | None = None
    ) -> list[Any]:
        self.send(commands)
        return await self.replies(len(commands), timeout)

    def send(self, commands: Sequence[Command]) -> None:
        if self.closed:
            raise RedisUnavailable("cluster connection is closed (a node was lost or moved)")
        per_node: dict[Node, list[Command]] = {}
        order = self._order
        for command in commands:
            node = self.node_of(command)
            order.append((node, command))
            per_node.setdefault(node, []).append(command)
        try:
            for node, batch in per_node.items():
                self._nodes[node].send(batch)
        except BaseException:
            self.close()
            raise

    async def replies(self, n: int, timeout: float | None = None) -> list[Any]:
        if n > len(self._order):
            raise RuntimeError(f"{n} replies asked for, {len(self._order)} owed")
        taken = [self._order.popleft() for _ in range(n)]
        counts: dict[Node, int] = {}
        for node, _ in taken:
            counts[node] = counts.get(node, 0) + 1
        try:
            async with asyncio.timeout(timeout):
                got = {
                    node: deque(await self._nodes[node].replies(k)) for node, k in counts.items()
                }
                out = [got[node].popleft() for node, _ in taken]
                for i, reply in enumerate(out):
                    if isinstance(reply, RedisReplyError):
                        out[i] = await self._redirected(reply, taken[i][1])
        except TimeoutError:
            self.close()
            raise RedisTimeout(f"no reply from the cluster within {timeout} s") from None
        except BaseException:
            self.close()
            raise
        return out

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
