"""The exception tree every tickwire part raises from.

TickwireError
 ├── ConfigError            a setting or command-line value is invalid
 ├── ChannelError           a channel name or symbol is malformed
 │    ├── UnknownChannelType
 │    └── BarIntervalError   a `bars.<interval>` whose interval breaks the grammar or bounds
 ├── CodecError             bytes that are not a valid event
 ├── ReplayError            a malformed line in a recorded file (names file and line)
 ├── RedisUnavailable       Redis cannot be reached (translated at the edge)
 ├── AuthError              a credential that does not authenticate (says why, never the secret)
 └── ProtocolError          a client request that breaks protocol v1 (carries a wire code)
"""

from __future__ import annotations


class TickwireError(Exception):
    """Root of every error tickwire raises on purpose."""


class ConfigError(TickwireError):
    """A configuration value is invalid."""


class ChannelError(TickwireError):
    """A channel name or symbol is malformed."""


class UnknownChannelType(ChannelError):
    """The channel type is not one tickwire publishes."""


class BarIntervalError(ChannelError):
    """A bar interval outside the grammar `<N><unit>` (100ms..1d, in its largest unit)."""


class CodecError(TickwireError):
    """Bytes that do not decode to a valid event."""


class ReplayError(TickwireError):
    """A recorded file holds a line that is not a valid event."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class RedisUnavailable(TickwireError):
    """Redis could not be reached."""


class RedisTimeout(RedisUnavailable):
    """Redis did not answer in time: the connection may still be open, but for that long
    nothing came back over it (a paused or overloaded Redis, a black-holed link)."""


class AuthError(TickwireError):
    """A token or API key that is unknown, malformed, expired or not yet valid.

    The message says why in a few words for logs and close reasons; it never holds the token.
    """


class ProtocolError(TickwireError):
    """A request that breaks the wire protocol; `code` is the error code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
