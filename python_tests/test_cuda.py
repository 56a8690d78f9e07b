"""CUDA-specific tests of the csrc/cuda kernels (skipped without a GPU).

The device-parametrized tests in test_attention.py / test_kvcache.py run on CUDA too; these add
what only matters for the GPU kernels: the shapes they specialize (head_dim 64/128, R multiple
of 8), fp16/bf16/fp32 against float64, flash-decoding splits (long cache, B=1), NaN cache tails,
int64 offsets past 2**31 elements, the unsupported-shape errors, CUDA-graph capture, run-to-run
repeatability (a moving result is a race), and gradients of the training kernels; the same for
the latent-key kernels (SPEC 3b: separate and joint latents, Dr 0/8/16, 8 and 16 rows per
block).
"""
import pytest
import torch

from conftest import TOLERANCES, rel_error
from helpers import (make_attention_inputs, make_cache, make_latent_attention_inputs,
                     make_latent_cache, make_latent_step, make_step, run_attention, run_kvcache,
                     run_latent_attention, run_latent_kvcache, to_float64)
from vdproj_ext import bindings, reference
from vdproj_ext.ops import CompressedKVAttentionFunction, CompressedVAttentionFunction, backend_info
from vdproj_ext.ops.routing import (ckv_kvcache_uses_batched_aten,
                                    ckv_uses_restore_keys_then_sdpa, cuda_kernel_unsupported,
                                    cva_uses_restore_then_sdpa)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _ops():
    assert backend_info()["cuda_kernels"], f"CUDA kernels not built: {backend_info()}"
    return torch.ops.vdproj_ext


def test_cuda_kernels_built():
    info = backend_info()
    assert info["cuda_kernels"], info
    assert info["auto_backend"]["cuda"] == "ext"


# ---- kvcache -----------------------------------------------------------------------------------

def check_kvcache(b, t_max, h, d, r, lens, tq, t_new, dtype, causal, seed=0):
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, DEV, dtype, seed=seed)
    step = make_step(b, tq, t_new, h, d, r, DEV, dtype, seed=seed + 1)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    k64, vc64 = k_cache.double(), vc_cache.double()
    out = run_kvcache(step, k_cache, vc_cache, seqlens, causal, "ext")
    ref = run_kvcache(to_float64(step), k64, vc64, seqlens, causal, "reference")
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = rel_error(out, ref)
    assert err < TOLERANCES[dtype], err
    for i, n in enumerate(lens):  # written slots, and the NaN tails left alone
        if t_new:
            assert torch.equal(k_cache[i, n:n + t_new], step["k"][i])
            assert rel_error(vc_cache[i, n:n + t_new], vc64[i, n:n + t_new]) < TOLERANCES[dtype]
        assert torch.isnan(k_cache[i, n + t_new:]).all()
        assert torch.isnan(vc_cache[i, n + t_new:]).all()
    return out


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kvcache_decode_and_append(dtype, d, causal):
    # Varied lengths, an empty sequence, a full one; decode (Tq=1) and a short append.
    check_kvcache(4, 300, 4, d, 320, [17, 0, 299, 130], 1, 1, dtype, causal)
    check_kvcache(3, 300, 2, d, 64, [0, 41, 250], 5, 5, dtype, causal)
    check_kvcache(3, 300, 3, d, 136, [10, 77, 200], 3, 0, dtype, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kvcache_split_k_long_cache(dtype):
    # B * H far below the SM count: many flash-decoding splits, then the combine kernel.
    check_kvcache(1, 20000, 8, 64, 320, [19999], 1, 1, dtype, True)
    check_kvcache(2, 9000, 8, 64, 320, [8191, 3], 1, 0, dtype, True)


def test_kvcache_rank_and_heads_variants():
    check_kvcache(2, 200, 16, 64, 1024, [150, 199], 1, 1, torch.bfloat16, True)  # max rank
    check_kvcache(2, 200, 1, 128, 8, [5, 100], 2, 2, torch.float16, True)        # min rank
    check_kvcache(2, 200, 3, 64, 40, [60, 7], 9, 0, torch.float32, True)         # Tq > rows/block


def test_kvcache_strided_cache():
    # A cache that is a view into a larger buffer (rows still 16-byte aligned).
    g = torch.Generator().manual_seed(3)
    b, t_max, h, d, r, lens = 2, 128, 4, 64, 320, [50, 90]
    big_k = torch.randn(b, t_max + 16, h + 2, d, generator=g).to(DEV, torch.bfloat16)
    big_v = torch.randn(b, t_max + 16, r + 64, generator=g).to(DEV, torch.bfloat16)
    k_cache, vc_cache = big_k[:, 8:8 + t_max, 1:1 + h], big_v[:, :t_max, 32:32 + r]
    for i, n in enumerate(lens):
        k_cache[i, n + 1:] = float("nan")
        vc_cache[i, n + 1:] = float("nan")
    step = make_step(b, 1, 1, h, d, r, DEV, torch.bfloat16, seed=4)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    k64, vc64 = k_cache.double(), vc_cache.double()
    out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    ref = run_kvcache(to_float64(step), k64, vc64, seqlens, True, "reference")
    assert rel_error(out, ref) < TOLERANCES[torch.bfloat16]


def test_kvcache_int64_offsets():
    # Batch strides past 2**31 elements: any int32 index arithmetic would wrap.
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs ~10 GB of free GPU memory")
    h, d, r, t_max, lens = 2, 64, 64, 256, [100, 200]
    stride_b = 2 ** 31 + 1024  # elements, a multiple of 8
    g = torch.Generator().manual_seed(5)
    k_store = torch.full((stride_b + t_max * h * d,), float("nan"), dtype=torch.bfloat16,
                         device=DEV)
    v_store = torch.full((stride_b + t_max * r,), float("nan"), dtype=torch.bfloat16, device=DEV)
    k_cache = k_store.as_strided((2, t_max, h, d), (stride_b, h * d, d, 1))
    vc_cache = v_store.as_strided((2, t_max, r), (stride_b, r, 1))
    for i, n in enumerate(lens):
        k_cache[i, :n] = torch.randn(n, h, d, generator=g).to(DEV, torch.bfloat16)
        vc_cache[i, :n] = torch.randn(n, r, generator=g).to(DEV, torch.bfloat16)
    step = make_step(2, 1, 1, h, d, r, DEV, torch.bfloat16, seed=6)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    k64 = torch.stack([k_cache[i].double() for i in range(2)])
    vc64 = torch.stack([vc_cache[i].double() for i in range(2)])
    out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    ref = run_kvcache(to_float64(step), k64, vc64, seqlens, True, "reference")
    assert rel_error(out, ref) < TOLERANCES[torch.bfloat16]
    assert torch.equal(k_cache[1, 200], step["k"][1, 0])


def test_kvcache_repeatable_and_graph_capturable():
    b, t_max, h, d, r, lens = 2, 5000, 8, 64, 320, [4000, 4999]
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, DEV, torch.bfloat16, seed=7)
    step = make_step(b, 1, 0, h, d, r, DEV, torch.bfloat16, seed=8)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    args = (step["q"], k_cache, vc_cache, step["w_r"], step["b_r"], None, None, None, None,
            seqlens, True, d ** -0.5)
    check_repeatable_and_capturable(_ops().kvcache_attention, args)


def check_repeatable_and_capturable(op, args):
    """The same result on every call (a race shows up as run-to-run differences) and from a
    CUDA-graph replay of the call."""
    first = op(*args)
    for _ in range(5):
        assert torch.equal(op(*args), first)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(*args)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            captured = op(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


def test_unsupported_shapes_raise_clear_errors_or_fall_back():
    cases = [(96, 64, "head_dim"), (64, 20, "multiple of 8"), (64, 2048, "at most")]
    for d, r, words in cases:
        k_cache, vc_cache = make_cache(1, 16, 2, d, r, [5], DEV, torch.float16, seed=1)
        step = make_step(1, 1, 0, 2, d, r, DEV, torch.float16, seed=2)
        seqlens = torch.tensor([5], dtype=torch.int32, device=DEV)
        with pytest.raises(RuntimeError, match=words):
            _ops().kvcache_attention(step["q"], k_cache, vc_cache, step["w_r"], step["b_r"],
                                     None, None, None, None, seqlens, True, 0.1)
        # The extension gives the same reason to the routing question ...
        assert words in cuda_kernel_unsupported("kvcache", step["q"], r, [k_cache, vc_cache], 0)
        # ... and the public API takes the generic GPU path for such shapes instead.
        out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
        ref = run_kvcache(to_float64(step), k_cache.double(), vc_cache.double(), seqlens, True,
                          "reference")
        assert rel_error(out, ref) < TOLERANCES[torch.float16]
    q = torch.randn(1, 1, 2, 64, device=DEV, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _ops().cva_forward(q, q, torch.randn(1, 1, 64, device=DEV, dtype=torch.float64),
                           torch.randn(128, 64, device=DEV, dtype=torch.float64), None, False, 1.0)


def test_kernel_smem_query_and_routing_of_large_shapes():
    """The extension reports the kernels' shared memory and, asked whether the kernels take a
    shape that needs more than the device allows, says no; the public API then takes the
    generic path and stays correct."""
    _ops()
    attention, compress, bwd = bindings.load().cuda_kernel_smem_bytes("float32", 1, 32, 128,
                                                                      1024, 1)
    assert attention > 0 and compress > 0 and bwd > 0
    assert bindings.load().cuda_kernel_smem_bytes("float32", 0, 32, 128, 1024, 0)[:2] == [0, 0]
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    assert attention > limit  # float32, head_dim 128, R=1024: over any current GPU's limit
    b, h, d, r = 1, 32, 128, 1024
    k_cache, vc_cache = make_cache(b, 40, h, d, r, [30], DEV, torch.float32, seed=3)
    step = make_step(b, 1, 1, h, d, r, DEV, torch.float32, seed=4)
    vector_loaded = [k_cache, vc_cache, step["w_r"], step["k"], step["v"], step["w_c"]]
    assert "shared memory" in cuda_kernel_unsupported("kvcache", step["q"], r, vector_loaded, 1)
    small = make_step(b, 1, 1, 2, 64, 64, DEV, torch.float32, seed=5)
    assert cuda_kernel_unsupported("kvcache", small["q"], 64, [], 1) == ""
    seqlens = torch.tensor([30], dtype=torch.int32, device=DEV)
    ref_k, ref_vc = k_cache.double(), vc_cache.double()
    out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    ref = run_kvcache(to_float64(step), ref_k, ref_vc, seqlens, True, "reference")
    assert rel_error(out, ref) < TOLERANCES[torch.float32]


def test_seqlens_checked_by_the_op_itself():
    """The C++ op checks cache_seqlens (the public API leaves it to the op): ValueError, and
    nothing written."""
    k_cache, vc_cache = make_cache(2, 8, 2, 64, 16, [3, 7], DEV, torch.float16, seed=4)
    step = make_step(2, 2, 2, 2, 64, 16, DEV, torch.float16, seed=5)
    before = (k_cache.clone(), vc_cache.clone())
    for lens, words in (([3, 7], "overflow"), ([3, 9], "must lie in"), ([-1, 0], "must lie in")):
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match=words):
            _ops().kvcache_attention(step["q"], k_cache, vc_cache, step["w_r"], step["b_r"],
                                     step["k"], step["v"], step["w_c"], step["b_c"], seqlens,
                                     True, 0.1)
    assert torch.equal(k_cache.nan_to_num(5.0), before[0].nan_to_num(5.0))
    assert torch.equal(vc_cache.nan_to_num(5.0), before[1].nan_to_num(5.0))


# ---- training / prefill ------------------------------------------------------------------------

def kernel_forward_backward(inputs, causal, gout, scale=None):
    """Force the absorbed kernels (bypassing the shape-based composite choice)."""
    _ops()  # loads the extension
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    s = inputs["q"].shape[-1] ** -0.5 if scale is None else scale
    out = CompressedVAttentionFunction.apply(*leaves.values(), causal, s, "ext")
    out.backward(gout)
    return out.detach(), {n: x.grad for n, x in leaves.items()}


GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 37, 3, 64, 40), (2, 20, 75, 2, 128, 64),
                                   (1, 70, 33, 4, 64, 320), (1, 1, 300, 8, 64, 320)],
                         ids=["square", "tq<tk", "tq>tk", "decode-like"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cva_kernels_forward_and_grads(dtype, shape, causal):
    inputs = make_attention_inputs(shape, DEV, dtype)
    gout = torch.randn(shape[0], shape[1], shape[3], shape[4], device=DEV).to(dtype)
    out, grads = kernel_forward_backward(inputs, causal, gout)
    ref, ref_grads = run_attention(to_float64(inputs), "reference", causal, gout)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(out, ref) < TOLERANCES[dtype]
    for name in ["q", "k", "v_c", "w_r", "b_r"]:
        g, rg = grads[name], ref_grads[name]
        assert g is not None and g.dtype == dtype, name
        assert rel_error(g, rg) < GRAD_TOL[dtype], (name, rel_error(g, rg))


def test_cva_kernel_lse_and_ctx_contract():
    q, k, v_c, w_r, b_r = make_attention_inputs((2, 9, 5, 2, 64, 16), DEV, torch.float32).values()
    out, lse, ctx = _ops().cva_forward(q, k, v_c, w_r, b_r, True, 0.125)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 9)
    assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] < 0).all()  # rows seeing no key
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * 0.125
    allowed = reference.causal_mask(9, 5, DEV)
    ref_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    assert torch.allclose(lse[:, :, 4:].double(), ref_lse[:, :, 4:], rtol=1e-5, atol=1e-5)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    assert rel_error(ctx, torch.einsum("bhij,bjr->bihr", probs, v_c.double())) < 1e-5


def test_cva_repeatable_forward():
    inputs = make_attention_inputs((2, 200, 260, 8, 64, 320), DEV, torch.bfloat16).values()
    first = _ops().cva_forward(*inputs, True, 0.125)
    for _ in range(3):
        again = _ops().cva_forward(*inputs, True, 0.125)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("tq,tk", [(256, 256), (128, 512), (300, 200)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_composite_path_matches_reference(tq, tk, causal):
    # Shapes above the composite threshold take "restore V + SDPA" through the public API.
    inputs = make_attention_inputs((2, tq, tk, 4, 64, 96), DEV, torch.float32)
    assert cva_uses_restore_then_sdpa(inputs["q"], inputs["k"], inputs["v_c"])
    gout = torch.randn(2, tq, 4, 64, device=DEV)
    out, grads = run_attention(inputs, "ext", causal, gout)
    ref, ref_grads = run_attention(to_float64(inputs), "reference", causal, gout)
    assert rel_error(out, ref) < 1e-4  # SDPA may use TF32-free fp32 kernels: loose-ish bound
    for name, rg in ref_grads.items():
        assert rel_error(grads[name], rg) < 1e-3


# ---- latent keys (SPEC 3b) ---------------------------------------------------------------------

# (B, Tmax, H, D, Dr, Rk, Rv, seqlens, Tq, Tnew)
LATENT_CACHE_CASES = [
    (4, 300, 8, 64, 16, 192, 320, [17, 0, 299, 130], 1, 1),   # the reference shape, decode
    (3, 300, 4, 128, 8, 64, 136, [0, 41, 250], 3, 3),         # chunk of 3, 12 rows per block
    (3, 200, 16, 64, 0, 96, 128, [10, 77, 200], 1, 0),        # 16 heads, fully latent keys
]
LATENT_CACHE_IDS = ["ref-shape", "chunk-d128", "h16-dr0"]


def check_latent_kvcache(case, dtype, joint, causal, seed=0):
    b, t_max, h, d, dr, rk, rv, lens, tq, t_new = case
    caches = make_latent_cache(b, t_max, h, dr, rk, rv, lens, DEV, dtype, joint=joint, seed=seed)
    step = make_latent_step(b, tq, t_new, h, d, dr, rk, rv, DEV, dtype, joint=joint, seed=seed + 1)
    assert not ckv_kvcache_uses_batched_aten(
        step["q"], caches["krope_cache"], caches["kc_cache"], caches["vc_cache"], step["w_r"],
        step["k"], step["v"], step["w_kc"], step["w_c"]), "the kernels should take this case"
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref_caches = {n: (c.double() if c is not None else None) for n, c in caches.items()}
    out = run_latent_kvcache(step, caches, seqlens, causal, "ext")
    ref = run_latent_kvcache(to_float64(step), ref_caches, seqlens, causal, "reference")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(out, ref) < TOLERANCES[dtype], rel_error(out, ref)
    for i, n in enumerate(lens):  # written slots (rotary keys exactly), and the NaN tails
        if t_new:
            assert torch.equal(caches["krope_cache"][i, n:n + t_new], step["k"][i, :, :, :dr])
        for name, cache in caches.items():
            if cache is None:
                continue
            if t_new and name != "krope_cache":
                got, want = cache[i, n:n + t_new], ref_caches[name][i, n:n + t_new]
                assert rel_error(got, want) < TOLERANCES[dtype], name
            assert torch.isnan(cache[i, n + t_new:]).all(), name
    return out


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", LATENT_CACHE_CASES, ids=LATENT_CACHE_IDS)
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_latent_kvcache_decode_and_append(dtype, case, joint, causal):
    check_latent_kvcache(case, dtype, joint, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
def test_latent_kvcache_split_k_long_cache(dtype, joint):
    # B * H far below the SM count: many flash-decoding splits, then the combine kernel.
    check_latent_kvcache((1, 20000, 8, 64, 16, 192, 320, [19999], 1, 1), dtype, joint, True)
    check_latent_kvcache((2, 9000, 8, 64, 16, 192, 320, [8191, 3], 1, 0), dtype, joint, True)


def test_latent_kvcache_repeatable_and_graph_capturable():
    b, t_max, h, d, dr, rk, rv, lens = 2, 5000, 8, 64, 16, 192, 320, [4000, 4999]
    caches = make_latent_cache(b, t_max, h, dr, rk, rv, lens, DEV, torch.bfloat16, seed=7)
    step = make_latent_step(b, 1, 0, h, d, dr, rk, rv, DEV, torch.bfloat16, seed=8)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    args = (step["q"], caches["krope_cache"], caches["kc_cache"], caches["vc_cache"],
            step["w_kr"], step["w_r"], step["b_r"], None, None, None, None, None, None, seqlens,
            True, d ** -0.5)
    check_repeatable_and_capturable(_ops().ckv_kvcache_attention, args)


def test_latent_unsupported_shapes_raise_or_fall_back():
    """Rotary dims the 16-byte copies cannot move (Dr = 4) and head_dim 96: the op raises a
    RuntimeError with the extension's reason; the public API takes the ATen path instead."""
    for d, dr, words in [(64, 4, "rotary dims"), (96, 16, "head_dim")]:
        caches = make_latent_cache(1, 16, 2, dr, 24, 32, [5], DEV, torch.float16, seed=1)
        step = make_latent_step(1, 1, 1, 2, d, dr, 24, 32, DEV, torch.float16, seed=2)
        seqlens = torch.tensor([5], dtype=torch.int32, device=DEV)
        vector_loaded = [caches["krope_cache"], caches["kc_cache"], caches["vc_cache"]]
        assert words in cuda_kernel_unsupported("ckv_kvcache", step["q"], 32, vector_loaded, 1,
                                                rope_dim=dr, k_rank=24)
        with pytest.raises(RuntimeError, match=words):
            _ops().ckv_kvcache_attention(
                step["q"], caches["krope_cache"], caches["kc_cache"], caches["vc_cache"],
                step["w_kr"], step["w_r"], step["b_r"], step["k"], step["v"], step["w_kc"],
                step["b_kc"], step["w_c"], step["b_c"], seqlens, True, 0.1)
        ref_caches = {n: c.double() for n, c in caches.items()}
        out = run_latent_kvcache(step, caches, seqlens, True, "ext")
        ref = run_latent_kvcache(to_float64(step), ref_caches, seqlens, True, "reference")
        assert rel_error(out, ref) < TOLERANCES[torch.float16]


def test_latent_seqlens_checked_by_the_op_itself():
    """ValueError from the C++ op for bad cache_seqlens, and nothing written."""
    caches = make_latent_cache(2, 8, 2, 16, 32, 48, [3, 7], DEV, torch.float16, seed=4)
    step = make_latent_step(2, 2, 2, 2, 64, 16, 32, 48, DEV, torch.float16, seed=5)
    before = {n: c.clone() for n, c in caches.items()}
    for lens, words in (([3, 7], "overflow"), ([3, 9], "must lie in"), ([-1, 0], "must lie in")):
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match=words):
            run_latent_kvcache(step, caches, seqlens, True, "ext")
    for name, cache in caches.items():
        assert torch.equal(cache.nan_to_num(5.0), before[name].nan_to_num(5.0)), name


LATENT_NAMES = ["q", "k_rope", "k_c", "v_c", "w_kr", "w_r", "b_r"]


def latent_kernel_forward_backward(inputs, causal, gout, scale=None):
    """Force the ckv kernels (bypassing the shape-based composite choice)."""
    _ops()
    leaves = {n: (x.detach().clone().requires_grad_() if x is not None else None)
              for n, x in inputs.items()}
    s = inputs["q"].shape[-1] ** -0.5 if scale is None else scale
    out = CompressedKVAttentionFunction.apply(*(leaves[n] for n in LATENT_NAMES), causal, s,
                                              "ext")
    out.backward(gout)
    return out.detach(), {n: x.grad for n, x in leaves.items() if x is not None}


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 37, 3, 64, 16, 48, 64),
                                   (2, 20, 75, 2, 128, 8, 72, 136),
                                   (1, 70, 33, 4, 64, 0, 192, 320),
                                   (1, 1, 300, 8, 64, 16, 192, 320)],
                         ids=["square", "tq<tk", "tq>tk-dr0", "decode-like"])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ckv_kernels_forward_and_grads(dtype, shape, joint, causal):
    inputs = make_latent_attention_inputs(shape, DEV, dtype, joint=joint)
    assert not cuda_kernel_unsupported(
        "ckv", inputs["q"], shape[7], [inputs["k_rope"], inputs["k_c"], inputs["v_c"]], 0, True,
        rope_dim=shape[5], k_rank=0 if joint else shape[6])
    gout = torch.randn(shape[0], shape[1], shape[3], shape[4], device=DEV).to(dtype)
    out, grads = latent_kernel_forward_backward(inputs, causal, gout)
    ref, ref_grads = run_latent_attention(to_float64(inputs), "reference", causal, gout)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(out, ref) < TOLERANCES[dtype]
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == dtype, name
        err = rel_error(g, ref_grads[name])
        assert err < GRAD_TOL[dtype], (name, err)


def test_ckv_routing_and_composite_path():
    """Small shapes run the kernels through the public API, large ones the ATen path; both match
    the float64 reference."""
    for tq, tk, kernel in [(9, 40, True), (256, 256, False)]:
        inputs = make_latent_attention_inputs((2, tq, tk, 4, 64, 16, 64, 96), DEV, torch.float32)
        assert ckv_uses_restore_keys_then_sdpa(inputs["q"], inputs["k_rope"], inputs["k_c"],
                                               inputs["v_c"]) is not kernel
        gout = torch.randn(2, tq, 4, 64, device=DEV)
        out, grads = run_latent_attention(inputs, "ext", True, gout)
        ref, ref_grads = run_latent_attention(to_float64(inputs), "reference", True, gout)
        assert rel_error(out, ref) < 1e-4
        for name, rg in ref_grads.items():
            assert rel_error(grads[name], rg) < 1e-3, name


def test_ckv_repeatable_forward():
    inputs = make_latent_attention_inputs((2, 100, 160, 8, 64, 16, 192, 320), DEV, torch.bfloat16)
    args = [inputs[n] for n in LATENT_NAMES]
    first = _ops().ckv_forward(*args, True, 0.125)
    for _ in range(3):
        again = _ops().ckv_forward(*args, True, 0.125)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
