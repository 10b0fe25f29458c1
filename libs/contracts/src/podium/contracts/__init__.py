"""Podium's contracts: events, subjects, the registry, state records, streams, permissions."""
