"""Converting Hugging Face GPT-NeoX checkpoints (vdproj_ext.models.convert).

The equivalence tests build small random GPTNeoXForCausalLM models with transformers (skipped
when it is not installed), save them, convert them and compare logits. The error tests need
only torch: they write checkpoint folders by hand.
"""
import json
import math

import pytest
import torch

from helpers import gpt_neox_config_dict, write_gpt_neox_folder
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
