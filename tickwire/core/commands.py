"""Redis commands as data, without any I/O: the argument type, packed commands, the error replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tickwire.core.errors import RedisUnavailable

#: One argument of a command, as the wire protocol takes it.
Arg = bytes | str | int | float


@dataclass(frozen=True, slots=True)
class Packed:
    """A command already in the wire protocol's bytes (RESP), and its first key (None: none).

    A hot caller that builds its command from parts framed once (keys, constant arguments)
    sends this: packing ~200 arguments a call one by one was a sixth of a paced feed's CPU."""

    wire: bytes
    key: bytes | None


#: A command as connections take it: its arguments, or packed already.
Command = Sequence[Arg] | Packed


def bulk(value: bytes) -> bytes:
    """One argument framed as RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array_head(count: int) -> bytes:
    """The head of a command of `count` arguments."""
    return b"*%d\r\n" % count


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (the connection stays usable)."""


def wrong_type(reply: object) -> bool:
    """Whether `reply` is Redis's WRONGTYPE error: the key holds another type than the command
    works on (someone else wrote it)."""
    return isinstance(reply, RedisReplyError) and str(reply).startswith("WRONGTYPE")


class NodeDown(RedisReplyError, RedisUnavailable):
    """In place of a reply a cluster's master could not give: it is down (unreachable, its
    connection lost, or no reply within the timeout). Whether the command was applied is not
    known. Also a `RedisUnavailable`, for callers that reconnect on any failure."""

    def __init__(self, node: tuple[str, int], why: str) -> None:
        super().__init__(f"TWNODEDOWN {node[0]}:{node[1]} is down: {why}")
        self.node = node
