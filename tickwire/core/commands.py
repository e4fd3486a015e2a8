"""Redis commands as data, without any I/O: the argument type and the error reply."""

from __future__ import annotations

#: One argument of a command, as the wire protocol takes it.
Arg = bytes | str | int | float


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (the connection stays usable)."""
