"""The console's and the docs page's files: served from the package, offline, without the token,
each with its type and a Content-Security-Policy that lets nothing else in."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from sop_llm.ops.console import CONSOLE_FILES, DOCS_FILES
from tests.conftest import ROOT
from tests.ops.apicheck import serving

ASSETS = ROOT / "ops" / "console_assets"
OURS = [
    p
    for p in ASSETS.rglob("*")
    if p.suffix in (".html", ".js", ".css") and not p.name.startswith("swagger-ui")
]


async def test_the_pages_and_their_files_are_served_without_the_token(
    client: Redis, redis_url: str, namespace: str
) -> None:
    async with (
        serving(client, redis_url, namespace, token="t0ken") as api,
        aiohttp.ClientSession() as http,
    ):
        expected = [("/", "text/html"), ("/docs", "text/html")]
        expected += [(f"/console/{name}", _type(name)) for name in CONSOLE_FILES]
        expected += [(f"/docs/{name}", _type(name)) for name in DOCS_FILES]
        for path, content_type in expected:
            async with http.get(api.base + path) as r:
                assert r.status == 200, path
                assert r.content_type == content_type, path
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                body = await r.read()
            part = path.removeprefix("/console/").removeprefix("/docs/") or "index.html"
            if path == "/docs":
                part = "docs/index.html"
            elif path.startswith("/docs/"):
                part = f"docs/{part}"
            elif path == "/":
                part = "index.html"
            assert body == (ASSETS / part).read_bytes(), path
        for path in (
            "/console/nope.js",
            "/console/..%2Fconsole.py",
            "/docs/..%2F..%2Fsidecar.py",
            "/docs/index.html",
            "/console/index.html",
        ):
            async with http.get(api.base + path) as r:
                assert r.status == 404, path
                assert (await r.json())["error"] == "not_found"


def _type(name: str) -> str:
    suffix = Path(name).suffix
    return {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}.get(
        suffix, "text/plain"
    )


def test_every_asset_is_listed_and_shipped() -> None:
    on_disk = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()}
    served = {"index.html", "docs/index.html", *CONSOLE_FILES, *(f"docs/{n}" for n in DOCS_FILES)}
    assert on_disk == served
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["sop_llm.ops"]
    for name in on_disk:
        assert any(fnmatch.fnmatch(f"console_assets/{name}", g) for g in globs), name


def test_the_pages_load_nothing_from_elsewhere() -> None:
    """Offline: every script, style, image and import our files name is a local path."""
    assert OURS
    for path in OURS:
        text = path.read_text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', text) + re.findall(
            r'from "([^"]+)"', text
        ):
            assert ref.startswith(("/", "./", "#")), (path.name, ref)
        assert not re.search(r"\b(?:https?:)?//(?!\s)[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path
        assert "innerHTML" not in text and "eval(" not in text, path
    notice = (ASSETS / "docs" / "NOTICE").read_text()
    assert "swagger-ui-dist" in notice and "Apache License" in notice
