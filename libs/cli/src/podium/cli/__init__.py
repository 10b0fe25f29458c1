"""The ``podium`` command: run the platform locally, send messages, watch and inspect."""
