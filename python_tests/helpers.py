"""Input builders and calls shared by the ops tests (test_api, test_attention, test_kvcache,
test_cuda, test_reference, test_latent_ops)."""
import os
import subprocess
import sys

import torch

from conftest import TOLERANCES, rel_error
from vdproj_ext import (compressed_attn_with_kvcache, compressed_kv_attention,
                        compressed_kv_attn_with_kvcache, compressed_v_attention)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def run_python(args, timeout=300, **env) -> str:
    """python *args in a subprocess from the repository root, with this folder and the root on
    PYTHONPATH and the variables env set (a value of None removes one), for what a test must
    not change in its own process (an instruction-set build, a switch read at load). Asserts
    that it exited 0, showing its output if not; returns its stdout."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS_DIR, REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    for name, value in env.items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    proc = subprocess.run([sys.executable, *args], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def to_float64(tensors: dict) -> dict:
    return {n: (t.double() if t is not None else None) for n, t in tensors.items()}


# ---- compressed_v_attention ---------------------------------------------------------------------

def make_attention_inputs(shape, device, dtype=torch.float64, bias=True, seed=0):
    """dict q, k, v_c, w_r, b_r for shape (B, Tq, Tk, H, D, R), drawn in float64 on the CPU."""
    b, tq, tk, h, d, r = shape
    g = torch.Generator().manual_seed(seed)
    t = dict(q=torch.randn(b, tq, h, d, generator=g, dtype=torch.float64),
             k=torch.randn(b, tk, h, d, generator=g, dtype=torch.float64),
             v_c=torch.randn(b, tk, r, generator=g, dtype=torch.float64),
             w_r=torch.randn(h * d, r, generator=g, dtype=torch.float64) / r ** 0.5,
             b_r=torch.randn(h * d, generator=g, dtype=torch.float64) if bias else None)
    return {n: (v.to(device=device, dtype=dtype) if v is not None else None) for n, v in t.items()}


def run_attention(inputs, backend, causal, grad_out=None, scale=None):
    """Forward (and backward with grad_out) in the inputs' dtype; returns out, grads dict."""
    leaves = {n: v.detach().clone().requires_grad_(grad_out is not None)
              for n, v in inputs.items() if v is not None}
    out = compressed_v_attention(leaves["q"], leaves["k"], leaves["v_c"], leaves["w_r"],
                                 leaves.get("b_r"), causal=causal, softmax_scale=scale,
                                 backend=backend)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {n: v.grad for n, v in leaves.items()}
    return out.detach(), grads


def check_low_precision_against_reference(run, x64, dtype, causal, grad_out, factor=2.0):
    """run(inputs, backend, causal, grad_out) -> (out, grads) on inputs rounded to `dtype`: the
    "ext" forward and gradient errors against float64 (on the same rounded inputs) at most
    `factor` (2) times those of the reference run in that dtype, the forward within the
    dtype's tolerance. On the CPU also at most `factor` times those of the whole computation
    in float32, rounded to `dtype` only at the end: a stricter baseline, since the reference in
    bf16 rounds its intermediates (not yet measured for the CUDA kernels)."""
    xlow = {n: (v.to(dtype) if v is not None else None) for n, v in x64.items()}
    grad_out = grad_out.to(dtype)  # every run differentiates the same rounded gradient
    exact_out, exact_grads = run(to_float64(xlow), "reference", causal, grad_out)
    ref_out, ref_grads = run(xlow, "reference", causal, grad_out)
    baselines = [(ref_out, ref_grads)]
    if xlow["q"].device.type == "cpu":
        x32 = {n: (v.float() if v is not None else None) for n, v in xlow.items()}
        f32_out, f32_grads = run(x32, "reference", causal, grad_out)
        baselines.append((f32_out.to(dtype), {n: g.to(dtype) for n, g in f32_grads.items()}))
    out, grads = run(xlow, "ext", causal, grad_out)
    assert out.dtype == dtype
    err = rel_error(out, exact_out)
    assert err < TOLERANCES[dtype]
    assert all(grads[name].dtype == dtype for name in exact_grads)
    for base_out, base_grads in baselines:
        ref_err = rel_error(base_out, exact_out)
        assert err <= factor * ref_err, (err, ref_err)
        for name in exact_grads:
            g_err = rel_error(grads[name], exact_grads[name])
            ref_err = rel_error(base_grads[name], exact_grads[name])
            assert g_err <= factor * ref_err, (name, g_err, ref_err)


# ---- compressed_attn_with_kvcache ---------------------------------------------------------------

def make_cache(b, t_max, h, d, r, seqlens, device, dtype, layout="contiguous", seed=0):
    """Caches with random valid prefixes and NaN everywhere the op must not read; with
    layout="strided", views whose batch, seq and head strides are not the packed ones (unit
    stride in the last dimension)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        k_cache = torch.full((b, t_max, h, d), float("nan"), dtype=dtype, device=device)
        vc_cache = torch.full((b, t_max, r), float("nan"), dtype=dtype, device=device)
    else:
        k_big = torch.full((2 * b, t_max + 3, h + 1, d + 2), float("nan"), dtype=dtype,
                           device=device)
        vc_big = torch.full((2 * b, t_max + 3, r + 7), float("nan"), dtype=dtype, device=device)
        k_cache = k_big[::2, 1:1 + t_max, 1:, :d]
        vc_cache = vc_big[::2, 2:2 + t_max, 3:3 + r]
        assert not k_cache.is_contiguous() and not vc_cache.is_contiguous()
    for i, n in enumerate(seqlens):
        k_cache[i, :n] = torch.randn(n, h, d, generator=g, dtype=torch.float64).to(device, dtype)
        vc_cache[i, :n] = torch.randn(n, r, generator=g, dtype=torch.float64).to(device, dtype)
    return k_cache, vc_cache


def make_step(b, tq, t_new, h, d, r, device, dtype, bias=True, seed=1):
    """The other arguments of a kvcache call: q, w_r, b_r, and k, v, w_c, b_c when t_new > 0."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return dict(q=rnd(b, tq, h, d), w_r=rnd(h * d, r, scale=r ** -0.5),
                b_r=rnd(h * d) if bias else None,
                k=rnd(b, t_new, h, d) if t_new else None,
                v=rnd(b, t_new, h * d) if t_new else None,
                w_c=rnd(r, h * d, scale=(h * d) ** -0.5) if t_new else None,
                b_c=rnd(r) if (t_new and bias) else None)


def run_kvcache(step, k_cache, vc_cache, seqlens, causal, backend):
    return compressed_attn_with_kvcache(step["q"], k_cache, vc_cache, step["w_r"], step["b_r"],
                                        k=step["k"], v=step["v"], w_c=step["w_c"],
                                        b_c=step["b_c"], cache_seqlens=seqlens, causal=causal,
                                        backend=backend)


# =================================================================================================
# Latent keys (SPEC 3b; test_latent_ops): compressed_kv_attention and compressed_kv_attn_with_kvcache.
# A "latent shape" is (B, Tq, Tk, H, D, Dr, Rk, Rv); joint=True drops k_c / kc_cache, and then the
# key latent is the value latent (w_kr is (H*Dn, Rv), w_c (Rv, H*Dn + H*D)).

LATENT_ATTN_NAMES = ("q", "k_rope", "k_c", "v_c", "w_kr", "w_r", "b_r")


def _float64_draws(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def make_latent_attention_inputs(shape, device, dtype=torch.float64, bias=True, joint=False,
                                 seed=0):
    """dict q, k_rope, k_c (None when joint), v_c, w_kr, w_r, b_r, drawn in float64 on the CPU."""
    b, tq, tk, h, d, dr, rk, rv = shape
    rnd = _float64_draws(seed)
    k_rank = rv if joint else rk
    t = dict(q=rnd(b, tq, h, d), k_rope=rnd(b, tk, h, dr),
             k_c=None if joint else rnd(b, tk, rk), v_c=rnd(b, tk, rv),
             w_kr=rnd(h * (d - dr), k_rank, scale=k_rank ** -0.5),
             w_r=rnd(h * d, rv, scale=rv ** -0.5), b_r=rnd(h * d) if bias else None)
    return {n: (v.to(device=device, dtype=dtype) if v is not None else None) for n, v in t.items()}


def run_latent_attention(inputs, backend, causal, grad_out=None, scale=None):
    """compressed_kv_attention forward (and backward with grad_out); returns out, grads dict."""
    leaves = {n: (v.detach().clone().requires_grad_(grad_out is not None) if v is not None
                  else None) for n, v in inputs.items()}
    out = compressed_kv_attention(*(leaves[n] for n in LATENT_ATTN_NAMES), causal=causal,
                                  softmax_scale=scale, backend=backend)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {n: v.grad for n, v in leaves.items() if v is not None}
    return out.detach(), grads


def make_latent_cache(b, t_max, h, dr, rk, rv, seqlens, device, dtype, joint=False,
                      layout="contiguous", seed=0):
    """dict krope_cache, kc_cache (None when joint), vc_cache: random valid prefixes, NaN where
    the op must not read; layout="strided" gives views with a unit stride in the last dim only."""
    rnd = _float64_draws(seed)
    shapes = dict(krope_cache=(b, t_max, h, dr), kc_cache=None if joint else (b, t_max, rk),
                  vc_cache=(b, t_max, rv))
    caches = {}
    for name, shape in shapes.items():
        if shape is None:
            caches[name] = None
            continue
        padded = (2 * shape[0], shape[1] + 3, *(n + 2 for n in shape[2:]))
        big = torch.full(padded if layout == "strided" else shape, float("nan"), dtype=dtype,
                         device=device)
        inner = (slice(None, None, 2), slice(1, 1 + t_max)) + tuple(slice(1, 1 + n)
                                                                     for n in shape[2:])
        cache = big[inner] if layout == "strided" else big
        for i, n in enumerate(seqlens):
            cache[i, :n] = rnd(n, *shape[2:]).to(device, dtype)
        caches[name] = cache
    return caches


def make_latent_step(b, tq, t_new, h, d, dr, rk, rv, device, dtype, bias=True, joint=False,
                     seed=1):
    """The other arguments of a latent kvcache call: q, w_kr, w_r, b_r, and k, v with their
    compress weights (w_kc, b_kc separate; w_c, b_c) when t_new > 0."""
    rnd = _float64_draws(seed)
    nope, k_rank = h * (d - dr), (rv if joint else rk)
    c_in = nope + h * d if joint else h * d
    t = dict(q=rnd(b, tq, h, d), w_kr=rnd(nope, k_rank, scale=k_rank ** -0.5),
             w_r=rnd(h * d, rv, scale=rv ** -0.5), b_r=rnd(h * d) if bias else None,
             k=rnd(b, t_new, h, d) if t_new else None, v=rnd(b, t_new, h * d) if t_new else None,
             w_kc=rnd(rk, nope, scale=nope ** -0.5) if (t_new and not joint) else None,
             b_kc=rnd(rk) if (t_new and bias and not joint) else None,
             w_c=rnd(rv, c_in, scale=c_in ** -0.5) if t_new else None,
             b_c=rnd(rv) if (t_new and bias) else None)
    return {n: (v.to(device=device, dtype=dtype) if v is not None else None) for n, v in t.items()}


def run_latent_kvcache(step, caches, seqlens, causal, backend, scale=None):
    return compressed_kv_attn_with_kvcache(
        step["q"], caches["krope_cache"], caches["kc_cache"], caches["vc_cache"], step["w_kr"],
        step["w_r"], step["b_r"], k=step["k"], v=step["v"], w_kc=step["w_kc"],
        b_kc=step["b_kc"], w_c=step["w_c"], b_c=step["b_c"], cache_seqlens=seqlens,
        causal=causal, softmax_scale=scale, backend=backend)


# =================================================================================================
# Models tests (test_convert, test_generate): Hugging Face GPT-NeoX checkpoint folders written by
# hand, so that conversion is tested without transformers.

def gpt_neox_config_dict(cfg, **over) -> dict:
    """A GPT-NeoX config.json (transformers 4.x keys) for a VDProjConfig, with overrides."""
    d = {"model_type": "gpt_neox", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "intermediate_size": cfg.intermediate_size, "rotary_pct": cfg.rotary_pct,
         "rotary_emb_base": cfg.rotary_base, "max_position_embeddings": cfg.max_positions,
         "layer_norm_eps": cfg.layer_norm_eps, "use_parallel_residual": cfg.use_parallel_residual,
         "hidden_act": "gelu", "tie_word_embeddings": False}
    d.update(over)
    return d


def write_gpt_neox_folder(folder, model, sharded=False, **config_over):
    """A checkpoint folder of `model` (our state dict keys are GPT-NeoX's): config.json and
    model.safetensors, or two shards and their index with sharded=True."""
    import json
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(gpt_neox_config_dict(model.config,
                                                                        **config_over)))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not sharded:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# =================================================================================================
# Latent-key models (test_latent_model, test_convert): decoding through a cache piece by piece.

def logits_through_cache(model, ids, cache, cuts):
    """Logits (B, T, vocab) of ids fed through `cache` in pieces: ids[:, :cuts[0]], then
    ids[:, cuts[i]:cuts[i+1]], then one token at a time up to T."""
    bounds = list(cuts) + list(range(cuts[-1] + 1, ids.shape[1] + 1))
    pieces, start = [], 0
    with torch.no_grad():
        for end in bounds:
            pieces.append(model(ids[:, start:end], cache=cache).logits)
            start = end
    return torch.cat(pieces, 1)


# ---------------------------------------------------------------------------------------------
# bad-input cases that every op of the same family shares (SPEC section 3's error classes); each
# test file adds the cases of its own arguments. A case: name -> (edit, exception, message).


def replace_args(args: dict, **changes) -> dict:
    return dict(args, **changes)


def shared_attention_bad_cases() -> dict:
    """Query, compressed values and restore pair: the same checks on every attention op."""
    return {
        "q rank": (lambda a: replace_args(a, q=a["q"][0]), ValueError, r"q must be 4-D"),
        "int dtype": (lambda a: replace_args(a, q=a["q"].long()), TypeError, r"q must be float32"),
        "v_c length": (lambda a: replace_args(a, v_c=a["v_c"][:, :-1]), ValueError,
                       r"v_c must have shape"),
        "v_c rank": (lambda a: replace_args(a, v_c=a["v_c"][0]), ValueError, r"v_c must be 3-D"),
        "w_r shape": (lambda a: replace_args(a, w_r=a["w_r"][:, :-1]), ValueError,
                      r"w_r must have shape"),
        "b_r shape": (lambda a: replace_args(a, b_r=a["b_r"][:-1]), ValueError,
                      r"b_r must have shape"),
        "b_r rank": (lambda a: replace_args(a, b_r=a["b_r"][None]), ValueError, r"b_r must be 1-D"),
        "w_r dtype": (lambda a: replace_args(a, w_r=a["w_r"].half()), TypeError,
                      r"w_r must have dtype"),
        "w_r not a tensor": (lambda a: replace_args(a, w_r=a["w_r"].tolist()), TypeError,
                             r"w_r must be a torch.Tensor"),
        "v_c device": (lambda a: replace_args(a, v_c=a["v_c"].to("meta")), ValueError,
                       r"v_c must be on cpu"),
        "v_c None": (lambda a: replace_args(a, v_c=None), TypeError,
                     r"v_c must be a tensor, got None"),
    }


def shared_seqlens_bad_cases(batch: int, t_max: int, t_new: int) -> dict:
    """cache_seqlens of a KV-cache op whose cache holds t_max slots and which writes t_new tokens:
    type, dtype, shape, device, range and overflow."""
    def lens(first):
        return torch.tensor([first] + [0] * (batch - 1), dtype=torch.int32)
    shape = rf"cache_seqlens must have shape \({batch},\)"
    in_range = rf"cache_seqlens must lie in \[0, {t_max}\]"
    return {
        "seqlens int64": (lambda a: replace_args(a, cache_seqlens=a["cache_seqlens"].long()),
                          TypeError, r"cache_seqlens must have dtype torch.int32"),
        "seqlens list": (lambda a: replace_args(a, cache_seqlens=lens(3).tolist()), TypeError,
                         r"cache_seqlens must be an int32 tensor"),
        "seqlens shape": (lambda a: replace_args(a, cache_seqlens=a["cache_seqlens"][:1]),
                          ValueError, shape),
        "seqlens 2-D": (lambda a: replace_args(a, cache_seqlens=a["cache_seqlens"][:, None]),
                        ValueError, shape),
        "seqlens negative": (lambda a: replace_args(a, cache_seqlens=lens(-1)), ValueError,
                             in_range),
        "seqlens past Tmax": (lambda a: replace_args(a, cache_seqlens=lens(t_max + 1)),
                              ValueError, in_range),
        "seqlens device": (lambda a: replace_args(a, cache_seqlens=a["cache_seqlens"].to("meta")),
                           ValueError, r"cache_seqlens must be on cpu"),
        "overflow": (lambda a: replace_args(a, cache_seqlens=lens(t_max - t_new + 1)), ValueError,
                     rf"writing {t_new} new tokens .* would overflow the cache of Tmax={t_max}"),
    }


def error_of(call):
    """(type, message) of the exception call() raises, or None."""
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as exc:
        return type(exc), str(exc)
    return None


def assert_same_error_on_every_backend(call, backends, after_each=lambda: None):
    """One set of messages: call(backend) fails on the reference (the Python checks) and on
    "ext" (the C++ checks) with the same type and message; after_each() runs after every call
    (for example to check that nothing was written)."""
    errors = {}
    for backend in backends:
        errors[backend] = error_of(lambda: call(backend))
        after_each()
    assert errors["reference"] is not None, "the reference accepted the bad input"
    assert errors["ext"] == errors["reference"]
