"""Per-position cost of the latent-key decode step's phases, by where the cache sits.

Times the CPU kernels' building blocks (bench/kernel_phases.cpp, compiled here with ninja) on
one thread at the pythia-70m-kv shape (H=8, Dr=16, Rk=192, Rv=320, one query): scoring, the
softmax weights and P @ V_c, and both, with working sets that stay in L1/L2 (64 positions),
in L3 (4096) and in DRAM (65536), for each cache dtype. Rounds are interleaved; the table gives
medians in nanoseconds per cached position, and the multiply-adds per nanosecond the step
reaches (4,224 multiply-adds a position: 264 sixteen-wide FMAs with AVX-512, 528 eight-wide
ones with AVX2).

    python bench/kernel_phases.py [--rounds 7] [--positions 300000] [--isa avx2]
        [--dtypes float32,bfloat16]

A developer's tool for the question "compute or memory?": it needs an x86-64 CPU with the
instruction set asked for (AVX-512 by default).
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
MULTIPLY_ADDS_PER_POSITION = H * (DR + RK + RV)
LANES = {"avx512": 16, "avx2": 8}  # float32 lanes of a vector FMA
NEEDS = {"avx512": "Avx512", "avx2": "Avx2"}  # vdproj::Isa (csrc/cpu/dispatch.h)
# bfloat16: the bf16 loader of this build's kernels (Bf16Rows); bfloat16-pairs and
# bfloat16-inorder: each of the two loaders, for an A/B (Bf16PairRows, RowLoader<BFloat16>)
DTYPES = ["float32", "bfloat16", "int8", "float8_e4m3fn"]
AB_DTYPES = ["bfloat16-pairs", "bfloat16-inorder"]
PHASES = ["scores", "values", "step"]
SIZES = {"L1/L2": 64, "L3": 4096, "DRAM": 65536}


def build(isa):
    flags = compile_flags(ROOT / "csrc", with_cuda=False)
    build_dir = ROOT / "build" / f"kernel_phases_{isa}"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags["cxx"] = [*flags["cxx"], f"-DKERNEL_PHASES_ISA=isa_{isa}",
                    f"-DKERNEL_PHASES_NEEDS={NEEDS[isa]}"]
    return load(name=f"vdproj_kernel_phases_{isa}",
                sources=[str(ROOT / "bench" / "kernel_phases.cpp")],
                extra_include_paths=[str(ROOT / "csrc" / "cpu"), str(ROOT / "csrc" / "common")],
                extra_cflags=flags["cxx"], extra_ldflags=flags["ldflags"],
                build_directory=str(build_dir), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--positions", type=int, default=300_000,
                        help="cached positions timed per measurement")
    parser.add_argument("--isa", choices=sorted(LANES), default="avx512",
                        help="which compiled variant of the kernels to time")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated cache dtypes (default: {','.join(DTYPES)}; "
                             f"also {', '.join(AB_DTYPES)})")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES) - set(AB_DTYPES))
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; expected some of {DTYPES + AB_DTYPES}")
    ext = build(args.isa)
    fmas_per_position = MULTIPLY_ADDS_PER_POSITION / LANES[args.isa]
    cases = [(size, dt, ph) for size in SIZES for dt in dtypes for ph in PHASES]
    times = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            size, dt, ph = case
            keys = SIZES[size]
            iters = max(1, args.positions // keys)
            times[case].append(ext.phase_ns_per_key(dt, keys, iters, ph, DR, RK, RV))
    med = {c: statistics.median(v) for c, v in times.items()}
    print(f"{args.isa} kernels, one thread, {args.rounds} interleaved rounds, medians; "
          f"FMA: {LANES[args.isa]} lanes; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| cache dtype | working set | scores ns | values ns | step ns | FMA/ns (step) |")
    print("|---|---|---:|---:|---:|---:|")
    for dt in dtypes:
        for size in SIZES:
            s, v, st = (med[(size, dt, ph)] for ph in PHASES)
            print(f"| {dt} | {size} ({SIZES[size]} positions) | {s:.1f} | {v:.1f} | {st:.1f} | "
                  f"{fmas_per_position / st:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
