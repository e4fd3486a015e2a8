"""The server's HTTP side: the routes beside `/ws`, static files, and the WebSocket admission.

Every request comes to `HttpRoutes.route` before any handshake: a response ends the exchange,
None lets the upgrade of `/ws` go on (once `Admission` has let it in).
"""

from __future__ import annotations

import logging
import mimetypes
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tickwire.server.admission import Admission, Refused
from tickwire.server.metrics import Metrics
from tickwire.server.wire import Wire

log = logging.getLogger("tickwire.server")

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"

FALLBACK_PAGE = b"""<!doctype html><meta charset=utf-8><title>tickwire</title>
<h1>tickwire</h1><p>WebSocket endpoint: <code>/ws</code>. See docs/protocol.md.</p>"""


class HttpRoutes:
    """`/ws` (admission), `/healthz`, `/metrics`, `/` (the web page), `/web/…`, `/asyncapi.yaml`."""

    def __init__(
        self,
        admission: Admission,
        metrics: Metrics,
        *,
        health: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        self.admission = admission
        self.metrics = metrics
        #: (healthy, the document `/healthz` shows).
        self.health = health

    def route(self, wire: Wire, request: Request) -> Response | None:
        if request.method != "GET":
            # Every method comes here. Every route is read-only, and a response to
            # HEAD must carry no body.
            body = b"" if request.method == "HEAD" else b"method not allowed\n"
            return respond(HTTPStatus.METHOD_NOT_ALLOWED, body, "text/plain", (("Allow", "GET"),))
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return self._admit(wire, request)
        if path == "/healthz":
            healthy, doc = self.health()
            return respond(
                HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                orjson.dumps(doc),
                "application/json",
            )
        if path == "/metrics":
            return respond(
                HTTPStatus.OK, self.metrics.render().encode(), "text/plain; version=0.0.4"
            )
        if path == "/":
            page = WEB_DIR / "index.html"
            body = page.read_bytes() if page.is_file() else FALLBACK_PAGE
            return respond(HTTPStatus.OK, body, "text/html; charset=utf-8")
        if path.startswith("/web/"):
            return static(WEB_DIR, path[len("/web/") :])
        if path == "/asyncapi.yaml":
            return static(DOCS_DIR, "asyncapi.yaml")
        return respond(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _admit(self, wire: Wire, request: Request) -> Response | None:
        remote = wire.remote_address
        peer = str(remote[0]) if isinstance(remote, tuple) and remote else "unix"
        decision = self.admission.admit(
            request.headers, request.path, peer, time.time(), wire.client_certificate
        )
        if isinstance(decision, Refused):
            status = decision.status
            refused = self.metrics.handshakes_refused
            refused[status.value] = refused.get(status.value, 0) + 1
            log.log(
                logging.DEBUG if status.value in (429, 503) else logging.INFO,
                "refused a connection from %s: %d %s",
                peer,
                status.value,
                decision.reason,
            )
            return respond(status, f"{decision.reason}\n".encode(), "text/plain", decision.headers)
        # Its slots are given back when the TCP connection goes, whether or not the handshake
        # completes (`TickwireServer._lost`).
        wire.admitted = decision
        return None


def static(root: Path, name: str) -> Response:
    target = (root / name).resolve()
    if root.resolve() not in target.parents or not target.is_file():
        return respond(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
    ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".yaml":
        ctype = "application/yaml"
    return respond(HTTPStatus.OK, target.read_bytes(), ctype)


def respond(
    status: HTTPStatus, body: bytes, ctype: str, extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    headers = Headers(
        [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
    )
    return Response(status.value, status.phrase, headers, body)
