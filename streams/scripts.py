"""The Lua scripts of intake, retries, cancels, requeues and reads, and how they are called.

The batch scripts of a task's start and terminal write are in ``streams/outcome_scripts.py``.

Every key a script touches is passed in ``KEYS`` (all share the namespace hash tag), so the
scripts are legal on Redis Cluster. They run on Redis 6.2 and later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

EncodableT = str | bytes | int | float

TERMINAL_LUA: Final = """
local function terminal(s)
  return s == 'completed' or s == 'failed' or s == 'cancelled' or s == 'expired'
end
"""

# Intake through the SDK: back-pressure, idempotency check, status record and XADD in one step.
# KEYS: stream, status[, idem]
# ARGV: task_id, payload_hash, type, data, model, now_ms, traceparent ('' = none), reply_to,
#       webhook_url, max_backlog (0 = no limit)
SUBMIT: Final = """
if #KEYS >= 3 then
  local cur = redis.call('GET', KEYS[3])
  if cur then
    local sep = string.find(cur, ' ', 1, true)
    local h, tid = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
    if h == ARGV[2] then return {'duplicate', tid} end
    return {'conflict', tid}
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  -- the same task id and payload again (a resend after a lost reply): accepted, once
  if redis.call('HGET', KEYS[2], 'payload_hash') == ARGV[2] then return {'duplicate', ARGV[1]} end
  return {'exists', ARGV[1]}
end
local limit = tonumber(ARGV[10])
if limit > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  -- backlog: entries not yet delivered (lag, Redis 7) plus delivered but unfinished ones
  local backlog = redis.call('XLEN', KEYS[1])
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
  if ok then
    for _, g in ipairs(groups) do
      local f = {}
      for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
      if f['name'] == 'workers' and type(f['lag']) == 'number' then
        backlog = f['lag'] + f['pending']
      end
    end
  end
  if backlog >= limit then return {'backlog', tostring(backlog)} end
end
local fields = {'type', ARGV[3], 'data', ARGV[4]}
if ARGV[7] ~= '' then table.insert(fields, 'traceparent'); table.insert(fields, ARGV[7]) end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[2], 'state', 'queued', 'task_id', ARGV[1], 'model', ARGV[5],
  'stream', KEYS[1], 'entry_id', id, 'created_at', ARGV[6], 'attempts', 0,
  'reply_to', ARGV[8], 'webhook_url', ARGV[9], 'payload_hash', ARGV[2])
if #KEYS >= 3 then
  -- no TTL yet: like the status record, the key's lifetime starts at the terminal state
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. ARGV[1])
end
return {'new', ARGV[1], id}
"""

# A retryable failure: back to `queued`, the retry parked in the delayed set, the entry acked.
# KEYS: status, delayed zset, source stream
# ARGV: group, entry_id, member, due_ms, error_json
# Returns 1 (scheduled), 0 (already terminal: acked only), -1 (cancel requested: not scheduled)
RETRY: Final = (
    TERMINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'state')
if terminal(st) then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  return 0
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return -1 end
local errs = redis.call('HGET', KEYS[1], 'errors')
local list = {}
if errs and errs ~= '' then list = cjson.decode(errs) end
table.insert(list, cjson.decode(ARGV[5]))
redis.call('HSET', KEYS[1], 'state', 'queued', 'retry_at', ARGV[4], 'errors', cjson.encode(list))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
)

# A due retry goes back to its partition as a new entry of the same task.
# KEYS: delayed zset, stream, status. ARGV: member, data, traceparent
# Returns the new entry id, or '' when another mover took it or the task ended meanwhile.
MOVE: Final = (
    TERMINAL_LUA
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return '' end
if terminal(redis.call('HGET', KEYS[3], 'state')) then return '' end
local fields = {'type', 'task.submitted', 'data', ARGV[2]}
if ARGV[3] ~= '' then table.insert(fields, 'traceparent'); table.insert(fields, ARGV[3]) end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HSET', KEYS[3], 'entry_id', id, 'stream', KEYS[2])
return id
"""
)

# Ask a running (or just-started) task to stop. KEYS: status, control stream
# ARGV: task_id, notify ('1': publish a control event for the worker running it)
# Returns the state seen ('' = unknown task; terminal states: nothing done).
CANCEL: Final = (
    TERMINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'state')
if not st or terminal(st) then return st or '' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'type', 'task.cancel',
    'data', cjson.encode({v = 1, task_id = ARGV[1]}))
end
return st
"""
)

# Operator requeue of a dead letter: a new entry of the same task, a fresh round of attempts.
# KEYS: dead stream, task stream, status. ARGV: dead entry id, data, traceparent, task_id
REQUEUE: Final = """
local fields = {'type', 'task.submitted', 'data', ARGV[2]}
if ARGV[3] ~= '' then table.insert(fields, 'traceparent'); table.insert(fields, ARGV[3]) end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HDEL', KEYS[3], 'result', 'finished_at', 'errors', 'retry_at', 'cancel_requested',
  'duplicate_of')
redis.call('HSET', KEYS[3], 'state', 'queued', 'task_id', ARGV[4], 'entry_id', id,
  'stream', KEYS[2], 'attempts', 0)
redis.call('PERSIST', KEYS[3])
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

# Pull-when-ready read of one pool: first the best parked entries of the models that have free
# slots here (each moved from the parked consumer to this one), then up to `count` new entries
# from the partitions in the order given, taking at most `first_limit` from the first one when
# it is > 0 (the aged partition, see dispatch).
# KEYS: the pool's partition streams in read order (n of them), the wake stream, then one
#   parked set per model asked for
# ARGV: group, consumer, parked consumer, count, first_limit, n, rank_ms, aging_ms, the size
#   limit of an entry, the byte budget of the read, then per parked set a count and a score
#   bound (a parked score is rank * rank_ms + entry time; with a bound >= 0 only members
#   scored below it are taken, oldest first, with no aging: the first partition's, for a
#   reserved slot; -1: any member, aging rule applied)
# A parked member is "<stream> <entry id>"; taking it claims the entry from the parked consumer
# with JUSTID (the delivery counter is not raised: parking is no delivery). A member whose entry
# the parked consumer no longer holds (acknowledged by a cancel, trimmed) is dropped.
# Returns {taken entries as {parked-set number, stream, {id, fields}, delivery count},
#   {{key index, entries}...}, last ids of the partitions and of the wake stream}.
READ: Final = """
local group, me, parked, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local rank_ms, aging = tonumber(ARGV[7]), tonumber(ARGV[8])
local max_entry, budget = tonumber(ARGV[9]), tonumber(ARGV[10])
local partitions = {}
for i = 1, n do partitions[KEYS[i]] = true end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- the next member of a parked set: the oldest that has waited past the aging limit in a lower
-- partition, else the lowest score
local function next_member(key)
  if aging > 0 then
    local best, best_ts
    for r = 1, n - 1 do
      local lo = r * rank_ms
      local m = redis.call('ZRANGEBYSCORE', key, lo, lo + now - aging, 'WITHSCORES', 'LIMIT', 0, 1)
      if m[1] and (not best or tonumber(m[2]) - lo < best_ts) then
        best, best_ts = m[1], tonumber(m[2]) - lo
      end
    end
    if best then return best end
  end
  return redis.call('ZRANGE', key, 0, 0)[1]
end
local taken = {}
for j = n + 2, #KEYS do
  local want = tonumber(ARGV[10 + 2 * (j - n - 1) - 1])
  local bound = tonumber(ARGV[10 + 2 * (j - n - 1)])
  while want > 0 do
    local m
    if bound >= 0 then
      m = redis.call('ZRANGEBYSCORE', KEYS[j], '-inf', '(' .. bound, 'LIMIT', 0, 1)[1]
    else
      m = next_member(KEYS[j])
    end
    if not m then break end
    redis.call('ZREM', KEYS[j], m)
    local sep = string.find(m, ' [^ ]*$')
    local stream, id = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
    local p = partitions[stream] and redis.call('XPENDING', stream, group, id, id, 1)
    if p and p[1] and p[1][2] == parked then
      redis.call('XCLAIM', stream, group, me, 0, id, 'JUSTID')
      local r = redis.call('XRANGE', stream, id, id)
      if #r > 0 then
        table.insert(taken, {j - n - 1, stream, r[1], p[1][4]})
        want = want - 1
      else
        redis.call('XACK', stream, group, id)
      end
    end
  end
end
-- an entry over the size limit leaves Redis as a stub: its type, its size and the task id
-- found near the start of its data, so that it is dead-lettered by its size unread
local function checked(entry)
  local f, size, data, typ = entry[2], 0, '', ''
  for k = 1, #f, 2 do
    size = size + #f[k] + #f[k + 1]
    if f[k] == 'data' then data = f[k + 1] elseif f[k] == 'type' then typ = f[k + 1] end
  end
  if size <= max_entry then return entry, size end
  local id = string.match(string.sub(data, 1, 65536), '"task_id"%s*:%s*"([A-Za-z0-9._:%-]+)"')
  return {entry[1], {'type', string.sub(typ, 1, 64), '__oversize', tostring(size),
    '__task_id', id or ''}}, 0
end
local left = tonumber(ARGV[4])
local out = {}
for i = 1, n do
  local limit = left
  if i == 1 and tonumber(ARGV[5]) > 0 and tonumber(ARGV[5]) < limit then
    limit = tonumber(ARGV[5])
  end
  local got = {}
  -- in chunks, so that a read stops near its byte budget
  while limit > 0 and budget > 0 do
    local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', math.min(limit, 16),
      'STREAMS', KEYS[i], '>')
    if not r then break end
    for _, entry in ipairs(r[1][2]) do
      local e, size = checked(entry)
      table.insert(got, e)
      budget = budget - size
    end
    limit = limit - #r[1][2]
    left = left - #r[1][2]
  end
  if #got > 0 then table.insert(out, {i, got}) end
  if left <= 0 or budget <= 0 then break end
end
-- the newest id of each stream (and the wake stream), so that a caller that found less than it
-- asked for can block for what comes next
local last = {}
for i = 1, n + 1 do
  local r = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if #r > 0 then table.insert(last, r[1][1]) else table.insert(last, '0-0') end
end
return {taken, out, last}
"""

# Park entries whose model has no free slot here: each moves to the parked consumer (only if it
# is still this consumer's) and into its model's parked set, where any worker takes it next.
# KEYS: the wake stream, the parked-models set, then the streams and parked sets named below
# ARGV: group, consumer, parked consumer, then per entry: stream index, parked-set index, entry
#   id, score, model
# Returns the number parked; idle workers of the pool are woken through the wake stream.
PARK: Final = """
local group, me, parked = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV, 5 do
  local stream, set, id = KEYS[tonumber(ARGV[i])], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == me then
    redis.call('XCLAIM', stream, group, parked, 0, id, 'JUSTID')
    redis.call('ZADD', set, ARGV[i + 3], stream .. ' ' .. id)
    redis.call('SADD', KEYS[2], ARGV[i + 4])
    n = n + 1
  end
end
if n > 0 then redis.call('XADD', KEYS[1], 'MAXLEN', '~', 100, '*', 'parked', n) end
return n
"""

# Server time (ms), then the id of the next undelivered entry of each partition ('' when
# none), for the aging rule. KEYS: partition streams. ARGV: group
HEADS: Final = """
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
for i, key in ipairs(KEYS) do
  local head = ''
  if redis.call('EXISTS', key) == 1 then
    local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
    if ok then
      for _, g in ipairs(groups) do
        local name, last
        for j = 1, #g, 2 do
          if g[j] == 'name' then name = g[j + 1] end
          if g[j] == 'last-delivered-id' then last = g[j + 1] end
        end
        if name == ARGV[1] then
          local r = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
          if #r > 0 then head = r[1][1] end
        end
      end
    end
  end
  table.insert(out, head)
end
return out
"""


class LuaScript:
    """A script called by SHA, loaded again on demand after a server restart (NOSCRIPT)."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


ScriptCall = tuple[LuaScript, Sequence[str], Sequence[EncodableT]]


async def run_batch(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run several script calls in one round trip (pipelined, not a transaction).

    Each call stays atomic on its own. Calls refused with NOSCRIPT did not run, so they are
    loaded and sent again; any other error is returned in place of that call's reply.
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for i in todo:
            script, keys, args = calls[i]
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses the latter
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        out = await pipe.execute(raise_on_error=False)
        missing = []
        for i, reply in zip(todo, out, strict=True):
            if isinstance(reply, NoScriptError):
                missing.append(i)
            else:
                replies[i] = reply
        if not missing:
            return replies
        for script in {calls[i][0] for i in missing}:
            await client.script_load(script.source)
        todo = missing
    raise NoScriptError("scripts could not be loaded")


SUBMIT_SCRIPT: Final = LuaScript("submit", SUBMIT)
READ_SCRIPT: Final = LuaScript("read", READ)
HEADS_SCRIPT: Final = LuaScript("heads", HEADS)
PARK_SCRIPT: Final = LuaScript("park", PARK)
RETRY_SCRIPT: Final = LuaScript("retry", RETRY)
MOVE_SCRIPT: Final = LuaScript("move", MOVE)
CANCEL_SCRIPT: Final = LuaScript("cancel", CANCEL)
REQUEUE_SCRIPT: Final = LuaScript("requeue", REQUEUE)
