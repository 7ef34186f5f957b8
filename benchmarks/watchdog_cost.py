"""What the watchdog costs: N jobs through `vigil run` (a subprocess, the built-in
simulated API at latency 0) with `watchdog.enabled` on and off, alternating for a
few rounds so drift on the machine hits both alike.

    .venv/bin/python benchmarks/watchdog_cost.py [--jobs 20000] [--rounds 5]

Jobs are submitted while the daemon is paused, then timed from `resume` until the
last one is final, so only the dispatcher -> worker -> API -> store path is measured.
Prints, per run, jobs/s and the daemon's CPU time per job; then the ratio on/off of
the median and of the best throughput, of the median CPU per job, and the median
of each round's own ratio (a round runs on and off back to back, so it pairs runs
that saw the same load). On a shared machine the paired figures are the steadier.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs; types-psutil is not a dependency

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon_proc import DaemonProcess, sim_config

BATCH = 500


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def run_once(state_dir: Path, *, enabled: bool, jobs: int) -> tuple[float, float]:
    """(jobs per second, daemon CPU microseconds per job) for one daemon run."""
    extra = f"\n[watchdog]\nenabled = {'true' if enabled else 'false'}\n"
    config = sim_config(latency_ms=0, max_concurrency=64, extra=extra)
    daemon = DaemonProcess.start(state_dir, config)
    try:
        proc = psutil.Process(daemon.proc.pid)
        daemon.call("pause")
        for start in range(0, jobs, BATCH):
            batch = [
                {"analyzer": "summarize", "input": {"text": f"document {i}"}}
                for i in range(start, min(jobs, start + BATCH))
            ]
            daemon.call("submit", jobs=batch)
        cpu_before, started = _cpu_s(proc), time.perf_counter()
        daemon.call("resume")
        counts = daemon.wait_all_terminal(timeout_s=900)
        elapsed, cpu = time.perf_counter() - started, _cpu_s(proc) - cpu_before
        assert counts["succeeded"] == jobs, counts
        return jobs / elapsed, cpu / jobs * 1e6
    finally:
        daemon.terminate()
        daemon.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        for round_no in range(args.rounds):
            # Alternate which goes first, so warm caches favour neither.
            order = (False, True) if round_no % 2 == 0 else (True, False)
            for enabled in order:
                state = Path(tmp) / f"r{round_no}-{'on' if enabled else 'off'}"
                rate, cpu_us = run_once(state, enabled=enabled, jobs=args.jobs)
                rates[enabled].append(rate)
                cpus[enabled].append(cpu_us)
                label = "on " if enabled else "off"
                print(
                    f"round {round_no + 1}  watchdog {label}  {rate:8.1f} jobs/s  "
                    f"{cpu_us:6.0f} us CPU/job",
                    flush=True,
                )
    for name, pick in (("median", statistics.median), ("best", max)):
        on, off = pick(rates[True]), pick(rates[False])
        print(
            f"{name:6} throughput: off {off:.1f}, on {on:.1f} jobs/s; "
            f"ratio on/off {on / off:.3f} ({100 * (1 - on / off):+.1f} % cost)"
        )
    on, off = statistics.median(cpus[True]), statistics.median(cpus[False])
    print(
        f"median CPU/job:    off {off:.0f}, on {on:.0f} us; "
        f"ratio on/off {on / off:.3f} ({100 * (on / off - 1):+.1f} % cost)"
    )
    paired = statistics.median(a / b for a, b in zip(rates[True], rates[False], strict=True))
    paired_cpu = statistics.median(a / b for a, b in zip(cpus[True], cpus[False], strict=True))
    print(
        f"paired (median of per-round ratios): throughput {paired:.3f} "
        f"({100 * (1 - paired):+.1f} % cost), CPU/job {paired_cpu:.3f} "
        f"({100 * (paired_cpu - 1):+.1f} % cost)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
