"""Podium conductor: the agent in the loop — triage, delegation, validation, replies."""
