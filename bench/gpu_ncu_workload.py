"""The workload bench/gpu_check.sh profiles with Nsight Compute (ncu): one bf16 decode read of
each op (V-only, then latent keys) at (B, T) = (1, 32768) and (128, 2048), every position
valid, after one warm-up call each. ncu then reports, per kernel launch, the duration, DRAM and
SM throughput against peak, achieved occupancy and launch sizes: what the first H200 run
(bench/RESULTS.md, 2026-12-04) could not see, with the decode kernels at 19-43% of copy
bandwidth.

    python bench/gpu_ncu_workload.py    (needs a CUDA device and the built kernels)
"""
import torch

from vdproj_ext.ops.backend import load_kernels

H, D, R, DR, RK = 8, 64, 320, 16, 192


def main():
    ops = load_kernels()
    dt, scale = torch.bfloat16, D ** -0.5

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt)
    w_r, b_r, w_kr = rnd(H * D, R) / R ** 0.5, rnd(H * D), rnd(H * (D - DR), RK) / RK ** 0.5
    for batch, t in [(1, 32768), (128, 2048)]:
        full = torch.full((batch,), t, dtype=torch.int32, device="cuda")
        q, kc, vc = rnd(batch, 1, H, D), rnd(batch, t, H, D), rnd(batch, t, R)
        kr, kl = rnd(batch, t, H, DR), rnd(batch, t, RK)
        for _ in range(2):  # the first call warms up; ncu's kernel filter skips nothing
            ops.kvcache_attention(q, kc, vc, w_r, b_r, None, None, None, None, full, True, scale)
            ops.ckv_kvcache_attention(q, kr, kl, vc, w_kr, w_r, b_r, None, None, None, None,
                                      None, None, full, True, scale)
        torch.cuda.synchronize()
        print(f"ncu workload B={batch} T={t}: done", flush=True)


if __name__ == "__main__":
    main()
