"""Running a benchmark script: its error type, its exit, and SIGTERM."""

import signal
import sys


class BenchError(Exception):
    """An API error or a server that would not start: the benchmark fails (exit 1)."""


def run_script(main):
    """Run a benchmark's main(): exit 1 with the message on a BenchError."""
    try:
        main()
    except BenchError as exc:
        print(f"\nERROR: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def install_sigterm_handler():
    """SIGTERM -> SystemExit, so that `finally` blocks (killing the server) run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
