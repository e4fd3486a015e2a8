"""Unmasked WebSocket text frames built by hand, for the fan-out's hot write path.

The websockets library builds a Frame object and serializes it for every send; the fan-out
writes tens of thousands of frames a second, so building the 2-10 header bytes ourselves and
writing header + payload to the transport in one call saves that per frame (server frames are
never masked, RFC 6455 §5.1). Only valid without extensions (compression rewrites payloads).
"""

from __future__ import annotations

import struct

_SHORT = struct.Struct("!BB").pack
_MEDIUM = struct.Struct("!BBH").pack
_LONG = struct.Struct("!BBQ").pack
_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """One final text frame carrying `payload` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return _SHORT(_FIN_TEXT, n) + payload
    if n < 65536:
        return _MEDIUM(_FIN_TEXT, 126, n) + payload
    return _LONG(_FIN_TEXT, 127, n) + payload
