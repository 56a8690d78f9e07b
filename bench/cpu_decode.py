"""Side-by-side CPU decode benchmark for the judged shapes (issue 2).

One decode step, float32, H=8, D=64, R=320, Tq=1, every cache position valid, at
(B, Tmax) = (4, 4096) and (8, 16384). In one process, interleaved round by round (ext, sdpa
and reference in one rotation; ext-op, ext+append, latent and latent-op each in a rotation
with sdpa):
  ext        compressed_attn_with_kvcache(..., backend="ext") through the public API
  ext-op     torch.ops.vdproj_ext.kvcache_attention directly (no Python input checks)
  ext+append the public API writing one new token at Tmax-1 (compress-on-write), then reading
  latent     compressed_kv_attn_with_kvcache(..., backend="ext"): latent keys (SPEC 3b), Dr=16,
             Rk=192, Rv=320: krope (B, T, H, Dr), K_c (B, T, Rk), V_c (B, T, Rv), 640 floats a
             token instead of 1024 (issue 10's judged point: at least 1.5x SDPA)
  latent-op  torch.ops.vdproj_ext.ckv_kvcache_attention directly (no Python input checks)
  sdpa       torch.nn.functional.scaled_dot_product_attention over uncompressed (B, H, T, D) K, V
  reference  compressed_attn_with_kvcache(..., backend="reference"): restore, then attend
It also measures the machine's read bandwidth in the same run (torch.sum over a 1 GiB
tensor, before and after), and prints a markdown table of medians (and best times, to show
noise), achieved GB/s (bytes of K and V_c, krope, K_c and V_c, or K and V, that the step must
read) and ratios.

    python bench/cpu_decode.py [--rounds 40] [--ref-rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vdproj_ext
from vdproj_ext import compressed_attn_with_kvcache, compressed_kv_attn_with_kvcache

H, D, R = 8, 64, 320
DR, RK = 16, 192  # latent keys: rotary dims per head, key latent rank (values keep R)
SHAPES = [(4, 4096), (8, 16384)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 9) -> float:
    """GB/s of torch.sum over a float32 tensor of nbytes (larger than the caches)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = [timed(x.sum) for _ in range(repeats)]
    return nbytes / statistics.median(times) / 1e9


def latent_case(batch: int, t_max: int, q, w_r, b_r, g):
    """The latent-key decode step over its own caches (so no other row warms them)."""
    krope = torch.randn(batch, t_max, H, DR, generator=g)
    kc = torch.randn(batch, t_max, RK, generator=g)
    vc = torch.randn(batch, t_max, R, generator=g)
    w_kr = torch.randn(H * (D - DR), RK, generator=g) / RK ** 0.5
    full = torch.full((batch,), t_max, dtype=torch.int32)
    fns = {
        "latent": lambda: compressed_kv_attn_with_kvcache(q, krope, kc, vc, w_kr, w_r, b_r,
                                                          cache_seqlens=full, backend="ext"),
        "latent-op": lambda: torch.ops.vdproj_ext.ckv_kvcache_attention(
            q, krope, kc, vc, w_kr, w_r, b_r, None, None, None, None, None, None, full, True,
            D ** -0.5),
    }
    nbytes = batch * t_max * (H * DR + RK + R) * 4
    return fns, {name: nbytes for name in fns}


def shape_case(batch: int, t_max: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, H, D, generator=g)
    k_cache = torch.randn(batch, t_max, H, D, generator=g)
    vc_cache = torch.randn(batch, t_max, R, generator=g)
    w_r = torch.randn(H * D, R, generator=g) / R ** 0.5
    b_r = torch.randn(H * D, generator=g)
    full = torch.full((batch,), t_max, dtype=torch.int32)
    minus_one = torch.full((batch,), t_max - 1, dtype=torch.int32)
    k_new = torch.randn(batch, 1, H, D, generator=g)
    v_new = torch.randn(batch, 1, H * D, generator=g)
    w_c = torch.randn(R, H * D, generator=g) / (H * D) ** 0.5
    b_c = torch.randn(R, generator=g)
    # The equivalent uncompressed cache for SDPA, in its native (B, H, T, D) layout.
    q_s = q.transpose(1, 2).contiguous()
    k_s = torch.randn(batch, H, t_max, D, generator=g)
    v_s = torch.randn(batch, H, t_max, D, generator=g)
    scale = D ** -0.5
    fns = {
        "ext": lambda: compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r,
                                                    cache_seqlens=full, backend="ext"),
        "ext-op": lambda: torch.ops.vdproj_ext.kvcache_attention(
            q, k_cache, vc_cache, w_r, b_r, None, None, None, None, full, True, scale),
        "ext+append": lambda: compressed_attn_with_kvcache(
            q, k_cache, vc_cache, w_r, b_r, k=k_new, v=v_new, w_c=w_c, b_c=b_c,
            cache_seqlens=minus_one, backend="ext"),
        "sdpa": lambda: F.scaled_dot_product_attention(q_s, k_s, v_s),
        "reference": lambda: compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r,
                                                          cache_seqlens=full,
                                                          backend="reference"),
    }
    kv_c_bytes = batch * t_max * (H * D + R) * 4
    kv_bytes = batch * t_max * 2 * H * D * 4
    nbytes = {"ext": kv_c_bytes, "ext-op": kv_c_bytes, "ext+append": kv_c_bytes,
              "sdpa": kv_bytes, "reference": kv_c_bytes}
    latent_fns, latent_bytes = latent_case(batch, t_max, q, w_r, b_r, g)
    return {**fns, **latent_fns}, {**nbytes, **latent_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds per shape")
    parser.add_argument("--ref-rounds", type=int, default=5,
                        help="rounds that also run the (slow) reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.ops.vdproj_ext  # noqa: B018 (make sure the extension is loaded below)
    info = vdproj_ext.backend_info()
    assert info["cpu_kernels"], info

    bandwidth_before = read_bandwidth()
    rows = []
    for batch, t_max in SHAPES:
        fns, nbytes = shape_case(batch, t_max)
        for fn in fns.values():  # warm-up (page faults, allocator, lazy init)
            fn()
        # Main rotation: ext, sdpa, reference take turns, so each one finds the caches as
        # the others left them. The ext variants are timed in their own rotations against
        # sdpa (running them back to back with ext would hand them ext's warm cache).
        rotations = [("ext", "sdpa", "reference"), ("ext-op", "sdpa"), ("ext+append", "sdpa"),
                     ("latent", "sdpa"), ("latent-op", "sdpa")]
        for rotation in rotations:
            times = {name: [] for name in rotation}
            for rnd in range(args.rounds):
                for name in rotation:
                    if name == "reference" and rnd >= args.ref_rounds:
                        continue
                    times[name].append(timed(fns[name]))
            med = {name: statistics.median(ts) for name, ts in times.items()}
            if rotation[0] == "ext":
                ref_med = med["reference"]
            for name in rotation:
                if name in ("sdpa", "reference"):  # listed once, after ext
                    continue
                # the reference restores V-only keys: no ratio for the latent rows
                vs_ref = None if name.startswith("latent") else ref_med / med[name]
                rows.append((f"({batch}, {t_max})", name, med[name] * 1e3,
                             min(times[name]) * 1e3, nbytes[name] / med[name] / 1e9,
                             med["sdpa"] / med[name], vs_ref, len(times[name])))
                if name == "ext":
                    for other in ("sdpa", "reference"):
                        rows.append((f"({batch}, {t_max})", other, med[other] * 1e3,
                                     min(times[other]) * 1e3, nbytes[other] / med[other] / 1e9,
                                     med["sdpa"] / med[other], ref_med / med[other],
                                     len(times[other])))
        del fns
    bandwidth_after = read_bandwidth()
    print_table(rows, info, bandwidth_before, bandwidth_after)


def print_table(rows, info, bandwidth_before, bandwidth_after) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"extension {info['extension_origin']}")
    print(f"machine read bandwidth (torch.sum over 1 GiB): {bandwidth_before:.1f} GB/s before, "
          f"{bandwidth_after:.1f} GB/s after\n")
    print("| (B, Tmax) | impl | median ms | best ms | GB/s read (median) | speed-up vs SDPA "
          "| speed-up vs reference | runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, name, ms, best, gbs, vs_sdpa, vs_ref, n in rows:
        ref = "-" if vs_ref is None else f"{vs_ref:.1f}"
        print(f"| {shape} | {name} | {ms:.3f} | {best:.3f} | {gbs:.1f} | {vs_sdpa:.2f} "
              f"| {ref} | {n} |")
    print("\nspeed-ups are ratios of medians within one rotation (ext, sdpa, reference; ext-op, "
          "ext+append, latent and latent-op each against sdpa in their own rotation, vs "
          "reference from the main one); GB/s counts the K and V_c (ext, reference), krope, K_c "
          "and V_c (latent) or K and V (sdpa) bytes the step must read.")


if __name__ == "__main__":
    main()
