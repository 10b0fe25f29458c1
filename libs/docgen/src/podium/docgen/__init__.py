"""Files derived from the code (``podium generate``): docs, NATS permissions, monitoring."""
