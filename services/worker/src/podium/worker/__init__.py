"""Podium worker: runs agent tasks in their own working directories and reports results."""
