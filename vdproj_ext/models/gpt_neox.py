"""A minimal GPT-NeoX (Pythia-style) causal language model with V-DProj attention.

Module names and tensor layouts follow Hugging Face's GPTNeoXForCausalLM exactly, so its state
dict maps 1:1 onto ours; V-DProj adds two Linear layers per attention block:

    gpt_neox.embed_in                              Embedding(vocab, H*D)
    gpt_neox.layers.N.input_layernorm              LayerNorm before attention
    gpt_neox.layers.N.post_attention_layernorm     LayerNorm before the MLP
    gpt_neox.layers.N.attention.query_key_value    Linear(H*D, 3*H*D), per-head interleaved
    gpt_neox.layers.N.attention.v_compress         Linear(H*D, R)   (V-DProj only)
    gpt_neox.layers.N.attention.v_restore          Linear(R, H*D)   (V-DProj only)
    gpt_neox.layers.N.attention.k_compress         Linear(H*Dn, Rk) (latent keys, separate)
    gpt_neox.layers.N.attention.k_restore          Linear(Rk, H*Dn) (latent keys)
    gpt_neox.layers.N.attention.dense              Linear(H*D, H*D)
    gpt_neox.layers.N.mlp.dense_h_to_4h / dense_4h_to_h
    gpt_neox.final_layer_norm
    embed_out                                      Linear(H*D, vocab, bias=False), untied
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import generation
from .cache import CompressedKVCache, KVCache, LatentKVCache, check_cache_dtype
from .config import VDProjConfig
from .folding import fold_v_compress
from .layers import (CompressedVAttention, GPTNeoXLayer, Linear, is_projection_pair,
                     rotary_cos_sin)


class GPTNeoXModel(nn.Module):
    """The transformer trunk: embedding, layers, final LayerNorm."""

    def __init__(self, config: VDProjConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, cos, sin, cache=None, want_recon: bool = False):
        """Final hidden states (B, T, H*D) and the compressed layers' reconstruction losses,
        one dict per layer (empty unless want_recon)."""
        x = self.embed_in(input_ids)
        recons = []
        for idx, layer in enumerate(self.layers):
            x, recon = layer(x, cos, sin, cache, idx, want_recon)
            if recon is not None:
                recons.append(recon)
        return self.final_layer_norm(x), recons


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor] = None        # (B, T, vocab); None with skip_logits
    loss: Optional[torch.Tensor] = None          # shifted next-token CE; None without labels
    # With return_recon (phase 1): recon_losses {"v": mean over layers of mean (V - V_r)^2,
    # and with latent keys "k": the same for k_nope}; recon_loss the mean of all pair losses
    # (= recon_losses["v"] for a V-only model); layer_recon per layer the mean of its pairs.
    recon_loss: Optional[torch.Tensor] = None
    recon_losses: Optional[Dict[str, torch.Tensor]] = None
    layer_recon: Optional[List[torch.Tensor]] = None
    hidden_states: Optional[torch.Tensor] = None  # final hidden states (after final LN)


class VDProjForCausalLM(nn.Module):
    """GPT-NeoX causal LM; V-DProj attention when config.v_rank is set."""

    def __init__(self, config: VDProjConfig, init_seed: Optional[int] = 0):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)
        if init_seed is not None:
            self.init_weights(init_seed)

    # ---- parameters
    def attention_modules(self) -> List[CompressedVAttention]:
        return [layer.attention for layer in self.gpt_neox.layers]

    def v_projection_parameters(self) -> List[nn.Parameter]:
        """Every compress/restore pair's parameters: v_compress, v_restore and, with latent
        keys, k_compress and k_restore (phase 1 trains them, phase 2 freezes them)."""
        return [p for n, p in self.named_parameters() if is_projection_pair(n)]

    def num_parameters(self) -> dict:
        """Keys as in config.param_counts(): "v_projection" counts every pair, "k_projection"
        the keys' share (k_compress, k_restore, and v_compress's k_nope columns if joint)."""
        total = sum(p.numel() for p in self.parameters())
        vproj = sum(p.numel() for p in self.v_projection_parameters())
        kproj = sum(p.numel() for n, p in self.named_parameters()
                    if ".k_compress." in n or ".k_restore." in n)
        if self.config.joint_kv:
            kproj += sum(a.v_compress.weight[:, :a.k_restore.out_features].numel()
                         for a in self.attention_modules())
        return {"total": total, "v_projection": vproj, "k_projection": kproj,
                "without_v_projection": total - vproj}

    def set_backend(self, backend: str):
        """Backend for the functional ops ("auto", "ext" or "reference")."""
        for attn in self.attention_modules():
            attn.backend = backend
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Deterministic init, independent of the global RNG and of the device.

        The GPT-NeoX parameters are drawn first, in name order, from one generator, and the
        V-DProj pair from a second one, so a baseline and a compressed model built with the
        same seed start from identical shared weights. Linear/embedding weights ~ N(0, 0.02),
        biases 0, LayerNorm 1/0 (Hugging Face's GPT-NeoX init). v_compress/v_restore start as
        a random orthogonal projection pair (w_r = w_c^T with orthonormal rows of w_c), so the
        value path starts as a projection onto a random R-dim subspace rather than ~0.
        """
        if any(p.is_meta for p in self.parameters()):
            return
        gen = torch.Generator().manual_seed(int(seed))
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if is_projection_pair(name):
                continue
            if "layernorm" in name or "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))
        self.init_weights_vproj_(seed)

    @torch.no_grad()
    def init_weights_vproj_(self, seed: int = 0):
        """Every compress/restore pair := a random orthogonal projection pair (see
        init_weights). The key pairs draw from a generator of their own, so a V-only and a
        latent-key model of one seed start with the same value pair (a joint latent, whose
        restore rows are [k_restore; v_restore], draws from the values' generator)."""
        gen_v = torch.Generator().manual_seed(int(seed) + 1_000_003)
        gen_k = torch.Generator().manual_seed(int(seed) + 2_000_003)
        for attn in self.attention_modules():
            if not attn.compressed:
                continue
            restores = [attn.k_restore, attn.v_restore] if attn.joint_kv else [attn.v_restore]
            _orthogonal_pair_(attn.v_compress, restores, gen_v)
            if attn.k_rank is not None:
                _orthogonal_pair_(attn.k_compress, [attn.k_restore], gen_k)

    # ---- forward
    def _rotary(self, positions: torch.Tensor):
        """cos, sin for positions (B or 1, T), shared by all layers."""
        return rotary_cos_sin(positions, self.config.rotary_ndims, self.config.rotary_base)

    def _check_cache(self, cache, batch: int) -> None:
        """The cache's batch and layer count (its layout is checked by each layer)."""
        if not isinstance(cache, (KVCache, CompressedKVCache, LatentKVCache)):
            raise TypeError(f"cache must be a cache from model.new_cache(...), got "
                            f"{type(cache).__name__}")
        if cache.batch_size != batch or cache.num_layers != self.config.num_layers:
            raise ValueError(
                f"cache holds batch_size={cache.batch_size} sequences of "
                f"num_layers={cache.num_layers} layers, but input_ids has {batch} rows and the "
                f"model {self.config.num_layers} layers; create the cache with "
                f"model.new_cache({batch}, max_len)")

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache=None, *, return_recon: bool = False, skip_logits: bool = False,
                loss_reduction: str = "mean") -> CausalLMOutput:
        """input_ids (B, T). labels (B, T): the loss is next-token cross-entropy of
        logits[:, :-1] against labels[:, 1:], ignoring -100 (loss_reduction "mean", or "none"
        for the per-token (B, T-1) losses). With a cache the T tokens are appended at
        cache.seqlens (rotary positions seqlens[b] + arange(T)) and the cache advances by T.
        return_recon adds the reconstruction losses of the pairs (phase 1; see CausalLMOutput),
        skip_logits skips the LM head.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (B, T), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if cache is not None:
            self._check_cache(cache, b)
            positions = cache.new_token_positions(t).to(input_ids.device)
        else:
            positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
        cos, sin = self._rotary(positions)
        x, recons = self.gpt_neox(input_ids, cos, sin, cache, return_recon)
        if cache is not None:
            cache.advance(t)

        out = CausalLMOutput(hidden_states=x)
        if return_recon and recons:
            out.layer_recon = [torch.stack(list(r.values())).mean() for r in recons]
            out.recon_losses = {name: torch.stack([r[name] for r in recons]).mean()
                                for name in sorted(recons[0])}
            out.recon_loss = torch.stack(out.layer_recon).mean()
        if skip_logits:
            return out
        out.logits = self.embed_out(x)
        if labels is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=-100, reduction=loss_reduction)
            out.loss = loss.view(b, t - 1) if loss_reduction == "none" else loss
        return out

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """What the attention of layer `layer_idx` reads (its input LayerNorm's output,
        (B, T, H*D)), the layers before it running as they are."""
        cos, sin = self._rotary(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        x = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers[:layer_idx]:
            x, _ = layer(x, cos, sin)
        return self.gpt_neox.layers[layer_idx].input_layernorm(x)

    @torch.no_grad()
    def layer_values(self, input_ids: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """V (B, T, H*D) of layer `layer_idx`, the layers before it running as they are."""
        x = self.layer_inputs(input_ids, layer_idx)
        cos, sin = self._rotary(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        return self.gpt_neox.layers[layer_idx].attention.project_qkv(x, cos, sin)[2]

    # ---- inference
    def new_cache(self, batch_size: int, max_len: int, dtype=None, cache_dtype=None):
        """An empty KV cache: LatentKVCache with latent keys, CompressedKVCache when only
        v_rank is set, else KVCache. dtype: of the cached values, and of what a quantized
        cache dequantizes to (default: the model's). Only the uncompressed KVCache takes a
        dtype other than the model's (it casts its rows back to the model's dtype before
        SDPA); the compressed caches' fused ops need the model's dtype, so they raise a
        ValueError for any other (to store them smaller, use cache_dtype). cache_dtype: None
        (stored in dtype), or torch.int8 / torch.float8_e4m3fn: every cache tensor quantized
        with float32 per-row scales (SPEC 3c; cache.py). The uncompressed KVCache
        dequantizes before SDPA (unfused, a baseline); the compressed caches dequantize
        inside the attention."""
        check_cache_dtype(cache_dtype)
        cfg = self.config
        param = next(self.parameters())
        dtype = dtype or param.dtype
        if cfg.v_rank is not None and dtype != param.dtype:
            raise ValueError(
                f"new_cache(dtype={dtype}): a compressed model's cache must be in the model's "
                f"dtype {param.dtype} (its fused attention ops read it directly); leave dtype "
                f"out, convert the model with model.to({dtype}), or store the cache smaller "
                f"with cache_dtype=torch.int8 or torch.float8_e4m3fn")
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_heads, cfg.head_dim)
        common = dict(dtype=dtype, device=param.device, cache_dtype=cache_dtype)
        if cfg.latent_keys:
            return LatentKVCache(*shape, cfg.v_rank, rope_dims=cfg.rope_dims,
                                 k_rank=cfg.k_rank, **common)
        if cfg.v_rank is not None:
            return CompressedKVCache(*shape, cfg.v_rank, **common)
        return KVCache(*shape, **common)

    def prepare_for_inference(self) -> "VDProjForCausalLM":
        """Fold every compress projection into the fused query/key/value projection
        (folding.py: x -> q, rotary keys and the latents in one Linear), in place, and switch
        to eval mode; returns the model itself. Call it once before decoding with generate()
        (bench/bench_decode.py does; generate() itself works on either form and never folds,
        since the model may still be trained): logits are unchanged up to float rounding,
        and decoding never computes V or k_nope. The folded model is for inference: the fused
        Linear replaces query_key_value and the compress projections, so there is no
        reconstruction loss, and LM training would update the fused weight, which nothing
        maps back onto the pair (nor does a folded state_dict load into an unfolded model).
        Train first, then fold. An uncompressed model is only put in eval mode. Idempotent.
        For a folded copy instead, use
        copy.deepcopy(model).prepare_for_inference() (or fold_v_compress(model))."""
        if self.config.v_rank is not None:
            fold_v_compress(self, inplace=True)
        return self.eval()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 pad_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, cache_dtype=None,
                 vocab_limit: Optional[int] = None) -> torch.Tensor:
        """Prompt followed by max_new_tokens generated tokens (see models/generation.py);
        cache_dtype as for new_cache; vocab_limit: only ids below it are generated."""
        return generation.generate(
            self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
            eos_token_id=eos_token_id, attention_mask=attention_mask, pad_token_id=pad_token_id,
            use_cache=use_cache, generator=generator, cache_dtype=cache_dtype,
            vocab_limit=vocab_limit)

    # ---- loading
    @classmethod
    def from_gpt_neox(cls, path, *, v_rank=None, k_rank=None, joint_kv=False, init="pca",
                      calibration_ids=None, **kwargs):
        """Load a Hugging Face GPT-NeoX checkpoint folder (see models/convert.py)."""
        # The one import cycle of the package, by design (SPEC section 4 puts this entry point
        # on the class): convert.py builds a VDProjForCausalLM, so it is imported on call.
        from .convert import from_gpt_neox
        return from_gpt_neox(path, v_rank=v_rank, k_rank=k_rank, joint_kv=joint_kv, init=init,
                             calibration_ids=calibration_ids, **kwargs)


def _orthogonal_pair_(compress: nn.Linear, restores: List[nn.Linear], gen) -> None:
    """compress.weight := Q^T and the restores' stacked weights := Q, for a random Q
    (width, rank) with orthonormal columns (orthonormal rows when rank > width); biases 0."""
    width, rank = compress.in_features, compress.out_features
    a = torch.randn(max(width, rank), min(width, rank), generator=gen, dtype=torch.float64)
    qmat, _ = torch.linalg.qr(a)  # orthonormal columns
    w_r = qmat if width >= rank else qmat.T  # (width, rank)
    compress.weight.copy_(w_r.T.to(compress.weight))
    for lin, rows in zip(restores, w_r.split([r.out_features for r in restores])):
        lin.weight.copy_(rows.to(lin.weight))
    for lin in (compress, *restores):
        if lin.bias is not None:
            lin.bias.zero_()
