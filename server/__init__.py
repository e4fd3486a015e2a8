"""The fan-out server: protocol sessions, hub, Redis reader, catch-up and the WebSocket app."""
