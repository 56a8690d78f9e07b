"""compressed_v_attention with backend="ext" against the float64 reference.

Forward and gradients on random odd sizes (Tq < Tk, Tq == Tk, Tq > Tk; causal or not; bias or
not), float32 / bfloat16 / float16 accuracy, non-contiguous inputs, zero sizes, gradcheck, and
every compiled instruction-set variant of the CPU kernels.
"""
import pytest
import torch

from conftest import rel_error
from helpers import (check_low_precision_against_reference, make_attention_inputs,
                     run_attention, run_python, to_float64)
from vdproj_ext import compressed_v_attention
from vdproj_ext.ops.backend import has_kernel, load_kernels

# (B, Tq, Tk, H, D, R): odd head sizes and ranks, R not a multiple of any vector width.
SHAPES = [
    (2, 5, 11, 3, 24, 37),     # Tq < Tk
    (3, 9, 9, 2, 16, 21),      # Tq == Tk
    (2, 13, 6, 4, 8, 13),      # Tq > Tk: causal rows that see no key
    (1, 1, 70, 5, 33, 70),     # decode-like, crosses a key block
    (2, 67, 130, 2, 40, 57),   # several query tiles and key blocks
]
SHAPE_IDS = ["tq<tk", "tq==tk", "tq>tk", "decode", "multiblock"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_forward_and_grads(device, shape, causal, bias):
    x64 = make_attention_inputs(shape, device, bias=bias)
    gout = torch.randn(shape[0], shape[1], shape[3], shape[4], dtype=torch.float64, device=device)
    ref_out, ref_grads = run_attention(x64, "reference", causal, gout)
    x32 = {n: (v.float() if v is not None else None) for n, v in x64.items()}
    out, grads = run_attention(x32, "ext", causal, gout)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert rel_error(out, ref_out) < 1e-5
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == ref_grads[name].shape, name
        assert rel_error(g, ref_grads[name]) < 1e-4, name


def test_rows_without_keys_are_zero(device):
    # Tq > Tk with causal masking: the first Tq - Tk rows see no key -> zeros, bias included.
    x = make_attention_inputs((2, 7, 3, 2, 8, 5), device, dtype=torch.float32)
    out, grads = run_attention(x, "ext", True, torch.randn(2, 7, 2, 8, device=device))
    assert torch.all(out[:, :4] == 0)
    assert torch.all(out[:, 4:] != 0)
    ref_out, ref_grads = run_attention(x, "reference", True,
                                       torch.randn(2, 7, 2, 8, device=device))
    for g in grads.values():
        assert torch.isfinite(g).all()


def test_custom_scale(device):
    x64 = make_attention_inputs((2, 4, 9, 3, 12, 10), device)
    ref_out, _ = run_attention(x64, "reference", True, scale=0.37)
    out, _ = run_attention({n: v.float() for n, v in x64.items()}, "ext", True, scale=0.37)
    assert rel_error(out, ref_out) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_within_twice_reference_error(device, dtype, causal):
    """Upcast kernels: error vs float64 at most 2x the reference evaluated in that dtype."""
    shape = (2, 11, 23, 3, 24, 37)
    x64 = make_attention_inputs(shape, device)
    gout = torch.randn(2, 11, 3, 24, dtype=torch.float64, device=device)
    # Both backends see the same rounded inputs; compare each to float64 on those inputs.
    check_low_precision_against_reference(run_attention, x64, dtype, causal, gout)


@pytest.mark.skipif(not has_kernel("cpu", "cva_backward"), reason="CPU training kernels not built")
def test_bf16_gradients_within_twice_float32_accumulation_over_seeds():
    """As the latent-key op's sweep (test_latent_ops.py): small random cases, every gradient
    against the whole computation in float32 rounded to bf16 at the end."""
    for seed in range(6):
        for causal in (False, True):
            shape = (2, 7, 9, 3, 24, 13)
            x64 = make_attention_inputs(shape, "cpu", seed=seed)
            gout = torch.randn(2, 7, 3, 24, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))
            check_low_precision_against_reference(run_attention, x64, torch.bfloat16, causal,
                                                  gout)


def test_non_contiguous_inputs(device):
    b, tq, tk, h, d, r = 2, 6, 10, 3, 16, 19
    g = torch.Generator().manual_seed(3)
    # Views: q and k from transposed (B, H, T, D) storage, v_c a column slice, w_r a transpose.
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
    k = torch.randn(b, h, tk, d, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
    v_c = torch.randn(b, tk, r + 5, generator=g, dtype=torch.float64).to(device)[:, :, 2:2 + r]
    w_r = torch.randn(r, h * d, generator=g, dtype=torch.float64).to(device).t() / r ** 0.5
    b_r = torch.randn(2 * h * d, generator=g, dtype=torch.float64).to(device)[::2]
    views = dict(q=q, k=k, v_c=v_c, w_r=w_r, b_r=b_r)
    assert not any(v.is_contiguous() for v in views.values())
    gout = torch.randn(b, tq, h, d, dtype=torch.float64, device=device)
    ref_out, ref_grads = run_attention(views, "reference", True, gout)
    out, grads = run_attention({n: v.float() for n, v in views.items()}, "ext", True, gout)
    assert rel_error(out, ref_out) < 1e-5
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("shape", [(0, 3, 4, 2, 8, 5), (2, 0, 4, 2, 8, 5), (2, 3, 0, 2, 8, 5),
                                   (2, 3, 4, 2, 8, 0), (1, 1, 1, 1, 1, 1)],
                         ids=["B0", "Tq0", "Tk0", "R0", "ones"])
def test_zero_and_tiny_sizes(device, shape):
    x = make_attention_inputs(shape, device, dtype=torch.float32)
    gout = torch.randn(shape[0], shape[1], shape[3], shape[4], device=device)
    out, grads = run_attention(x, "ext", False, gout)
    ref_out, ref_grads = run_attention(to_float64(x), "reference", False, gout)
    assert out.shape == ref_out.shape
    assert torch.allclose(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        assert grads[name].shape == ref_grads[name].shape
        assert torch.allclose(grads[name].double(), ref_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64(device, causal):
    x = make_attention_inputs((2, 3, 4, 2, 5, 3), device)
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v_c", "w_r", "b_r")]

    def fn(q, k, v_c, w_r, b_r):
        return compressed_v_attention(q, k, v_c, w_r, b_r, causal=causal, backend="ext")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_direct_op_rejects_bad_input():
    """The C++ checks (bypassing the Python checks) raise instead of crashing, with the
    exception types of the public API's checks."""
    load_kernels()
    q = torch.randn(1, 2, 2, 4)
    k = torch.randn(1, 3, 2, 4)
    v_c = torch.randn(1, 3, 5)
    w_r = torch.randn(8, 5)
    op = torch.ops.vdproj_ext.cva_forward
    with pytest.raises(ValueError, match="v_c"):
        op(q, k, torch.randn(1, 4, 5), w_r, None, False, 0.5)
    with pytest.raises(ValueError, match="w_r"):
        op(q, k, v_c, torch.randn(8, 6), None, False, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        op(q, k.double(), v_c, w_r, None, False, 0.5)
    with pytest.raises(TypeError, match="float32"):
        op(q.int(), k.int(), v_c.int(), w_r.int(), None, False, 0.5)
    with pytest.raises(ValueError, match="finite"):
        op(q, k, v_c, w_r, None, False, float("nan"))
    with pytest.raises(ValueError, match="softmax_lse"):
        torch.ops.vdproj_ext.cva_backward(q, q, k, v_c, w_r, torch.zeros(1, 2, 3),
                                          torch.zeros(1, 2, 2, 5), False, 0.5)


_ISA_SCRIPT = r"""
import torch
from vdproj_ext import compressed_v_attention, compressed_attn_with_kvcache, reference
torch.manual_seed(0)
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    q, k = torch.randn(2, 5, 3, 24), torch.randn(2, 70, 3, 24)
    v_c, w_r, b_r = torch.randn(2, 70, 37), torch.randn(72, 37) / 6, torch.randn(72)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v_c, w_r, b_r)]
    out = compressed_v_attention(*leaves, causal=True, backend="ext")
    out.sum().backward()
    r64 = [t.detach().to(dtype).double().requires_grad_() for t in (q, k, v_c, w_r, b_r)]
    ref = reference.compressed_v_attention(*r64, causal=True)
    ref.sum().backward()
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    assert rel(out, ref) < tol, (dtype, rel(out, ref))
    for a, b in zip(leaves, r64):
        assert rel(a.grad, b.grad) < 10 * tol, (dtype, rel(a.grad, b.grad))
kc = torch.randn(3, 300, 3, 24); vc = torch.randn(3, 300, 37)
lens = torch.tensor([300, 17, 0], dtype=torch.int32)
q1 = torch.randn(3, 1, 3, 24)
out = compressed_attn_with_kvcache(q1, kc, vc, w_r, b_r, cache_seqlens=lens, backend="ext")
ref = reference.compressed_attn_with_kvcache(q1.double(), kc.double(), vc.double(), w_r.double(),
                                             b_r.double(), cache_seqlens=lens)
assert rel(out, ref) < 1e-5, rel(out, ref)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_instruction_set_variants(isa):
    """The lower instruction-set builds of the kernels (chosen by VDPROJ_CPU_ISA) are correct."""
    assert "ok" in run_python(["-c", _ISA_SCRIPT], VDPROJ_CPU_ISA=isa)
