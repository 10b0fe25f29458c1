"""Podium's private test support: real servers for fixtures, fakes of paid provider APIs."""
