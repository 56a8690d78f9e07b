"""Re-render report.md and plots from results.json, or join runs trained in separate folders.

    python -m vdproj_ext.cli.report OUT_DIR                  # re-render OUT_DIR/report.md, plots
    python -m vdproj_ext.cli.report --merge A B C --out DIR  # join runs of separate folders
"""
from __future__ import annotations

import argparse
import json
import os

from ..experiment.report import merge, summary_table, write_report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vdproj_ext.cli.report")
    p.add_argument("dir", nargs="?", help="folder with results.json to re-render")
    p.add_argument("--merge", nargs="+", help="folders whose results.json to join")
    p.add_argument("--out", help="output folder for --merge")
    a = p.parse_args(argv)
    if a.merge:
        if not a.out:
            p.error("--merge needs --out")
        res = merge(a.merge, a.out)
        print(summary_table(res))
    elif a.dir:
        with open(os.path.join(a.dir, "results.json")) as f:
            res = json.load(f)
        write_report(res, a.dir)
        print(summary_table(res))
    else:
        p.error("give a folder or --merge")


if __name__ == "__main__":
    main()
