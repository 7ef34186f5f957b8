"""The benchmarks behind `vigil bench`: daemon/cli/bench.py parses the command line and
calls run_throttle (throttle.py) or run_perf (perf.py), loading them only when a bench
runs. BENCHMARKS.md has the methods and the figures."""

from collections.abc import Awaitable, Callable

# The CLI's event loop runner (daemon.cli.main.run_async, on uvloop), handed in so that
# this package does not import the CLI: each scenario runs in an event loop of its own.
RunAsync = Callable[[Callable[[], Awaitable[int]]], int]
