"""A minimal GPT-NeoX (Pythia-style) causal language model with V-DProj attention.

Module names and tensor layouts follow Hugging Face's GPTNeoXForCausalLM exactly, so its state
dict maps 1:1 onto ours; V-DProj adds two Linear layers per attention block:

    gpt_neox.embed_in                              Embedding(vocab, H*D)
    gpt_neox.layers.N.input_layernorm              LayerNorm before attention
    gpt_neox.layers.N.post_attention_layernorm     LayerNorm before the MLP
    gpt_neox.layers.N.attention.query_key_value    Linear(H*D, 3*H*D), per-head interleaved
    gpt_neox.layers.N.attention.v_compress         Linear(H*D, R)   (V-DProj only)
    gpt_neox.layers.N.attention.v_restore          Linear(R, H*D)   (V-DProj only)
    gpt_neox.layers.N.attention.dense              Linear(H*D, H*D)
    gpt_neox.layers.N.mlp.dense_h_to_4h / dense_4h_to_h
    gpt_neox.final_layer_norm
    embed_out                                      Linear(H*D, vocab, bias=False), untied
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import generation
from .cache import CompressedKVCache, KVCache
from .config import VDProjConfig
from .layers import CompressedVAttention, GPTNeoXLayer, Linear, is_v_projection, rotary_cos_sin


class GPTNeoXModel(nn.Module):
    """The transformer trunk: embedding, layers, final LayerNorm."""

    def __init__(self, config: VDProjConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, cos, sin, cache=None, want_recon: bool = False):
        """Final hidden states (B, T, H*D) and the compressed layers' reconstruction losses
        (empty unless want_recon)."""
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
    recon_loss: Optional[torch.Tensor] = None    # mean over layers of mean (V - V_r)^2
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
        return [p for n, p in self.named_parameters() if is_v_projection(n)]

    def num_parameters(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        vproj = sum(p.numel() for p in self.v_projection_parameters())
        return {"total": total, "v_projection": vproj, "without_v_projection": total - vproj}

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
            if is_v_projection(name):
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
        """v_compress/v_restore := a random orthogonal projection pair (see init_weights)."""
        gen_v = torch.Generator().manual_seed(int(seed) + 1_000_003)
        for attn in self.attention_modules():
            if not attn.compressed:
                continue
            hd, r = attn.hidden_size, attn.v_rank
            a = torch.randn(max(hd, r), min(hd, r), generator=gen_v, dtype=torch.float64)
            qmat, _ = torch.linalg.qr(a)  # orthonormal columns
            w_r = qmat if hd >= r else qmat.T  # (hd, r)
            attn.v_restore.weight.copy_(w_r.to(attn.v_restore.weight))
            attn.v_compress.weight.copy_(w_r.T.to(attn.v_compress.weight))
            for lin in (attn.v_compress, attn.v_restore):
                if lin.bias is not None:
                    lin.bias.zero_()

    # ---- forward
    def _rotary(self, positions: torch.Tensor):
        """cos, sin for positions (B or 1, T), shared by all layers."""
        return rotary_cos_sin(positions, self.config.rotary_ndims, self.config.rotary_base)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache=None, *, return_recon: bool = False, skip_logits: bool = False,
                loss_reduction: str = "mean") -> CausalLMOutput:
        """input_ids (B, T). labels (B, T): the loss is next-token cross-entropy of
        logits[:, :-1] against labels[:, 1:], ignoring -100 (loss_reduction "mean", or "none"
        for the per-token (B, T-1) losses). With a cache the T tokens are appended at
        cache.seqlens (rotary positions seqlens[b] + arange(T)) and the cache advances by T.
        return_recon adds the V reconstruction loss (phase 1), skip_logits skips the LM head.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (B, T), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if cache is not None:
            positions = cache.new_token_positions(t).to(input_ids.device)
        else:
            positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
        cos, sin = self._rotary(positions)
        x, recons = self.gpt_neox(input_ids, cos, sin, cache, return_recon)
        if cache is not None:
            cache.advance(t)

        out = CausalLMOutput(hidden_states=x)
        if return_recon and recons:
            out.layer_recon = recons
            out.recon_loss = torch.stack(recons).mean()
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
    def layer_values(self, input_ids: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """V (B, T, H*D) of layer `layer_idx`, the layers before it running as they are."""
        cos, sin = self._rotary(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        x = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers[:layer_idx]:
            x, _ = layer(x, cos, sin)
        layer = self.gpt_neox.layers[layer_idx]
        return layer.attention.project_qkv(layer.input_layernorm(x), cos, sin)[2]

    # ---- inference
    def new_cache(self, batch_size: int, max_len: int, dtype=None):
        """An empty KV cache: CompressedKVCache when v_rank is set, else KVCache."""
        cfg = self.config
        param = next(self.parameters())
        dtype = dtype or param.dtype
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_heads, cfg.head_dim)
        if cfg.v_rank is not None:
            return CompressedKVCache(*shape, cfg.v_rank, dtype=dtype, device=param.device)
        return KVCache(*shape, dtype=dtype, device=param.device)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 pad_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prompt followed by max_new_tokens generated tokens (see models/generation.py)."""
        return generation.generate(
            self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
            eos_token_id=eos_token_id, attention_mask=attention_mask, pad_token_id=pad_token_id,
            use_cache=use_cache, generator=generator)

    # ---- loading
    @classmethod
    def from_gpt_neox(cls, path, *, v_rank=None, init="pca", calibration_ids=None, **kwargs):
        """Load a Hugging Face GPT-NeoX checkpoint folder (see models/convert.py)."""
        # The one import cycle of the package, by design (SPEC section 4 puts this entry point
        # on the class): convert.py builds a VDProjForCausalLM, so it is imported on call.
        from .convert import from_gpt_neox
        return from_gpt_neox(path, v_rank=v_rank, init=init, calibration_ids=calibration_ids,
                             **kwargs)
