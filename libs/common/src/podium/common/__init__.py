"""Podium's shared contracts and runtime: events, subjects, streams, settings, services."""
