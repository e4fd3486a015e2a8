"""The atomic append of a channel batch: dense `seq`, the stream's `epoch`, `MAXLEN ~` retention.

One Lua call takes a whole batch for one stream. Inside Redis nothing interleaves with it, so two
publishers on one channel can never produce a duplicate or a hole. The entry ID is `<seq>-0`: the
stream ID *is* the sequence number, so resuming from a seq is a plain XRANGE and a trimmed head is
visible from the first ID alone.

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
a batch whose predecessor is not applied (its append failed while this one was already on its way)
is refused with `TWBEHIND`, so a publisher can keep several flushes in flight without ever storing
a channel's events out of order. Index 0 means "follows nothing": a publisher's first batch of a
channel, and the first after events it had to drop.

Each append is also pushed, in the same atomic step, on the live pub/sub channel (`live_channel`):
one message `<stream key> <epoch> <first seq>\n<event>\n<event>…` holding the events as stored.
Servers take live events from there, without polling every stream, and read the streams only to
catch up (start, reconnect, or a hole in the pushed seqs). JSON from orjson never holds a raw
newline, so the newline separates events safely.

KEYS: stream, meta.  ARGV: candidate epoch, maxlen, epoch the caller last saw ('' if none), highest
seq the caller saw in it, publisher id, the publisher's index of the first body, the live channel,
the index the batch must follow (0: none), then the encoded bodies (see `tickwire.core.events.encode_body`). Returns {epoch, last seq, epoch
start}.
"""

from __future__ import annotations

# Each redis.call costs about a microsecond of Lua overhead on top of the command, and this
# runs once per channel per flush: one HMGET reads all the meta, one HSET writes it, and the
# last XADD trims (`MAXLEN ~` once per batch instead of per entry: it costs 8-23 % per XADD).
APPEND_LUA = r"""
local stream, meta = KEYS[1], KEYS[2]
local mark = 'w:' .. ARGV[5]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'start', mark)
local epoch, seq, start = m[1], tonumber(m[2] or '0'), tonumber(m[3] or '1')
local fresh = not epoch
if epoch and seq > 0 and redis.call('EXISTS', stream) == 0 then
  fresh = true
  seq = 0
end
if epoch and ARGV[3] == epoch and seq < tonumber(ARGV[4]) then
  fresh = true
end
if fresh then
  epoch = ARGV[1]
  start = seq + 1
end
local first = tonumber(ARGV[6])
local done = fresh and 0 or tonumber(m[4] or '0')
if not fresh and done < tonumber(ARGV[8]) then
  return redis.error_reply('TWBEHIND the batch before this one is not applied')
end
local from = 9 + math.max(0, done - first + 1)
local last = #ARGV
local tail = ',"epoch":"' .. epoch .. '","seq":'
local stored = {}
for i = from, last do
  seq = seq + 1
  local body = ARGV[i] .. tail .. seq .. '}'
  stored[#stored + 1] = body
  if i < last then
    redis.call('XADD', stream, seq .. '-0', 'd', body)
  else
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], seq .. '-0', 'd', body)
  end
end
local applied = math.max(done, first + last - 9)
if fresh then
  redis.call('HSET', meta, 'epoch', epoch, 'start', start, 'seq', seq, mark, applied)
else
  redis.call('HSET', meta, 'seq', seq, mark, applied)
end
if #stored > 0 then
  redis.call('PUBLISH', ARGV[7],
    stream .. ' ' .. epoch .. ' ' .. (seq - #stored + 1) .. '\n' .. table.concat(stored, '\n'))
end
return {epoch, seq, start}
"""
