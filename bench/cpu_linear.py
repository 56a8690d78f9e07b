"""The linear layers of a CPU decode step: vdproj_ext.decode_linear against CPU BLAS.

A decode step multiplies one row per sequence by every weight matrix of the model, so it is a
stream over the weights. This times, for the pythia-70m shapes (LM head 50304 x 512 and the
layer linears) and a few row counts M, in one process, interleaved round by round:
  kernel    torch.ops.vdproj_ext.decode_linear (what vdproj_ext.decode_linear runs for M <= 16)
  F.linear  torch.nn.functional.linear(x, W)          (x @ W.T)
  W @ x.T   the same product with W as the long, untransposed operand (what
            vdproj_ext.decode_linear runs for 16 < M <= 64)
Each call gets the next of several copies of W (over 1 GiB in all, twice the 480 MiB L3 of the
machine we measured on), so every call reads its weights from DRAM as in a real decode step.
GB/s counts the bytes of W. The machine's read bandwidth (torch.sum over 1 GiB) is measured in
the same run for comparison. Prints a markdown table of medians.

    python bench/cpu_linear.py [--rounds 25] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import vdproj_ext
except ImportError:  # run as a script from a source checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vdproj_ext
from vdproj_ext.ops import linear
from vdproj_ext.ops.backend import has_kernel, load_kernels

# (name, N, K) of pythia-70m: the LM head and the four linears of a layer.
LAYERS = [("embed_out", 50304, 512), ("query_key_value", 1536, 512),
          ("dense_h_to_4h", 2048, 512), ("dense_4h_to_h", 512, 2048), ("dense", 512, 512)]
ROWS = [1, 8, 16, 32]
STREAM_BYTES = 1 << 30


def read_bandwidth(nbytes: int = STREAM_BYTES, repeats: int = 9) -> float:
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def measure(n: int, k: int, rows: int, rounds: int) -> dict:
    copies = max(2, STREAM_BYTES // (n * k * 4))
    weights = [torch.randn(n, k) for _ in range(copies)]
    x = torch.randn(rows, k)
    fns = {"kernel": lambda w: torch.ops.vdproj_ext.decode_linear(x, w, None),
           "F.linear": lambda w: F.linear(x, w),
           "W @ x.T": lambda w: (w @ x.T).T}
    ref = x.double() @ weights[0].double().T
    for name, fn in fns.items():  # same answer, and a warm-up
        err = ((fn(weights[0]).double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name} differs from float64 by {err}"
    times = {name: [] for name in fns}
    i = 0
    for _ in range(rounds):
        for name, fn in fns.items():
            w = weights[i % copies]
            i += 1
            t0 = time.perf_counter()
            fn(w)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assert load_kernels() is not None and has_kernel("cpu", "decode_linear"), \
        "the compiled extension (with decode_linear) is needed"
    bw0 = read_bandwidth()
    rows_out = []
    for name, n, k in LAYERS:
        for rows in ROWS:
            t = measure(n, k, rows, args.rounds)
            gbs = n * k * 4 / t["kernel"] / 1e9
            rows_out.append(
                f"| {name} ({n} x {k}) | {rows} | {1e3 * t['kernel']:.3f} | "
                f"{1e3 * t['F.linear']:.3f} | {1e3 * t['W @ x.T']:.3f} | {gbs:.1f} | "
                f"{t['F.linear'] / t['kernel']:.2f}x | {t['W @ x.T'] / t['kernel']:.2f}x |")
            print(rows_out[-1], flush=True)
    bw1 = read_bandwidth()
    print(f"\nfloat32, {torch.get_num_threads()} threads, medians of {args.rounds} interleaved "
          f"rounds; read bandwidth (torch.sum, 1 GiB) {bw0:.1f} GB/s before, {bw1:.1f} after; "
          f"vdproj_ext.decode_linear uses the kernel up to {linear.kernel_max_rows()} rows and "
          f"W @ x.T up to {linear.WEIGHT_MAJOR_MAX_ROWS}\n")
    print("| layer (N x K) | M rows | kernel ms | F.linear ms | W @ x.T ms | kernel GB/s "
          "| vs F.linear | vs W @ x.T |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))


if __name__ == "__main__":
    main()
