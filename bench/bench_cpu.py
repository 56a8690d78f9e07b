"""pytest-benchmark suite for the CPU kernels (`pytest bench --benchmark-only`).

Each group times the compiled kernels ("ext"), the pure-PyTorch reference and, for decode,
torch.nn.functional.scaled_dot_product_attention over the equivalent uncompressed cache
(K and V as (B, H, T, D)), at the same shapes in the same run. Shapes are kept small enough
for the whole file to finish in well under two minutes on 2 cores; bench/cpu_decode.py runs
the full-size judged decode shapes side by side.
"""
import pytest
import torch
import torch.nn.functional as F

from vdproj_ext import compressed_attn_with_kvcache, compressed_v_attention, decode_linear

H, D, R = 8, 64, 320
DECODE_SHAPES = [(4, 4096), (1, 8192)]


def decode_setup(batch, t_max, append):
    g = torch.Generator().manual_seed(0)
    x = dict(q=torch.randn(batch, 1, H, D, generator=g),
             k_cache=torch.randn(batch, t_max, H, D, generator=g),
             vc_cache=torch.randn(batch, t_max, R, generator=g),
             w_r=torch.randn(H * D, R, generator=g) / R ** 0.5,
             b_r=torch.randn(H * D, generator=g))
    if append:  # one new token written at t_max - 1, so every position is valid after it
        x.update(k=torch.randn(batch, 1, H, D, generator=g),
                 v=torch.randn(batch, 1, H * D, generator=g),
                 w_c=torch.randn(R, H * D, generator=g) / (H * D) ** 0.5,
                 b_c=torch.randn(R, generator=g))
    x["cache_seqlens"] = torch.full((batch,), t_max - (1 if append else 0), dtype=torch.int32)
    return x


@pytest.mark.parametrize("impl", ["ext", "sdpa", "reference"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"B{s[0]}xT{s[1]}")
def test_decode(benchmark, shape, impl):
    batch, t_max = shape
    benchmark.group = f"decode fp32 B={batch} T={t_max} H={H} D={D} R={R}"
    x = decode_setup(batch, t_max, append=False)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if impl == "sdpa":
        q = x["q"].transpose(1, 2).contiguous()
        k = torch.randn(batch, H, t_max, D)
        v = torch.randn(batch, H, t_max, D)
        benchmark(F.scaled_dot_product_attention, q, k, v)
        return
    x["backend"] = impl
    if impl == "reference":
        benchmark.pedantic(lambda: compressed_attn_with_kvcache(**x), rounds=5, warmup_rounds=1)
    else:
        benchmark(lambda: compressed_attn_with_kvcache(**x))


@pytest.mark.parametrize("impl", ["ext", "reference"])
def test_decode_with_append(benchmark, impl):
    batch, t_max = 4, 2048
    benchmark.group = f"decode+append fp32 B={batch} T={t_max} H={H} D={D} R={R}"
    x = decode_setup(batch, t_max, append=True)
    x["backend"] = impl
    if impl == "reference":
        benchmark.pedantic(lambda: compressed_attn_with_kvcache(**x), rounds=5, warmup_rounds=1)
    else:
        benchmark(lambda: compressed_attn_with_kvcache(**x))


TRAIN_SHAPES = [(8, 128, 4, 32), (2, 128, 8, 64)]


@pytest.mark.parametrize("impl", ["ext", "reference"])
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "B{}xT{}xH{}xD{}".format(*s))
def test_train_forward_backward(benchmark, shape, impl):
    batch, t, heads, head_dim = shape
    rank = int(0.625 * heads * head_dim)
    benchmark.group = f"train fwd+bwd fp32 causal B={batch} T={t} H={heads} D={head_dim} R={rank}"
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in
              ((batch, t, heads, head_dim), (batch, t, heads, head_dim), (batch, t, rank),
               (heads * head_dim, rank), (heads * head_dim,))]

    def step():
        out = compressed_v_attention(*leaves, causal=True, backend=impl)
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None

    benchmark.pedantic(step, rounds=10 if impl == "ext" else 4, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["decode_linear", "F.linear"])
def test_decode_lm_head(benchmark, impl):
    """The LM head of one batch-8 pythia-70m decode step (bench/cpu_linear.py has the table)."""
    x, w = torch.randn(8, 512), torch.randn(50304, 512)
    fn = decode_linear if impl == "decode_linear" else F.linear
    with torch.no_grad():
        y = benchmark(fn, x, w)
    assert y.shape == (8, 50304) and torch.isfinite(y).all()
