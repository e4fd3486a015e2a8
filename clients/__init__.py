"""The tickwire client: an asyncio feed with exactly-once delivery, its sans-I/O session, the watcher.

    async with tickwire.clients.connect("ws://127.0.0.1:8765/ws") as feed:
        await feed.subscribe("trades:BTC-USD", "quotes:*", snapshot=True)
        async for msg in feed:
            ...

Importing this package loads websockets and orjson, never numpy or redis: `columns` imports numpy
when called, `watch` imports rich when run.
"""

from __future__ import annotations

from tickwire.clients.columns import (
    bars_to_numpy,
    events_to_numpy,
    quotes_to_numpy,
    trades_to_numpy,
)
from tickwire.clients.connection import (
    Backoff,
    ClientConfig,
    Connecting,
    Disconnected,
    Feed,
    FeedMessage,
    Reconnected,
    connect,
)
from tickwire.clients.errors import (
    AuthenticationFailed,
    CertificateRefused,
    ClientError,
    ConnectFailed,
    ConnectionLost,
    FeedClosed,
    InvalidFrame,
    ServerError,
)
from tickwire.clients.messages import (
    ChannelList,
    EventBatch,
    Gap,
    Heartbeat,
    Message,
    Pong,
    Position,
    Received,
    Reset,
    ResumeNeeded,
    Status,
    Subscribed,
    Unsubscribed,
    Welcome,
    event_to_dict,
)
from tickwire.clients.session import ClientSession, Request
from tickwire.core.events import Bar, Event, Quote, Trade

__all__ = [
    "AuthenticationFailed",
    "Backoff",
    "Bar",
    "CertificateRefused",
    "ChannelList",
    "ClientConfig",
    "ClientError",
    "ClientSession",
    "ConnectFailed",
    "Connecting",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "EventBatch",
    "Feed",
    "FeedClosed",
    "FeedMessage",
    "Gap",
    "Heartbeat",
    "InvalidFrame",
    "Message",
    "Pong",
    "Position",
    "Quote",
    "Received",
    "Reconnected",
    "Request",
    "Reset",
    "ResumeNeeded",
    "ServerError",
    "Status",
    "Subscribed",
    "Trade",
    "Unsubscribed",
    "Welcome",
    "bars_to_numpy",
    "connect",
    "event_to_dict",
    "events_to_numpy",
    "quotes_to_numpy",
    "trades_to_numpy",
]
