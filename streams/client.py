"""The Redis client the streams layer works with (redis-py's asyncio client, with hiredis).

Layers above ``streams`` name it through this alias and never import ``redis`` themselves."""

from redis.asyncio import Redis as RedisClient

__all__ = ["RedisClient"]
