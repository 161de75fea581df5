"""Waiting for replicas after the writes that matter: a submission and a terminal write.

Replication in Redis is asynchronous: a write acknowledged by the master can be lost when a
replica that has not received it is promoted. With ``replicas`` > 0, the write and a ``WAIT
replicas timeout`` go out together on one connection (``WAIT`` counts the replicas that hold
that connection's writes), so the caller learns how many replicas hold it before it goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from sop_llm.streams.scripts import EncodableT, LuaScript


@dataclass(frozen=True, slots=True)
class Durability:
    replicas: int = 0
    """Replicas that must hold a write before it counts as done (0: the master's word)."""
    timeout_ms: int = 1000
    """How long to wait for them."""

    async def call(
        self, client: Redis, script: LuaScript, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> tuple[Any, int | None]:
        """``script``'s reply, and how many replicas acknowledged its writes within the
        timeout (``None`` when no replica is asked for)."""
        if self.replicas <= 0:
            return await script(client, keys, args), None
        for loaded in (False, True):
            pipe = client.pipeline(transaction=False)  # one connection: WAIT counts its writes
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and not loaded:
                await client.script_load(script.source)
                continue
            for value in (reply, acked):
                if isinstance(value, Exception):
                    raise value
            return reply, int(acked)
        raise NoScriptError(f"script {script.name} could not be loaded")
