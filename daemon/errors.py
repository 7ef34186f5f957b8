"""Errors the entry point maps to exit codes, kept light so the CLI imports them
without pulling in the daemon."""


class StartupError(Exception):
    """The daemon cannot start (a second instance, a socket in use); exit code 1,
    or 78 (EX_CONFIG) for a setup only a human can fix, so systemd stops restarting."""

    exit_code = 1
