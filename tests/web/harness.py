"""Headless Chromium around the live page: its files served by route, a scripted mock server."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    Page,
    Route,
    WebSocket,
    WebSocketRoute,
    async_playwright,
)

from tests.conftest import timeout
from tests.contract.schemas import validate_client_message, validate_server_message

WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Origin the page is loaded from in tests without a server (never resolved: routes answer).
MOCK_ORIGIN = "http://tickwire.test"


def require_chromium() -> None:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium; "
            "run scripts/ensure-chromium.sh (apt-get install chromium chromium-driver)"
        )


@asynccontextmanager
async def launch_chromium() -> AsyncIterator[Browser]:
    """Debian's headless Chromium under Playwright; fails the test (never skips) if missing."""
    require_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def serve_web_files(page: Page, origin: str = MOCK_ORIGIN) -> None:
    """Answer `GET /` and `GET /web/<name>` from clients/web/, as the server does."""

    async def handle(route: Route) -> None:
        path = urlsplit(route.request.url).path
        name = "index.html" if path == "/" else path.removeprefix("/web/")
        target = (WEB_DIR / name).resolve()
        served = path == "/" or path.startswith("/web/")
        if served and target.parent == WEB_DIR.resolve() and target.is_file():
            await route.fulfill(path=target)
        else:
            await route.fulfill(status=404, body="not found")

    await page.route(f"{origin}/**", handle)


async def wait_for(
    what: str, check: Callable[[], Awaitable[object] | object], seconds: float = 10
) -> None:
    """Poll `check` until it holds; fail with `what` after `seconds` (scaled by the env factor)."""
    deadline = asyncio.get_running_loop().time() + timeout(seconds)
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout(seconds):.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def snapshot(page: Page) -> dict[str, Any]:
    """The page's read-only state (window.tickwire.snapshot())."""
    result: dict[str, Any] = await page.evaluate("() => window.tickwire.snapshot()")
    return result


@dataclass
class PageErrors:
    """Uncaught exceptions and console errors of a page, less the ones a test expects."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None,
        )

    def unexpected(self, *allowed: str) -> list[str]:
        console = [m for m in self.console_errors if not any(a in m for a in allowed)]
        return self.page_errors + console


# -- a scripted server behind page.route_web_socket ------------------------------------------


class MockConnection:
    """One WebSocket the page opened; the test plays the server. Validates both directions."""

    def __init__(self, route: WebSocketRoute) -> None:
        self.route = route
        self.requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed: asyncio.Future[tuple[int | None, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        route.on_message(self._on_message)
        route.on_close(self._on_close)

    def _on_message(self, data: str | bytes) -> None:
        request = json.loads(data)
        validate_client_message(request)
        self.requests.put_nowait(request)

    async def _on_close(self, code: int | None, reason: str | None) -> None:
        # With a close handler installed Playwright leaves the closing handshake to us: finish it
        # so that the page's socket reaches CLOSED (and its onclose runs), as with a real server.
        if not self.closed.done():
            self.closed.set_result((code, reason))
            await self.route.close(code=code, reason=reason)

    def send(self, *messages: dict[str, Any], array: bool = False) -> None:
        """Send messages, each valid per the contract: one frame each, or one array frame."""
        for message in messages:
            validate_server_message(message)
        if array:
            self.route.send(json.dumps(list(messages)))
        else:
            for message in messages:
                self.route.send(json.dumps(message))

    async def request(self, op: str) -> dict[str, Any]:
        """The next request the page sends, which must be `op`."""
        try:
            request = await asyncio.wait_for(self.requests.get(), timeout(10))
        except TimeoutError:
            raise AssertionError(f"the page sent no {op} request") from None
        assert request["op"] == op, f"expected a {op} request, got {request}"
        return request

    async def requests_until_quiet(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Every request the page sends until it has said nothing for `quiet` seconds."""
        out = []
        while True:
            try:
                out.append(await asyncio.wait_for(self.requests.get(), quiet))
            except TimeoutError:
                return out

    async def close(self, code: int, reason: str = "") -> None:
        await self.route.close(code=code, reason=reason)


class MockServer:
    """Accepts the page's WebSockets at ws://tickwire.test/ws; the test drives each one."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[MockConnection] = asyncio.Queue()
        self.count = 0

    async def install(self, page: Page) -> None:
        host = urlsplit(MOCK_ORIGIN).netloc

        def is_feed(url: str) -> bool:
            parts = urlsplit(url)
            return parts.netloc == host and parts.path == "/ws"

        await page.route_web_socket(is_feed, self._accept)

    def _accept(self, route: WebSocketRoute) -> None:
        self.count += 1
        self.connections.put_nowait(MockConnection(route))

    async def next_connection(self, seconds: float = 10) -> MockConnection:
        try:
            return await asyncio.wait_for(self.connections.get(), timeout(seconds))
        except TimeoutError:
            raise AssertionError(f"the page opened no WebSocket within {seconds} s") from None


# -- what the page exchanges with a real server ----------------------------------------------


@dataclass
class SocketLog:
    """Frames of every WebSocket the page opened, in order, per connection."""

    sent: list[list[dict[str, Any]]] = field(default_factory=list)
    received: list[list[str]] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("websocket", self._opened)

    def _opened(self, ws: WebSocket) -> None:
        index = len(self.sent)
        self.sent.append([])
        self.received.append([])
        self.closed.append(False)
        ws.on("framesent", lambda payload: self.sent[index].append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received[index].append(str(payload)))
        ws.on("close", lambda _ws: self.closed.__setitem__(index, True))

    def requests(self, op: str, connection: int = -1) -> list[dict[str, Any]]:
        if not self.sent:
            return []
        return [r for r in self.sent[connection] if r.get("op") == op]
