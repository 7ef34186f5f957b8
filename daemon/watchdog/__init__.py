"""The in-process watchdog: Vigil watches its own event loop, memory, tasks, stuck
jobs and health, says what is wrong and where, and feeds systemd's watchdog only
while healthy. `service.Watchdog` is the component app.py runs."""
