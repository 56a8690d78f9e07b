"""GPU benchmarks of the CUDA kernels (run by bench/gpu_check.sh on a machine with a GPU).

    python bench/bench_gpu.py [--out DIR] [--quick]

1. Device copy bandwidth (a large device-to-device copy, bytes read + written): the ceiling.
2. Decode, bf16, H=8, D=64, R=320, Tq=1, (B, T) in {(1, 32768), (32, 4096), (128, 2048)}, every
   cache position valid: the raw op torch.ops.vdproj_ext.kvcache_attention (no Python input
   checks) against torch SDPA (flash and efficient backends, the faster counts) over the
   equivalent uncompressed bf16 cache, same layout (B, T, H, D). Achieved GB/s counts the bytes
   of K and V_c the op must read. Each timed sample is a CUDA-graph replay of one call per input
   set, rotating over enough sets that their total is several times the 60 MB L2; medians of
   CUDA-event timings after warm-up. A second column times decode with append (compress-on-write
   of one new token, cache_seqlens = T - 1).
   A third table times the latent-key decode op (SPEC 3b) at the same (B, T): H=8, D=64,
   Dr=16, Rk=192, Rv=320, torch.ops.vdproj_ext.ckv_kvcache_attention, against the same SDPA
   time; its GB/s counts the rotary keys, K_c and V_c it must read.
   A fourth table times both decode ops with quantized caches (SPEC 3c), int8 and float8_e4m3fn
   with float32 row scales, at the same shapes: the V-only op (and with append: quantize-on-
   write of one new token) and the latent-key op; GB/s counts the 1-byte rows and their scales.
3. Training, bf16, B=8, T in {64, 128, 1024, 4096}, H=8, D=64, R=320, causal, forward +
   backward, for the V-only op and the latent-key op (Dr=16, Rk=192): the public API (backend
   "auto": the shape-based choice of vdproj_ext.ops.routing), the absorbed kernels forced, and
   the baseline "restore with GEMMs + SDPA".
4. Where a decode step's device time goes: torch.profiler's CUDA kernel times of one call
   (V-only and latent-key, bf16 and int8 caches, with and without an append) at (1, 32768)
   and (128, 2048), kernel by kernel: the split attention, the combine, the restore, the
   compress-on-write. The first H200 run (bench/RESULTS.md, 2026-12-04) found the decode
   kernels at 19-43% of copy bandwidth and no faster with half the bytes: this says which
   kernel to look at.
Prints a markdown table and writes it to DIR/gpu_results.md (DIR: --out, else $OUT, else bench/).
This file has no test functions: pytest collects it (pyproject python_files) and finds nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

H, D, R = 8, 64, 320
DR, RK = 16, 192  # latent keys: rotary dims per head, key latent rank (values: R)
L2_BYTES = 60 * 2 ** 20
DECODE_SHAPES = [(1, 32768), (32, 4096), (128, 2048)]
TRAIN_T = [64, 128, 1024, 4096]  # 64: below the API's composite threshold (128 x 128)


def event_median(fn, iters, warmup=3):
    """Median milliseconds of fn() timed with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def graph_median(calls, iters):
    """Median ms per call: `calls` (one per input set) captured in one CUDA graph, replayed.

    Falls back to plain event timing of the same calls if capture fails."""
    for c in calls:  # warm-up outside capture (allocator, attributes, first-launch costs)
        c()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
            with torch.cuda.graph(graph, stream=stream):
                for c in calls:
                    c()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return event_median(graph.replay, iters) / len(calls), "graph"
    except Exception as exc:  # noqa: BLE001 - report and fall back
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing without graphs)")
        torch.cuda.synchronize()

        def run_all():
            for c in calls:
                c()
        return event_median(run_all, iters) / len(calls), "events"


def copy_bandwidth():
    n = 2 ** 30  # 2 GiB of bf16 per buffer
    src = torch.randn(n // 2, device="cuda").to(torch.bfloat16).view(-1)
    src = torch.cat([src, src])
    dst = torch.empty_like(src)
    ms = event_median(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)  # bytes/s, read + write


def n_sets(bytes_per_set):
    return max(2, min(8, math.ceil(4 * L2_BYTES / bytes_per_set)))


def bench_decode(batch, t, copy_bw, iters):
    from vdproj_ext.ops.backend import load_kernels  # also registers the fake kernels
    op = load_kernels().kvcache_attention
    dt = torch.bfloat16
    ours_bytes = batch * t * (H * D + R) * 2
    sdpa_bytes = batch * t * H * D * 2 * 2
    sets = n_sets(min(ours_bytes, sdpa_bytes))
    scale = D ** -0.5
    w_r = (torch.randn(H * D, R, device="cuda") / R ** 0.5).to(dt)
    b_r = torch.randn(H * D, device="cuda").to(dt)
    w_c = (torch.randn(R, H * D, device="cuda") / (H * D) ** 0.5).to(dt)
    b_c = torch.randn(R, device="cuda").to(dt)
    full = torch.full((batch,), t, dtype=torch.int32, device="cuda")
    minus1 = full - 1
    data = []
    for _ in range(sets):
        data.append(dict(q=torch.randn(batch, 1, H, D, device="cuda", dtype=dt),
                         kc=torch.randn(batch, t, H, D, device="cuda", dtype=dt),
                         vc=torch.randn(batch, t, R, device="cuda", dtype=dt),
                         k1=torch.randn(batch, 1, H, D, device="cuda", dtype=dt),
                         v1=torch.randn(batch, 1, H * D, device="cuda", dtype=dt)))
    ours = [lambda d=d: op(d["q"], d["kc"], d["vc"], w_r, b_r, None, None, None, None, full,
                           True, scale) for d in data]
    ours_ms, how = graph_median(ours, iters)
    append = [lambda d=d: op(d["q"], d["kc"], d["vc"], w_r, b_r, d["k1"], d["v1"], w_c, b_c,
                             minus1, True, scale) for d in data]
    append_ms, _ = graph_median(append, iters)
    # Correctness spot check of one set against the float64 reference (bf16 tolerance).
    from vdproj_ext import reference
    d = data[0]
    out = ours[0]()
    nb = min(batch, 2)
    ref = reference.compressed_attn_with_kvcache(
        d["q"][:nb].double(), d["kc"][:nb].double(), d["vc"][:nb].double(), w_r.double(),
        b_r.double(), cache_seqlens=full[:nb], causal=True, softmax_scale=scale)
    err = ((out[:nb].double() - ref).norm() / ref.norm()).item()
    del data, ours, append

    sdpa = sdpa_decode_ms(batch, t, sets, scale, iters)
    best = min(sdpa.items(), key=lambda kv: kv[1]) if sdpa else ("none", float("nan"))
    gbps = ours_bytes / (ours_ms * 1e-3) / 1e9
    return dict(B=batch, T=t, sets=sets, timing=how, ours_us=ours_ms * 1e3,
                append_us=append_ms * 1e3, gbps=gbps, pct_copy=100 * gbps * 1e9 / copy_bw,
                sdpa_backend=best[0], sdpa_us=best[1] * 1e3,
                sdpa_gbps=sdpa_bytes / (best[1] * 1e-3) / 1e9 if sdpa else float("nan"),
                speedup=best[1] / ours_ms if sdpa else float("nan"), err=err)


def bench_latent_decode(batch, t, copy_bw, sdpa_us, iters):
    """The latent-key decode op at (B, T), every position valid, against the SDPA time of the
    same shape; the error of one set against the float64 reference."""
    from vdproj_ext.ops.backend import load_kernels
    op = load_kernels().ckv_kvcache_attention
    dt = torch.bfloat16
    ours_bytes = batch * t * (H * DR + RK + R) * 2
    sets = n_sets(ours_bytes)
    scale = D ** -0.5
    w_kr = (torch.randn(H * (D - DR), RK, device="cuda") / RK ** 0.5).to(dt)
    w_r = (torch.randn(H * D, R, device="cuda") / R ** 0.5).to(dt)
    b_r = torch.randn(H * D, device="cuda").to(dt)
    full = torch.full((batch,), t, dtype=torch.int32, device="cuda")
    data = [dict(q=torch.randn(batch, 1, H, D, device="cuda", dtype=dt),
                 kr=torch.randn(batch, t, H, DR, device="cuda", dtype=dt),
                 kc=torch.randn(batch, t, RK, device="cuda", dtype=dt),
                 vc=torch.randn(batch, t, R, device="cuda", dtype=dt)) for _ in range(sets)]
    calls = [lambda d=d: op(d["q"], d["kr"], d["kc"], d["vc"], w_kr, w_r, b_r, None, None, None,
                            None, None, None, full, True, scale) for d in data]
    ours_ms, _ = graph_median(calls, iters)
    from vdproj_ext import reference
    d, nb = data[0], min(batch, 2)
    out = calls[0]()
    ref = reference.compressed_kv_attn_with_kvcache(
        d["q"][:nb].double(), d["kr"][:nb].double(), d["kc"][:nb].double(), d["vc"][:nb].double(),
        w_kr.double(), w_r.double(), b_r.double(), cache_seqlens=full[:nb], causal=True,
        softmax_scale=scale)
    err = ((out[:nb].double() - ref).norm() / ref.norm()).item()
    del data, calls
    torch.cuda.empty_cache()
    gbps = ours_bytes / (ours_ms * 1e-3) / 1e9
    return dict(ours_us=ours_ms * 1e3, gbps=gbps, pct_copy=100 * gbps * 1e9 / copy_bw,
                speedup=sdpa_us / (ours_ms * 1e3), err=err)


LATENT_HEADER = (
    "", f"## Decode with latent keys: bf16, H={H}, D={D}, Dr={DR}, Rk={RK}, Rv={R}, Tq=1, all "
    "positions valid", "",
    "GB/s counts the rotary keys, K_c and V_c the kernels must read; speedup = SDPA time (table "
    "above) / our time.", "",
    "| B | T | ours us | ours GB/s | % of copy | speedup vs SDPA | rel err |",
    "|---|---|---|---|---|---|---|")


def latent_decode_row(batch, t, copy_bw, sdpa_us, iters):
    """bench_latent_decode at (B, T), printed and as a row of the LATENT_HEADER table."""
    k = bench_latent_decode(batch, t, copy_bw, sdpa_us, iters)
    print(f"  latent decode B={batch} T={t}: {k['ours_us']:.1f} us, {k['gbps']:.0f} GB/s, "
          f"speedup {k['speedup']:.2f}x, err {k['err']:.1e}", flush=True)
    return (f"| {batch} | {t} | {k['ours_us']:.1f} | {k['gbps']:.0f} | {k['pct_copy']:.0f}% | "
            f"{k['speedup']:.2f}x | {k['err']:.1e} |")


def sdpa_decode_ms(batch, t, sets, scale, iters):
    """{SDPA backend: median ms} of decode over the equivalent uncompressed cache (K and V,
    each (B, T, H, D)), for the flash and memory-efficient backends that take the shape."""
    dt = torch.bfloat16
    sd = [dict(q=torch.randn(batch, H, 1, D, device="cuda", dtype=dt),
               k=torch.randn(batch, t, H, D, device="cuda", dtype=dt),
               v=torch.randn(batch, t, H, D, device="cuda", dtype=dt)) for _ in range(sets)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(s, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(s["q"], s["k"].transpose(1, 2),
                                                      s["v"].transpose(1, 2), scale=scale)
        try:
            sdpa[name], _ = graph_median([lambda s=s: call(s) for s in sd], iters)
        except Exception as exc:  # noqa: BLE001 - a backend may not take this shape
            print(f"  SDPA {name} unavailable for B={batch}, T={t}: {type(exc).__name__}: {exc}")
    del sd
    torch.cuda.empty_cache()
    return sdpa


def bench_train(t, iters, latent=False):
    """Forward + backward at B=8, T: baseline (restore with GEMMs, then SDPA), the API (its
    shape-based choice) and the absorbed kernels forced; the V-only op, or with latent=True the
    latent-key op (Dr=16, Rk=192)."""
    from vdproj_ext import reference
    from vdproj_ext.ops import (CompressedKVAttentionFunction, CompressedVAttentionFunction,
                                compressed_kv_attention, compressed_v_attention)
    from vdproj_ext.ops.routing import ckv_uses_restore_keys_then_sdpa, cva_uses_restore_then_sdpa
    dt, batch, scale = torch.bfloat16, 8, D ** -0.5

    def leaf(*shape, div=1.0):
        return (torch.randn(*shape, device="cuda") / div).to(dt).requires_grad_()
    q, v_c = leaf(batch, t, H, D), leaf(batch, t, R)
    w_r, b_r = leaf(H * D, R, div=R ** 0.5), leaf(H * D)
    if latent:
        k_rope, k_c, w_kr = leaf(batch, t, H, DR), leaf(batch, t, RK), leaf(H * (D - DR), RK,
                                                                             div=RK ** 0.5)
        leaves = (q, k_rope, k_c, v_c, w_kr, w_r, b_r)
        composite = ckv_uses_restore_keys_then_sdpa(q, k_rope, k_c, v_c, needs_grad=True)

        def api():
            return compressed_kv_attention(q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal=True,
                                           backend="auto")

        def absorbed():
            return CompressedKVAttentionFunction.apply(q, k_rope, k_c, v_c, w_kr, w_r, b_r, True,
                                                       scale, "ext")

        def keys():
            return reference.restore_keys(k_rope, k_c, w_kr)
    else:
        k = leaf(batch, t, H, D)
        leaves = (q, k, v_c, w_r, b_r)
        composite = cva_uses_restore_then_sdpa(q, k, v_c, needs_grad=True)

        def api():
            return compressed_v_attention(q, k, v_c, w_r, b_r, causal=True, backend="auto")

        def absorbed():
            return CompressedVAttentionFunction.apply(q, k, v_c, w_r, b_r, True, scale, "ext")

        def keys():
            return k
    gout = torch.randn(batch, t, H, D, device="cuda", dtype=dt)

    def step(forward):
        for x in leaves:
            x.grad = None
        forward().backward(gout)

    def baseline():
        v_r = F.linear(v_c, w_r, b_r).view(batch, t, H, D)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys().transpose(1, 2),
                                              v_r.transpose(1, 2), is_causal=True,
                                              scale=scale).transpose(1, 2)

    row = dict(T=t, path="composite" if composite else "absorbed")
    row["baseline_ms"] = event_median(lambda: step(baseline), iters)
    row["api_ms"] = event_median(lambda: step(api), iters)
    row["absorbed_ms"] = event_median(lambda: step(absorbed),
                                      max(3, iters // 4 if t >= 4096 else iters),
                                      warmup=1 if t >= 4096 else 3)
    return row


def train_table(iters, row_or_error, lines):
    """The training sections of the results, appended to lines: one row per (op, T), printed
    as it is measured."""
    for latent in (False, True):
        what = (f"latent keys (Dr={DR}, Rk={RK}, Rv={R}), compressed_kv_attention" if latent
                else f"V-only (R={R}), compressed_v_attention")
        lines += ["", f"## Training, {what}: bf16, B=8, H={H}, D={D}, causal, forward + backward",
                  "", "baseline = restore with GEMMs + SDPA; api = backend 'auto' (path = its "
                  "shape-based choice); absorbed = the absorbed training kernels forced.", "",
                  "| T | api path | baseline ms | api ms | api / baseline | absorbed ms | "
                  "absorbed / baseline |", "|---|---|---|---|---|---|---|"]
        for t in TRAIN_T:
            def train_row(t=t, latent=latent):
                r = bench_train(t, max(5, iters // 5), latent)
                print(f"  train {'latent' if latent else 'V-only'} T={t}: baseline "
                      f"{r['baseline_ms']:.3f} ms, api ({r['path']}) {r['api_ms']:.3f} ms, "
                      f"absorbed {r['absorbed_ms']:.3f} ms", flush=True)
                return (f"| {t} | {r['path']} | {r['baseline_ms']:.3f} | {r['api_ms']:.3f} | "
                        f"{r['api_ms'] / r['baseline_ms']:.2f} | {r['absorbed_ms']:.3f} | "
                        f"{r['absorbed_ms'] / r['baseline_ms']:.2f} |")
            row_or_error(lines, f"train {'latent' if latent else 'V-only'} T={t}", train_row, 7)


def bench_quant_decode(batch, t, cache_dtype, copy_bw, sdpa_us, iters):
    """Both decode ops at (B, T) with every cache quantized to cache_dtype (SPEC 3c), every
    position valid; the errors of one set against the float64 reference on the same caches."""
    from vdproj_ext.ops.backend import load_kernels
    from vdproj_ext.ops.quant import quantize_rows
    from vdproj_ext import reference
    ops_ = load_kernels()
    dt = torch.bfloat16
    vonly_bytes = batch * t * (H * D + R + H * 4 + 4)  # 1-byte rows, float32 scales
    latent_bytes = batch * t * (H * DR + RK + R + H * 4 + 2 * 4)
    sets = n_sets(min(vonly_bytes, latent_bytes))
    scale = D ** -0.5
    w_r = (torch.randn(H * D, R, device="cuda") / R ** 0.5).to(dt)
    b_r = torch.randn(H * D, device="cuda").to(dt)
    w_c = (torch.randn(R, H * D, device="cuda") / (H * D) ** 0.5).to(dt)
    w_kr = (torch.randn(H * (D - DR), RK, device="cuda") / RK ** 0.5).to(dt)
    full = torch.full((batch,), t, dtype=torch.int32, device="cuda")
    minus1 = full - 1

    def quantized(*shape):
        return quantize_rows(torch.randn(*shape, device="cuda"), cache_dtype)

    data = []
    for _ in range(sets):
        d = dict(q=torch.randn(batch, 1, H, D, device="cuda", dtype=dt),
                 k1=torch.randn(batch, 1, H, D, device="cuda", dtype=dt),
                 v1=torch.randn(batch, 1, H * D, device="cuda", dtype=dt))
        d["kc"], d["ks"] = quantized(batch, t, H, D)
        d["vc"], d["vs"] = quantized(batch, t, R)
        d["kr"], d["krs"] = quantized(batch, t, H, DR)
        d["kl"], d["kls"] = quantized(batch, t, RK)
        data.append(d)
    vonly = [lambda d=d: ops_.kvcache_attention(d["q"], d["kc"], d["vc"], w_r, b_r, None, None,
                                                None, None, full, True, scale, d["ks"], d["vs"])
             for d in data]
    append = [lambda d=d: ops_.kvcache_attention(d["q"], d["kc"], d["vc"], w_r, b_r, d["k1"],
                                                 d["v1"], w_c, None, minus1, True, scale, d["ks"],
                                                 d["vs"]) for d in data]
    latent = [lambda d=d: ops_.ckv_kvcache_attention(
        d["q"], d["kr"], d["kl"], d["vc"], w_kr, w_r, b_r, None, None, None, None, None, None,
        full, True, scale, d["krs"], d["kls"], d["vs"]) for d in data]
    vonly_ms, _ = graph_median(vonly, iters)
    append_ms, _ = graph_median(append, iters)
    latent_ms, _ = graph_median(latent, iters)
    d, nb = data[0], min(batch, 2)
    out_v, out_l = vonly[0](), latent[0]()
    ref_v = reference.compressed_attn_with_kvcache(
        d["q"][:nb].double(), d["kc"][:nb], d["vc"][:nb], w_r.double(), b_r.double(),
        cache_seqlens=full[:nb], causal=True, softmax_scale=scale, k_scale=d["ks"][:nb],
        vc_scale=d["vs"][:nb])
    ref_l = reference.compressed_kv_attn_with_kvcache(
        d["q"][:nb].double(), d["kr"][:nb], d["kl"][:nb], d["vc"][:nb], w_kr.double(),
        w_r.double(), b_r.double(), cache_seqlens=full[:nb], causal=True, softmax_scale=scale,
        krope_scale=d["krs"][:nb], kc_scale=d["kls"][:nb], vc_scale=d["vs"][:nb])
    err_v = ((out_v[:nb].double() - ref_v).norm() / ref_v.norm()).item()
    err_l = ((out_l[:nb].double() - ref_l).norm() / ref_l.norm()).item()
    del data, vonly, append, latent
    torch.cuda.empty_cache()
    return dict(vonly_us=vonly_ms * 1e3, append_us=append_ms * 1e3, latent_us=latent_ms * 1e3,
                vonly_gbps=vonly_bytes / (vonly_ms * 1e-3) / 1e9,
                latent_gbps=latent_bytes / (latent_ms * 1e-3) / 1e9,
                vonly_pct=100 * vonly_bytes / (vonly_ms * 1e-3) / copy_bw,
                vonly_speedup=sdpa_us / (vonly_ms * 1e3), latent_speedup=sdpa_us / (latent_ms * 1e3),
                err_v=err_v, err_l=err_l)


QUANT_HEADER = (
    "", f"## Decode with quantized caches: bf16 queries, H={H}, D={D}, R={R} (latent: Dr={DR}, "
    f"Rk={RK}), Tq=1, all positions valid", "",
    "Every cache tensor int8 or float8_e4m3fn with float32 row scales. GB/s counts the 1-byte "
    "rows and the scales the kernels must read; speedup = SDPA time over the uncompressed bf16 "
    "cache (decode table) / our time; rel err against the float64 reference on the same "
    "quantized caches.", "",
    "| cache | B | T | V-only us | +append us | V-only GB/s | % of copy | speedup | latent us | "
    "latent GB/s | speedup | rel err V-only / latent |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|")


def quant_decode_row(batch, t, cache_dtype, copy_bw, sdpa_us, iters):
    """bench_quant_decode at (B, T), printed and as a row of the QUANT_HEADER table."""
    k = bench_quant_decode(batch, t, cache_dtype, copy_bw, sdpa_us, iters)
    name = str(cache_dtype).replace("torch.", "")
    print(f"  {name} decode B={batch} T={t}: V-only {k['vonly_us']:.1f} us "
          f"({k['vonly_speedup']:.2f}x), latent {k['latent_us']:.1f} us "
          f"({k['latent_speedup']:.2f}x), err {k['err_v']:.1e} / {k['err_l']:.1e}", flush=True)
    return (f"| {name} | {batch} | {t} | {k['vonly_us']:.1f} | {k['append_us']:.1f} | "
            f"{k['vonly_gbps']:.0f} | {k['vonly_pct']:.0f}% | {k['vonly_speedup']:.2f}x | "
            f"{k['latent_us']:.1f} | {k['latent_gbps']:.0f} | {k['latent_speedup']:.2f}x | "
            f"{k['err_v']:.1e} / {k['err_l']:.1e} |")


BREAKDOWN_SHAPES = [(1, 32768), (128, 2048)]
BREAKDOWN_HEADER = (
    "", "## Where a decode step's device time goes (torch.profiler, CUDA kernels)", "",
    "Device microseconds per call, kernel by kernel (the mean over the profiled calls, no CUDA "
    "graph), for one input set; launches = kernel launches per call. The graph-replay tables "
    "above time the same calls back to back.", "",
    "| case | B | T | kernel | launches | us per call |", "|---|---|---|---|---|---|")


def breakdown_rows(batch, t, calls_per_case=20):
    """Rows of BREAKDOWN_HEADER at (B, T): per case, each CUDA kernel's device time per call,
    then the case's total."""
    from torch.profiler import ProfilerActivity, profile
    from vdproj_ext.ops.backend import load_kernels
    from vdproj_ext.ops.quant import quantize_rows
    ops_ = load_kernels()
    dt, scale = torch.bfloat16, D ** -0.5

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt)
    w_r, b_r = (rnd(H * D, R) / R ** 0.5), rnd(H * D)
    w_c, w_kr = rnd(R, H * D) / (H * D) ** 0.5, rnd(H * (D - DR), RK) / RK ** 0.5
    full = torch.full((batch,), t, dtype=torch.int32, device="cuda")
    minus1 = full - 1
    q, k1, v1 = rnd(batch, 1, H, D), rnd(batch, 1, H, D), rnd(batch, 1, H * D)
    kc, vc, kr, kl = rnd(batch, t, H, D), rnd(batch, t, R), rnd(batch, t, H, DR), rnd(batch, t, RK)
    q8 = {n: quantize_rows(x.float(), torch.int8) for n, x in
          dict(kc=kc, vc=vc, kr=kr, kl=kl).items()}
    cases = {
        "V-only bf16": lambda: ops_.kvcache_attention(q, kc, vc, w_r, b_r, None, None, None, None,
                                                      full, True, scale),
        "V-only bf16 +append": lambda: ops_.kvcache_attention(q, kc, vc, w_r, b_r, k1, v1, w_c,
                                                              None, minus1, True, scale),
        "V-only int8": lambda: ops_.kvcache_attention(
            q, q8["kc"][0], q8["vc"][0], w_r, b_r, None, None, None, None, full, True, scale,
            q8["kc"][1], q8["vc"][1]),
        "latent bf16": lambda: ops_.ckv_kvcache_attention(
            q, kr, kl, vc, w_kr, w_r, b_r, None, None, None, None, None, None, full, True, scale),
        "latent int8": lambda: ops_.ckv_kvcache_attention(
            q, q8["kr"][0], q8["kl"][0], q8["vc"][0], w_kr, w_r, b_r, None, None, None, None,
            None, None, full, True, scale, q8["kr"][1], q8["kl"][1], q8["vc"][1]),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls_per_case):
                fn()
            torch.cuda.synchronize()
        total = 0.0
        for e in sorted(prof.key_averages(), key=lambda e: e.key):
            us = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) or 0)
            if us <= 0 or e.key.startswith("cuda") or "Memcpy" in e.key or "Memset" in e.key:
                continue
            total += us / calls_per_case
            kernel = re.search(r"\w+_kernel(<[^()]*>)?", e.key)  # drop namespaces and params
            label = (kernel.group(0) if kernel else e.key)[:70]
            rows.append(f"| {name} | {batch} | {t} | `{label}` | "
                        f"{e.count / calls_per_case:g} | {us / calls_per_case:.1f} |")
        rows.append(f"| {name} | {batch} | {t} | **all kernels** | | **{total:.1f}** |")
        print(f"  breakdown {name} B={batch} T={t}: {total:.1f} us of kernels per call",
              flush=True)
    del kc, vc, kr, kl, q8
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.dirname(__file__))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to do")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    iters = 20 if args.quick else 100
    from vdproj_ext import backend_info
    info = backend_info()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuda kernels built: {info['cuda_kernels']}")
    if not info["cuda_kernels"]:
        print(f"bench_gpu: CUDA kernels unavailable: {info['extension_error']}")
        return 1
    t0 = time.time()
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    lines = [f"# GPU results: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             f"Device-to-device copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s", "",
             "## Decode: bf16, H=8, D=64, R=320, Tq=1, all positions valid", "",
             "Medians of CUDA-event timings of CUDA-graph replays, rotating input sets.",
             "GB/s counts the K and V_c bytes the kernel must read; % of copy is against the "
             "measured copy bandwidth; speedup = SDPA time / our time (uncompressed cache).", "",
             "| B | T | sets | ours us | +append us | ours GB/s | % of copy | SDPA backend | "
             "SDPA us | SDPA GB/s | speedup | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    latent = list(LATENT_HEADER)
    quant = list(QUANT_HEADER)
    train = []
    breakdown = []
    failures = []
    path = os.path.join(args.out, "gpu_results.md")
    os.makedirs(args.out, exist_ok=True)

    def write_table():
        # After every row: a later failure or a time limit still leaves what was measured.
        with open(path, "w") as f:
            f.write("\n".join(lines + latent + quant + train + breakdown) + "\n")

    def row_or_error(table, what, fn, columns):
        """Append fn()'s row to table; on an exception, a row saying so (and go on)."""
        try:
            table.append(fn())
            return True
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            msg = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
            print(f"  {what} FAILED: {msg}", flush=True)
            table.append("| " + what + " | " + " | ".join(["-"] * (columns - 2)) +
                         f" | FAILED: {msg} |")
            failures.append(what)
            try:  # after a sticky CUDA error this fails too; the later rows then say so
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
            return False
        finally:
            write_table()

    for batch, t in DECODE_SHAPES:
        r = {}

        def decode_row(batch=batch, t=t):
            r.update(bench_decode(batch, t, copy_bw, iters))
            print(f"  decode B={batch} T={t}: {r['ours_us']:.1f} us, {r['gbps']:.0f} GB/s "
                  f"({r['pct_copy']:.0f}% of copy), SDPA {r['sdpa_backend']} "
                  f"{r['sdpa_us']:.1f} us, speedup {r['speedup']:.2f}x, err {r['err']:.1e}",
                  flush=True)
            return (f"| {batch} | {t} | {r['sets']} | {r['ours_us']:.1f} | {r['append_us']:.1f} | "
                    f"{r['gbps']:.0f} | {r['pct_copy']:.0f}% | {r['sdpa_backend']} | "
                    f"{r['sdpa_us']:.1f} | {r['sdpa_gbps']:.0f} | {r['speedup']:.2f}x | "
                    f"{r['err']:.1e} |")
        row_or_error(lines, f"decode B={batch} T={t}", decode_row, 12)
        sdpa_us = r.get("sdpa_us", float("nan"))
        row_or_error(latent, f"latent B={batch} T={t}",
                     lambda b=batch, t=t: latent_decode_row(b, t, copy_bw, sdpa_us, iters), 7)
        for cache_dtype in (torch.int8, torch.float8_e4m3fn):
            row_or_error(quant, f"{cache_dtype} B={batch} T={t}",
                         lambda b=batch, t=t, c=cache_dtype: quant_decode_row(
                             b, t, c, copy_bw, sdpa_us, iters), 12)
    train_table(iters, row_or_error, train)
    for batch, t in BREAKDOWN_SHAPES:
        try:
            rows = breakdown_rows(batch, t)
        except Exception as exc:  # noqa: BLE001 - diagnostic only; keep the tables above
            msg = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
            print(f"  breakdown B={batch} T={t} FAILED: {msg}", flush=True)
            failures.append(f"breakdown B={batch} T={t}")
            rows = [f"| - | {batch} | {t} | FAILED: {msg} | | |"]
        if not breakdown:
            breakdown.extend(BREAKDOWN_HEADER)
        breakdown.extend(rows)
        write_table()
    breakdown += ["", f"Benchmark wall time: {time.time() - t0:.0f} s"]
    write_table()
    print()
    print("\n".join(lines + latent + quant + train + breakdown))
    print(f"\nwritten to {path}")
    if failures:
        print(f"bench_gpu: {len(failures)} case(s) failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
