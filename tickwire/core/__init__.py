"""Ground floor every tickwire part shares: events, channels, config, errors."""
