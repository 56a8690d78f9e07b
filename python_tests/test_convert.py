"""Converting Hugging Face GPT-NeoX checkpoints (vdproj_ext.models.convert).

The equivalence tests build small random GPTNeoXForCausalLM models with transformers (skipped
when it is not installed), save them, convert them and compare logits. The error tests need
only torch: they write checkpoint folders by hand.
"""
import json
import math

import pytest
import torch

from helpers import gpt_neox_config_dict, logits_through_cache, write_gpt_neox_folder
from vdproj_ext import VDProjConfig, VDProjForCausalLM
from vdproj_ext.models import config_from_gpt_neox, from_gpt_neox, init_v_projection_
from vdproj_ext.models.convert import load_gpt_neox_state_dict

# (hidden, heads, layers, intermediate, rotary_pct, parallel, tied, attention_bias)
SHAPES = [
    (64, 4, 2, 256, 0.25, True, False, True),    # Pythia-like
    (48, 3, 3, 96, 1.0, False, False, True),     # full rotary, sequential residual
    (40, 5, 2, 80, 0.5, True, True, True),       # head_dim 8, tied embeddings
    (32, 2, 2, 64, 0.0, False, False, False),    # no rotary, no attention biases
    (128, 2, 2, 200, 0.3, True, False, True),    # odd rotary dims: int(64 * 0.3) = 19
]
VOCAB = 97


def _hf_model(shape, seed=0, sharpen=1.0):
    transformers = pytest.importorskip("transformers")
    hidden, heads, layers, inter, pct, parallel, tied, abias = shape
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, rotary_pct=pct,
        rotary_emb_base=5000.0 if parallel else 10000.0, max_position_embeddings=128,
        use_parallel_residual=parallel, tie_word_embeddings=tied, attention_bias=abias,
        layer_norm_eps=1e-5, hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every weight matters
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _save_legacy_bin(hf_model, folder):
    """A transformers-4.x style folder: pytorch_model.bin with the old buffers, and the old
    rotary_pct / rotary_emb_base config keys."""
    folder.mkdir()
    cfg = hf_model.config
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    if "lm_head.weight" in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")
    for i in range(cfg.num_hidden_layers):  # buffers old checkpoints carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, folder / "pytorch_model.bin")
    rope = getattr(cfg, "rope_parameters", None) or {  # transformers 5 / 4.x
        "partial_rotary_factor": cfg.rotary_pct, "rope_theta": cfg.rotary_emb_base}
    legacy = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads,
              "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
              "rotary_pct": rope["partial_rotary_factor"], "rotary_emb_base": rope["rope_theta"],
              "max_position_embeddings": cfg.max_position_embeddings,
              "layer_norm_eps": cfg.layer_norm_eps,
              "use_parallel_residual": cfg.use_parallel_residual,
              "tie_word_embeddings": cfg.tie_word_embeddings, "rope_scaling": None,
              "torch_dtype": "float32"}
    if not getattr(cfg, "attention_bias", True):
        legacy["attention_bias"] = False
    (folder / "config.json").write_text(json.dumps(legacy))
    return folder


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}-rot{s[4]}-par{int(s[5])}")
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_uncompressed_logits_equal_transformers(shape, fmt, tmp_path):
    hf = _hf_model(shape)
    folder = tmp_path / "ckpt"
    if fmt == "safetensors":
        hf.save_pretrained(folder)
        assert (folder / "model.safetensors").exists()
    else:
        _save_legacy_bin(hf, folder)
    ids = torch.randint(0, VOCAB, (3, 37))
    expected = _hf_logits(hf, ids)
    model = from_gpt_neox(folder)
    assert model.config.v_rank is None
    assert model.config.rotary_pct == shape[4] and model.config.use_parallel_residual == shape[5]
    with torch.no_grad():
        got = model(ids).logits
    assert _max_rel(got, expected) < 1e-5
    if shape[6]:  # tied embeddings stay tied
        assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    # cached decoding of the converted model agrees too
    cache = model.new_cache(3, 40)
    with torch.no_grad():
        step = torch.cat([model(ids[:, :30], cache=cache).logits] +
                         [model(ids[:, i:i + 1], cache=cache).logits for i in range(30, 37)], 1)
    assert _max_rel(step, expected) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"h{s[0]}-rot{s[4]}-par{int(s[5])}")
@pytest.mark.parametrize("init", ["pca", "whitened_svd"])
def test_full_rank_is_lossless(shape, init, tmp_path):
    hf = _hf_model(shape, seed=1)
    hf.save_pretrained(tmp_path / "ckpt")
    calib = torch.randint(0, VOCAB, (6, 32))
    model = VDProjForCausalLM.from_gpt_neox(tmp_path / "ckpt", v_rank=shape[0], init=init,
                                            calibration_ids=calib)
    assert model.config.v_rank == shape[0]
    assert all(k == pytest.approx(1.0, abs=1e-6) for k in model.calibration_kept)
    ids = torch.randint(0, VOCAB, (2, 41))
    with torch.no_grad():
        got = model(ids).logits
        cache = model.new_cache(2, 41)
        cached = torch.cat([model(ids[:, :20], cache=cache).logits] +
                           [model(ids[:, i:i + 1], cache=cache).logits for i in range(20, 41)], 1)
    expected = _hf_logits(hf, ids)
    assert _max_rel(got, expected) < 1e-4
    assert _max_rel(cached, expected) < 1e-4


def _ppl(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_lower_rank_costs_measured_perplexity(tmp_path):
    """Text sampled from the original model is predicted best by the original model (in
    expectation, cross-entropy = entropy + KL), so compressing V can only raise perplexity."""
    shape = SHAPES[0]
    hf = _hf_model(shape, seed=2, sharpen=25.0)
    hf.save_pretrained(tmp_path / "ckpt")
    base = from_gpt_neox(tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (24, 1), generator=gen)
    text = base.generate(starts, 63, temperature=1.0, generator=gen)
    calib, held_out = text[:12], text[12:]
    ppl = {"original": _ppl(base, held_out)}
    assert abs(ppl["original"] - math.exp(_hf_ce(hf, held_out))) / ppl["original"] < 1e-4
    kept = {}
    for rank in (48, 16):
        for init in ("pca", "whitened_svd", "random"):
            m = from_gpt_neox(tmp_path / "ckpt", v_rank=rank, init=init, calibration_ids=calib)
            ppl[f"r{rank}-{init}"] = _ppl(m, held_out)
            kept[f"r{rank}-{init}"] = m.calibration_kept
    print("\nperplexity on text sampled from the original model (hidden 64):")
    for name, value in ppl.items():
        print(f"  {name:18s} {value:9.3f}  ({100 * (value / ppl['original'] - 1):+.2f}%)")
    for name, value in ppl.items():
        assert math.isfinite(value)
        if name != "original":
            assert value > ppl["original"], name
    assert ppl["r16-pca"] > ppl["r48-pca"]
    assert ppl["r16-random"] > ppl["r16-pca"]
    # PCA is the optimal rank-R affine autoencoder of V: it keeps at least as much variance
    # as the (uncentred) whitened SVD on the same layer inputs (layer 0 sees identical inputs)
    assert kept["r16-pca"][0] >= kept["r16-whitened_svd"][0] - 1e-9
    assert all(0 < k <= 1 + 1e-9 for k in kept["r16-pca"])


def _hf_ce(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids, labels=ids).loss.item()


def test_dtype_and_index_sharded_checkpoint(tmp_path):
    # Our own model written as a sharded safetensors checkpoint (keys map 1:1).
    cfg = VDProjConfig.preset("smoke", v_rank=None)
    ours = VDProjForCausalLM(cfg, init_seed=5)
    folder = write_gpt_neox_folder(tmp_path / "sharded", ours, sharded=True)
    state = load_gpt_neox_state_dict(folder)
    assert set(state) == set(ours.state_dict())
    model = from_gpt_neox(folder, v_rank=16, init="pca",
                          calibration_ids=torch.randint(0, cfg.vocab_size, (2, 16)),
                          dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits.float()).all()


@pytest.fixture
def small_folder(tmp_path):
    cfg = VDProjConfig.preset("smoke", v_rank=None)
    return write_gpt_neox_folder(tmp_path / "ok", VDProjForCausalLM(cfg, init_seed=1))


def test_clear_errors(tmp_path, small_folder):
    cfg = VDProjConfig.preset("smoke", v_rank=None)
    model = VDProjForCausalLM(cfg, init_seed=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        from_gpt_neox(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_gpt_neox(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(gpt_neox_config_dict(cfg)))
    with pytest.raises(FileNotFoundError, match="no weights"):
        from_gpt_neox(tmp_path / "noweights")
    with pytest.raises(ValueError, match="model_type"):
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "llama", model, model_type="llama"))
    with pytest.raises(ValueError, match="hidden_act"):
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "relu", model, hidden_act="relu"))
    with pytest.raises(ValueError, match="rope_type"):
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "scaled", model,
                                            rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="shape"):  # config says 4 heads x 16... wrong MLP
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "mismatch", model, intermediate_size=128))
    with pytest.raises(ValueError, match="missing"):
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "deeper", model, num_hidden_layers=3))
    calib = torch.randint(0, cfg.vocab_size, (2, 8))
    for bad in (0, cfg.hidden_size + 1):
        with pytest.raises(ValueError, match="v_rank"):
            from_gpt_neox(small_folder, v_rank=bad, calibration_ids=calib)
    with pytest.raises(TypeError, match="v_rank"):
        from_gpt_neox(small_folder, v_rank=8.0, calibration_ids=calib)
    with pytest.raises(ValueError, match="calibration_ids"):
        from_gpt_neox(small_folder, v_rank=8)
    with pytest.raises(ValueError, match="calibration_ids"):
        from_gpt_neox(small_folder, v_rank=8, calibration_ids=calib + cfg.vocab_size)
    with pytest.raises(ValueError, match="init"):
        from_gpt_neox(small_folder, v_rank=8, init="svd", calibration_ids=calib)
    # random init needs no calibration text
    m = from_gpt_neox(small_folder, v_rank=8, init="random")
    assert m.config.v_rank == 8
    with pytest.raises(ValueError, match="v_rank is None"):
        init_v_projection_(from_gpt_neox(small_folder), calib)


def test_config_mapping_transformers5_keys():
    hf = {"model_type": "gpt_neox", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 8,
          "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                              "partial_rotary_factor": 0.5},
          "attention_bias": False, "use_parallel_residual": False, "layer_norm_eps": 1e-6,
          "max_position_embeddings": 77}
    cfg = config_from_gpt_neox(hf, v_rank=4)
    assert (cfg.rotary_base, cfg.rotary_pct, cfg.attention_bias, cfg.use_parallel_residual,
            cfg.layer_norm_eps, cfg.max_positions, cfg.v_rank) == (500.0, 0.5, False, False,
                                                                   1e-6, 77, 4)


# ---------------------------------------------------------------------------------------------
# Latent keys (SPEC 3b): k_rank and joint_kv, "pca" and "score_aware" inits

LATENT_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4]]  # SHAPES[1] is all rotary


def _latent_ranks(shape, mode):
    """Full ranks: Rk = H*Dn and Rv = H*D, or the joint R = H*Dn + H*D. Dn excludes every
    dim rotary rotates: int(D * rotary_pct) rounded up to even (19 -> 20)."""
    hidden, heads, pct = shape[0], shape[1], shape[4]
    nope = hidden - heads * 2 * ((int(hidden // heads * pct) + 1) // 2)
    if mode == "joint":
        return dict(v_rank=nope + hidden, joint_kv=True)
    return dict(v_rank=hidden, k_rank=nope)


@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=lambda s: f"h{s[0]}-rot{s[4]}")
@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_latent_full_rank_logits_equal_transformers(shape, mode, tmp_path):
    hf = _hf_model(shape, seed=1)
    hf.save_pretrained(tmp_path / "ckpt")
    calib = torch.randint(0, VOCAB, (6, 32))
    ids = torch.randint(0, VOCAB, (2, 41))
    expected = _hf_logits(hf, ids)
    for init in ("pca", "score_aware", "whitened_svd"):
        model = VDProjForCausalLM.from_gpt_neox(tmp_path / "ckpt", init=init,
                                                calibration_ids=calib,
                                                **_latent_ranks(shape, mode))
        assert model.config.latent_keys and len(model.calibration_kept_k) == shape[2]
        assert all(k == pytest.approx(1.0, abs=1e-6)
                   for k in model.calibration_kept + model.calibration_kept_k)
        with torch.no_grad():
            got = model(ids).logits
        cached = logits_through_cache(model, ids, model.new_cache(2, 41), [20])
        assert _max_rel(got, expected) < 1e-4, init
        assert _max_rel(cached, expected) < 1e-4, init


def _sharp_attention_folder(tmp_path):
    """SHAPES[0] with peaked next-token distributions and attention (q and k rows scaled), so
    that compressing the keys visibly costs perplexity; and text sampled from it."""
    hf = _hf_model(SHAPES[0], seed=2, sharpen=25.0)
    with torch.no_grad():
        for layer in hf.gpt_neox.layers:
            hidden, heads = SHAPES[0][:2]
            w = layer.attention.query_key_value.weight.view(heads, 3, -1, hidden)
            w[:, :2] *= 3.0
    hf.save_pretrained(tmp_path / "sharp")
    base = from_gpt_neox(tmp_path / "sharp")
    gen = torch.Generator().manual_seed(0)
    text = base.generate(torch.randint(0, VOCAB, (24, 1), generator=gen), 63, temperature=1.0,
                         generator=gen)
    return tmp_path / "sharp", base, text[:12], text[12:]


def test_latent_lower_ranks_cost_measured_perplexity(tmp_path):
    folder, base, calib, held_out = _sharp_attention_folder(tmp_path)
    ppl = {"original": _ppl(base, held_out)}
    for init in ("pca", "score_aware"):  # H*Dn = 48, H*D = 64
        for k_rank in (4, 16, 32):
            m = from_gpt_neox(folder, v_rank=64, k_rank=k_rank, init=init,
                              calibration_ids=calib)
            ppl[f"k{k_rank}-v64-{init}"] = _ppl(m, held_out)
        for rank in (48, 80):
            m = from_gpt_neox(folder, v_rank=rank, joint_kv=True, init=init,
                              calibration_ids=calib)
            ppl[f"joint{rank}-{init}"] = _ppl(m, held_out)
    print("\nperplexity with latent keys, text sampled from the original model (hidden 64):")
    for name, value in ppl.items():
        print(f"  {name:20s} {value:9.3f}  ({100 * (value / ppl['original'] - 1):+.2f}%)")
    assert all(math.isfinite(v) for v in ppl.values())
    for init in ("pca", "score_aware"):
        assert ppl[f"k4-v64-{init}"] > ppl["original"]
        assert ppl[f"k4-v64-{init}"] > ppl[f"k32-v64-{init}"]
        assert ppl[f"joint48-{init}"] > ppl["original"]


def _layer0_errors(model, ids):
    """Layer 0's key reconstruction error and score error (mean over every query/key pair
    and head of (q_nope . (k_nope - k_nope_restored))^2) on ids."""
    attn = model.attention_modules()[0]
    cos, sin = model._rotary(torch.arange(ids.shape[1])[None])
    with torch.no_grad():
        q, k, _ = attn.project_qkv(model.layer_inputs(ids, 0), cos, sin)
        dr, h = attn.rotary_ndims, attn.num_heads
        k_nope = k[..., dr:].reshape(-1, h * (attn.head_dim - dr))
        err = (k_nope - attn.k_restore(attn.k_compress(k_nope))).view(-1, h, attn.head_dim - dr)
        q_nope = q[..., dr:].reshape(-1, h, attn.head_dim - dr)
        scores = torch.einsum("ihd,jhd->ijh", q_nope.double(), err.double())
    return float((err.double() ** 2).sum(-1).mean()), float((scores ** 2).mean())


def test_score_aware_preserves_scores_better_than_pca(tmp_path):
    """Each init is the optimum of its own objective on the calibration text (layer 0 sees
    the same inputs under both): PCA of the key error, score_aware of the score error."""
    cfg = VDProjConfig.preset("smoke", v_rank=None)
    ours = VDProjForCausalLM(cfg, init_seed=7)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    folder = write_gpt_neox_folder(tmp_path / "ckpt", ours)
    calib = torch.randint(0, cfg.vocab_size, (4, 24))
    errors = {init: _layer0_errors(from_gpt_neox(folder, v_rank=32, k_rank=6, init=init,
                                                 calibration_ids=calib), calib)
              for init in ("pca", "score_aware")}
    assert errors["pca"][0] <= errors["score_aware"][0] * (1 + 1e-6)
    assert errors["score_aware"][1] <= errors["pca"][1] * (1 + 1e-6)
    assert errors["score_aware"][1] < 0.99 * errors["pca"][1]  # and it matters here


def test_latent_clear_errors(small_folder, tmp_path):
    calib = torch.randint(0, 256, (2, 8))  # the smoke preset: H*Dn = 16, H*D = 32
    with pytest.raises(ValueError, match=r"k_rank=17 exceeds the 16 non-rotary key dims"):
        from_gpt_neox(small_folder, v_rank=8, k_rank=17, calibration_ids=calib)
    with pytest.raises(ValueError, match=r"v_rank=49 exceeds the 48 dims"):
        from_gpt_neox(small_folder, v_rank=49, joint_kv=True, calibration_ids=calib)
    with pytest.raises(ValueError, match="leave k_rank=None"):
        from_gpt_neox(small_folder, v_rank=8, k_rank=4, joint_kv=True, calibration_ids=calib)
    with pytest.raises(ValueError, match="needs v_rank"):
        from_gpt_neox(small_folder, k_rank=4, calibration_ids=calib)
    with pytest.raises(TypeError, match="k_rank"):
        from_gpt_neox(small_folder, v_rank=8, k_rank=4.0, calibration_ids=calib)
    with pytest.raises(ValueError, match="calibration_ids"):
        from_gpt_neox(small_folder, v_rank=8, k_rank=4, init="score_aware")
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=None, rotary_pct=1.0))
    with pytest.raises(ValueError, match="rotary_pct < 1"):
        from_gpt_neox(write_gpt_neox_folder(tmp_path / "allrot", model), v_rank=8, k_rank=4,
                      calibration_ids=calib)
    m = from_gpt_neox(small_folder, v_rank=8, joint_kv=True, init="random")
    assert m.config.joint_kv and m.calibration_kept_k == []


def test_save_gpt_neox_round_trip(tmp_path):
    from vdproj_ext.models import save_gpt_neox
    cfg = VDProjConfig.preset("smoke", v_rank=None, attention_bias=False)
    ours = VDProjForCausalLM(cfg, init_seed=3).eval()
    folder = save_gpt_neox(ours, tmp_path / "saved")
    back = from_gpt_neox(folder)
    assert back.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(folder).eval()
    assert _max_rel(_hf_logits(hf, ids), back(ids).logits.detach()) < 1e-5
    with pytest.raises(ValueError, match="uncompressed"):
        save_gpt_neox(VDProjForCausalLM(VDProjConfig.preset("smoke")), tmp_path / "no")


@pytest.mark.slow
def test_convert_ppl_bench_on_a_tiny_run(tmp_path):
    """bench/convert_ppl.py end to end on a 1-epoch smoke baseline: it trains nothing itself,
    converts at each setting and init, and writes its table."""
    import importlib.util
    from pathlib import Path
    from vdproj_ext.cli.train import main as train_main
    train_out = tmp_path / "baseline"
    train_main(["--preset", "smoke", "--mode", "baseline", "--epochs", "1", "--out",
                str(train_out), "--no-plots", "--no-progress"])
    path = Path(__file__).resolve().parents[1] / "bench" / "convert_ppl.py"
    spec = importlib.util.spec_from_file_location("convert_ppl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # bad settings are usage errors before anything is written (k_rank 0.75 * 32 = 24 is
    # above smoke's 16 non-rotary key dims)
    for bad in (["--k-fracs", "0.75"], ["--k-fracs", "0"], ["--preset", "nope"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--train-out", str(train_out), *bad, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2, bad
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        bench.main(["--train-out", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")])
    # the preset defaults to the run's own (results.json)
    result = bench.main(["--train-out", str(train_out), "--k-fracs",
                         "0.25", "--joint-fracs", "1.5", "--calib-samples", "8",
                         "--val-samples", "4", "--out", str(tmp_path)])
    assert result["preset"] == "smoke"
    names = [r["setting"] for r in result["rows"]]
    assert names == ["original", "values only", "separate k8 v20", "joint R48"]
    joint_full = result["rows"][-1]  # R = H*Dn + H*D: lossless
    assert joint_full["ppl"]["pca"] == pytest.approx(result["original_ppl"], rel=1e-4)
    assert all(math.isfinite(p) for r in result["rows"] for p in r["ppl"].values())
    assert (tmp_path / "convert_ppl_smoke.md").read_text().count("| joint R48 |") == 1


def test_quant_ppl_bench_refuses_a_folder_without_its_runs(tmp_path, monkeypatch, capsys):
    """bench/quant_ppl.py on a folder without results.json, or without the runs' checkpoints:
    a usage error naming --train-out (it was a traceback)."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import quant_ppl
    for setup in ("empty", "no checkpoints"):
        if setup == "no checkpoints":
            (tmp_path / "results.json").write_text('{"preset": "smoke"}')
        with pytest.raises(SystemExit) as exit_info:
            quant_ppl.main(["--train-out", str(tmp_path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2, setup
        assert f"--train-out {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
