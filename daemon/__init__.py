"""Vigil: a single-process asyncio daemon that runs AI analysis continuously and safely."""

__version__ = "0.1.0"
