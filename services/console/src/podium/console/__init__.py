"""The operators' console: every conversation, its timeline, tasks, escalations, dead
letters and spend, as web pages and a JSON API (``podium.console.service``)."""
