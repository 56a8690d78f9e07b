"""The public API contract: backend selection, bad input, torch.library and torch.compile."""
import math

import pytest
import torch

from helpers import (assert_same_error_on_every_backend, make_attention_inputs, make_cache,
                     make_latent_attention_inputs, make_latent_cache, make_latent_step,
                     make_step, replace_args, run_attention, run_kvcache, run_latent_attention,
                     run_latent_kvcache, shared_attention_bad_cases, shared_seqlens_bad_cases)
from vdproj_ext import backend_info, compressed_attn_with_kvcache, compressed_v_attention
from vdproj_ext.ops.backend import load_kernels

load_kernels()  # defines torch.ops.vdproj_ext.*, which the raw-op tests call (also run alone)

B, TQ, TK, H, D, R = 2, 3, 5, 2, 8, 6
BACKENDS = ["reference", "ext"]


def attn_inputs(dtype=torch.float32, bias=True, requires_grad=False):
    t = dict(q=torch.randn(B, TQ, H, D, dtype=dtype), k=torch.randn(B, TK, H, D, dtype=dtype),
             v_c=torch.randn(B, TK, R, dtype=dtype), w_r=torch.randn(H * D, R, dtype=dtype) * 0.3,
             b_r=torch.randn(H * D, dtype=dtype) if bias else None)
    if requires_grad:
        for v in t.values():
            if v is not None:
                v.requires_grad_()
    return t


def cache_inputs(t_max=8, t_new=2, seqlens=(3, 0), dtype=torch.float32):
    k_cache, vc_cache = make_cache(B, t_max, H, D, R, seqlens, "cpu", dtype)
    step = make_step(B, t_new, t_new, H, D, R, "cpu", dtype)
    return dict(q=step["q"], k_cache=k_cache, vc_cache=vc_cache, w_r=step["w_r"], b_r=step["b_r"],
                k=step["k"], v=step["v"], w_c=step["w_c"], b_c=step["b_c"],
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32))


def call_attn(args, **kw):
    args = dict(args)
    return compressed_v_attention(args.pop("q"), args.pop("k"), args.pop("v_c"), args.pop("w_r"),
                                  args.pop("b_r"), **args, **kw)


def call_cache(args, **kw):
    args = dict(args)
    return compressed_attn_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("vc_cache"),
                                        args.pop("w_r"), args.pop("b_r"), **args, **kw)


# ---------------------------------------------------------------------------------------------
# backend_info and selection


def test_backend_info_reports_cpu_kernels():
    info = backend_info()
    for key in ("torch_version", "cpu_kernels", "cuda_kernels", "cuda_archs", "auto_backend",
                "built_torch_version", "extension_origin"):
        assert key in info
    assert info["cpu_kernels"], f"CPU kernels not loadable: {info['extension_error']}"
    assert info["auto_backend"]["cpu"] == "ext"
    assert info["built_torch_version"] and torch.__version__.startswith(info["built_torch_version"])
    if not torch.cuda.is_available() or not info["cuda_kernels"]:
        assert info["auto_backend"]["cuda"] == "reference"


def test_auto_matches_ext_and_reference():
    args = attn_inputs(torch.float64)
    outs = [call_attn(args, causal=True, backend=b) for b in ("auto", "ext", "reference")]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[2], rtol=1e-10, atol=1e-10)


def test_ext_unavailable_for_device_raises_clearly():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    args = {k: (v.to("meta") if v is not None else None) for k, v in attn_inputs().items()}
    with pytest.raises(RuntimeError, match="backend='ext'.*meta"):
        call_attn(args, backend="ext")


@pytest.mark.parametrize("backend", [None, "fast", 3])
def test_bad_backend(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        call_attn(attn_inputs(), backend=backend)


# ---------------------------------------------------------------------------------------------
# bad input for compressed_v_attention: every class of SPEC section 3, on both backends


ATTN_BAD = {
    **shared_attention_bad_cases(),
    "k shape": (lambda a: replace_args(a, k=a["k"][..., :-1]), ValueError, r"k must have shape"),
    "k heads": (lambda a: replace_args(a, k=a["k"][:, :, :1]), ValueError, r"k must have shape"),
    "mixed dtype": (lambda a: replace_args(a, k=a["k"].double()), TypeError, r"k must have dtype"),
    "q None": (lambda a: replace_args(a, q=None), TypeError, r"q must be a tensor, got None"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ATTN_BAD))
def test_attention_bad_input(case, backend):
    mutate, exc, pattern = ATTN_BAD[case]
    with pytest.raises(exc, match=pattern):
        call_attn(mutate(attn_inputs()), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,exc", [(float("inf"), ValueError), (float("nan"), ValueError),
                                       (-math.inf, ValueError), (True, TypeError),
                                       ("0.1", TypeError)])
def test_bad_softmax_scale(scale, exc, backend):
    with pytest.raises(exc, match="softmax_scale"):
        call_attn(attn_inputs(), softmax_scale=scale, backend=backend)
    with pytest.raises(exc, match="softmax_scale"):
        call_cache(cache_inputs(), softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_causal_flag(backend):
    with pytest.raises(TypeError, match="causal must be a bool"):
        call_attn(attn_inputs(), causal="yes", backend=backend)


# ---------------------------------------------------------------------------------------------
# bad input for compressed_attn_with_kvcache

CACHE_BAD = {
    **shared_seqlens_bad_cases(batch=2, t_max=8, t_new=2),
    "k without v": (lambda a: replace_args(a, v=None), ValueError, r"k and v must be given together"),
    "no w_c": (lambda a: replace_args(a, w_c=None), ValueError, r"w_c .* is required"),
    "w_c shape": (lambda a: replace_args(a, w_c=a["w_c"].t()), ValueError, r"w_c must have shape"),
    "b_c shape": (lambda a: replace_args(a, b_c=a["b_c"][:-1]), ValueError, r"b_c must have shape"),
    "v shape": (lambda a: replace_args(a, v=a["v"][..., :-1]), ValueError, r"v must have shape"),
    "k shape": (lambda a: replace_args(a, k=a["k"][:, :, :1]), ValueError, r"k must have shape"),
    "vc_cache rank": (lambda a: replace_args(a, vc_cache=a["vc_cache"][0]), ValueError,
                      r"vc_cache must be 3-D"),
    "vc_cache length": (lambda a: replace_args(a, vc_cache=a["vc_cache"][:, :-1]), ValueError,
                        r"vc_cache must have shape"),
    "k_cache dtype": (lambda a: replace_args(a, k_cache=a["k_cache"].half()), TypeError,
                      r"k_cache must have dtype"),
    "cache stride": (lambda a: replace_args(a, vc_cache=a["vc_cache"].transpose(0, 2).contiguous()
                                        .transpose(0, 2)), ValueError, r"vc_cache must have a unit stride"),
    "k_cache expanded": (lambda a: replace_args(a, k_cache=a["k_cache"][:1].expand_as(a["k_cache"])),
                         ValueError, r"k_cache has elements that share memory"),
    "vc_cache expanded": (lambda a: replace_args(a, vc_cache=a["vc_cache"][:1].expand_as(a["vc_cache"])),
                          ValueError, r"vc_cache has elements that share memory"),
    "q not a tensor": (lambda a: replace_args(a, q=a["q"].tolist()), TypeError,
                       r"q must be a torch.Tensor"),
    "q int dtype": (lambda a: replace_args(a, q=a["q"].long()), TypeError, r"q must be float32"),
    "k rank": (lambda a: replace_args(a, k=a["k"][0]), ValueError, r"k must be 4-D"),
    "b_c rank": (lambda a: replace_args(a, b_c=a["b_c"][None]), ValueError, r"b_c must be 1-D"),
    "w_c dtype": (lambda a: replace_args(a, w_c=a["w_c"].double()), TypeError, r"w_c must have dtype"),
    "k_cache device": (lambda a: replace_args(a, k_cache=a["k_cache"].to("meta")), ValueError,
                       r"k_cache must be on cpu"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CACHE_BAD))
def test_kvcache_bad_input(case, backend):
    mutate, exc, pattern = CACHE_BAD[case]
    args = mutate(cache_inputs())
    before = [args["k_cache"].clone(), args["vc_cache"].clone()]
    with pytest.raises(exc, match=pattern):
        call_cache(args, backend=backend)
    # A rejected call writes nothing (NaN compares equal to NaN here).
    torch.testing.assert_close(args["k_cache"], before[0], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_cache_is_read_when_nothing_is_written(backend):
    """A prefix shared by every batch row (expand, stride 0) is refused only when new tokens
    would be written into it; read-only calls see the same result as with a copy."""
    args = replace_args(cache_inputs(seqlens=(3, 3)), k=None, v=None)
    shared = replace_args(args, k_cache=args["k_cache"][:1].expand_as(args["k_cache"]),
                          vc_cache=args["vc_cache"][:1].expand_as(args["vc_cache"]))
    owned = replace_args(shared, k_cache=shared["k_cache"].contiguous(),
                         vc_cache=shared["vc_cache"].contiguous())
    torch.testing.assert_close(call_cache(shared, backend=backend),
                               call_cache(owned, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_overflow_writes_nothing(backend):
    args = cache_inputs(t_max=8, t_new=3, seqlens=(6, 1))  # 6 + 3 > 8
    before = [args["k_cache"].clone(), args["vc_cache"].clone()]
    with pytest.raises(ValueError, match="overflow"):
        call_cache(args, backend=backend)
    torch.testing.assert_close(args["k_cache"], before[0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(args["vc_cache"], before[1], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_runs_without_grad_and_restores_grad_mode(backend):
    """The decode op writes caches in place, so it runs with grad mode off (inference_only)
    and gives grad mode back as it was: after a normal return and after an error."""
    args = cache_inputs()
    args["q"].requires_grad_(True)
    seen = []
    with torch.enable_grad():
        out = call_cache(args, backend=backend)
        assert not out.requires_grad and torch.is_grad_enabled()
        with pytest.raises(ValueError, match="overflow"):
            call_cache(replace_args(args, cache_seqlens=torch.tensor([7, 7], dtype=torch.int32)),
                       backend=backend)
        seen.append(torch.is_grad_enabled())
    with torch.no_grad():
        call_cache(cache_inputs(), backend=backend)
        seen.append(torch.is_grad_enabled())
    assert seen == [True, False]


@pytest.mark.parametrize("case", sorted(ATTN_BAD))
def test_attention_bad_input_same_error_on_every_backend(case):
    """One set of messages: the Python checks (reference) and the C++ checks (ext) agree."""
    args = ATTN_BAD[case][0](attn_inputs())
    assert_same_error_on_every_backend(lambda backend: call_attn(args, backend=backend), BACKENDS)


@pytest.mark.parametrize("case", sorted(CACHE_BAD))
def test_kvcache_bad_input_same_error_on_every_backend(case):
    args = CACHE_BAD[case][0](cache_inputs())
    before = [args["k_cache"].clone(), args["vc_cache"].clone()]

    def nothing_written():
        for cache, old in zip((args["k_cache"], args["vc_cache"]), before):
            torch.testing.assert_close(cache, old, equal_nan=True, rtol=0, atol=0)

    assert_same_error_on_every_backend(lambda backend: call_cache(args, backend=backend),
                                       BACKENDS, nothing_written)


def test_direct_op_call_with_bad_shapes_raises_not_crashes():
    """The C++ API checks its inputs too, for callers that bypass the Python checks."""
    a = attn_inputs()
    with pytest.raises(ValueError):
        torch.ops.vdproj_ext.cva_forward(a["q"], a["k"][:, :, :1], a["v_c"], a["w_r"], a["b_r"],
                                         False, 0.3)
    with pytest.raises(ValueError):
        torch.ops.vdproj_ext.cva_forward(a["q"], a["k"], a["v_c"][:, :-1], a["w_r"], a["b_r"],
                                         False, 0.3)
    c = cache_inputs()
    with pytest.raises(ValueError, match="overflow"):  # 7 + 2 > 8
        torch.ops.vdproj_ext.kvcache_attention(
            c["q"], c["k_cache"], c["vc_cache"], c["w_r"], c["b_r"], c["k"], c["v"], c["w_c"],
            c["b_c"], torch.tensor([7, 0], dtype=torch.int32), True, 0.3)


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def test_opcheck_cva_forward_and_backward():
    a = attn_inputs(requires_grad=True)
    for causal in (False, True):
        args = (a["q"], a["k"], a["v_c"], a["w_r"], a["b_r"], causal, 0.37)
        torch.library.opcheck(torch.ops.vdproj_ext.cva_forward.default, args)
        out, lse, ctx = torch.ops.vdproj_ext.cva_forward(*args)
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.vdproj_ext.cva_backward.default,
                              (grad, a["q"].detach(), a["k"].detach(), a["v_c"].detach(),
                               a["w_r"].detach(), lse, ctx, causal, 0.37))
    torch.library.opcheck(torch.ops.vdproj_ext.cva_forward.default,
                          (a["q"], a["k"], a["v_c"], a["w_r"], None, True, 0.37))


def test_saved_context_is_float32_for_bf16_and_checked():
    # The latent context a forward saves for its backward stays in float32 for bf16 inputs (a
    # bf16 copy cost the gradients precision); the fake kernel says so too, and the backward
    # refuses a context of another dtype by name.
    a = attn_inputs(torch.bfloat16, requires_grad=True)
    args = (a["q"], a["k"], a["v_c"], a["w_r"], a["b_r"], True, 0.37)
    torch.library.opcheck(torch.ops.vdproj_ext.cva_forward.default, args)
    out, lse, ctx = torch.ops.vdproj_ext.cva_forward(*args)
    assert out.dtype == torch.bfloat16 and ctx.dtype == torch.float32
    plain = [t.detach() for t in (a["q"], a["k"], a["v_c"], a["w_r"])]
    torch.library.opcheck(torch.ops.vdproj_ext.cva_backward.default,
                          (torch.randn_like(out), *plain, lse, ctx, True, 0.37))
    with pytest.raises(TypeError, match="ctx must have dtype torch.float32"):
        torch.ops.vdproj_ext.cva_backward(torch.randn_like(out), *plain, lse,
                                          ctx.bfloat16(), True, 0.37)


def test_opcheck_kvcache_attention():
    c = cache_inputs()
    c["k_cache"] = torch.nan_to_num(c["k_cache"])  # opcheck compares whole caches
    c["vc_cache"] = torch.nan_to_num(c["vc_cache"])
    args = (c["q"], c["k_cache"], c["vc_cache"], c["w_r"], c["b_r"], c["k"], c["v"], c["w_c"],
            c["b_c"], c["cache_seqlens"], True, 0.3)
    torch.library.opcheck(torch.ops.vdproj_ext.kvcache_attention.default, args)
    args_no_new = (c["q"], c["k_cache"], c["vc_cache"], c["w_r"], None, None, None, None, None,
                   c["cache_seqlens"], True, 0.3)
    torch.library.opcheck(torch.ops.vdproj_ext.kvcache_attention.default, args_no_new)


def test_registered_autograd_matches_function():
    """Calling the raw op under autograd uses the registered backward formula."""
    a = attn_inputs(torch.float64, requires_grad=True)
    out, _, _ = torch.ops.vdproj_ext.cva_forward(a["q"], a["k"], a["v_c"], a["w_r"], a["b_r"],
                                                  True, D ** -0.5)
    grads_op = torch.autograd.grad(out.sum(), list(a.values()))
    out_ref = call_attn(a, causal=True, backend="reference")
    grads_ref = torch.autograd.grad(out_ref.sum(), list(a.values()))
    for g_op, g_ref in zip(grads_op, grads_ref):
        torch.testing.assert_close(g_op, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    a = attn_inputs(requires_grad=True)

    def step(q, k, v_c, w_r, b_r):
        return compressed_v_attention(q, k, v_c, w_r, b_r, causal=True,
                                      backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*a.values())
    grads = torch.autograd.grad(loss, list(a.values()))
    loss_ref = step(*a.values())
    grads_ref = torch.autograd.grad(loss_ref, list(a.values()))
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.slow
def test_torch_compile_inductor_decode():
    torch._dynamo.reset()
    c = cache_inputs()
    c2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}

    def decode(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, seqlens):
        out = compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r, k=k, v=v, w_c=w_c,
                                           b_c=b_c, cache_seqlens=seqlens, backend="ext")
        return out * 2.0

    compiled = torch.compile(decode, fullgraph=True)
    out = compiled(*c.values())
    out_eager = decode(*c2.values())
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(c["vc_cache"], c2["vc_cache"], equal_nan=True)


# ---- NaN in the part of the inputs that is read propagates (a NaN key once gave zeros: an
# online-softmax row whose sum was NaN was taken for a row without keys)

NAN_CASES = ("attention", "kvcache", "latent_attention", "latent_kvcache")


def _nan_key_call(case, backend, causal):
    """The output of `case` with NaN in one read key element of batch 0, head 1 (under the
    causal mask too, every query of batch 0 reads it). backend "aten": the ATen paths the
    GPU takes for inputs its kernels do not (ops/aten_paths.py), run here on the CPU."""
    from vdproj_ext.ops import aten_paths
    b, tq, tk, h, d, dr, rk, r = 2, 3, 7, 3, 16, 8, 6, 5
    seqlens = torch.tensor([5, 7], dtype=torch.int32)
    scale = d ** -0.5
    if case == "attention":
        x = make_attention_inputs((b, tq, tk, h, d, r), "cpu", torch.float32)
        x["k"][0, 4, 1, 2] = float("nan")
        if backend == "aten":
            return aten_paths.restore_then_sdpa(*x.values(), causal, scale)
        return run_attention(x, backend, causal=causal)[0]
    if case == "kvcache":
        k_cache, vc_cache = make_cache(b, tk, h, d, r, seqlens.tolist(), "cpu", torch.float32)
        k_cache[0, 2, 1, 2] = float("nan")
        s = make_step(b, tq, 0, h, d, r, "cpu", torch.float32)
        if backend == "aten":
            return aten_paths.batched_kvcache_attention(
                s["q"], k_cache, vc_cache, s["w_r"], s["b_r"], s["k"], s["v"], s["w_c"],
                s["b_c"], seqlens, causal, scale)
        return run_kvcache(s, k_cache, vc_cache, seqlens, causal, backend)
    if case == "latent_attention":
        x = make_latent_attention_inputs((b, tq, tk, h, d, dr, rk, r), "cpu", torch.float32)
        x["k_rope"][0, 4, 1, 2] = float("nan")
        if backend == "aten":
            return aten_paths.restore_keys_then_sdpa(*x.values(), causal, scale)
        return run_latent_attention(x, backend, causal=causal)[0]
    caches = make_latent_cache(b, tk, h, dr, rk, r, seqlens.tolist(), "cpu", torch.float32)
    caches["krope_cache"][0, 2, 1, 2] = float("nan")
    s = make_latent_step(b, tq, 0, h, d, dr, rk, r, "cpu", torch.float32)
    if backend == "aten":
        return aten_paths.batched_latent_kvcache_attention(
            s["q"], *caches.values(), s["w_kr"], s["w_r"], s["b_r"], s["k"], s["v"], s["w_kc"],
            s["b_kc"], s["w_c"], s["b_c"], seqlens, causal, scale)
    return run_latent_kvcache(s, caches, seqlens, causal, backend)


@pytest.mark.parametrize("backend", [*BACKENDS, "aten"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", NAN_CASES)
def test_nan_in_a_read_key_gives_nan_not_zeros(case, causal, backend):
    """As in float math (and torch's SDPA): the poisoned head's outputs are NaN, every other
    head and batch row stays finite."""
    out = _nan_key_call(case, backend, causal)
    assert out[0, :, 1].isnan().all(), out[0, :, 1]
    out[0, :, 1] = 0
    assert out.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_as_the_only_visible_key_gives_nan(backend):
    """Query 0 of a causal Tq = Tk call sees key 0 alone: a NaN there is not 'no key'
    (the kernels' block max skips NaN scores, which once made such a row zeros)."""
    x = make_attention_inputs((2, 5, 5, 3, 16, 5), "cpu", torch.float32)
    x["k"][0, 0, 1] = float("nan")
    out = run_attention(x, backend, causal=True)[0]
    assert out[0, :, 1].isnan().all()
    out[0, :, 1] = 0
    assert out.isfinite().all()
