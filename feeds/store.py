"""The atomic append of a channel batch: dense `seq`, the stream's `epoch`, `MAXLEN ~` retention.

One Lua call takes a whole batch for one stream. Inside Redis nothing interleaves with it, so two
publishers on one channel can never produce a duplicate or a hole. The entry ID is `<seq>-0`: the
stream ID *is* the sequence number, so resuming from a seq is a plain XRANGE and a trimmed head is
visible from the first ID alone.

The epoch is created when the channel's meta hash is missing (first publish, or Redis lost its
data) or when the meta survives but the stream is gone (someone deleted it); the new epoch starts
again at seq 1.
"""

from __future__ import annotations

APPEND_LUA = """
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
if (not epoch) or (seq > 0 and redis.call('EXISTS', stream) == 0) then
  epoch = ARGV[1]
  seq = 0
  redis.call('HSET', meta, 'epoch', epoch)
end
local maxlen = ARGV[2]
local tail = ',"epoch":"' .. epoch .. '","seq":'
for i = 3, #ARGV do
  seq = seq + 1
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0', 'd', ARGV[i] .. tail .. seq .. '}')
end
redis.call('HSET', meta, 'seq', seq)
return {epoch, seq}
"""
