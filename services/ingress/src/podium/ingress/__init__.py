"""Podium ingress: the JSON API and provider webhooks, each message stored in JetStream."""
