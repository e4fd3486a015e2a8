"""Redis Cluster hash slots: a key's slot, a command's slot, and the live pub/sub channel of a slot.

A key's slot is CRC16 (XMODEM, which is `binascii.crc_hqx` from 0) of the key, or of its hash tag
(the text between the first `{` and the next `}` when not empty), modulo 16384. Every key of a
symbol carries the tag `{SYMBOL}` (`tickwire.core.channels.Channel.stream_key`), so one append call
per symbol (or per slot) stays in one slot.

Live pushes in a cluster go over sharded pub/sub (SPUBLISH), whose channels are hashed like keys,
and inside a script the channel must share the keys' slot. So there is one live channel per slot,
`tw:live:{<tag>}`, where `<tag>` is the first short string (in a fixed order) that hashes to that
slot; a server subscribes, on each master, to the channels of the slots that master owns.
"""

from __future__ import annotations

import binascii
import functools
from itertools import product

from tickwire.core.channels import KEY_PREFIX, Channel
from tickwire.core.commands import Arg, Command, Packed

SLOTS = 16384
_TAG_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key_slot(key: str | bytes) -> int:
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1 : end]
    return binascii.crc_hqx(k, 0) % SLOTS


@functools.cache
def channel_slot(channel: Channel) -> int:
    """A channel's slot (its symbol's hash tag): asked per channel per flush or read, so kept."""
    return key_slot(channel.stream_key)


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each slot, the first string of 1-4 characters (by length, then alphabet) hashing to
    it. Computed once per process (~0.1 s), only where a cluster is used."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    for length in range(1, 5):
        for chars in product(_TAG_ALPHABET, repeat=length):
            tag = "".join(chars)
            slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
                if not missing:
                    return tuple(t for t in tags if t is not None)
    raise AssertionError("no tag found for some slot")  # 62**4 strings cover every slot


def slot_live_channel(slot: int, db: int = 0) -> str:
    """The sharded pub/sub channel that carries the live pushes of appends in `slot`."""
    return f"{KEY_PREFIX}:live:{db}:{{{slot_tags()[slot]}}}"


#: Commands whose first key is not their first argument, and where it is.
_STREAMS_AT = {b"XREAD", b"XREADGROUP"}
_NUMKEYS_AT = {b"EVALSHA": 2, b"EVAL": 2, b"EVALSHA_RO": 2, b"EVAL_RO": 2, b"FCALL": 2}


def _as_bytes(a: Arg) -> bytes:
    if isinstance(a, bytes):
        return a
    return str(a).encode()


def command_slot(command: Command) -> int | None:
    """The slot a command's keys hash to (its first key: callers keep a command's keys in one
    slot), or None for a command without keys (PING, SCRIPT LOAD, INFO, …)."""
    if isinstance(command, Packed):
        return None if command.key is None else key_slot(command.key)
    name = _as_bytes(command[0]).upper()
    if name in _NUMKEYS_AT:
        at = _NUMKEYS_AT[name]
        if len(command) <= at + 1 or int(command[at]) == 0:
            return None
        return key_slot(_as_bytes(command[at + 1]))
    if name in _STREAMS_AT:
        for i, a in enumerate(command):
            if _as_bytes(a).upper() == b"STREAMS":
                return key_slot(_as_bytes(command[i + 1]))
        return None
    if name in (b"PING", b"SCRIPT", b"INFO", b"CLUSTER", b"ROLE", b"ASKING", b"READONLY"):
        return None
    if len(command) < 2:
        return None
    return key_slot(_as_bytes(command[1]))
