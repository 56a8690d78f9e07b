"""Bring a Hugging Face GPT-NeoX checkpoint (Pythia and its siblings) into V-DProj form.

    model = from_gpt_neox("path/to/pythia-70m", v_rank=320, init="pca",
                          calibration_ids=ids)          # ids: LongTensor (N, T)
    model = from_gpt_neox("path/to/pythia-70m", v_rank=320, k_rank=192,   # latent keys
                          init="score_aware", calibration_ids=ids)

Needs only torch and safetensors: config.json is read as JSON and the weights are read from
model.safetensors, pytorch_model.bin, or their sharded forms (*.index.json). transformers is
not imported and nothing is downloaded.

VDProjForCausalLM uses Hugging Face's module names, so the weights load 1:1. The compress /
restore pairs (v_compress / v_restore, and k_compress / k_restore with latent keys) are then
initialised from calibration text (calibration.py: "pca", "score_aware", "whitened_svd" or
"random").
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .calibration import INITS, check_calibration_ids, init_v_projection_
from .config import VDProjConfig
from .gpt_neox import VDProjForCausalLM
from .layers import is_projection_pair

# Buffers some GPT-NeoX checkpoints carry that are not weights (recomputed by the model).
_SKIPPED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# Config


def read_gpt_neox_config(path: Union[str, os.PathLike]) -> dict:
    """config.json of a checkpoint folder, as a dict; checks that it is a GPT-NeoX config."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"GPT-NeoX checkpoint folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face "
                                f"GPT-NeoX checkpoint folder)")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "gpt_neox" and "GPTNeoXForCausalLM" not in archs:
        raise ValueError(f"{cfg_path}: model_type must be 'gpt_neox' (a GPT-NeoX / Pythia "
                         f"checkpoint), got model_type={model_type!r}, architectures={archs}")
    return cfg


def _rotary_settings(hf: dict):
    """(rotary_pct, rotary_base) from either spelling: rotary_pct / rotary_emb_base
    (transformers 4.x, the Pythia configs) or rope_parameters / rope_scaling (transformers 5).
    Scaled RoPE variants raise."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if not rope:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"unsupported GPT-NeoX config: {key}={rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported GPT-NeoX config: {key} has rope_type={rope_type!r} "
                             f"(RoPE scaling is not implemented; only plain rotary embeddings)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return (float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
            float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))


def _check_rank_type(name: str, rank) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"{name} must be an int or None, got {type(rank).__name__}")


def config_from_gpt_neox(hf: dict, v_rank: Optional[int] = None, k_rank: Optional[int] = None,
                         joint_kv: bool = False) -> VDProjConfig:
    """Map a GPT-NeoX config.json dict onto VDProjConfig; unsupported features raise."""
    def need(key):
        if key not in hf:
            raise ValueError(f"GPT-NeoX config.json lacks the required key {key!r}")
        return hf[key]

    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported GPT-NeoX config: hidden_act={act!r}; only 'gelu' "
                         f"(exact erf GELU, as in Pythia) is implemented")
    rotary_pct, rotary_base = _rotary_settings(hf)
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if hidden % heads:
        raise ValueError(f"unsupported GPT-NeoX config: hidden_size {hidden} is not divisible "
                         f"by num_attention_heads {heads}")
    _check_rank_type("v_rank", v_rank)  # the ranges once the config knows the shape
    _check_rank_type("k_rank", k_rank)
    with warnings.catch_warnings():  # a rank above what it compresses: refused just below
        warnings.simplefilter("ignore")
        config = VDProjConfig(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            intermediate_size=int(need("intermediate_size")),
            rotary_pct=rotary_pct,
            rotary_base=rotary_base,
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            attention_bias=bool(hf.get("attention_bias", True)),
            v_rank=v_rank,
            v_bias=True,
            k_rank=k_rank,
            joint_kv=joint_kv,
        )
    if config.oversized_rank():  # it would only add zero dimensions
        raise ValueError(f"{config.oversized_rank()} (this checkpoint's shape)")
    return config


# ---------------------------------------------------------------------------------------------
# Weights


def _load_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional dependency, needed only here
        return load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not a plain state dict, or a corrupt file
        raise ValueError(f"could not read {path} as a PyTorch state dict: {exc}") from None


def load_gpt_neox_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint: model.safetensors, pytorch_model.bin or a sharded index."""
    folder = Path(path)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return _load_file(folder / single)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            with open(folder / index) as f:
                weight_map = json.load(f)["weight_map"]
            state = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"shard {shard} listed in {index} is missing "
                                            f"from {folder}")
                state.update(_load_file(folder / shard))
            return state
    raise FileNotFoundError(f"{folder} has no weights: expected model.safetensors, "
                            f"pytorch_model.bin or a sharded *.index.json")


def _map_state_dict(hf_state: Dict[str, torch.Tensor], model: VDProjForCausalLM,
                    tied: bool) -> Dict[str, torch.Tensor]:
    """Rename/filter checkpoint keys to ours and check that nothing is missing or extra."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith(_SKIPPED_SUFFIXES):
            continue
        if key == "lm_head.weight":  # transformers 5 in-memory name of embed_out
            key = "embed_out.weight"
        state[key] = value
    reference = model.state_dict()
    ours = {k for k in reference if not is_projection_pair(k)}
    if tied and "embed_out.weight" not in state and "gpt_neox.embed_in.weight" in state:
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]
    missing = sorted(ours - state.keys())
    unexpected = sorted(state.keys() - ours)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config.json: missing "
                         f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(reference[key].shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the "
                             f"config implies {tuple(reference[key].shape)}")
    return state


def save_gpt_neox(model: VDProjForCausalLM, path: Union[str, os.PathLike]) -> Path:
    """Write an uncompressed model as a Hugging Face GPT-NeoX checkpoint folder (config.json
    and model.safetensors, the keys unchanged), which from_gpt_neox and transformers read.
    A compressed model has no GPT-NeoX form (its pairs are not part of the architecture)."""
    cfg = model.config
    if cfg.v_rank is not None:
        raise ValueError("save_gpt_neox needs an uncompressed model (config.v_rank is None); "
                         "GPT-NeoX has no compress/restore pairs")
    from safetensors.torch import save_file  # optional dependency, needed only here
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
          "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rotary_base,
          "max_position_embeddings": cfg.max_positions, "layer_norm_eps": cfg.layer_norm_eps,
          "use_parallel_residual": cfg.use_parallel_residual,
          "attention_bias": cfg.attention_bias, "tie_word_embeddings": False,
          "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    state = {k: v.detach().to("cpu", torch.float32).clone()  # tied weights: two copies
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


# ---------------------------------------------------------------------------------------------
# The entry point


def from_gpt_neox(path: Union[str, os.PathLike], *, v_rank: Optional[int] = None,
                  k_rank: Optional[int] = None, joint_kv: bool = False, init: str = "pca",
                  calibration_ids: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None, device=None,
                  calibration_batch_size: int = 8) -> VDProjForCausalLM:
    """Load a Hugging Face GPT-NeoX checkpoint folder into VDProjForCausalLM.

    v_rank=None keeps the model uncompressed (its logits equal the original's). Otherwise
    v_compress/v_restore (rank v_rank <= hidden_size) are initialised by `init`; k_rank
    (<= H*Dn) adds a key latent and joint_kv=True makes the keys share the value latent
    (v_rank <= H*Dn + H*D then), SPEC 3b. init is "pca", "score_aware", "whitened_svd" or
    "random" (calibration.py); all but "random" need calibration_ids, a LongTensor (N, T).
    Calibration runs in float32; the model is then cast to `dtype` (default float32) and
    moved to `device` (default CPU). The per-layer fraction of V's variance kept is stored
    as model.calibration_kept, and of k_nope's as model.calibration_kept_k (empty without
    latent keys).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    hf = read_gpt_neox_config(path)
    config = config_from_gpt_neox(hf, v_rank, k_rank, joint_kv)
    if v_rank is not None and init != "random":  # fail before reading the weights
        calibration_ids = check_calibration_ids(calibration_ids, config.vocab_size, init)
    hf_state = load_gpt_neox_state_dict(path)
    model = VDProjForCausalLM(config, init_seed=0)
    tied = bool(hf.get("tie_word_embeddings", False))
    state = _map_state_dict(hf_state, model, tied)
    # Weights are loaded in float32 whatever the checkpoint's dtype (Pythia ships fp16).
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    if tied:
        model.embed_out.weight = model.gpt_neox.embed_in.weight  # shared, as in the original
    if device is not None:
        model.to(device)
    model.eval()
    kept = []
    if v_rank is not None:
        kept = init_v_projection_(model, calibration_ids, init, calibration_batch_size,
                                  by_pair=True)
    model.calibration_kept = [k["v"] for k in kept]
    model.calibration_kept_k = [k["k"] for k in kept if "k" in k]
    if dtype is not None:
        model.to(dtype)
    return model
