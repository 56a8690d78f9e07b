"""`python -m vdproj_ext.generate` and vdproj-generate: see vdproj_ext/cli/generate.py."""
import sys

from .cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
