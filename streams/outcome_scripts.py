"""The batch scripts of a task's start and terminal write: ``BEGIN_MANY`` and ``FINISH_MANY``.

Each task in a call is atomic and isolated on its own (``pcall``). Its values travel as one
JSON object per task whose fields are named by one list defined here, :data:`BEGIN_FIELDS` and
:data:`FINISH_FIELDS`: the Python side builds the object from the list, and the Lua side reads
the same names (no offsets kept by hand in two languages). Fields named in :data:`KEY_FIELDS`
are indexes into ``KEYS`` (0: none), so every key a script touches is in ``KEYS`` (legal on
Redis Cluster). The status record's fields are written by one Lua function.
"""

from __future__ import annotations

from typing import Final

from sop_llm.streams.scripts import TERMINAL_LUA, LuaScript

BEGIN_FIELDS: Final = (
    "status", "source", "idem", "entry_id", "task_id", "max_attempts", "model", "payload_hash",
    "created_ms", "reply_to", "webhook_url", "correlation_id",
)  # fmt: skip
"""A task's start: its status key, source stream and idempotency key (KEYS indexes), the entry
id, task id, attempt limit, model, payload hash (idempotency), creation time, ``reply_to``,
webhook URL and the entry's correlation id ('' none; see ``Entry.correlation_id``)."""

FINISH_FIELDS: Final = (
    "status", "source", "reply", "idem", "entry_id", "task_id", "state", "event_type", "result",
    "finished_at", "worker", "attempts", "traceparent", "webhook", "dead", "expect", "fence",
    "correlation_id",
)  # fmt: skip
"""A task's terminal write: its status key, source stream, reply stream and idempotency key
(KEYS indexes), the entry id, task id, terminal state, result event type, result JSON, finish
time, the worker and attempt number of the attempt that wrote it, traceparent ('' none), webhook
job JSON ('' none), dead letter JSON ('' none), the state it must be in ('' any), and the fence
('1': the entry is malformed, and may write only a task that no other entry owns), and the
correlation id of the entry ('' none: the status record's, kept from the task's first entry
through retries, if any)."""

KEY_FIELDS: Final = frozenset({"status", "source", "reply", "idem"})

# KEYS[1..4] of both scripts: results, webhooks, dead, reply-streams set; then the tasks' own.
_COMMON_LUA: Final = (
    TERMINAL_LUA
    + """
local function fields(i, names)
  local a = cjson.decode(ARGV[i])
  for _, name in ipairs(names) do
    if a[name] == nil then error('missing field ' .. name) end
  end
  for _, name in ipairs(KEY_FIELDS) do
    if a[name] ~= nil then
      local k = tonumber(a[name])
      if k > 0 then a[name] = KEYS[k] else a[name] = false end
    end
  end
  return a
end
local function set_status(key, ...)
  -- every write of a task's status record goes through here: field, value, ...
  redis.call('HSET', key, ...)
end
local function xadd(key, typ, data, tp, cid)
  if cid and cid ~= '' then
    -- the task entry's correlation id (a FastStream publish's) goes back on its results
    if tp == '' then
      return redis.call('XADD', key, '*', 'type', typ, 'data', data, 'correlation_id', cid)
    end
    return redis.call('XADD', key, '*', 'type', typ, 'data', data, 'traceparent', tp,
      'correlation_id', cid)
  end
  if tp == '' then return redis.call('XADD', key, '*', 'type', typ, 'data', data) end
  return redis.call('XADD', key, '*', 'type', typ, 'data', data, 'traceparent', tp)
end
"""
)


def _lua_list(names: tuple[str, ...]) -> str:
    return "{" + ", ".join(f"'{n}'" for n in names) + "}"


def _script(body: str) -> str:
    head = (
        f"local KEY_FIELDS = {_lua_list(tuple(sorted(KEY_FIELDS)))}\n"
        f"local BEGIN_FIELDS = {_lua_list(BEGIN_FIELDS)}\n"
        f"local FINISH_FIELDS = {_lua_list(FINISH_FIELDS)}\n"
    )
    return head + _COMMON_LUA + body


# The terminal write of one task: status, results entry (and the reply_to copy), webhook job,
# dead letter and XACK, or nothing. A task already terminal gets no second result.
# finish_one returns 1 written, 0 already terminal (acked only), -1 state not as expected
# (nothing written), -2 fenced (a malformed entry with another entry's task id: only its own
# dead letter and XACK).
_FINISH_ONE_LUA: Final = """
local function finish_one(a)
  local cur = redis.call('HMGET', a.status, 'state', 'entry_id', 'correlation_id')
  local st = cur[1]
  if a.expect ~= '' and st ~= a.expect then return -1 end
  if a.fence == '1' and cur[2] and cur[2] ~= a.entry_id then
    if redis.call('XACK', a.source, group, a.entry_id) == 1 and a.dead ~= '' then
      xadd(KEYS[3], 'task.dead', a.dead, a.traceparent)
    end
    return -2
  end
  if terminal(st) then
    -- dead-letter this entry only if it was still pending (not on a retry of our own write)
    if redis.call('XACK', a.source, group, a.entry_id) == 1 and a.dead ~= '' then
      xadd(KEYS[3], 'task.dead', a.dead, a.traceparent)
    end
    return 0
  end
  if a.dead ~= '' then xadd(KEYS[3], 'task.dead', a.dead, a.traceparent) end
  set_status(a.status, 'state', a.state, 'result', a.result, 'finished_at', a.finished_at,
    'task_id', a.task_id, 'worker', a.worker, 'attempts', a.attempts)
  -- a retry comes back as a plain entry: the correlation id is the status record's then
  local cid = a.correlation_id
  if cid == '' then cid = cur[3] or '' elseif cid ~= cur[3] then
    set_status(a.status, 'correlation_id', cid)
  end
  redis.call('EXPIRE', a.status, ttl)
  xadd(KEYS[1], a.event_type, a.result, a.traceparent, cid)
  if a.reply then
    xadd(a.reply, a.event_type, a.result, a.traceparent, cid)
    redis.call('SADD', KEYS[4], string.sub(a.reply, #KEYS[1] + 2))
  end
  if a.webhook ~= '' then
    xadd(KEYS[2], 'webhook.delivery', a.webhook, a.traceparent)
    set_status(a.status, 'webhook_state', 'pending', 'webhook_attempts', 0)
  end
  if a.idem then redis.call('EXPIRE', a.idem, ttl) end
  redis.call('XACK', a.source, group, a.entry_id)
  return 1
end
"""

# A worker is about to run entries: per entry, in one call, each atomic on its own.
# ARGV: group, worker, now_ms, ttl_s, n, then per entry a JSON object of the BEGIN_FIELDS
# Returns per entry: {'run', attempts, errors_json} | {'done', state} | {'duplicate', task id}
#   | {'conflict', task id} | {'exhausted', attempts, errors_json} | {'cancelled', attempts}
#   | {'error', message}
BEGIN_MANY: Final = _script(
    """
local group, worker, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function begin_one(a)
  local cur = redis.call('HMGET', a.status, 'state', 'entry_id', 'duplicate_of',
    'cancel_requested', 'errors', 'created_at', 'attempts')
  local st, eid = cur[1], cur[2]
  if terminal(st) then
    redis.call('XACK', a.source, group, a.entry_id)
    return {'done', st}
  end
  if st and eid and eid ~= a.entry_id and not cur[3] then
    -- a second entry carrying the same task id: the first one owns the task
    redis.call('XACK', a.source, group, a.entry_id)
    return {'duplicate', a.task_id}
  end
  if a.idem then
    local held = redis.call('GET', a.idem)
    if held then
      local sep = string.find(held, ' ', 1, true)
      local h, tid = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
      if tid ~= a.task_id then
        if h ~= a.payload_hash then return {'conflict', tid} end
        -- same key, same payload, published again by plain XADD: point at the first task
        set_status(a.status, 'task_id', a.task_id, 'duplicate_of', tid, 'entry_id', a.entry_id)
        redis.call('EXPIRE', a.status, ttl)
        redis.call('XACK', a.source, group, a.entry_id)
        return {'duplicate', tid}
      end
    else
      redis.call('SET', a.idem, a.payload_hash .. ' ' .. a.task_id)
    end
  end
  local attempts = (tonumber(cur[7]) or 0) + 1
  set_status(a.status, 'state', 'running', 'task_id', a.task_id, 'attempts', attempts,
    'model', a.model, 'stream', a.source, 'entry_id', a.entry_id, 'started_at', now,
    'worker', worker, 'reply_to', a.reply_to, 'webhook_url', a.webhook_url,
    'created_at', cur[6] or a.created_ms)
  if a.correlation_id ~= '' then set_status(a.status, 'correlation_id', a.correlation_id) end
  if cur[4] == '1' then return {'cancelled', attempts} end
  if attempts > tonumber(a.max_attempts) then return {'exhausted', attempts, cur[5] or ''} end
  return {'run', attempts, cur[5] or ''}
end
local out = {}
for n = 1, tonumber(ARGV[5]) do
  local ok, res = pcall(function() return begin_one(fields(5 + n, BEGIN_FIELDS)) end)
  if ok then out[n] = res else out[n] = {'error', tostring(res)} end
end
return out
"""
)

# The terminal writes of a batch of tasks in one call, each with finish_one: atomic on its own
# and isolated (one that fails to write does not stop the others).
# ARGV: group, ttl_s, n, then per task a JSON object of the FINISH_FIELDS
# Returns per task: 1 written, 0 already terminal (acked only), -1 state not as expected
# (nothing written), -2 fenced, or "ERR <message>".
FINISH_MANY: Final = _script(
    """
local group, ttl = ARGV[1], ARGV[2]
"""
    + _FINISH_ONE_LUA
    + """
local out = {}
for n = 1, tonumber(ARGV[3]) do
  local ok, res = pcall(function() return finish_one(fields(3 + n, FINISH_FIELDS)) end)
  if ok then out[n] = res else out[n] = 'ERR ' .. tostring(res) end
end
return out
"""
)


# The last resort when a task's own keys refuse its terminal write (a key of the wrong type,
# say): the outcome goes to `results` and the entry to the dead letters, and the entry is
# acknowledged, touching none of the task's own keys. Written once: only while the entry is
# still pending (checked first, since a script's writes before an error stay).
# KEYS: results, dead, source stream. ARGV: group, entry id, event type, result JSON, dead
# letter JSON, traceparent ('' = none), correlation id ('' = none). Returns 1 written, 0 the
# entry was not pending.
ABANDON: Final = (
    _COMMON_LUA
    + """
local group, id = ARGV[1], ARGV[2]
if not redis.call('XPENDING', KEYS[3], group, id, id, 1)[1] then return 0 end
xadd(KEYS[1], ARGV[3], ARGV[4], ARGV[6], ARGV[7])
xadd(KEYS[2], 'task.dead', ARGV[5], ARGV[6])
redis.call('XACK', KEYS[3], group, id)
return 1
"""
)

BEGIN_MANY_SCRIPT: Final = LuaScript("begin_many", BEGIN_MANY)
ABANDON_SCRIPT: Final = LuaScript("abandon", ABANDON)
FINISH_MANY_SCRIPT: Final = LuaScript("finish_many", FINISH_MANY)
