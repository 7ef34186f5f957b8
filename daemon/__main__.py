"""`python -m daemon` is the `vigil` command."""

from daemon.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
