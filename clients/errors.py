"""Errors the client library raises, under the project's root `TickwireError`.

TickwireError
 └── ClientError              anything the client library raises on purpose
      ├── ServerError          the server answered a request with an `error` message
      ├── InvalidFrame         the server sent something that is not protocol v1
      ├── ConnectFailed        the server could not be reached (first connection, or gave up)
      ├── AuthenticationFailed the server refused our credentials (HTTP 401/403, close 4001/4003)
      ├── ConnectionLost       a request's connection dropped before its reply (ping, list)
      └── FeedClosed           the feed was closed
"""

from __future__ import annotations

from tickwire.core.errors import TickwireError


class ClientError(TickwireError):
    """Root of the client library's errors."""


class ServerError(ClientError):
    """The server's `error` reply: `code` is the wire code, `id` the failed request's id.

    The connection stays open. Raised by `Feed.subscribe()` and friends; an error that answers no
    pending request is delivered by the feed's iterator as a message instead.
    """

    def __init__(self, code: str, message: str, id: int | str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id

    def __repr__(self) -> str:
        return f"ServerError(code={self.code!r}, message={self.message!r}, id={self.id!r})"


class InvalidFrame(ClientError):
    """A server frame that breaks protocol v1 (not JSON, missing fields, a malformed event)."""


class ConnectFailed(ClientError):
    """The server could not be reached."""


class CertificateRefused(ConnectFailed):
    """The server's TLS certificate is not trusted (another CA, another name); retrying would
    not help until `ClientConfig.ssl` trusts it."""


class AuthenticationFailed(ClientError):
    """The server refused the credentials; retrying would not help."""


class ConnectionLost(ClientError):
    """The connection dropped before a request's reply came."""


class FeedClosed(ClientError):
    """The feed was closed (by `close()`, or after it gave up reconnecting)."""
