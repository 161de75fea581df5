"""The batch scripts of a task's start and terminal write: ``BEGIN_MANY`` and ``FINISH_MANY``.

Each task in a call is atomic and isolated on its own (``pcall``). Its values are positional
arguments, a fixed number per task, passed to the commands as they are: the scripts decode no
JSON and build no tables on the hot path. All keys come in ``KEYS`` (legal on Redis Cluster).
"""

from __future__ import annotations

from typing import Final

from streams.scripts import TERMINAL_LUA, LuaScript

BEGIN_WIDTH: Final = 12
"""ARGV values per entry in ``BEGIN_MANY`` (before its finish, when it carries one)."""
FINISH_WIDTH: Final = 14
"""ARGV values per task in ``FINISH_MANY`` (and per finish carried into ``BEGIN_MANY``)."""


def _widths(source: str) -> str:
    # the widths as literals: a script may not read globals it did not define
    return source.replace("BEGIN_WIDTH", str(BEGIN_WIDTH)).replace(
        "FINISH_WIDTH", str(FINISH_WIDTH)
    )


# The terminal write of one task: status, results entry (and the reply_to copy), webhook job,
# dead letter and XACK, or nothing. A task already terminal gets no second result.
# KEYS[1..4]: results, webhooks, dead, reply-streams set; the task's own keys by index.
# A task's terminal write is FINISH_WIDTH positional ARGV values from index i:
#   status, source stream, reply stream (0: none), idem key (0: none): indexes into KEYS;
#   entry id, task id, state, event type, result JSON, finished_at, traceparent ('' = none),
#   webhook job JSON ('' = none), dead letter JSON ('' = none), expected state ('' = any).
# Documents travel as they are (neither side escapes or parses them again), and the commands
# take their arguments directly: no tables are built on the hot path.
# finish_one returns 1 written, 0 already terminal (acked only), -1 state not as expected
# (nothing written). finish_rest is what follows the status HSET, shared with begin_one.
_FINISH_ONE_LUA: Final = """
local function xadd(key, typ, data, tp)
  if tp == '' then return redis.call('XADD', key, '*', 'type', typ, 'data', data) end
  return redis.call('XADD', key, '*', 'type', typ, 'data', data, 'traceparent', tp)
end
local function finish_rest(i, status, source)
  local result, tp, job, kreply, kidem = ARGV[i + 8], ARGV[i + 10], ARGV[i + 11],
    tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  redis.call('EXPIRE', status, ttl)
  xadd(KEYS[1], ARGV[i + 7], result, tp)
  if kreply > 0 then
    local reply = KEYS[kreply]
    xadd(reply, ARGV[i + 7], result, tp)
    redis.call('SADD', KEYS[4], string.sub(reply, #KEYS[1] + 2))
  end
  if job ~= '' then
    xadd(KEYS[2], 'webhook.delivery', job, tp)
    redis.call('HSET', status, 'webhook_state', 'pending', 'webhook_attempts', 0)
  end
  if kidem > 0 then redis.call('EXPIRE', KEYS[kidem], ttl) end
  redis.call('XACK', source, group, ARGV[i + 4])
end
local function finish_one(i)
  local status, source = KEYS[tonumber(ARGV[i])], KEYS[tonumber(ARGV[i + 1])]
  local st = redis.call('HGET', status, 'state')
  local expect, dead = ARGV[i + 13], ARGV[i + 12]
  if expect ~= '' and st ~= expect then return -1 end
  if terminal(st) then
    -- dead-letter this entry only if it was still pending (not on a retry of our own write)
    if redis.call('XACK', source, group, ARGV[i + 4]) == 1 and dead ~= '' then
      xadd(KEYS[3], 'task.dead', dead, ARGV[i + 10])
    end
    return 0
  end
  if dead ~= '' then xadd(KEYS[3], 'task.dead', dead, ARGV[i + 10]) end
  redis.call('HSET', status, 'state', ARGV[i + 6], 'result', ARGV[i + 8],
    'finished_at', ARGV[i + 9], 'task_id', ARGV[i + 5])
  finish_rest(i, status, source)
  return 1
end
"""

# A worker is about to run a read batch: per entry, in one call, each atomic on its own.
# KEYS: results, webhooks, dead, reply-streams set, then every key the entries name (status,
#   source stream, idempotency key, reply stream)
# ARGV: group, worker, now_ms, ttl_s, n, then per entry BEGIN_WIDTH positional values:
#   status, source stream, idem key (0: none): indexes into KEYS; entry id, task id, max
#   attempts, model, payload hash, created ms, reply_to, webhook_url, and a flag: '1' when
#   FINISH_WIDTH values follow, the entry's outcome already computed (an instant model) as
#   finish_one takes it, written in the same step (one HSET for the start and the end) when
#   this is the task's first attempt; '0' when nothing follows
# Returns per entry: {'run', attempts, errors_json} | {'finished', attempts} | {'done', state}
#   | {'duplicate', task id} | {'conflict', task id} | {'exhausted', attempts, errors_json}
#   | {'cancelled', attempts} | {'error', message}
BEGIN_MANY: Final = _widths(
    TERMINAL_LUA
    + """
local group, worker, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
"""
    + _FINISH_ONE_LUA
    + """
local function begin_one(i)
  local status, source = KEYS[tonumber(ARGV[i])], KEYS[tonumber(ARGV[i + 1])]
  local e, id = ARGV[i + 3], ARGV[i + 4]
  local cur = redis.call('HMGET', status, 'state', 'entry_id', 'duplicate_of',
    'cancel_requested', 'errors', 'created_at', 'attempts')
  local st, eid = cur[1], cur[2]
  if terminal(st) then
    redis.call('XACK', source, group, e)
    return {'done', st}
  end
  if st and eid and eid ~= e and not cur[3] then
    -- a second entry carrying the same task id: the first one owns the task
    redis.call('XACK', source, group, e)
    return {'duplicate', id}
  end
  local kidem = tonumber(ARGV[i + 2])
  if kidem > 0 then
    local idem, hash = KEYS[kidem], ARGV[i + 7]
    local held = redis.call('GET', idem)
    if held then
      local sep = string.find(held, ' ', 1, true)
      local h, tid = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
      if tid ~= id then
        if h ~= hash then return {'conflict', tid} end
        -- same key, same payload, published again by plain XADD: point at the first task
        redis.call('HSET', status, 'task_id', id, 'duplicate_of', tid, 'entry_id', e)
        redis.call('EXPIRE', status, ttl)
        redis.call('XACK', source, group, e)
        return {'duplicate', tid}
      end
    else
      redis.call('SET', idem, hash .. ' ' .. id)
    end
  end
  local attempts = (tonumber(cur[7]) or 0) + 1
  local cancelled, errors = cur[4] == '1', cur[5] or ''
  local f = i + BEGIN_WIDTH
  if ARGV[i + 11] == '1' and attempts == 1 and not cancelled then
    -- the start and the end in one HSET; then the rest of finish_one's write
    redis.call('HSET', status, 'state', ARGV[f + 6], 'result', ARGV[f + 8],
      'finished_at', ARGV[f + 9], 'task_id', id, 'attempts', attempts, 'model', ARGV[i + 6],
      'stream', source, 'entry_id', e, 'started_at', now, 'worker', worker,
      'reply_to', ARGV[i + 9], 'webhook_url', ARGV[i + 10], 'created_at', cur[6] or ARGV[i + 8])
    local dead = ARGV[f + 12]
    if dead ~= '' then xadd(KEYS[3], 'task.dead', dead, ARGV[f + 10]) end
    finish_rest(f, status, source)
    return {'finished', attempts}
  end
  redis.call('HSET', status, 'state', 'running', 'task_id', id, 'attempts', attempts,
    'model', ARGV[i + 6], 'stream', source, 'entry_id', e, 'started_at', now, 'worker', worker,
    'reply_to', ARGV[i + 9], 'webhook_url', ARGV[i + 10], 'created_at', cur[6] or ARGV[i + 8])
  if cancelled then return {'cancelled', attempts} end
  if attempts > tonumber(ARGV[i + 5]) then return {'exhausted', attempts, errors} end
  return {'run', attempts, errors}
end
local out, i = {}, 6
for n = 1, tonumber(ARGV[5]) do
  local ok, res = pcall(begin_one, i)
  if ok then out[n] = res else out[n] = {'error', tostring(res)} end
  if ARGV[i + 11] == '1' then i = i + BEGIN_WIDTH + FINISH_WIDTH else i = i + BEGIN_WIDTH end
end
return out
"""
)

# The terminal writes of a batch of tasks in one call, each with finish_one: atomic on its own
# and isolated (one that fails to write does not stop the others).
# KEYS: results, webhooks, dead, reply-streams set, then every key the tasks name
# ARGV: group, ttl_s, n, then FINISH_WIDTH values per task as finish_one takes them
# Returns per task: 1 written, 0 already terminal (acked only), -1 state not as expected
# (nothing written), or "ERR <message>".
FINISH_MANY: Final = _widths(
    TERMINAL_LUA
    + """
local group, ttl = ARGV[1], ARGV[2]
"""
    + _FINISH_ONE_LUA
    + """
local out = {}
for n = 1, tonumber(ARGV[3]) do
  local ok, res = pcall(finish_one, 4 + (n - 1) * FINISH_WIDTH)
  if ok then out[n] = res else out[n] = 'ERR ' .. tostring(res) end
end
return out
"""
)


BEGIN_MANY_SCRIPT: Final = LuaScript("begin_many", BEGIN_MANY)
FINISH_MANY_SCRIPT: Final = LuaScript("finish_many", FINISH_MANY)
