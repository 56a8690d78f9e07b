"""Compare two builds of the kernels: run this from each source tree in turn, alternating.

One process loads one build (two copies of torch.ops.vdproj_ext cannot share a process), so
the comparison is the ratio to SDPA measured in the same process, which cancels most of the
machine's drift between processes. Times the raw decode ops (no Python checks) at the judged
shape (B, Tmax) = (8, 16384), float32, H=8, D=64, Rv=320, latent keys Dr=16, Rk=192:

    for i in 1 2 3; do
      (cd OLD_TREE && PYTHONPATH=.:bench python bench/build_ab.py --label old)
      (cd NEW_TREE && PYTHONPATH=.:bench python bench/build_ab.py --label new)
    done

Each line: label, then per op the medians (ms) of the op and of SDPA, and SDPA / op.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import cpu_decode
import vdproj_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="build")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert vdproj_ext.backend_info()["cpu_kernels"], "build the extension in this tree first"
    fns, _ = cpu_decode.shape_case(8, 16384)
    cells = []
    for op in ("ext-op", "latent-op"):
        rotation = (op, "sdpa")
        for name in rotation:
            fns[name]()  # warm-up
        times = {name: [] for name in rotation}
        for _ in range(args.rounds):
            for name in rotation:
                times[name].append(cpu_decode.timed(fns[name]))
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        cells.append(f"{op} {med[op]:.2f} sdpa {med['sdpa']:.2f} ratio {med['sdpa'] / med[op]:.3f}")
    print(args.label, " | ".join(cells))


if __name__ == "__main__":
    main()
