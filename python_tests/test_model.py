"""VDProjForCausalLM: shapes, parameter counts, GPT-NeoX layout, the op it trains through."""

import pytest
import torch

import vdproj_ext
from vdproj_ext.models import (CompressedVAttention, VDProjConfig, VDProjForCausalLM, fit_v_pca_,
                               rotary_cos_sin)
from vdproj_ext.models import layers as layers_mod


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small(v_rank=20, **kw):
    cfg = VDProjConfig.preset("smoke", v_rank=v_rank, **kw)
    return VDProjForCausalLM(cfg, init_seed=0).set_backend("reference")


def test_pythia70m_param_counts_without_allocating():
    cfg = VDProjConfig.preset("pythia-70m")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == \
        (6, 512, 8, 2048)
    assert (cfg.vocab_size, cfg.rotary_pct, cfg.v_rank, cfg.rotary_ndims) == (50304, 0.25, 320, 16)
    with torch.device("meta"):
        m = VDProjForCausalLM(cfg)
        base = VDProjForCausalLM(cfg.replace(v_rank=None))
    counts = m.num_parameters()
    assert counts["v_projection"] == 1_971_072 == 6 * (512 * 320 + 320 + 320 * 512 + 512)
    assert base.num_parameters()["total"] == 70_426_624  # Pythia-70m itself
    assert counts["total"] == 70_426_624 + 1_971_072 == cfg.param_counts()["total"]
    assert cfg.kv_cache_reduction == pytest.approx(0.1875)
    assert cfg.replace(v_rank=None).kv_cache_reduction == 0.0


@pytest.mark.parametrize("name", ["pythia-70m", "cpu-small", "smoke"])
def test_presets_keep_reference_ratio(name):
    cfg = VDProjConfig.preset(name)
    assert cfg.v_rank == 0.625 * cfg.hidden_size
    assert cfg.kv_cache_reduction == pytest.approx(0.1875)


def test_param_counts_match_built_model():
    for name in ("cpu-small", "smoke"):
        for v_rank in (VDProjConfig.preset(name).v_rank, None):
            cfg = VDProjConfig.preset(name, v_rank=v_rank)
            assert VDProjForCausalLM(cfg).num_parameters()["total"] == cfg.param_counts()["total"]


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset"):
        VDProjConfig.preset("nope")
    with pytest.raises(ValueError, match="divisible"):
        VDProjConfig(hidden_size=30, num_heads=4)


BAD_CONFIG_FIELDS = [("num_heads", 0), ("num_heads", -2), ("hidden_size", -4),
                     ("num_layers", -1), ("num_layers", 0), ("vocab_size", 0),
                     ("intermediate_size", 0), ("max_positions", 0), ("v_rank", 2.5),
                     ("v_rank", True), ("v_rank", 0), ("rotary_pct", 1.5), ("rotary_pct", -0.5),
                     ("rotary_base", 0.0), ("rotary_base", -5.0), ("rotary_base", float("inf"))]


@pytest.mark.parametrize("field,value", BAD_CONFIG_FIELDS)
def test_config_refuses_a_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        VDProjConfig.preset("smoke").replace(**{field: value})


@pytest.mark.parametrize("field,value", [(f, v) for f, v in BAD_CONFIG_FIELDS
                                         if f in ("num_heads", "hidden_size", "v_rank",
                                                  "rotary_pct", "rotary_base")])
def test_attention_layer_refuses_a_bad_argument_by_name(field, value):
    """The layer alone checks its arguments as the config does (num_heads=0 once raised
    ZeroDivisionError, v_rank=0 built a layer that ignored V, rotary_base=0 gave NaN)."""
    args = dict(hidden_size=12, num_heads=2, v_rank=5, rotary_pct=0.5, rotary_base=10000.0)
    with pytest.raises(ValueError, match=field):
        CompressedVAttention(**{**args, field: value})


LAYOUTS = {"uncompressed": dict(v_rank=None), "values": dict(), "latent": dict(k_rank=12),
           "latent-k8": dict(k_rank=8), "joint": dict(joint_kv=True)}


@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("cache_of", list(LAYOUTS))
@pytest.mark.parametrize("model_of", list(LAYOUTS))
def test_cache_of_another_layout_is_refused(model_of, cache_of, folded):
    """A cache must store what the model's layers cache: a plain KVCache under a compressed
    model once gave wrong logits silently, and other pairs raised AttributeError."""
    model = small(**LAYOUTS[model_of]).eval()
    if folded and model.config.v_rank is not None:
        model.prepare_for_inference()
    cache = small(**LAYOUTS[cache_of]).new_cache(2, 8)
    ids = torch.randint(0, 256, (2, 3))
    if cache_of == model_of:
        with torch.no_grad():
            torch.testing.assert_close(model(ids, cache=cache).logits, model(ids).logits,
                                       rtol=1e-5, atol=1e-5)
        return
    before = [t.clone() for t in cache.buffers()]
    with pytest.raises(ValueError, match=r"cache: this \w+ stores .* but the attention layer"):
        model(ids, cache=cache)
    assert int(cache.seqlens.sum()) == 0
    for t, old in zip(cache.buffers(), before):
        torch.testing.assert_close(t, old, rtol=0, atol=0, equal_nan=True)


def test_cache_of_another_batch_or_depth_is_refused_by_name():
    model = small().eval()
    ids = torch.randint(0, 256, (2, 3))
    for cache in (model.new_cache(3, 8), model.new_cache(1, 8)):
        with pytest.raises(ValueError, match=r"cache holds batch_size=\d .* input_ids has 2 rows"):
            model(ids, cache=cache)
    deeper = VDProjForCausalLM(model.config.replace(num_layers=3)).new_cache(2, 8)
    with pytest.raises(ValueError, match=r"num_layers=3 layers.* the model 2 layers"):
        model(ids, cache=deeper)
    with pytest.raises(TypeError, match="cache must be a cache from model.new_cache"):
        model(ids, cache={"k": None})


def test_generate_refuses_an_empty_batch_by_name():
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\) with B >= 1"):
        small().generate(torch.zeros(0, 4, dtype=torch.long), 2)


def test_attention_layer_alone_with_a_cache_rotates_at_the_cache_positions():
    """Without cos/sin a cached layer rotates the new tokens at seqlens + 0 .. T-1, so token by
    token equals one uncached pass (it once rotated every step at position 0)."""
    from vdproj_ext.models import CompressedKVCache
    torch.manual_seed(0)
    attn = CompressedVAttention(hidden_size=12, num_heads=2, v_rank=5, rotary_pct=0.5).eval()
    attn.backend = "reference"
    x = torch.randn(1, 4, 12)
    cache = CompressedKVCache(1, 1, 8, 2, 6, 5)
    with torch.no_grad():
        full = attn(x)[0]
        steps = []
        for i in range(4):
            steps.append(attn(x[:, i:i + 1], cache=cache)[0])
            cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_state_dict_names_follow_gpt_neox():
    m = small()
    keys = set(m.state_dict())
    for k in ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight", "embed_out.weight",
              "gpt_neox.layers.1.input_layernorm.bias",
              "gpt_neox.layers.1.post_attention_layernorm.weight",
              "gpt_neox.layers.0.attention.query_key_value.weight",
              "gpt_neox.layers.0.attention.query_key_value.bias",
              "gpt_neox.layers.0.attention.dense.weight",
              "gpt_neox.layers.0.attention.v_compress.weight",
              "gpt_neox.layers.0.attention.v_restore.bias",
              "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
              "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"):
        assert k in keys, k
    assert "embed_out.bias" not in keys
    assert not any("v_compress" in k or "v_restore" in k for k in small(None).state_dict())


def test_forward_shapes_and_loss():
    m = small()
    ids = torch.randint(0, 256, (3, 17))
    out = m(ids)
    assert out.logits.shape == (3, 17, 256) and out.loss is None
    out = m(ids, labels=ids, return_recon=True)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256),
                                            ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    assert len(out.layer_recon) == 2 and out.recon_loss > 0
    per_tok = m(ids, labels=ids, loss_reduction="none").loss
    assert per_tok.shape == (3, 16) and torch.allclose(per_tok.mean(), ref)
    labels = ids.clone()
    labels[:, 5:] = -100
    masked = m(ids, labels=labels).loss
    ref5 = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 256),
                                             ids[:, 1:5].reshape(-1))
    assert torch.allclose(masked, ref5)


def test_recon_loss_definition():
    m = small()
    ids = torch.randint(0, 256, (2, 9))
    out = m(ids, return_recon=True, skip_logits=True)
    assert out.logits is None
    v = m.layer_values(ids, 0)
    attn = m.attention_modules()[0]
    expect = ((attn.v_restore(attn.v_compress(v)) - v) ** 2).mean()
    assert torch.allclose(out.layer_recon[0], expect, rtol=1e-5)


def test_baseline_and_compressed_share_initial_weights():
    a, b = small(20).state_dict(), small(None).state_dict()
    for k, v in b.items():
        assert torch.equal(a[k], v), k
    # the projection pair starts as an orthogonal projection: w_c w_r = I_R
    attn = small(20).attention_modules()[0]
    eye = attn.v_compress.weight @ attn.v_restore.weight
    assert torch.allclose(eye, torch.eye(20), atol=1e-5)


def test_full_rank_identity_projection_equals_baseline():
    """v_rank = H*D with identity w_c/w_r: the compressed-attention path (the package op)
    must give the SDPA baseline's logits."""
    comp, base = small(32), small(None)
    comp.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for attn in comp.attention_modules():
            attn.v_compress.weight.copy_(torch.eye(32))
            attn.v_restore.weight.copy_(torch.eye(32))
            attn.v_compress.bias.zero_()
            attn.v_restore.bias.zero_()
    ids = torch.randint(0, 256, (2, 21))
    torch.testing.assert_close(comp(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-5)


def test_pca_fit_lossless_at_full_rank_and_optimal():
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (16, 24))
    base = small(None)
    full = small(32)
    full.load_state_dict(base.state_dict(), strict=False)
    kept = fit_v_pca_(full, lambda: [ids[:8], ids[8:]])
    assert all(k == pytest.approx(1.0) for k in kept)
    torch.testing.assert_close(full(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    low = small(8)
    before = low(ids, return_recon=True).recon_loss.item()
    fit_v_pca_(low, lambda: [ids])
    after = low(ids, return_recon=True).recon_loss.item()
    assert after < before


def test_training_goes_through_package_op(monkeypatch):
    calls = []
    real = layers_mod.compressed_v_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(layers_mod, "compressed_v_attention", spy)
    m = small()
    ids = torch.randint(0, 256, (2, 12))
    seen = []
    hook = m.gpt_neox.layers[0].attention.dense.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].grad_fn))
    m(ids, labels=ids).loss.backward()
    hook.remove()
    assert calls == [True, True]  # one call per layer, causal
    # the attention output comes from the package's autograd.Function
    fn, names = seen[0], []
    while fn is not None and len(names) < 5:
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any("CompressedVAttentionFunction" in n for n in names), names
    assert m.gpt_neox.layers[0].attention.v_restore.weight.grad is not None
    calls.clear()
    small(None)(ids, labels=ids)
    assert calls == []  # the baseline never uses it


def test_loss_decreases_on_tiny_batch():
    torch.manual_seed(0)
    m = small()
    ids = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = m(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0, (first, loss.item())


def test_bf16_autocast_forward_backward():
    m = small()
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, labels=ids, return_recon=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.recon_loss)
    out.loss.backward()
    assert torch.isfinite(m.gpt_neox.layers[0].attention.v_compress.weight.grad).all()


def test_attention_module_constructor_and_submodules():
    attn = CompressedVAttention(hidden_size=64, num_heads=4, v_rank=40, rotary_pct=0.25,
                                rotary_base=10000, max_positions=128, bias=True)
    assert attn.v_compress.weight.shape == (40, 64) and attn.v_restore.weight.shape == (64, 40)
    assert attn.query_key_value.weight.shape == (192, 64) and attn.dense.weight.shape == (64, 64)
    assert not hasattr(CompressedVAttention(64, 4, None), "v_compress")
    assert vdproj_ext.CompressedVAttention is CompressedVAttention


def test_attention_module_alone_uses_its_own_rotary():
    """Without cos/sin the layer rotates positions 0 .. T-1 by its own rotary_pct/base."""
    attn = CompressedVAttention(64, 4, 40, rotary_pct=0.5, rotary_base=500.0)
    attn.backend = "reference"
    x = torch.randn(2, 7, 64)
    cos, sin = rotary_cos_sin(torch.arange(7)[None], 8, 500.0)
    other = rotary_cos_sin(torch.arange(7)[None], 8, 10000.0)
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], attn(x, cos, sin)[0])
        assert not torch.allclose(attn(x)[0], attn(x, *other)[0])


@pytest.mark.parametrize("parallel", [True, False])
def test_logits_match_transformers_gpt_neox(parallel):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, rotary_pct=0.5, rotary_emb_base=10000,
        max_position_embeddings=64, use_parallel_residual=parallel, hidden_act="gelu",
        layer_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
        hidden_dropout=0.0)
    torch.manual_seed(3)
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits biases: randomize so the layout is really tested
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    cfg = VDProjConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                       intermediate_size=96, rotary_pct=0.5, max_positions=64,
                       use_parallel_residual=parallel, v_rank=None)
    ours = VDProjForCausalLM(cfg).eval()
    # transformers 5 names the head lm_head in memory; checkpoints on disk say embed_out
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v
             for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == []
    assert all("rotary" in k or k.endswith(".bias") and "attention.bias" in k
               or "masked_bias" in k for k in unexpected), unexpected
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("head_dim,rotary_ndims", [(64, 16), (16, 16), (12, 5), (8, 0)])
def test_apply_rotary_is_gpt_neox_bit_for_bit(dtype, head_dim, rotary_ndims):
    # x * cos + rotate_half(x) * sin on the first rotary dims, as GPT-NeoX writes it (odd
    # rotary_ndims: cos and sin cover the next even number, as in Hugging Face), values and
    # gradients exactly.
    from vdproj_ext.models import apply_rotary, rotary_cos_sin
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 4, head_dim) * 5).to(dtype).requires_grad_(dtype == torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(7).expand(3, 7) * 37, rotary_ndims, 10000.0)
    rot = cos.shape[-1]
    c, s = cos.to(dtype), sin.to(dtype)
    x_rot = x[..., :rot]
    half = rot // 2
    turned = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    want = torch.cat((x_rot * c + turned * s, x[..., rot:]), dim=-1)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)
    if x.requires_grad:
        g = torch.randn_like(want)
        assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
