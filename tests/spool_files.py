"""Files delivered to a spool inbox the way a producer should, and the config section
that points a daemon at it."""

from __future__ import annotations

import os
from pathlib import Path


def spool_toml(inbox: Path, extra: str = "") -> str:
    """An `[intake.spool]` section polling `inbox` fast, with no settle wait."""
    return (
        f'[intake.spool]\ndir = "{inbox}"\nanalyzer = "summarize"\n'
        f"poll_s = 0.05\nsettle_s = 0\n{extra}"
    )


def drop(inbox: Path, name: str | bytes, data: str | bytes) -> None:
    """Write elsewhere, then rename in: the file appears whole. `name` may be bytes
    that are no valid text."""
    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    inbox.mkdir(exist_ok=True)  # the daemon makes it at its first poll, just after READY
    tmp = staging / "incoming"
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.rename(tmp, os.path.join(os.fsencode(inbox), os.fsencode(name)))
