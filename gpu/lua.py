"""The Lua scripts behind the GPU semaphore, and a tiny runner for them.

Every key a script touches arrives in ``KEYS`` (they share the namespace hash tag, so the scripts
are legal on Redis Cluster). Deadlines come from the server's own clock (``TIME``), so processes
with skewed clocks still agree on when a lease ran out. A script that reads ``TIME`` and then
writes must be replicated by its effects: the default on Redis 5 and later, and switched on
explicitly for servers configured otherwise (``redis.replicate_commands`` is a no-op on 7).

Keys of one device (see :class:`gpu.semaphore.DeviceKeys`):

1. ``holders``  zset, member -> lease deadline (ms)
2. ``waiters``  zset, member -> ``rank * 1e12 + arrival``: the queue, most urgent first
3. ``leases``   zset, member -> waiter deadline (ms): a waiter that stops polling drops out
4. ``seq``      string counter, the arrival number
5. ``wake``     list; a release pushes tokens that waiters block on (BLPOP)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float

# ranks are below 9000 and arrivals below 1e12, so a score stays an exact integer in a double
RANK_SCALE: Final = 10**12
MAX_RANK: Final = 8999

_PRELUDE: Final = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function wake(queue, list, ttl)
  local n = redis.call('ZCARD', queue)
  if n > 64 then n = 64 end
  if n > 0 then
    for _ = 1, n do redis.call('RPUSH', list, '1') end
    redis.call('LTRIM', list, 0, 63)
    redis.call('PEXPIRE', list, ttl)
  end
end
-- holders whose lease ran out and waiters that stopped polling are gone; 1 when any was
local function sweep(holders, queue, leases)
  local gone = redis.call('ZREMRANGEBYSCORE', holders, '-inf', '(' .. now)
  local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', '(' .. now, 'LIMIT', 0, 500)
  if #dead > 0 then
    redis.call('ZREM', queue, unpack(dead))
    redis.call('ZREM', leases, unpack(dead))
  end
  return gone > 0 or #dead > 0
end
"""

# Try to take a permit, joining (or staying in) the queue when none is free for this waiter.
# KEYS: holders, waiters, leases, seq, wake
# ARGV: member, permits, lease_ms, waiter_ttl_ms, rank, score ('' on the first attempt),
#       wake_ttl_ms
# Returns {1, score} when granted, {0, score, position, holders} while waiting.
ACQUIRE: Final = (
    _PRELUDE
    + """
local member, permits = ARGV[1], tonumber(ARGV[2])
local lease, wttl, wake_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[7])
if sweep(KEYS[1], KEYS[2], KEYS[3]) then wake(KEYS[2], KEYS[5], wake_ttl) end
local function grant(score)
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZADD', KEYS[1], now + lease, member)
  -- a permit may still be free for the next waiter in line
  if redis.call('ZCARD', KEYS[1]) < permits then wake(KEYS[2], KEYS[5], wake_ttl) end
  return {1, score}
end
if redis.call('ZSCORE', KEYS[1], member) then
  -- granted before, but the reply was lost: keep it
  redis.call('ZADD', KEYS[1], now + lease, member)
  return {1, ARGV[6]}
end
local held = redis.call('ZCARD', KEYS[1])
local score = redis.call('ZSCORE', KEYS[2], member)
if not score then
  if ARGV[6] ~= '' then
    score = ARGV[6]  -- it dropped out (a stalled poll) and comes back to its old place
  else
    if held < permits and redis.call('ZCARD', KEYS[2]) == 0 then return grant('') end
    local seq = redis.call('INCR', KEYS[4]) % 1000000000000
    score = string.format('%.0f', tonumber(ARGV[5]) * 1000000000000 + seq)
  end
  redis.call('ZADD', KEYS[2], score, member)
end
redis.call('ZADD', KEYS[3], now + wttl, member)
local pos = redis.call('ZRANK', KEYS[2], member)
if pos < permits - held then return grant(score) end
return {0, score, pos, held}
"""
)

# Keep a permit: push the holder's lease deadline on. KEYS: holders. ARGV: member, lease_ms
# Returns 1, or 0 when the permit is no longer held (its lease ran out and was swept).
RENEW: Final = (
    _PRELUDE
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)

# Give a permit back, or leave the queue (a waiter that timed out or was cancelled, which may
# have been granted just before it gave up). KEYS: holders, waiters, leases, wake.
# ARGV: member, wake_ttl_ms. Returns 1 when a permit was freed.
RELEASE: Final = (
    _PRELUDE
    + """
local freed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if freed > 0 then wake(KEYS[2], KEYS[4], tonumber(ARGV[2])) end
return freed
"""
)

# Live holders and waiters as they stand, for the sidecar (read only). KEYS: holders, waiters,
# leases. Returns {now, {member, deadline, ...}, {member, score, ...}}
INSPECT: Final = (
    _PRELUDE
    + """
local holders = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')
local queue = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local waiters = {}
for i = 1, #queue, 2 do
  local d = redis.call('ZSCORE', KEYS[3], queue[i])
  if d and tonumber(d) >= now then
    table.insert(waiters, queue[i]); table.insert(waiters, queue[i + 1])
  end
end
return {tostring(now), holders, waiters}
"""
)


class Script:
    """A Lua script called by SHA and loaded again on NOSCRIPT (a restarted or new server)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Arg]) -> object:
        try:
            reply: object = await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            reply = await client.evalsha(self.sha, len(keys), *keys, *args)
        return reply


ACQUIRE_SCRIPT: Final = Script(ACQUIRE)
RENEW_SCRIPT: Final = Script(RENEW)
RELEASE_SCRIPT: Final = Script(RELEASE)
INSPECT_SCRIPT: Final = Script(INSPECT)
