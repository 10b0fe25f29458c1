"""Podium notifier: email, SMS and API replies out, exactly once per command."""
