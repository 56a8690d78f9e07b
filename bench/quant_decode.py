"""Side-by-side CPU decode step with quantized and half-precision caches (issue 11).

One decode step (Tq=1, every cache position valid) at the pythia-70m-kv shape: H=8, D=64,
Dr=16, Rk=192, Rv=320 for latent keys (SPEC 3b), and the V-only layout (keys uncompressed,
R=320), with the cache stored as float32, bfloat16 (a bf16 model), int8 and float8_e4m3fn
(SPEC 3c, float32 model, float32 scales per row), against torch's
scaled_dot_product_attention over the equivalent uncompressed cache in float32 and bfloat16.
All implementations take turns in one rotation per shape (so each finds the caches as the
others left them: every working set but the smallest is larger than the last-level cache),
and the table reports medians, the bytes each step must read (scales included), GB/s and
ratios against fp32 SDPA and against the same layout's float32 cache.

    python bench/quant_decode.py [--rounds 30] [--threads 2] [--shapes 8x16384,4x4096]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import vdproj_ext
from vdproj_ext import bindings
from vdproj_ext import compressed_attn_with_kvcache, compressed_kv_attn_with_kvcache
from vdproj_ext.ops.quant import quantize_rows

from cpu_decode import read_bandwidth, timed

H, D, DR, RK, R = 8, 64, 16, 192, 320
STORAGE = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8,
           "e4m3": torch.float8_e4m3fn}


def stored(x: torch.Tensor, kind: str):
    """(cache tensor, its scales or None) of float32 x in the storage `kind`."""
    dtype = STORAGE[kind]
    if dtype is None:
        return x, None
    if dtype == torch.bfloat16:
        return x.to(dtype), None
    return quantize_rows(x, dtype)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def latent_case(batch, t_max, kind, g):
    """The latent-key decode step (separate K_c) with its caches stored as `kind`."""
    model_dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    q = torch.randn(batch, 1, H, D, generator=g).to(model_dtype)
    krope, krope_s = stored(torch.randn(batch, t_max, H, DR, generator=g), kind)
    kc, kc_s = stored(torch.randn(batch, t_max, RK, generator=g), kind)
    vc, vc_s = stored(torch.randn(batch, t_max, R, generator=g), kind)
    w_kr = (torch.randn(H * (D - DR), RK, generator=g) / RK ** 0.5).to(model_dtype)
    w_r = (torch.randn(H * D, R, generator=g) / R ** 0.5).to(model_dtype)
    full = torch.full((batch,), t_max, dtype=torch.int32)

    def step():
        compressed_kv_attn_with_kvcache(q, krope, kc, vc, w_kr, w_r, cache_seqlens=full,
                                        backend="ext", krope_scale=krope_s, kc_scale=kc_s,
                                        vc_scale=vc_s)
    return step, nbytes(krope, krope_s, kc, kc_s, vc, vc_s)


def v_only_case(batch, t_max, kind, g):
    """The V-only decode step (uncompressed keys, compressed values) stored as `kind`."""
    model_dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    q = torch.randn(batch, 1, H, D, generator=g).to(model_dtype)
    k, k_s = stored(torch.randn(batch, t_max, H, D, generator=g), kind)
    vc, vc_s = stored(torch.randn(batch, t_max, R, generator=g), kind)
    w_r = (torch.randn(H * D, R, generator=g) / R ** 0.5).to(model_dtype)
    full = torch.full((batch,), t_max, dtype=torch.int32)

    def step():
        compressed_attn_with_kvcache(q, k, vc, w_r, cache_seqlens=full, backend="ext",
                                     k_scale=k_s, vc_scale=vc_s)
    return step, nbytes(k, k_s, vc, vc_s)


def without_int8_vnni(case):
    """The same step on the float32 FMA path of the int8 kernels (csrc/cpu/int8_vnni.h off)."""
    step, size = case
    kernels = bindings.load()

    def run():
        previous = kernels._set_cpu_int8_vnni(False)
        try:
            step()
        finally:
            kernels._set_cpu_int8_vnni(previous)
    return run, size


def sdpa_case(batch, t_max, dtype, g):
    q = torch.randn(batch, H, 1, D, generator=g).to(dtype)
    k = torch.randn(batch, H, t_max, D, generator=g).to(dtype)
    v = torch.randn(batch, H, t_max, D, generator=g).to(dtype)
    return (lambda: F.scaled_dot_product_attention(q, k, v)), nbytes(k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", default="8x16384,4x4096")
    parser.add_argument("--only", default=None, help="comma-separated subset of the rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = vdproj_ext.backend_info()
    assert info["cpu_kernels"], info
    bandwidth_before = read_bandwidth()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"machine read bandwidth (torch.sum over 1 GiB): {bandwidth_before:.1f} GB/s\n")
    print("| (B, Tmax) | impl | median ms | best ms | bytes read / step (MB) | GB/s "
          "| vs fp32 SDPA | vs same layout fp32 | runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        batch, t_max = (int(x) for x in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        cases = {"sdpa fp32": sdpa_case(batch, t_max, torch.float32, g),
                 "sdpa bf16": sdpa_case(batch, t_max, torch.bfloat16, g)}
        for kind in STORAGE:
            cases[f"latent {kind}"] = latent_case(batch, t_max, kind, g)
            cases[f"v-only {kind}"] = v_only_case(batch, t_max, kind, g)
            if kind == "int8" and info["cpu_int8_vnni"]:  # the A/B of the VNNI path
                cases["latent int8 no-vnni"] = without_int8_vnni(cases["latent int8"])
        if args.only:
            keep = set(args.only.split(",")) | {"sdpa fp32", "latent fp32", "v-only fp32"}
            cases = {n: c for n, c in cases.items() if n in keep}
        for fn, _ in cases.values():
            fn()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, _) in cases.items():
                times[name].append(timed(fn))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, (_, size) in cases.items():
            layout = name.split()[0]
            base = med.get(f"{layout} fp32", med["sdpa fp32"])
            print(f"| ({batch}, {t_max}) | {name} | {med[name] * 1e3:.3f} "
                  f"| {min(times[name]) * 1e3:.3f} | {size / 1e6:.1f} "
                  f"| {size / med[name] / 1e9:.1f} | {med['sdpa fp32'] / med[name]:.2f} "
                  f"| {base / med[name]:.2f} | {len(times[name])} |")
        if "latent int8 no-vnni" in med:
            vnni_gain = med["latent int8 no-vnni"] / med["latent int8"]
            print(f"| ({batch}, {t_max}) | latent int8: VNNI path / FMA path speed | "
                  f"{vnni_gain:.2f}x | | | | | | |")
        del cases
    print(f"\nread bandwidth after: {read_bandwidth():.1f} GB/s")


if __name__ == "__main__":
    main()
