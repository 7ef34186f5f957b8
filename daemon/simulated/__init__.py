"""The simulated AI API: a real HTTP server on loopback that behaves like the real
ones (their dialects, headers, sliced limits and faults), for the demo, tests and
benchmarks."""
