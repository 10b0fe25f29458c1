"""The service runtime: settings, the NATS connection, the consumer, health, metrics."""
