"""A local HTTP server that speaks a vendor's wire protocol, scripted reply by reply.

Tests drive the official SDKs against it: nothing is mocked, every byte crosses a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Seen:
    path: str
    headers: Mapping[str, str]
    body: Any
    peer: Any = None
    """The client's (host, port): one per connection, so distinct peers count connections."""


@dataclass(slots=True)
class FakeServer:
    url: str = ""
    replies: deque[Reply] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    disconnects: int = 0

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    @property
    def bodies(self) -> list[Any]:
        return [s.body for s in self.seen]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.path, headers, body, peer))
        if not self.replies:
            return web.json_response({"error": {"message": "no reply scripted"}}, status=599)
        reply = self.replies.popleft()
        try:
            return await reply(request)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise


@contextlib.asynccontextmanager
async def fake_server() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def json_reply(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=dict(headers or {}))

    return reply


def raw_reply(text: str, *, status: int = 200, content_type: str = "application/json") -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, status=status, content_type=content_type)

    return reply


def slow_reply(seconds: float, then: Reply) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request)

    return reply


def sse_reply(
    events: Sequence[tuple[str | None, Any]],
    *,
    delay: float = 0.0,
    done: bool = False,
    cut: bool = False,
) -> Reply:
    """Server-sent events; ``(None, data)`` omits the ``event:`` line (the OpenAI style).
    ``done`` ends with ``data: [DONE]``; ``cut`` drops the connection after the events."""

    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event, data in events:
            chunk = "" if event is None else f"event: {event}\n"
            chunk += f"data: {json.dumps(data)}\n\n"
            await resp.write(chunk.encode())
            if delay:
                await asyncio.sleep(delay)
        if cut:
            assert request.transport is not None
            request.transport.close()
            return resp
        if done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return reply


# ---- OpenAI Chat Completions -------------------------------------------------------------


def oa_completion(
    text: str, *, finish: str = "stop", prompt_tokens: int = 5, completion_tokens: int = 2
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def oa_chunks(
    pieces: Sequence[str], *, finish: str | None = "stop", usage: tuple[int, int] | None = (5, 3)
) -> list[tuple[str | None, Any]]:
    """A streamed chat completion: a role chunk, a chunk per piece, then the finish chunk
    (none when ``finish`` is None) and the usage chunk (none when ``usage`` is None)."""

    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        }

    out: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant"}, None))]
    out += [(None, chunk({"content": p}, None)) for p in pieces]
    if finish is not None:
        out.append((None, chunk({}, finish)))
    if usage is not None:
        out.append(
            (
                None,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": usage[0],
                        "completion_tokens": usage[1],
                        "total_tokens": sum(usage),
                    },
                },
            )
        )
    return out


def oa_error(message: str, *, type_: str = "invalid_request_error", code: str | None = None) -> Any:
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


# ---- Anthropic Messages ------------------------------------------------------------------


def an_message(
    content: list[dict[str, Any]], *, stop: str = "end_turn", usage: tuple[int, int] = (5, 2)
) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


def an_events(
    blocks: Sequence[tuple[str, Sequence[str]]],
    *,
    stop: str = "end_turn",
    usage: tuple[int, int] = (5, 4),
    tool_name: str = "output",
) -> list[tuple[str | None, Any]]:
    """``blocks``: ("text", pieces) or ("tool", partial JSON pieces)."""
    start = an_message([], stop=stop, usage=(usage[0], 1))
    start["stop_reason"] = None
    out: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start})
    ]
    for i, (kind, pieces) in enumerate(blocks):
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": f"toolu_{i}", "name": tool_name, "input": {}}
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": block},
            )
        )
        for p in pieces:
            delta = (
                {"type": "text_delta", "text": p}
                if kind == "text"
                else {"type": "input_json_delta", "partial_json": p}
            )
            out.append(
                ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
            )
        out.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": usage[1]},
            },
        )
    )
    out.append(("message_stop", {"type": "message_stop"}))
    return out


def an_error(type_: str, message: str) -> Any:
    return {"type": "error", "error": {"type": type_, "message": message}}
