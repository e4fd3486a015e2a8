"""The atomic append of channel batches: dense `seq`, the stream's `epoch`, `MAXLEN ~` retention.

One Lua call takes a whole flush: a batch for each of several streams. Inside Redis nothing
interleaves with it, so two publishers on one channel can never produce a duplicate or a hole.
The entry ID is `<seq>-0`: the stream ID *is* the sequence number, so resuming from a seq is a
plain XRANGE and a trimmed head is visible from the first ID alone.

A new epoch begins (meta hash fields `epoch`, `start` = its first seq) when:
- the meta hash is missing: first publish, or Redis lost its data;
- the meta survives but the stream is gone (someone deleted it): seq starts again at 1;
- the publisher saw a higher seq in this epoch than Redis now has: Redis rolled back (a crash lost
  the AOF tail). Seqs already handed out must never be reused under the same epoch, so the epoch
  changes and seq continues from what Redis kept (stream IDs must keep increasing).

A batch is appended at most once: the caller numbers its own events per channel (publisher id,
index of the batch's first event), and the meta hash keeps the last index applied per publisher
(field `w:<id>`). A batch written again because its reply was lost (a timeout, a cut connection)
skips what was already applied, instead of storing those events twice under new seqs. And a batch
applies only right after the one before it: the caller names the index its batch must follow, and
a call holding a batch whose predecessor is not applied (its append failed while this one was
already on its way) is refused whole with `TWBEHIND`, before it writes anything, so a publisher
can keep several flushes in flight without ever storing a channel's events out of order. Index 0
means "follows nothing": a publisher's first batch of a channel, and the first after events it
had to drop.

Each call is also pushed, in the same atomic step, on the live pub/sub channel (`live_channel`):
one message holding, for each batch that stored events, a line `<stream key> <epoch> <first seq>
<count>` and then its `count` events, one per line, as stored. Servers take live events from
there, without polling every stream, and read the streams only to catch up (start, reconnect, or
a hole in the pushed seqs). JSON from orjson never holds a raw newline, so newlines separate
events safely.

Why one call per flush, not per channel: each call costs Redis about 10 µs besides its events
(and each push message the server a parse); a simulator flush touches ~40 channels with one or
two events each, so per-channel calls were most of Redis's time and of the feed-to-server delay.
In Redis Cluster a call's keys must share a slot: the publisher then makes one call per symbol
(`PublisherConfig.one_call_per_symbol`), as every stream of a symbol shares its hash tag.

KEYS: stream and meta of each batch, in pairs (each channel at most once per call).
ARGV: candidate epoch, publisher id, live channel; then per batch: maxlen, epoch the caller last
saw ('' if none), highest seq the caller saw in it, the publisher's index of the first body, the
index the batch must follow (0: none), the number of bodies, then the encoded bodies (see
`tickwire.core.events.encode_body`). Returns {epoch, last seq, epoch start} per batch, flattened.
"""

from __future__ import annotations

# Each redis.call costs about a microsecond of Lua overhead on top of the command: one HMGET reads
# all of a channel's meta, one HSET writes it, and the last XADD trims (`MAXLEN ~` once per batch
# instead of per entry: it costs 8-23 % per XADD).
APPEND_LUA = r"""
local candidate, mark = ARGV[1], 'w:' .. ARGV[2]
local plans = {}
local a = 4
for k = 1, #KEYS, 2 do
  local stream, meta = KEYS[k], KEYS[k + 1]
  local m = redis.call('HMGET', meta, 'epoch', 'seq', 'start', mark)
  local epoch, seq, start = m[1], tonumber(m[2] or '0'), tonumber(m[3] or '1')
  local fresh = not epoch
  if epoch and seq > 0 and redis.call('EXISTS', stream) == 0 then
    fresh = true
    seq = 0
  end
  if epoch and ARGV[a + 1] == epoch and seq < tonumber(ARGV[a + 2]) then
    fresh = true
  end
  if fresh then
    epoch = candidate
    start = seq + 1
  end
  local first, n = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 5])
  local done = fresh and 0 or tonumber(m[4] or '0')
  if not fresh and done < tonumber(ARGV[a + 4]) then
    return redis.error_reply('TWBEHIND the batch before one of these is not applied')
  end
  local body = a + 6
  plans[#plans + 1] = {stream, meta, epoch, seq, start, fresh, ARGV[a],
    body + math.max(0, done - first + 1), body + n - 1, math.max(done, first + n - 1)}
  a = body + n
end
local out, push = {}, {}
for _, p in ipairs(plans) do
  local stream, meta, epoch, seq, start, fresh, maxlen, from, last, applied =
    p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]
  if from <= last then
    push[#push + 1] = stream .. ' ' .. epoch .. ' ' .. (seq + 1) .. ' ' .. (last - from + 1)
  end
  local tail = ',"epoch":"' .. epoch .. '","seq":'
  for i = from, last do
    seq = seq + 1
    local stored = ARGV[i] .. tail .. seq .. '}'
    push[#push + 1] = stored
    if i < last then
      redis.call('XADD', stream, seq .. '-0', 'd', stored)
    else
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0', 'd', stored)
    end
  end
  if fresh then
    redis.call('HSET', meta, 'epoch', epoch, 'start', start, 'seq', seq, mark, applied)
  else
    redis.call('HSET', meta, 'seq', seq, mark, applied)
  end
  out[#out + 1] = epoch
  out[#out + 1] = seq
  out[#out + 1] = start
end
if #push > 0 then
  redis.call('PUBLISH', ARGV[3], table.concat(push, '\n'))
end
return out
"""

#: Arguments of each batch before its bodies (see ARGV above).
BATCH_HEAD_ARGS = 6
