"""Bring a Hugging Face GPT-NeoX checkpoint (Pythia and its siblings) into V-DProj form.

    model = from_gpt_neox("path/to/pythia-70m", v_rank=320, init="pca",
                          calibration_ids=ids)          # ids: LongTensor (N, T)

Needs only torch and safetensors: config.json is read as JSON and the weights are read from
model.safetensors, pytorch_model.bin, or their sharded forms (*.index.json). transformers is
not imported and nothing is downloaded.

VDProjForCausalLM uses Hugging Face's module names, so the weights load 1:1. v_compress and
v_restore are then initialised, layer by layer, from statistics of calibration text:

* "pca": the rank-R mean-centred PCA autoencoder of the layer's V (the closed-form optimum of
  phase 1's reconstruction loss): w_c = U_R^T, b_c = -U_R^T mu, w_r = U_R, b_r = mu.
  With v_rank = H*D it is lossless.
* "whitened_svd" (Palu / SVD-LLM): truncate the SVD of W_v S, where S S^T = E[x x^T] is the
  second moment of the layer's input x (Cholesky factor; eigen factor if x's moment is
  singular). Then W_v x ~= U_R (U_R^T W_v x): the latent U_R^T W_v x is a linear function of
  V = W_v x + b_v, so w_c = U_R^T, b_c = -U_R^T b_v, w_r = U_R, b_r = b_v. This minimises the
  error of W_v x over the calibration inputs without centring (it equals an uncentred PCA
  of W_v x); "pca" also centres, so its reconstruction error is never larger.
* "random": the model's own random orthogonal initialisation (no calibration needed).

Calibration is sequential: layer l is fitted on inputs that went through layers < l already
compressed, as the converted model will see them. The hidden states of the calibration set
are kept in memory between layers (N * T * hidden floats).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .model import VDProjConfig, VDProjForCausalLM, rotary_cos_sin

__all__ = ["from_gpt_neox", "read_gpt_neox_config", "config_from_gpt_neox",
           "load_gpt_neox_state_dict", "init_v_projection_", "INITS"]

INITS = ("pca", "whitened_svd", "random")

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


def config_from_gpt_neox(hf: dict, v_rank: Optional[int] = None) -> VDProjConfig:
    """Map a GPT-NeoX config.json dict onto VDProjConfig; unsupported features raise.

    Handles both spellings of rotary settings: rotary_pct / rotary_emb_base (transformers 4.x,
    the Pythia configs) and rope_parameters / rope_scaling (transformers 5).
    """
    def need(key):
        if key not in hf:
            raise ValueError(f"GPT-NeoX config.json lacks the required key {key!r}")
        return hf[key]

    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported GPT-NeoX config: hidden_act={act!r}; only 'gelu' "
                         f"(exact erf GELU, as in Pythia) is implemented")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"unsupported GPT-NeoX config: rope parameters {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported GPT-NeoX config: rope_type={rope_type!r} (RoPE "
                         f"scaling is not implemented; only plain rotary embeddings)")
    rotary_pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    for key in ("rope_scaling",):
        extra = hf.get(key)
        if extra and extra.get("rope_type", extra.get("type", "default")) != "default":
            raise ValueError(f"unsupported GPT-NeoX config: {key}={extra!r}")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if hidden % heads:
        raise ValueError(f"unsupported GPT-NeoX config: hidden_size {hidden} is not divisible "
                         f"by num_attention_heads {heads}")
    if v_rank is not None:
        if isinstance(v_rank, bool) or not isinstance(v_rank, int):
            raise TypeError(f"v_rank must be an int or None, got {type(v_rank).__name__}")
        if not 1 <= v_rank <= hidden:
            raise ValueError(f"v_rank must lie in [1, hidden_size={hidden}] (H*D of this "
                             f"checkpoint), got {v_rank}")
    return VDProjConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        intermediate_size=int(need("intermediate_size")),
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
        attention_bias=bool(hf.get("attention_bias", True)),
        v_rank=v_rank,
        v_bias=True,
    )


# ---------------------------------------------------------------------------------------------
# Weights


def _load_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
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
    ours = {k for k in model.state_dict() if ".v_compress." not in k and ".v_restore." not in k}
    if tied and "embed_out.weight" not in state and "gpt_neox.embed_in.weight" in state:
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]
    missing = sorted(ours - state.keys())
    unexpected = sorted(state.keys() - ours)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config.json: missing "
                         f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    reference = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(reference[key].shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the "
                             f"config implies {tuple(reference[key].shape)}")
    return state


# ---------------------------------------------------------------------------------------------
# Initialising v_compress / v_restore from calibration statistics


def _value_rows(attn) -> torch.Tensor:
    """Row indices of the value projection inside GPT-NeoX's fused, per-head interleaved
    query_key_value weight: head h's values are rows h*3D+2D .. h*3D+3D."""
    d, heads = attn.head_dim, attn.num_heads
    return (torch.arange(heads).unsqueeze(1) * 3 * d + 2 * d + torch.arange(d)).reshape(-1)


def _top_eigvecs(sym: torch.Tensor, rank: int) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    return evecs[:, torch.argsort(evals, descending=True)[:rank]]


@torch.no_grad()
def _fit_layer_(attn, xs, init: str, eps: float = 1e-6) -> float:
    """Fit one layer's v_compress/v_restore on its inputs xs (list of (B, T, hidden)).
    Returns the fraction of V's (centred) variance that the fitted pair reconstructs."""
    rows = _value_rows(attn).to(attn.query_key_value.weight.device)
    w_v = attn.query_key_value.weight[rows].double()                      # (HD, hidden)
    b_v = (attn.query_key_value.bias[rows].double() if attn.query_key_value.bias is not None
           else torch.zeros(w_v.shape[0], dtype=torch.float64, device=w_v.device))
    hidden = w_v.shape[1]
    s1 = torch.zeros(hidden, dtype=torch.float64, device=w_v.device)
    s2 = torch.zeros(hidden, hidden, dtype=torch.float64, device=w_v.device)
    n = 0
    for x in xs:
        x = x.reshape(-1, hidden).double()
        s1 += x.sum(0)
        s2 += x.T @ x
        n += x.shape[0]
    mean_x, second_x = s1 / n, s2 / n
    cov_x = second_x - torch.outer(mean_x, mean_x)
    # V = W_v x + b_v, so its moments follow from x's exactly.
    mean_v = w_v @ mean_x + b_v
    cov_v = w_v @ cov_x @ w_v.T
    cov_v = (cov_v + cov_v.T) / 2
    rank = attn.v_rank
    if init == "pca":
        u = _top_eigvecs(cov_v, rank)
        attn.set_pca_(mean_v.float(), u.float())
    elif init == "whitened_svd":
        # S with S S^T = E[x x^T]; a tiny ridge keeps the Cholesky alive on degenerate inputs,
        # and the eigen factor takes over if it still fails.
        m = (second_x + second_x.T) / 2
        ridge = eps * float(m.diagonal().mean().clamp_min(1e-30))
        try:
            s = torch.linalg.cholesky(m + ridge * torch.eye(hidden, dtype=m.dtype,
                                                            device=m.device))
        except RuntimeError:
            evals, evecs = torch.linalg.eigh(m)
            s = evecs * evals.clamp_min(0).sqrt()
        u_full, _, _ = torch.linalg.svd(w_v @ s, full_matrices=False)
        u = u_full[:, :rank]
        if u.shape[1] < rank:  # W_v S has fewer columns than rank: pad orthonormally
            u = _complete_basis(u, rank)
        dev, dt = attn.v_compress.weight.device, attn.v_compress.weight.dtype
        attn.v_compress.weight.copy_(u.T.to(dev, dt))
        attn.v_restore.weight.copy_(u.to(dev, dt))
        if attn.v_compress.bias is not None:
            attn.v_compress.bias.copy_((-(u.T @ b_v)).to(dev, dt))
        if attn.v_restore.bias is not None:
            attn.v_restore.bias.copy_(b_v.to(dev, dt))
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    # Fraction of variance kept: 1 - E||V - V_r||^2 / E||V - mu||^2 with the fitted pair,
    # V_r = w_r (w_c V + b_c) + b_r, so V - V_r = A V - w_r b_c - b_r with A = I - w_r w_c.
    w_c, w_r = attn.v_compress.weight.double(), attn.v_restore.weight.double()
    zeros = torch.zeros
    b_c = (attn.v_compress.bias.double() if attn.v_compress.bias is not None
           else zeros(w_c.shape[0], dtype=torch.float64, device=w_c.device))
    b_r = (attn.v_restore.bias.double() if attn.v_restore.bias is not None
           else zeros(w_r.shape[0], dtype=torch.float64, device=w_r.device))
    a = torch.eye(w_r.shape[0], dtype=torch.float64, device=w_r.device) - w_r @ w_c
    offset = a @ mean_v - w_r @ b_c - b_r
    err = float(torch.trace(a @ cov_v @ a.T) + offset @ offset)
    total = float(torch.trace(cov_v))
    return 1.0 - err / total if total > 0 else 1.0


def _complete_basis(u: torch.Tensor, rank: int) -> torch.Tensor:
    rows = u.shape[0]
    extra = torch.randn(rows, rank - u.shape[1], dtype=u.dtype, device=u.device,
                        generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.cat((u, extra), 1))
    return q[:, :rank]


@torch.no_grad()
def init_v_projection_(model: VDProjForCausalLM, calibration_ids: Optional[torch.Tensor],
                       init: str = "pca", batch_size: int = 8) -> list:
    """Initialise every layer's v_compress/v_restore by `init` (see the module docstring).

    calibration_ids: LongTensor (N, T). Layers are fitted in order; layer l's inputs come
    from layers < l already compressed. Returns per layer the fraction of V's variance kept
    (an empty list for init="random").
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if model.config.v_rank is None:
        raise ValueError("model has no v_compress/v_restore (config.v_rank is None)")
    if init == "random":
        return []
    ids = _check_calibration_ids(calibration_ids, model.config.vocab_size, init)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cfg = model.config
    t = ids.shape[1]
    cos, sin = rotary_cos_sin(torch.arange(t, device=device), cfg.rotary_ndims,
                              cfg.rotary_base)
    cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    hs = [model.gpt_neox.embed_in(chunk.to(device)) for chunk in ids.split(batch_size)]
    kept = []
    for layer in model.gpt_neox.layers:
        xs = [layer.input_layernorm(h) for h in hs]
        kept.append(_fit_layer_(layer.attention, xs, init))
        hs = [layer(h, cos, sin)[0] for h in hs]
    model.train(was_training)
    return kept


def _check_calibration_ids(ids, vocab_size, init):
    if ids is None:
        raise ValueError(f"init={init!r} needs calibration_ids, a LongTensor (N, T) of token "
                         f"ids of calibration text (or use init='random')")
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration_ids must be a non-empty (N, T) tensor, got shape "
                         f"{tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"calibration_ids must hold integer token ids, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"calibration_ids must lie in [0, vocab_size={vocab_size}), got "
                         f"values in [{lo}, {hi}]")
    return ids.long()


# ---------------------------------------------------------------------------------------------
# The entry point


def from_gpt_neox(path: Union[str, os.PathLike], *, v_rank: Optional[int] = None,
                  init: str = "pca", calibration_ids: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None, device=None,
                  calibration_batch_size: int = 8) -> VDProjForCausalLM:
    """Load a Hugging Face GPT-NeoX checkpoint folder into VDProjForCausalLM.

    v_rank=None keeps the model uncompressed (its logits equal the original's). Otherwise
    v_compress/v_restore (rank v_rank <= hidden_size) are initialised by `init` ("pca",
    "whitened_svd" or "random"; the first two need calibration_ids, a LongTensor (N, T)).
    Calibration runs in float32; the model is then cast to `dtype` (default float32) and
    moved to `device` (default CPU). The per-layer fraction of V variance kept is stored as
    model.calibration_kept.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    hf = read_gpt_neox_config(path)
    config = config_from_gpt_neox(hf, v_rank)
    if v_rank is not None and init != "random":
        calibration_ids = _check_calibration_ids(calibration_ids, config.vocab_size, init)
    hf_state = load_gpt_neox_state_dict(path)
    model = VDProjForCausalLM(config, init_seed=0)
    state = _map_state_dict(hf_state, model, bool(hf.get("tie_word_embeddings", False)))
    # Weights are loaded in float32 whatever the checkpoint's dtype (Pythia ships fp16).
    state = {k: v.to(torch.float32) for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    if hf.get("tie_word_embeddings", False):
        model.embed_out.weight = model.gpt_neox.embed_in.weight  # shared, as in the original
    if device is not None:
        model.to(device)
    model.eval()
    model.calibration_kept = []
    if v_rank is not None:
        model.calibration_kept = init_v_projection_(model, calibration_ids, init,
                                                    calibration_batch_size)
    if dtype is not None:
        model.to(dtype)
    return model
