"""The operator console and the API docs page: static files shipped in the package.

``GET /`` is the console (``ops/console_assets/index.html`` and its script and style under
``/console/``), ``GET /docs`` Swagger UI over ``/openapi.json`` (its files under ``/docs/``,
copied from the ``swagger-ui-dist`` npm package: see ``ops/console_assets/docs/NOTICE``).
Nothing is fetched from anywhere else: the pages work offline.

These files hold no data, so they are served without the token; every figure the page shows
and every action it takes goes through the API, which asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final

from aiohttp import web

from sop_llm.ops.http_common import HttpError

_ASSETS: Final = "console_assets"
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# the page's own script and style only; Swagger UI styles some elements inline and draws its
# icons from data: URLs
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
_HEADERS: Final = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONSOLE_FILES: Final = (
    "console.js",
    "core.js",
    "overview.js",
    "views.js",
    "task.js",
    "console.css",
    "favicon.png",
)
DOCS_FILES: Final = (
    "docs.js",
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "LICENSE",
    "NOTICE",
    "swagger-ui-bundle.js.LICENSE.txt",
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str


@cache
def asset(*parts: str) -> Asset:
    """A file of the package's ``console_assets`` (read once). Raises ``FileNotFoundError``."""
    node = resources.files("ops").joinpath(_ASSETS, *parts)
    name = parts[-1]
    suffix = name[name.rfind(".") :] if "." in name else ".txt"
    return Asset(node.read_bytes(), _TYPES.get(suffix, "text/plain; charset=utf-8"))


def _serve(*parts: str) -> web.Response:
    found = asset(*parts)
    return web.Response(body=found.body, headers={**_HEADERS, "Content-Type": found.content_type})


async def index(request: web.Request) -> web.Response:
    """``GET /``: the console page."""
    return _serve("index.html")


async def console_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in CONSOLE_FILES:
        raise HttpError(404, "not_found", "no such file")
    return _serve(name)


async def docs(request: web.Request) -> web.Response:
    """``GET /docs``: Swagger UI over this sidecar's OpenAPI document."""
    return _serve("docs", "index.html")


async def docs_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in DOCS_FILES:
        raise HttpError(404, "not_found", "no such file")
    return _serve("docs", name)


OPEN_ROUTES: Final = frozenset({"/", "/console/{name}", "/docs", "/docs/{name}"})
"""The routes served without the token (files only, no data)."""


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/console/{name}", console_file)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/{name}", docs_file)
