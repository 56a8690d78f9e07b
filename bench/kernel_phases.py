"""Per-position cost of the latent-key decode step's phases, by where the cache sits.

Times the CPU kernels' building blocks (bench/kernel_phases.cpp, compiled here with ninja) on
one thread at the pythia-70m-kv shape (H=8, Dr=16, Rk=192, Rv=320, one query): scoring, the
softmax weights and P @ V_c, and both, with working sets that stay in L1/L2 (64 positions),
in L3 (4096) and in DRAM (65536), for each cache dtype. Rounds are interleaved; the table gives
medians in nanoseconds per cached position, and the multiply-adds per nanosecond the step
reaches (264 sixteen-wide FMAs a position).

    python bench/kernel_phases.py [--rounds 7] [--positions 300000]

A developer's tool for the question "compute or memory?": it needs an AVX-512 CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from vdproj_ext.bindings.build_config import compile_flags

ROOT = Path(__file__).resolve().parent.parent
DR, RK, RV, H = 16, 192, 320, 8
FMAS_PER_POSITION = H * (DR + RK + RV) // 16  # sixteen-wide multiply-adds
DTYPES = ["float32", "bfloat16", "int8", "float8_e4m3fn"]
PHASES = ["scores", "values", "step"]
SIZES = {"L1/L2": 64, "L3": 4096, "DRAM": 65536}


def build():
    flags = compile_flags(ROOT / "csrc", with_cuda=False)
    build_dir = ROOT / "build" / "kernel_phases"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name="vdproj_kernel_phases", sources=[str(ROOT / "bench" / "kernel_phases.cpp")],
                extra_include_paths=[str(ROOT / "csrc" / "cpu"), str(ROOT / "csrc" / "common")],
                extra_cflags=flags["cxx"], extra_ldflags=flags["ldflags"],
                build_directory=str(build_dir), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--positions", type=int, default=300_000,
                        help="cached positions timed per measurement")
    args = parser.parse_args()
    ext = build()
    cases = [(size, dt, ph) for size in SIZES for dt in DTYPES for ph in PHASES]
    times = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            size, dt, ph = case
            keys = SIZES[size]
            iters = max(1, args.positions // keys)
            times[case].append(ext.phase_ns_per_key(dt, keys, iters, ph, DR, RK, RV))
    med = {c: statistics.median(v) for c, v in times.items()}
    print(f"one thread, {args.rounds} interleaved rounds, medians; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| cache dtype | working set | scores ns | values ns | step ns | FMA/ns (step) |")
    print("|---|---|---:|---:|---:|---:|")
    for dt in DTYPES:
        for size in SIZES:
            s, v, st = (med[(size, dt, ph)] for ph in PHASES)
            print(f"| {dt} | {size} ({SIZES[size]} positions) | {s:.1f} | {v:.1f} | {st:.1f} | "
                  f"{FMAS_PER_POSITION / st:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
