"""Errors the entry point maps to exit codes, kept light so the CLI imports them
without pulling in the daemon."""


class StartupError(Exception):
    """The daemon cannot start (a second instance, a socket in use); exit code 1."""
