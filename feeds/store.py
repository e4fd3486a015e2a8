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
skips what was already applied, instead of storing those events twice under new seqs.

KEYS: stream, meta.  ARGV: candidate epoch, maxlen, epoch the caller last saw ('' if none), highest
seq the caller saw in it, publisher id, the publisher's index of the first body, then the encoded
bodies (see `tickwire.core.events.encode_body`). Returns {epoch, last seq, epoch start}.
"""

from __future__ import annotations

APPEND_LUA = """
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
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
  redis.call('HSET', meta, 'epoch', epoch, 'start', seq + 1)
end
local mark = 'w:' .. ARGV[5]
local first = tonumber(ARGV[6])
local done = fresh and 0 or tonumber(redis.call('HGET', meta, mark) or '0')
local tail = ',"epoch":"' .. epoch .. '","seq":'
for i = 7 + math.max(0, done - first + 1), #ARGV do
  seq = seq + 1
  redis.call('XADD', stream, seq .. '-0', 'd', ARGV[i] .. tail .. seq .. '}')
end
-- One approximate trim per batch instead of per entry (it costs 8-23 % when done per XADD).
redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[2])
redis.call('HSET', meta, 'seq', seq, mark, math.max(done, first + #ARGV - 7))
return {epoch, seq, tonumber(redis.call('HGET', meta, 'start') or '1')}
"""
