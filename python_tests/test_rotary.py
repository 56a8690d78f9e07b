"""rotary_pair (csrc/cpu/rotary_ops.cpp): the same bits as apply_rotary, float64 agreement,
the model's route to it, and clear errors."""
import pytest
import torch

from helpers import logits_through_cache
from vdproj_ext.models import VDProjConfig, VDProjForCausalLM
from vdproj_ext.models.layers import apply_rotary, apply_rotary_pair, rotary_cos_sin
from vdproj_ext.ops import rotary
from vdproj_ext.ops.backend import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("cpu", "rotary_pair"),
                                reason="the extension was built without rotary_pair")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (heads and head_dim of q, of k, rotary dims): the pythia-70m-kv layer (keys rotated whole),
# the uncompressed one, odd widths, and the smallest rotation
SHAPES = [(8, 64, 8, 16, 16), (8, 64, 8, 64, 16), (3, 13, 5, 9, 6), (1, 3, 2, 2, 2)]


def projected(b, t, hq, dq, hk, dk, dtype, seed=0):
    """q and k as a folded layer gets them: views into one projection output (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(b, t, hq * dq + hk * dk + 5, generator=g, dtype=torch.float64).to(dtype)
    q, k, _ = fused.split([hq * dq, hk * dk, 5], -1)
    return q.view(b, t, hq, dq), k.view(b, t, hk, dk)


def positions(b, t, ragged):
    """(B, T) per-sequence positions, as a cache gives them, or (T,) shared ones."""
    if not ragged:
        return torch.arange(t)
    return torch.arange(t) + torch.tensor([[7], [0], [300], [2]])[:b]


def gpt_neox_rotary(x, cos, sin):
    """GPT-NeoX's formula in float64: x * cos + rotate_half(x) * sin on the rotated dims."""
    rot = cos.shape[-1]
    x = x.double()
    x_rot, rest = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., :rot // 2], x_rot[..., rot // 2:]
    turned = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos.double() + turned * sin.double(), rest), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b,t,ragged", [(1, 1, True), (4, 3, True), (2, 5, False)])
def test_same_bits_as_apply_rotary(dtype, shape, b, t, ragged):
    hq, dq, hk, dk, rot = shape
    q, k = projected(b, t, hq, dq, hk, dk, dtype)
    cos, sin = rotary_cos_sin(positions(b, t, ragged), rot, 10000.0)
    got_q, got_k = rotary.rotary_pair(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert got_q.dtype == dtype and got_k.shape == k.shape
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-15)])
def test_matches_float64_formula_on_a_prefill(dtype, tol):
    """A prefill-sized input, whose rows split over threads."""
    q, k = projected(3, 301, 8, 64, 8, 16, dtype, seed=3)
    cos, sin = rotary_cos_sin(positions(3, 301, True), 16, 10000.0)
    got_q, got_k = rotary.rotary_pair(q, k, cos, sin)
    for got, x in ((got_q, q), (got_k, k)):
        want = gpt_neox_rotary(x, cos, sin)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < tol, err
        assert torch.equal(got, apply_rotary(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_projection_output(dtype):
    """decode_linear's weight-major path returns a transposed view: no unit stride in D."""
    q, k = projected(5, 1, 3, 13, 2, 8, dtype)
    q, k = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k))
    assert q.stride(3) != 1 and k.stride(3) != 1
    cos, sin = rotary_cos_sin(positions(4, 1, True).repeat(2, 1)[:5], 6, 10000.0)
    got_q, got_k = rotary.rotary_pair(q, k, cos, sin)
    assert torch.equal(got_q, apply_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_rotary(k, cos, sin))


def test_empty_inputs():
    q, k = projected(0, 3, 2, 8, 2, 8, torch.float32)
    cos, sin = rotary_cos_sin(torch.arange(3), 4, 10000.0)
    got_q, got_k = rotary.rotary_pair(q, k, cos, sin)
    assert got_q.shape == q.shape and got_k.shape == k.shape


def test_route_needs_no_gradient():
    q, k = projected(2, 1, 2, 8, 2, 8, torch.float32)
    cos, sin = rotary_cos_sin(torch.arange(1), 4, 10000.0)
    assert rotary.kernel_takes(q, k, cos, sin)
    q.requires_grad_(True)
    assert not rotary.kernel_takes(q, k, cos, sin)
    with torch.no_grad():
        assert rotary.kernel_takes(q, k, cos, sin)
    out_q, _ = apply_rotary_pair(q, k, cos, sin)  # the ATen ops, differentiable
    out_q.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("kind", ["uncompressed", "latent"])
def test_model_logits_same_bits_with_and_without_the_kernel(kind, monkeypatch):
    """A cached forward pass (prefill, then single tokens) through the kernel gives the logits
    the ATen ops give, bit for bit, for the uncompressed layer and the folded latent one."""
    over = dict(k_rank=12, v_rank=20) if kind == "latent" else dict(v_rank=None)
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", **over), init_seed=0).eval()
    if kind == "latent":
        model = model.prepare_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(1))
    calls, real = [], rotary.rotary_pair
    monkeypatch.setattr(rotary, "rotary_pair", lambda *a: calls.append(1) or real(*a))
    runs = [logits_through_cache(model, ids, model.new_cache(2, 16), [5])]
    assert len(calls) == model.config.num_layers * 5  # one a layer: the prefill, four tokens
    monkeypatch.setattr(rotary, "kernel_takes", lambda *a: False)
    runs.append(logits_through_cache(model, ids, model.new_cache(2, 16), [5]))
    assert len(calls) == model.config.num_layers * 5  # none more
    assert torch.equal(runs[0], runs[1])


def _inputs():
    q, k = projected(2, 3, 2, 8, 2, 6, torch.float32)
    cos, sin = rotary_cos_sin(positions(2, 3, True), 4, 10000.0)
    return dict(q=q, k=k, cos=cos, sin=sin)


BAD = {
    "q rank": (lambda a: dict(a, q=a["q"][0]), ValueError, r"q must be 4-D, got shape"),
    "k dtype": (lambda a: dict(a, k=a["k"].double()), TypeError, r"k must have dtype torch.float32 like q"),
    "int q": (lambda a: dict(a, q=a["q"].long(), k=a["k"].long()), TypeError,
              r"q must be float32, float16, bfloat16 or float64"),
    "cos dtype": (lambda a: dict(a, cos=a["cos"].double()), TypeError, r"cos must be float32"),
    "sin shape": (lambda a: dict(a, sin=a["sin"][..., :2]), ValueError,
                  r"sin must have cos's shape"),
    "cos rank": (lambda a: dict(a, cos=a["cos"][:, :, 0], sin=a["sin"][:, :, 0]), ValueError,
                 r"cos must be \(B, T, 1, rotary_dims\)"),
    "odd rotary dims": (lambda a: dict(a, cos=a["cos"][..., :3], sin=a["sin"][..., :3]), ValueError,
                        r"rotary dims must be even"),
    "too few head dims": (lambda a: dict(a, k=a["k"][..., :2]), ValueError,
                          r"k has head_dim 2, fewer than the 4 rotary dims"),
    "batch": (lambda a: dict(a, q=a["q"][:1]), ValueError, r"q must have the batch and length"),
    "cos stride": (lambda a: dict(a, cos=torch.stack((a["cos"],) * 2, -1).flatten(-2)[..., ::2]),
                   ValueError, r"cos and sin must have unit stride"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_clearly(case):
    edit, exc, pattern = BAD[case]
    a = edit(_inputs())
    with pytest.raises(exc, match=pattern):
        torch.ops.vdproj_ext.rotary_pair(a["q"], a["k"], a["cos"], a["sin"])


def test_opcheck():
    a = _inputs()
    torch.library.opcheck(torch.ops.vdproj_ext.rotary_pair.default,
                          (a["q"].contiguous(), a["k"], a["cos"], a["sin"]))
