"""The atomic append of channel batches: dense `seq`, the stream's `epoch`, `MAXLEN ~` retention.

One Lua call takes a whole flush: a batch for each of several streams. Inside Redis nothing
interleaves with it, so two publishers on one channel can never produce a duplicate or a hole.
The entry ID is `<seq>-0`: the stream ID *is* the sequence number, so resuming from a seq is a
plain XRANGE and a trimmed head is visible from the first ID alone.

A new epoch begins (meta hash fields `epoch`, `start` = its first seq) when:
- the meta hash is missing: first publish, or Redis lost its data (if the stream is still there,
  its meta alone deleted, seq goes on after the stream's last ID);
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
means "follows nothing": a publisher's first batch of a channel, the first after events it had to
drop, and any batch whose predecessor Redis has already acknowledged (Redis holds it, or lost it
in a crash or failover: waiting for it would hold the channel back for ever).

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

Bodies usually come complete: the publisher predicts each channel's epoch and seqs (from the
replies it has had and what it has sent since) and appends the `,"epoch":"…","seq":N}` tail
itself, so the script stores and pushes its arguments as they are. It checks the prediction
against the meta hash first; when it is wrong (another publisher wrote, a new epoch began, a
retry skips events already applied) it cuts the predicted tail off and appends the right one, as
it does for bare bodies. Building every stored string in Lua was a third of Redis's time per
event.

KEYS: stream and meta of each batch, in pairs (each channel at most once per call).
ARGV: candidate epoch, publisher id, live channel; then per batch: maxlen, epoch the caller last
saw ('' if none), highest seq the caller saw in it, the publisher's index of the first body, the
index the batch must follow (0: none), the number of bodies, the epoch and the seq of the first
body that the bodies' tails predict (seq 0: the bodies are bare, see
`tickwire.core.events.encode_body`), then the bodies. Numbers may have leading zeros. Returns
{k, epoch, last seq} for each batch (the k-th of the call) that did not end where its tails
predicted (bare bodies: always), flattened: a paced feed's usual reply is empty, and reading a
triple per batch was a tenth of its publish. A batch whose stream or meta key holds another type
(someone wrote there) is refused alone, with nothing of it written: {-k, Redis's error, 0}; the
rest of the call goes on, so one bad key never holds back other channels.
"""

from __future__ import annotations

from tickwire.core.stream import TAIL_FIXED, TAIL_HEAD, TAIL_SEQ

# Each redis.call costs about a microsecond of Lua overhead on top of the command: one HMGET reads
# all of a channel's meta, one HSET writes it, and the last XADD trims (`MAXLEN ~` once per batch
# instead of per entry: it costs 8-23 % per XADD).
APPEND_LUA = r"""
-- Seqs as text: Lua's own number format ("%.14g") would write 1e+14 from there on.
local function int(x) return string.format('%d', x) end
local candidate, mark = ARGV[1], 'w:' .. ARGV[2]
-- Which replication history this node writes in, and the one it continues after a promotion.
local info = redis.call('INFO', 'replication')
local rid = string.match(info, 'master_replid:(%w+)')
local rid2 = string.match(info, 'master_replid2:(%w+)')
-- Only a key of another type refuses a batch alone; any other error (OOM, READONLY, …) fails
-- the call, which the publisher writes again.
local function refusal(err)
  return string.sub(err, 1, 9) == 'WRONGTYPE'
end
-- The seq of a stream's last entry (nil if it has none).
local function last_seq(stream)
  local top = redis.pcall('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if not top.err and top[1] then return tonumber(string.match(top[1][1], '^%d+')) end
end
-- A batch's plan from its channel's meta, or why its keys refuse it (one holds another type:
-- the batch is refused alone, and the call goes on), or nil if it must wait (TWBEHIND).
local function plan_of(stream, meta, a)
  local m = redis.pcall('HMGET', meta, 'epoch', 'seq', 'start', mark, 'rid')
  if m.err then return refusal(m.err) and {refused = m.err} or {failed = m.err} end
  local epoch, seq, start = m[1], tonumber(m[2] or '0'), tonumber(m[3] or '1')
  if not (seq and start and (not epoch or string.match(epoch, '^%w+$'))) then
    -- Not what this script writes (edited by hand, or by another program): as if lost.
    epoch, seq, start = nil, 0, 1
  end
  local fresh = not epoch
  if fresh then
    -- No history: a first publish, or the meta was lost and the stream kept (deleted by
    -- hand). Seqs then go on after its last ID, which XADD requires.
    seq = last_seq(stream) or seq
  end
  if epoch and m[5] and m[5] ~= rid and m[5] == rid2 then
    -- Last written by the primary this node replicated before its promotion: a failover, and
    -- replication is asynchronous, so the tail that primary pushed may be missing here.
    fresh = true
  end
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
  local done = fresh and 0 or (tonumber(m[4] or '0') or 0)
  if not fresh and done < tonumber(ARGV[a + 4]) then
    -- The batch before was refused (its stream holds another type) or failed: only the
    -- first waits. Asked only here, as TYPE per batch would cost every call.
    local kind = redis.call('TYPE', stream)['ok']
    if kind ~= 'stream' and kind ~= 'none' then
      return {refused = 'WRONGTYPE ' .. stream .. ' holds a ' .. kind .. ', not a stream'}
    end
    return nil
  end
  local body, skip = a + 8, math.max(0, done - first + 1)
  local tail_epoch, tail_seq = ARGV[a + 6], tonumber(ARGV[a + 7])
  return {stream, meta, epoch, seq, start, fresh, ARGV[a],
    body + skip, body + n - 1, math.max(done, first + n - 1),
    tail_seq > 0 and not fresh and tail_epoch == epoch and tail_seq + skip == seq + 1,
    tail_seq > 0 and @TAIL_FIXED@ + #tail_epoch or 0, tail_seq - body, m[5] ~= rid,
    tail_epoch, tail_seq > 0 and tail_seq + n - 1 or -1}
end
local plans = {}
local a = 4
for k = 1, #KEYS, 2 do
  local p = plan_of(KEYS[k], KEYS[k + 1], a)
  if not p then
    return redis.error_reply('TWBEHIND the batch before one of these is not applied')
  end
  if p.failed then return redis.error_reply(p.failed) end
  plans[#plans + 1] = p
  a = a + 8 + tonumber(ARGV[a + 5])
end
-- Appends a batch's events; returns why its stream refused the first (nothing written), or
-- nil and the error that stopped it.
local function append(p, push)
  local stream, meta, epoch, seq, start, fresh, maxlen, from, last, applied, as_is, cut, shift =
    p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13]
  if from <= last then
    push[#push + 1] = stream .. ' ' .. epoch .. ' ' .. int(seq + 1) .. ' ' .. (last - from + 1)
  end
  local tail = '@TAIL_HEAD@' .. epoch .. '@TAIL_SEQ@'
  for i = from, last do
    seq = seq + 1
    local stored = ARGV[i]
    if not as_is then
      if cut > 0 then
        -- The predicted tail: ',"epoch":"<epoch>","seq":<seq>}', @TAIL_FIXED@ bytes besides both.
        stored = string.sub(stored, 1, #stored - cut - #int(shift + i))
      end
      stored = stored .. tail .. int(seq) .. '}'
    end
    push[#push + 1] = stored
    -- The ID as a number: Redis prints it as plain digits ("%.17g", exact to 2^53; newer
    -- versions as an integer), and XADD reads "<seq>" as "<seq>-0". Building "<seq>-0" here
    -- cost 8-17 % of Redis's time per appended event.
    local r
    if i < last then
      r = redis.pcall('XADD', stream, seq, 'd', stored)
    else
      r = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, seq, 'd', stored)
    end
    if type(r) == 'table' and r.err then
      if i == from and not p.moved and string.find(r.err, 'equal or smaller', 1, true) then
        -- Someone appended past the seq the meta holds: nothing of the batch is written;
        -- a new epoch goes on after the stream's last entry (the caller writes it again).
        local top = last_seq(stream) or seq
        p.moved = true
        p[3], p[4], p[5], p[6], p[11] = candidate, top, top + 1, true, false
        return 'moved'
      end
      if i > from or not refusal(r.err) then return nil, r.err end
      return r.err
    end
  end
  if fresh then
    redis.call('HSET', meta, 'epoch', epoch, 'start', start, 'seq', seq, mark, applied, 'rid', rid)
  elseif p[14] then
    redis.call('HSET', meta, 'seq', seq, mark, applied, 'rid', rid)
  else
    redis.call('HSET', meta, 'seq', seq, mark, applied)
  end
  p[3], p[4] = epoch, seq
  return nil
end
local out, push = {}, {}
for k, p in ipairs(plans) do
  local refused, failed = p.refused, nil
  if not refused then
    local before = #push
    refused, failed = append(p, push)
    if refused == 'moved' then
      for i = #push, before + 1, -1 do push[i] = nil end
      refused, failed = append(p, push)
    end
    if failed then return redis.error_reply(failed) end
    if refused then
      for i = #push, before + 1, -1 do push[i] = nil end
    end
  end
  if refused then
    out[#out + 1] = -k
    out[#out + 1] = refused
    out[#out + 1] = 0
  elseif p[3] ~= p[15] or p[4] ~= p[16] then
    out[#out + 1] = k
    out[#out + 1] = p[3]
    out[#out + 1] = p[4]
  end
end
if #push > 0 then
  -- A cluster's live channels carry their slot's hash tag: sharded pub/sub, to that shard only.
  local publish = string.find(ARGV[3], '{', 1, true) and 'SPUBLISH' or 'PUBLISH'
  redis.call(publish, ARGV[3], table.concat(push, '\n'))
end
return out
"""
# The stored tail is defined once, in tickwire.core.stream.
APPEND_LUA = (
    APPEND_LUA.replace("@TAIL_HEAD@", TAIL_HEAD.decode())
    .replace("@TAIL_SEQ@", TAIL_SEQ.decode())
    .replace("@TAIL_FIXED@", str(TAIL_FIXED))
)
