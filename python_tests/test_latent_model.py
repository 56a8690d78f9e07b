"""Latent keys in the model (SPEC 3b and 4): config, k_compress / k_restore, the training op,
reconstruction losses, the latent cache and its size, cached decoding, the inference folds
(prepare_for_inference) and the closed-form phase 1 for the keys."""
import copy

import pytest
import torch

from helpers import logits_through_cache
from vdproj_ext.models import (CompressedVAttention, FoldedVAttention, KVCache, LatentKVCache,
                               VDProjConfig, VDProjForCausalLM, fit_v_pca_, kv_cache_nbytes)
from vdproj_ext.models import layers as layers_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# The smoke preset: H=2 heads of D=16, Dr=8 rotary dims, so H*Dn = 16 and H*D = 32.
LATENT = {"separate": dict(k_rank=12, v_rank=20), "joint": dict(joint_kv=True, v_rank=20)}
FULL_RANK = {"separate": dict(k_rank=16, v_rank=32), "joint": dict(joint_kv=True, v_rank=48)}


def _model(kind, dtype=torch.float32, backend="reference", seed=0, sharpen=False, **over):
    cfg = VDProjConfig.preset("smoke", **{**LATENT[kind], **over})
    model = VDProjForCausalLM(cfg, init_seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # every bias matters (HF-style init zeroes them)
                p.normal_(0.0, 0.1)
        if sharpen:  # peaked attention and next-token distributions: greedy choices are clear
            model.embed_out.weight.mul_(30)
            for attn in model.attention_modules():
                attn.query_key_value.weight.mul_(8)
    return model.to(dtype).set_backend(backend)


# ---------------------------------------------------------------------------------------------
# Config


def test_presets_and_cache_reduction():
    kv = VDProjConfig.preset("pythia-70m-kv")
    assert (kv.k_rank, kv.v_rank, kv.joint_kv, kv.rotary_ndims) == (192, 320, False, 16)
    assert kv.cache_values_per_token() == 8 * 16 + 192 + 320 == 640
    assert kv.kv_cache_reduction == pytest.approx(0.375)
    assert kv.replace(k_rank=None).kv_cache_reduction == pytest.approx(0.1875)
    joint = VDProjConfig.preset("pythia-70m", joint_kv=True)
    assert joint.kv_cache_reduction == pytest.approx(1 - 448 / 1024)
    cpu = VDProjConfig.preset("cpu-small-kv")
    hd = cpu.hidden_size
    assert (cpu.k_rank, cpu.v_rank) == (0.375 * hd, 0.625 * hd)
    assert cpu.kv_cache_reduction == pytest.approx(0.375)
    assert VDProjConfig.preset("pythia-70m").k_rank is None  # uncompressed keys by default
    assert kv.uncompressed() == VDProjConfig.preset("pythia-70m", v_rank=None)


def test_rope_dims_are_the_rotated_dims():
    """GPT-NeoX rotates 2 * ceil(rotary_ndims / 2) dims: an odd rotary_ndims keeps one more
    dim out of the key latent (int(64 * 0.3) = 19 -> 20)."""
    cfg = VDProjConfig(hidden_size=128, num_heads=2, rotary_pct=0.3, k_rank=8, v_rank=80)
    assert (cfg.rotary_ndims, cfg.rope_dims) == (19, 20)
    assert cfg.cache_values_per_token() == 2 * 20 + 8 + cfg.v_rank
    attn = CompressedVAttention(128, 2, 16, rotary_pct=0.3, k_rank=8)
    assert attn.k_compress.in_features == 2 * 44
    assert VDProjConfig.preset("pythia-70m-kv").rope_dims == 16


def test_invalid_combinations_have_clear_errors():
    with pytest.raises(ValueError, match="k_rank=8 needs v_rank"):
        VDProjConfig.preset("smoke", v_rank=None, k_rank=8)
    with pytest.raises(ValueError, match="joint_kv=True needs v_rank"):
        VDProjConfig.preset("smoke", v_rank=None, joint_kv=True)
    with pytest.raises(ValueError, match="leave k_rank=None"):
        VDProjConfig.preset("smoke", k_rank=8, joint_kv=True)
    with pytest.raises(ValueError, match="rotary_pct < 1"):
        VDProjConfig.preset("smoke", k_rank=8, rotary_pct=1.0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k_rank must be a positive int"):
            VDProjConfig.preset("smoke", k_rank=bad)
    with pytest.raises(TypeError, match="joint_kv must be a bool"):
        VDProjConfig.preset("smoke", joint_kv=1)
    with pytest.raises(ValueError, match="needs v_rank"):  # the layer checks the same way
        CompressedVAttention(32, 2, None, rotary_pct=0.5, k_rank=8)


@pytest.mark.parametrize("kind", ["separate", "joint"])
def test_param_counts_match_built_model(kind):
    for name in ("smoke", "cpu-small"):
        over = dict(LATENT[kind])
        if name == "cpu-small":
            over = {"k_rank": 48} if kind == "separate" else {"joint_kv": True}
        cfg = VDProjConfig.preset(name, **over)
        counts = VDProjForCausalLM(cfg).num_parameters()
        assert counts == cfg.param_counts()
        assert 0 < counts["k_projection"] < counts["v_projection"]


def test_pythia70m_kv_counts_without_allocating():
    cfg = VDProjConfig.preset("pythia-70m-kv")
    with torch.device("meta"):
        model = VDProjForCausalLM(cfg)
    counts = model.num_parameters()
    # the key pair: 384 -> 192 -> 384 in each of the 6 layers, biases included
    assert counts["k_projection"] == 6 * (384 * 192 + 192 + 192 * 384 + 384) == 888_192
    assert counts["v_projection"] == 1_971_072 + 888_192
    assert counts["total"] == 70_426_624 + 1_971_072 + 888_192 == cfg.param_counts()["total"]


# ---------------------------------------------------------------------------------------------
# The layer


def test_submodules_and_state_dict_names():
    sep = CompressedVAttention(64, 4, 40, rotary_pct=0.25, k_rank=24)
    assert sep.k_compress.weight.shape == (24, 48) and sep.k_restore.weight.shape == (48, 24)
    assert sep.v_compress.weight.shape == (40, 64) and sep.key_rank == 24
    joint = CompressedVAttention(64, 4, 40, rotary_pct=0.25, joint_kv=True)
    assert not hasattr(joint, "k_compress")
    assert joint.v_compress.weight.shape == (40, 48 + 64)
    assert joint.k_restore.weight.shape == (48, 40)
    assert not hasattr(CompressedVAttention(64, 4, 40), "k_restore")
    keys = set(_model("separate").state_dict())
    for k in ("gpt_neox.layers.0.attention.k_compress.weight",
              "gpt_neox.layers.1.attention.k_restore.bias"):
        assert k in keys


@pytest.mark.parametrize("kind", ["separate", "joint"])
def test_recon_losses_definition(kind):
    """recon_losses["k"] / ["v"]: mean over layers of the mean squared error of k_nope / V;
    recon_loss: the mean of all pair losses."""
    model = _model(kind)
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, return_recon=True, skip_logits=True)
    assert set(out.recon_losses) == {"k", "v"} and len(out.layer_recon) == 2
    attn = model.attention_modules()[0]
    x = model.layer_inputs(ids, 0)
    cos, sin = model._rotary(torch.arange(9)[None])
    _, k, v = attn.project_qkv(x, cos, sin)
    k_nope = k[..., 8:].reshape(2, 9, 16)
    if kind == "joint":
        lat = attn.v_compress(torch.cat((k_nope, v), -1))
        k_lat = lat
    else:
        lat, k_lat = attn.v_compress(v), attn.k_compress(k_nope)
    want_k = ((attn.k_restore(k_lat) - k_nope) ** 2).mean()
    want_v = ((attn.v_restore(lat) - v) ** 2).mean()
    torch.testing.assert_close(out.layer_recon[0], (want_k + want_v) / 2)
    torch.testing.assert_close(out.recon_loss, torch.stack(out.layer_recon).mean())
    torch.testing.assert_close(out.recon_loss, (out.recon_losses["k"] + out.recon_losses["v"]) / 2)
    v_only = VDProjForCausalLM(VDProjConfig.preset("smoke")).set_backend("reference")
    o = v_only(ids, return_recon=True)
    assert set(o.recon_losses) == {"v"} and torch.equal(o.recon_loss, o.recon_losses["v"])


@pytest.mark.parametrize("kind", ["separate", "joint"])
def test_training_goes_through_latent_op(kind, monkeypatch):
    calls = []
    real = layers_mod.compressed_kv_attention

    def spy(*args, **kwargs):
        calls.append((args[2] is None, kwargs.get("causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(layers_mod, "compressed_kv_attention", spy)
    model = _model(kind)
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels=ids, return_recon=True)
    (out.loss + out.recon_loss).backward()
    assert calls == [(kind == "joint", True)] * 2  # one call per layer, causal; no k_c if joint
    attn = model.attention_modules()[0]
    grads = [attn.v_compress.weight.grad, attn.k_restore.weight.grad]
    if kind == "separate":
        grads.append(attn.k_compress.weight.grad)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bf16_autocast_forward_backward():
    model = _model("separate")
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, return_recon=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.recon_loss)
    out.loss.backward()
    assert torch.isfinite(model.attention_modules()[0].k_compress.weight.grad).all()


def test_pair_init_shared_with_v_only_model():
    """A latent-key model of one seed starts with the V-only model's value pair, every
    GPT-NeoX weight, and an orthogonal key pair."""
    a = VDProjForCausalLM(VDProjConfig.preset("smoke-kv"), init_seed=4).state_dict()
    b = VDProjForCausalLM(VDProjConfig.preset("smoke"), init_seed=4).state_dict()
    for name, t in b.items():
        assert torch.equal(a[name], t), name
    attn = VDProjForCausalLM(VDProjConfig.preset("smoke-kv")).attention_modules()[0]
    torch.testing.assert_close(attn.k_compress.weight @ attn.k_restore.weight, torch.eye(12))
    joint = VDProjForCausalLM(VDProjConfig.preset("smoke", joint_kv=True)).attention_modules()[0]
    restore = torch.cat((joint.k_restore.weight, joint.v_restore.weight))
    torch.testing.assert_close(joint.v_compress.weight @ restore, torch.eye(20))


# ---------------------------------------------------------------------------------------------
# Closed-form phase 1 and full rank


@pytest.mark.parametrize("kind", ["separate", "joint"])
def test_pca_fit_lossless_at_full_rank_and_lowers_both_losses(kind):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (16, 24))
    base = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=None), init_seed=0)
    full = _model(kind, **FULL_RANK[kind])
    full.load_state_dict(base.state_dict(), strict=False)
    kept = fit_v_pca_(full, lambda: [ids[:8], ids[8:]], by_pair=True)
    assert all(k == {"k": pytest.approx(1.0), "v": pytest.approx(1.0)} for k in kept)
    torch.testing.assert_close(full(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    low = _model(kind)
    before = low(ids, return_recon=True).recon_losses
    v_kept = fit_v_pca_(low, lambda: [ids])
    after = low(ids, return_recon=True).recon_losses
    assert after["k"] < before["k"] and after["v"] < before["v"]
    assert all(0 < k < 1 for k in v_kept)


# ---------------------------------------------------------------------------------------------
# The cache


def test_cache_size_pythia70m_kv_is_640_of_1024():
    cfg = VDProjConfig.preset("pythia-70m-kv")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):  # sizes come from shapes: nothing is allocated
            # a compressed cache is in the model's dtype (new_cache refuses another)
            model = VDProjForCausalLM(cfg).to(dtype)
            joint = VDProjForCausalLM(cfg.replace(k_rank=None, joint_kv=True)).to(dtype)
            base = VDProjForCausalLM(cfg.uncompressed()).to(dtype)
        kv = model.new_cache(2, 32, dtype=dtype)
        full = base.new_cache(2, 32, dtype=dtype)
        assert isinstance(kv, LatentKVCache) and isinstance(full, KVCache)
        assert kv.nbytes * 1024 == full.nbytes * 640
        assert joint.new_cache(2, 32, dtype=dtype).nbytes * 1024 == full.nbytes * 448
        elem = torch.empty((), dtype=dtype).element_size()
        assert kv.nbytes == kv_cache_nbytes(None, 2, 32, None, None, None, elem, config=cfg)
        assert kv.nbytes == 6 * 2 * 32 * 640 * elem
    assert kv.krope_cache[0].shape == (2, 32, 8, 16) and kv.kc_cache[5].shape == (2, 32, 192)
    assert kv.vc_cache[0].shape == (2, 32, 320)
    assert joint.new_cache(1, 4).kc_cache == [None] * 6


def test_new_cache_cache_dtype():
    """The quantized caches themselves are tested in test_quant_model.py."""
    model = _model("separate")
    assert model.new_cache(1, 4, cache_dtype=None).dtype == torch.float32
    assert model.new_cache(1, 4, cache_dtype=torch.int8).cache_dtype == torch.int8
    with pytest.raises(ValueError, match="cache_dtype must be None"):
        model.new_cache(1, 4, cache_dtype=torch.float16)


@pytest.mark.parametrize("kind", ["separate", "joint"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cached_logits_equal_full_forward(kind, backend):
    model = _model(kind, torch.float64, backend).eval()
    ids = torch.randint(0, 256, (3, 23))
    with torch.no_grad():
        full = model(ids).logits
    cache = model.new_cache(3, 30)
    got = logits_through_cache(model, ids, cache, [9, 13])
    assert cache.seqlens.tolist() == [23, 23, 23]
    assert (got - full).abs().max() <= 1e-10 * full.abs().max()


def test_cached_decoding_goes_through_the_decode_op(monkeypatch):
    from vdproj_ext.models import cache as cache_mod
    calls = []
    real = cache_mod.attend_latent_cache

    def spy(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, *rest):
        calls.append(k is not None and w_c is not None)
        return real(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c,
                    *rest)

    monkeypatch.setattr(cache_mod, "attend_latent_cache", spy)
    model = _model("separate").eval()
    model.generate(torch.randint(0, 256, (2, 5)), 3)
    assert calls == [True] * 2 * 3  # compress-on-write inside the op, every layer and step


@pytest.mark.parametrize("kind", ["separate", "joint"])
def test_greedy_and_ragged_generation(kind):
    model = _model(kind, torch.float64, "auto", seed=3, sharpen=True).eval()
    ids = torch.randint(1, 256, (3, 7))
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(model.generate(ids, 10), seq)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    out = model.generate(ids, 8, attention_mask=mask)
    for i in range(3):
        alone = model.generate(ids[i:i + 1, int((mask[i] == 0).sum()):], 8)
        assert torch.equal(out[i, 7:], alone[0, -8:])


def test_overflow_writes_nothing():
    model = _model("separate").eval()
    cache = model.new_cache(2, 8)
    ids = torch.randint(0, 256, (2, 6))
    model(ids, cache=cache)
    before = [t.clone() for t in cache.krope_cache + cache.kc_cache + cache.vc_cache]
    with pytest.raises(ValueError, match="max_len=8"):
        model(ids[:, :3], cache=cache)
    after = cache.krope_cache + cache.kc_cache + cache.vc_cache
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert cache.seqlens.tolist() == [6, 6]


def test_latent_cache_checks_its_arguments():
    with pytest.raises(ValueError, match="rope_dims must be < head_dim"):
        LatentKVCache(1, 1, 4, 2, 8, 6, rope_dims=8, k_rank=4)
    with pytest.raises(TypeError, match="k_rank"):
        LatentKVCache(1, 1, 4, 2, 8, 6, rope_dims=2, k_rank=4.0)
    cache = LatentKVCache(1, 2, 4, 2, 8, 6, rope_dims=2, k_rank=4)
    attn = _model("separate").attention_modules()[0]
    q = torch.zeros(2, 1, 2, 8)
    with pytest.raises(ValueError, match="k_rope must have shape"):
        cache.attend_compressed(0, q, torch.zeros(2, 1, 2, 3), (torch.zeros(2, 1, 4),
                                                                torch.zeros(2, 1, 6)), attn)
    with pytest.raises(ValueError, match="k_c"):
        cache.attend_compressed(0, q, torch.zeros(2, 1, 2, 2), (None, torch.zeros(2, 1, 6)),
                                attn)
    joint = LatentKVCache(1, 2, 4, 2, 8, 6, rope_dims=2)
    with pytest.raises(ValueError, match="joint latent"):
        joint.attend_compressed(0, q, torch.zeros(2, 1, 2, 2), (torch.zeros(2, 1, 4),
                                                                torch.zeros(2, 1, 6)), attn)
    assert joint.nbytes == 2 * 4 * (2 * 2 + 6) * 4 and cache.seqlens.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Inference folds: prepare_for_inference


@pytest.mark.parametrize("kind", ["v-only", "separate", "joint"])
@pytest.mark.parametrize("biases", [True, False])
def test_prepare_for_inference_keeps_logits_and_generations(kind, biases):
    over = {} if biases else {"attention_bias": False}
    if kind == "v-only":
        over.update(k_rank=None)
        kind_cfg = "separate"
    else:
        kind_cfg = kind
    model = _model(kind_cfg, torch.float64, "auto", seed=3, sharpen=True, **over).eval()
    folded = copy.deepcopy(model).prepare_for_inference()
    assert all(isinstance(a, FoldedVAttention) for a in folded.attention_modules())
    assert not folded.training
    ids = torch.randint(0, 256, (3, 15))
    with torch.no_grad():
        full = model(ids).logits
        assert (folded(ids).logits - full).abs().max() < 1e-9 * full.abs().max()
    got = logits_through_cache(folded, ids, folded.new_cache(3, 16), [6, 9])
    assert (got - full).abs().max() < 1e-9 * full.abs().max()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    assert torch.equal(folded.generate(ids, 8, attention_mask=mask),
                       model.generate(ids, 8, attention_mask=mask))
    with pytest.raises(ValueError, match="inference only"):
        folded(ids, return_recon=True)


def test_prepare_for_inference_in_place_and_idempotent():
    model = _model("separate").train()
    assert model.prepare_for_inference() is model and not model.training
    fused = [a.fused.weight for a in model.attention_modules()]
    model.prepare_for_inference()
    assert [a.fused.weight for a in model.attention_modules()] == fused
    # the fused projection yields q, the rotary keys and both latents: nothing of k_nope or V
    attn = model.attention_modules()[0]
    assert attn.fused.weight.shape == (32 + 2 * 8 + 12 + 20, 32)
    base = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=None)).train()
    layers = list(base.attention_modules())
    assert base.prepare_for_inference() is base and not base.training
    assert list(base.attention_modules()) == layers  # nothing to fold
