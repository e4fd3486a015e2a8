"""One client's WebSocket: websockets' sans-I/O protocol driven by asyncio callbacks, no task.

websockets' asyncio connection gives each client a handler task and its coroutine frames, a
queue of received frames, futures for its request and its end, and a logger adapter: about 5 KB
per connection, for a server whose clients mostly sit and receive. Here the HTTP parsing, the
handshake, the framing and the closing handshake stay websockets' (`ServerProtocol`); what
reaches the server is one call per message (`Handler.on_message`), in the loop turn that read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from tickwire.server.auth import ClientCertificate
from tickwire.server.frames import text_frame

if TYPE_CHECKING:
    from tickwire.server.admission import Admitted

log = logging.getLogger("tickwire.server")

#: Fragments of one message at most, websockets' own cap: empty continuation frames add nothing
#: to a message's size, so without a cap a message that never ends would hold memory for ever.
MAX_FRAGMENTS = 4096

# Why reading from a client is held; it resumes when no reason is left.
#: Its socket's unsent data is over `read_pause_bytes`. websockets answers pings with pongs
#: written straight to the socket, past the outbox: a client that pings and never reads would
#: grow the server's memory without bound.
_HOLD_WRITES = 1
#: The handler cannot take its next message yet (`Handler.on_message` said so).
_HOLD_HANDLER = 2

_OPEN = State.OPEN
#: What a request keeps as headers once answered (read only).
_NO_HEADERS = Headers()
OP_TEXT, OP_BINARY, OP_CONT, OP_PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG


class Handler(Protocol):
    """What the server attaches to an open connection."""

    def on_message(self, data: bytes) -> bool:
        """Handle one message (UTF-8 checked for text); False to be offered it again after
        `Wire.release()`, reading held meanwhile."""
        ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What every connection of one listening socket shares."""

    #: Answers a request (`process_request` in websockets): a response ends the exchange,
    #: None upgrades it to a WebSocket.
    route: Callable[[Wire, Request], Response | None]
    #: Called once the connection is made: accepted, and over TLS its TLS handshake done (a
    #: connection whose TLS handshake fails is never made, and never lost).
    made: Callable[[Wire], None]
    #: Called once the WebSocket handshake is done; returns the connection's handler.
    opened: Callable[[Wire], Handler]
    #: Called once when a connection made is gone, whether or not its handshake completed.
    lost: Callable[[Wire], None]
    #: False once the server is shutting down: upgrades are refused with 503.
    serving: Callable[[], bool]
    max_size: int
    extensions: tuple[ServerExtensionFactory, ...]
    logger: logging.Logger | logging.LoggerAdapter[Any]
    open_timeout_s: float
    close_timeout_s: float
    #: Unsent bytes above which the client is no longer read (`_HOLD_WRITES`).
    read_pause_bytes: int
    write_high: int
    write_low: int
    server_header: str

    def __call__(self) -> Wire:
        """The protocol factory of `loop.create_server`."""
        return Wire(
            self,
            ServerProtocol(
                extensions=list(self.extensions) or None,
                max_size=self.max_size,
                logger=self.logger,
            ),
        )


class Wire(asyncio.Protocol):
    """One client connection: handshake, frames in and out, flow control, close."""

    __slots__ = (
        "_backlog",
        "_drain",
        "_fragments",
        "_gone",
        "_holds",
        "_lost",
        "_timer",
        "_writable",
        "admitted",
        "endpoint",
        "handler",
        "ping_out",
        "protocol",
        "raw",
        "transport",
    )

    def __init__(self, endpoint: Endpoint, protocol: ServerProtocol) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self.handler: Handler | None = None
        #: The admission decision of an upgrade, set by the endpoint's route.
        self.admitted: Admitted | None = None
        #: The payload of the ping that awaits its pong, if any.
        self.ping_out: bytes | None = None
        #: Frames may be written without the library's framing: no extension (compression)
        #: was negotiated (set at the upgrade).
        self.raw = False
        self._holds = 0
        #: The fragments of a message still coming in, if any.
        self._fragments: list[Frame] | None = None
        #: Messages the handler could not take yet, oldest first; None while there are none.
        self._backlog: deque[bytes] | None = None
        #: The open deadline during the handshake, the close deadline once closing.
        self._timer: asyncio.TimerHandle | None = None
        self._writable = True
        self._drain: asyncio.Future[None] | None = None
        #: Resolved when the TCP connection is gone; made only for those who wait for it.
        self._lost: asyncio.Future[None] | None = None
        self._gone = False

    # -- what the server uses ------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return self.protocol.state is _OPEN

    @property
    def reading_held(self) -> bool:
        return bool(self._holds)

    @property
    def remote_address(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The certificate the client presented over TLS, verified against the server's client
        CA; None without one, or if it names no common name."""
        tls = None if self.transport is None else self.transport.get_extra_info("ssl_object")
        if tls is None:
            return None
        for rdn in (tls.getpeercert() or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return ClientCertificate(str(value), tls.getpeercert(True))
        return None

    def send_text(self, message: bytes, frame: bytes | None = None) -> None:
        """Send `message` (UTF-8) as one text frame; `frame` is it framed already
        (`text_frame`), shared by every client it goes to. Nothing when not open."""
        if self.protocol.state is not _OPEN:
            return
        if self.raw:
            assert self.transport is not None
            self.transport.write(frame if frame is not None else text_frame(message))
        else:
            self.protocol.send_text(message)
            self.send_data()

    def ping(self) -> bool:
        """Send a ping; its pong clears `ping_out`. False when the connection is not open."""
        if self.protocol.state is not _OPEN:
            return False
        self.ping_out = os.urandom(4)
        self.protocol.send_ping(self.ping_out)
        self.send_data()
        return True

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake; the connection is aborted if it has not ended
        `close_timeout_s` later. A connection still in its handshake is aborted."""
        state = self.protocol.state
        if state is _OPEN:
            self.protocol.send_close(code, reason)
            self.send_data()
            self._close_deadline()
        elif state is State.CONNECTING and self.transport is not None:
            self.transport.abort()

    def fail(self, code: int, reason: str) -> None:
        """Close at once for an error: a close frame, then the end of the stream."""
        if self.protocol.state is _OPEN:
            self.protocol.fail(code, reason)
            self.send_data()
            self._close_deadline()

    async def wait_lost(self) -> None:
        """Until the TCP connection is gone."""
        if self._gone:
            return
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._lost)

    async def drain(self) -> None:
        """Until the socket's buffer is below the low-water mark (or the connection gone)."""
        if self._writable or self._gone:
            return
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def release(self) -> None:
        """The handler takes messages again: offer it those it could not take, in order."""
        backlog = self._backlog
        if backlog is None:
            return
        while backlog:
            if self.protocol.state is not _OPEN:
                backlog.clear()
                break
            if not self._offer(backlog[0]):
                return
            backlog.popleft()
        self._backlog = None
        self._unhold(_HOLD_HANDLER)

    def send_data(self) -> None:
        """Write what the protocol has to send; an empty chunk ends our side of the stream."""
        transport = self.transport
        assert transport is not None
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                # uvloop raises RuntimeError once the transport is closing.
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            else:
                self._close_transport()  # TLS: no half-close

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's: a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        endpoint = self.endpoint
        transport.set_write_buffer_limits(endpoint.write_high, endpoint.write_low)
        self._timer = asyncio.get_running_loop().call_later(
            endpoint.open_timeout_s, transport.abort
        )
        endpoint.made(self)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        # Automatic replies first (pongs, the close frame answering the client's).
        self.send_data()
        if protocol.close_expected():
            self._close_deadline()
        for event in events:
            if type(event) is Frame:
                if protocol.state is _OPEN:
                    self._frame(event)
            elif isinstance(event, Request):
                self._request(event)
        transport = self.transport
        if (
            transport is not None
            and not self._holds & _HOLD_WRITES
            and transport.get_write_buffer_size() > self.endpoint.read_pause_bytes
        ):
            self._hold(_HOLD_WRITES)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self.protocol.events_received()
        self.send_data()
        # The WebSocket closing handshake has its own end: nothing to write after the peer's.
        return None

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._unhold(_HOLD_WRITES)

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is CLOSED from here on
        self._gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiter in (self._drain, self._lost):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._backlog = None
        self._fragments = None
        self.endpoint.lost(self)
        # The server freezes long-lived objects out of the cyclic GC's reach (`gcpolicy`), so
        # a closed connection must be freed by reference counting alone: break its cycles, to
        # its handler and inside the protocol: its parser (a generator that holds it) and the
        # errors its parsing stopped at (their tracebacks hold the parser's frame).
        self.handler = None
        protocol = self.protocol
        protocol.parser.close()
        protocol.parser_exc = None
        protocol.handshake_exc = None

    # -- inside --------------------------------------------------------------------------------
    def _close_transport(self) -> None:
        """Close the transport once: asyncio's TLS transport, closed a second time, drops its
        protocol, and every call on it after that raises AttributeError (CPython 3.11)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _request(self, request: Request) -> None:
        protocol, endpoint = self.protocol, self.endpoint
        if protocol.eof_sent:
            # Frames that came with the request broke the protocol: websockets failed the
            # connection and ended the stream before the request could be answered (a write
            # now would raise). The client broke RFC 6455 first; it gets nothing more.
            self._close_transport()
            return
        try:
            response = endpoint.route(self, request)
        except Exception:
            log.error("routing %s failed", request.path, exc_info=True)
            response = protocol.reject(
                http.HTTPStatus.INTERNAL_SERVER_ERROR, "Failed to answer; see the server log.\n"
            )
        if response is None:
            if endpoint.serving():
                response = protocol.accept(request)
            else:
                response = protocol.reject(
                    http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n"
                )
        # websockets' parser keeps the request in its suspended frame for the connection's
        # life; its headers (~1.1 KB) are read by nothing after this.
        request.headers = _NO_HEADERS
        response.headers["Server"] = endpoint.server_header
        protocol.send_response(response)
        self.send_data()
        if protocol.state is not _OPEN:
            # An HTTP answer or a refusal: the stream is ended; close once it is written.
            self._close_transport()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.raw = not protocol.extensions
        try:
            self.handler = endpoint.opened(self)
        except Exception:
            log.error("opening a connection failed", exc_info=True)
            self.fail(CloseCode.INTERNAL_ERROR, "internal error")

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is OP_TEXT or opcode is OP_BINARY:
            if frame.fin:
                self._message(frame.data, opcode is OP_TEXT)
            else:
                self._fragments = [frame]
        elif opcode is OP_CONT:
            fragments = self._fragments
            if fragments is None:
                return  # the protocol lets no stray continuation through; belt and braces
            if len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                self.fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                return
            fragments.append(frame)
            if frame.fin:
                self._fragments = None
                data = b"".join(f.data for f in fragments)
                self._message(data, fragments[0].opcode is OP_TEXT)
        elif opcode is OP_PONG and self.ping_out is not None and frame.data == self.ping_out:
            self.ping_out = None

    def _message(self, data: bytes | bytearray | memoryview, text: bool) -> None:
        data = bytes(data)
        if text:
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                self.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        if self._backlog is not None:
            self._backlog.append(data)
        elif not self._offer(data):
            self._backlog = deque((data,))
            self._hold(_HOLD_HANDLER)

    def _offer(self, data: bytes) -> bool:
        handler = self.handler
        if handler is None:
            return True
        try:
            return handler.on_message(data)
        except Exception:
            # One client's request never takes the server down: that client goes, with 1011.
            log.error("handling a message from %s failed", self.remote_address, exc_info=True)
            self.fail(CloseCode.INTERNAL_ERROR, "internal error")
            return True

    def _close_deadline(self) -> None:
        # Set once: a client sending more cannot push it back. (During the handshake, the open
        # deadline stands in for it.)
        if self._gone or self.transport is None or self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.endpoint.close_timeout_s, self.transport.abort
        )

    def _hold(self, why: int) -> None:
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds |= why

    def _unhold(self, why: int) -> None:
        if not self._holds & why:
            return
        self._holds &= ~why
        if not self._holds and self.transport is not None and not self._gone:
            self.transport.resume_reading()
