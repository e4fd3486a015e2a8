"""Stored history as the server reads it, sans-I/O: meta hashes and stream entries into batches."""

from __future__ import annotations

from typing import Any

from tickwire.core.channels import Channel
from tickwire.core.commands import Arg, NodeDown, RedisReplyError, wrong_type
from tickwire.core.errors import RedisUnavailable
from tickwire.core.stream import StreamPosition, epoch_of, seq_of
from tickwire.server.batch import Batch

#: A channel's meta: its epoch, last seq, and the epoch's first seq.
Meta = tuple[str, int, int]

# A channel stored behind what a server already read in the same epoch lost its tail (a failover
# promoted a replica that lacked it, an AOF crash). Whoever sees that starts a new epoch, so the
# next append, by any publisher, can never give a lost seq to a different event: the epoch
# changes only if the meta is still the one the server saw go back. Answers the meta after.
# KEYS: meta. ARGV: the epoch followed, the seq read in it, the new epoch.
FENCE_LUA = r"""
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'start')
local seq = tonumber(m[2] or '0')
if m[1] == ARGV[1] and seq < tonumber(ARGV[2]) then
  local start = string.format('%d', seq + 1)
  -- Written by this node now: the append script's promotion check (`rid`) has nothing to add.
  local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'start', start, 'rid', rid)
  return {ARGV[3], m[2] or '0', start}
end
return m
"""


def fence_commands(rolled_back: dict[Channel, StreamPosition], new_epoch: str) -> list[list[Arg]]:
    return [
        ["EVAL", FENCE_LUA, 1, c.meta_key, pos.epoch, pos.seq, new_epoch]
        for c, pos in rolled_back.items()
    ]


def meta_commands(channels: list[Channel]) -> list[list[Arg]]:
    return [["HMGET", c.meta_key, "epoch", "seq", "start"] for c in channels]


def parse_metas(
    channels: list[Channel], replies: list[Any], foreign: list[Channel] | None = None
) -> dict[Channel, Meta | None]:
    """The metas of `channels` by their replies; a channel whose cluster master is down
    (`NodeDown`) is left out, to be compared once it is back, and so is one whose meta is not
    what the append script writes (edited by hand, or a key of another type: its next append
    writes it anew, or refuses its events), added to `foreign` if given."""
    out: dict[Channel, Meta | None] = {}
    for c, reply in zip(channels, replies, strict=True):
        if isinstance(reply, NodeDown):
            continue
        if isinstance(reply, RedisReplyError) and not wrong_type(reply):
            # E.g. LOADING while Redis replays its AOF: back off and read again.
            raise RedisUnavailable(f"meta read refused: {reply}")
        try:
            out[c] = _meta(reply)
        except ValueError:
            if foreign is not None:
                foreign.append(c)
    return out


def _meta(reply: Any) -> Meta | None:
    """A meta from its HMGET reply; ValueError (UnicodeDecodeError is one) if it is not one the
    append script writes, a key of another type included."""
    if wrong_type(reply):
        raise ValueError(reply)
    epoch, seq, start = reply
    return None if epoch is None else (epoch.decode(), int(seq or 0), int(start or 1))


def to_batches(channel: Channel, entries: list[Any]) -> list[Batch]:
    """Stream entries → batches of consecutive seqs in one epoch (split at any hole or epoch)."""
    if not entries:
        return []
    first_seq = seq_of(entries[0][0])
    first_epoch = epoch_of(entries[0][1][1])
    if (
        seq_of(entries[-1][0]) - first_seq == len(entries) - 1
        and epoch_of(entries[-1][1][1]) == first_epoch
    ):
        # The usual case: one run. Epochs never come back, so equal ends mean one epoch.
        return [Batch(channel, first_epoch, first_seq, [fields[1] for _, fields in entries])]
    # Runs of (epoch, first seq, bodies), split where a seq skips or the epoch changes.
    runs: list[tuple[str, int, list[bytes]]] = []
    last = -1
    for entry_id, fields in entries:
        seq, body = seq_of(entry_id), fields[1]
        epoch = epoch_of(body)
        if runs and seq == last + 1 and epoch == runs[-1][0]:
            runs[-1][2].append(body)
        else:
            runs.append((epoch, seq, [body]))
        last = seq
    return [Batch(channel, epoch, first, bodies) for epoch, first, bodies in runs]
