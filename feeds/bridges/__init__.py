"""Bridges: broker messages (NATS JetStream, RabbitMQ, MQTT) into tickwire's streams."""
