"""`python -m vdproj_ext.study` and the vdproj-study console script: see vdproj_ext/cli/study.py."""
from .cli.study import main

if __name__ == "__main__":
    main()
