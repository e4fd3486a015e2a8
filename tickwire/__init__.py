"""tickwire: real-time market data streaming over Redis Streams and WebSockets."""

__version__ = "0.1.0"
