"""Feed adapters (simulator, replay, bars) and the publisher that appends their events to Redis."""
