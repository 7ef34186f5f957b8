"""What the watchdog costs: now `vigil bench watchdog` (daemon/bench/watchdog.py),
which keeps this script's method (N jobs submitted while paused, timed from `resume`
to the last result, the watchdog on and off in alternating rounds, jobs/s and the
daemon's CPU per job, the median of each round's own on/off ratio) and runs the API
as a separate process like the other scenarios.

    .venv/bin/python benchmarks/watchdog_cost.py [--jobs 10000] [--rounds 7]

is kept as a shortcut for `python -m daemon bench watchdog --jobs N --rounds R`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    command = [sys.executable, "-m", "daemon", "bench", "watchdog"]
    command += ["--jobs", str(args.jobs), "--rounds", str(args.rounds)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
