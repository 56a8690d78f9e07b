"""`python -m vdproj_ext.train` and the vdproj-train console script: see vdproj_ext/cli/train.py."""
from .cli.train import main

if __name__ == "__main__":
    main()
