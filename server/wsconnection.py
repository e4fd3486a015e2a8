"""The WebSocket connection class of the server: it stops reading a client that does not read.

websockets answers every ping with a pong written straight to the socket's buffer, past any queue
of ours: a client that sends pings and never reads would grow the server's memory without bound.
Above `read_pause_bytes` of unsent data the connection stops reading from the client (its
requests and pings wait in the kernel, and TCP pushes back on it) until the buffer drains.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.server import ServerConnection


class BoundedServerConnection(ServerConnection):
    #: Unsent bytes above which the client is no longer read; set by the server per instance
    #: (a subclass per server keeps the websockets factory signature).
    read_pause_bytes = 1 << 20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads_held = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        transport = self.transport
        if transport.get_write_buffer_size() > self.read_pause_bytes and not self.reads_held:
            self.reads_held = True
            transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.reads_held:
            self.reads_held = False
            # websockets' own flow control (its queue of received messages) may want reads
            # paused still: it resumes them itself when its queue drains.
            if not self.recv_messages.paused:
                self.transport.resume_reading()


def bounded_connection_class(read_pause_bytes: int) -> type[BoundedServerConnection]:
    return type(
        "BoundedServerConnection",
        (BoundedServerConnection,),
        {"read_pause_bytes": read_pause_bytes},
    )
