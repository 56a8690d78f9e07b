"""Ctrl-C in a command-line tool: a note on how to continue instead of a traceback."""
from __future__ import annotations

import sys


def run_interruptible(main, argv, note: str):
    """main(argv); on KeyboardInterrupt from the command line (argv None) print `note` and
    exit 130 (the shell's code for SIGINT). Called from Python (argv given), it propagates."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        if argv is not None:
            raise
        print(f"\ninterrupted: {note}", file=sys.stderr, flush=True)
        sys.exit(130)
