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

Parameter counts of the "pythia-70m" preset (see VDProjConfig.param_counts):
    without V-DProj (v_rank=None): 70,426,624 -- exactly Pythia-70m (vocab 50304, untied).
    V-DProj projections:            1,971,072 = 6 x (512*320+320 + 320*512+512).
    with V-DProj (v_rank=320):     72,397,696 = 70,426,624 + 1,971,072.
The reference experiment reports 72,391,552, which is 6,144 = 6 x 1,024 fewer than ours. Its
model code is not available; 1,024 per layer is what one 512-wide LayerNorm (weight + bias) or
two 512-wide bias vectors per layer would account for (for example a value projection whose
bias was dropped when V-DProj replaced it, plus the output bias), so its layer differs from
GPT-NeoX's in some such detail. Ours keeps every GPT-NeoX parameter, so that a Pythia
checkpoint loads unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import compressed_v_attention, decode_linear

__all__ = ["VDProjConfig", "CompressedVAttention", "VDProjForCausalLM", "CausalLMOutput"]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class VDProjConfig:
    vocab_size: int = 50304
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_positions: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    v_rank: Optional[int] = 320          # None: plain uncompressed baseline
    attention_bias: bool = True          # bias of query_key_value and dense
    v_bias: bool = True                  # bias of v_compress and v_restore
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.v_rank is not None and not (0 < self.v_rank):
            raise ValueError(f"v_rank must be a positive int or None, got {self.v_rank}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must lie in [0, 1], got {self.rotary_pct}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def replace(self, **changes) -> "VDProjConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VDProjConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    PRESETS = ("pythia-70m", "cpu-small", "smoke")

    @classmethod
    def preset(cls, name: str, **overrides) -> "VDProjConfig":
        """Named shapes. Every preset keeps R = 0.625 * H * D, the reference ratio."""
        if name == "pythia-70m":  # the reference shape: Pythia-70m plus 512 -> 320 -> 512
            cfg = cls()
        elif name == "cpu-small":  # the default main job on a 2-core CPU (vocab: small BPE)
            cfg = cls(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4,
                      intermediate_size=512, max_positions=512, v_rank=80)
        elif name == "smoke":  # CI: seconds per run
            cfg = cls(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, rotary_pct=0.5, max_positions=256, v_rank=20)
        else:
            raise ValueError(f"unknown preset {name!r}; known presets: {cls.PRESETS}")
        return cfg.replace(**overrides) if overrides else cfg

    # ---- sizes, computed without building the model
    def param_counts(self) -> dict:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        ab = 1 if self.attention_bias else 0
        per_layer = (4 * h                       # two LayerNorms
                     + h * 3 * h + 3 * h * ab    # query_key_value
                     + h * h + h * ab            # dense
                     + h * i + i + i * h + h)    # MLP
        base = 2 * v * h + self.num_layers * per_layer + 2 * h
        vproj = 0
        if self.v_rank is not None:
            r, vb = self.v_rank, 1 if self.v_bias else 0
            vproj = self.num_layers * (h * r + r * vb + r * h + h * vb)
        return {"total": base + vproj, "v_projection": vproj, "without_v_projection": base}

    @property
    def kv_cache_reduction(self) -> float:
        """Fraction of KV-cache values saved: each token and layer stores H*D keys and R
        compressed values instead of 2*H*D."""
        if self.v_rank is None:
            return 0.0
        hd = self.hidden_size
        return 1.0 - (hd + self.v_rank) / (2 * hd)


# ---------------------------------------------------------------------------------------------
# Rotary embedding (GPT-NeoX style: rotate_half on the first rotary_ndims of each head)


def rotary_cos_sin(positions: torch.Tensor, rotary_ndims: int, base: float):
    """cos, sin of shape positions.shape + (1, rotary_ndims), in float32.

    inv_freq is recomputed here (it is tiny) instead of kept as a buffer, so that casting the
    model to bf16 never rounds it.
    """
    exponent = torch.arange(0, rotary_ndims, 2, device=positions.device,
                            dtype=torch.int64).float() / rotary_ndims
    inv_freq = 1.0 / (base ** exponent)
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # broadcast over heads
    return emb.cos(), emb.sin()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); rotates the first cos.shape[-1] dims, passes the rest through."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is vdproj_ext.decode_linear:
    the streaming CPU kernel for decode-sized inputs without grad, F.linear for everything else.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


class CompressedVAttention(nn.Module):
    """GPT-NeoX attention whose value path is v_compress -> (cache) -> v_restore.

    With v_rank=None it is GPT-NeoX's plain attention (no v_compress / v_restore).
    Training and uncached forward passes call vdproj_ext.compressed_v_attention (restore on
    read inside the op); cached passes hand q, k, v to the cache object, which calls
    vdproj_ext.compressed_attn_with_kvcache (compress on write, restore on read).
    """

    def __init__(self, hidden_size: int, num_heads: int, v_rank: Optional[int] = None,
                 rotary_pct: float = 0.25, rotary_base: float = 10000.0,
                 max_positions: int = 2048, bias: bool = True, v_bias: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                             f"({num_heads})")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.v_rank = v_rank
        self.rotary_ndims = int(self.head_dim * rotary_pct)
        self.rotary_base = rotary_base
        self.max_positions = max_positions
        self.backend = "auto"  # passed to the functional ops; tests force "reference"
        self.query_key_value = Linear(hidden_size, 3 * hidden_size, bias=bias)
        if v_rank is not None:
            self.v_compress = Linear(hidden_size, v_rank, bias=v_bias)
            self.v_restore = Linear(v_rank, hidden_size, bias=v_bias)
        self.dense = Linear(hidden_size, hidden_size, bias=bias)

    @property
    def compressed(self) -> bool:
        return self.v_rank is not None

    def project_qkv(self, x, cos, sin):
        """x (B, T, H*D) -> q, k (B, T, H, D) with rotary applied, v (B, T, H*D)."""
        b, t, _ = x.shape
        # GPT-NeoX's fused layout: per head, [q | k | v] along the last dim.
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3 * self.head_dim)
        d = self.head_dim
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v.reshape(b, t, self.hidden_size)

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, want_recon: bool = False):
        """Returns (out (B, T, H*D), recon) where recon is mean((V - V_restored)^2) in float32
        when want_recon and the layer is compressed, else None."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        recon = None
        if cache is not None:
            o = cache.attend(layer_idx, q, k, v, self)
        elif self.compressed:
            v_c = self.v_compress(v)
            dt = v_c.dtype  # under autocast the parameters stay fp32: give the op one dtype
            w_r = self.v_restore.weight.to(dt)
            b_r = self.v_restore.bias.to(dt) if self.v_restore.bias is not None else None
            o = compressed_v_attention(q.to(dt), k.to(dt), v_c, w_r, b_r, causal=True,
                                       backend=self.backend)
            if want_recon:
                recon = F.mse_loss(self.v_restore(v_c).float(), v.float())
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2),
                v.view(b, t, self.num_heads, self.head_dim).transpose(1, 2),
                is_causal=True).transpose(1, 2)
        return self.dense(o.reshape(b, t, self.hidden_size).to(x.dtype)), recon

    @torch.no_grad()
    def set_pca_(self, mean: torch.Tensor, components: torch.Tensor):
        """v_compress/v_restore := the rank-R PCA autoencoder of V (components (H*D, R),
        orthonormal columns): V_c = U^T (V - mean), V_r = U V_c + mean."""
        if not self.compressed:
            raise ValueError("set_pca_ needs a compressed layer (v_rank set)")
        u = components.to(self.v_compress.weight)
        mu = mean.to(self.v_compress.weight)
        self.v_compress.weight.copy_(u.T)
        self.v_restore.weight.copy_(u)
        if self.v_compress.bias is None or self.v_restore.bias is None:
            raise ValueError("PCA initialisation needs v_bias=True (it centres by the mean)")
        self.v_compress.bias.copy_(-(u.T @ mu))
        self.v_restore.bias.copy_(mu)


# ---------------------------------------------------------------------------------------------
# Transformer


class GPTNeoXMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.dense_h_to_4h = Linear(hidden_size, intermediate_size)
        self.dense_4h_to_h = Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: VDProjConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layer_norm_eps)
        self.attention = CompressedVAttention(
            config.hidden_size, config.num_heads, config.v_rank, config.rotary_pct,
            config.rotary_base, config.max_positions, config.attention_bias, config.v_bias)
        self.mlp = GPTNeoXMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None, layer_idx=0, want_recon=False):
        attn, recon = self.attention(self.input_layernorm(x), cos, sin, cache, layer_idx,
                                     want_recon)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x)), recon
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), recon


class GPTNeoXModel(nn.Module):
    def __init__(self, config: VDProjConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


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
        return [p for n, p in self.named_parameters() if _is_vproj(n)]

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
            if _is_vproj(name):
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

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] * x.shape[1]
        if (x.device.type == "cpu" and 16 < rows <= 64 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            # Up to 16 rows embed_out runs the decode_linear kernel. Up to 64, W @ x.T runs the
            # (vocab x hidden) GEMM with the weight as the long, untransposed operand, which CPU
            # BLAS does ~20% faster than x @ W.T.
            flat = x.reshape(rows, x.shape[-1])
            return (self.embed_out.weight @ flat.T).T.reshape(*x.shape[:-1], -1)
        return self.embed_out(x)

    # ---- forward
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
        cfg = self.config
        if cache is not None:
            positions = cache.seqlens.to(input_ids.device, torch.long).unsqueeze(1) + \
                torch.arange(t, device=input_ids.device)
        else:
            positions = torch.arange(t, device=input_ids.device)
        cos, sin = rotary_cos_sin(positions, cfg.rotary_ndims, cfg.rotary_base)
        if cos.dim() == 3:  # (T, 1, rot) -> (1, T, 1, rot)
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)

        x = self.gpt_neox.embed_in(input_ids)
        recons = []
        for idx, layer in enumerate(self.gpt_neox.layers):
            x, recon = layer(x, cos, sin, cache, idx, return_recon)
            if recon is not None:
                recons.append(recon)
        if cache is not None:
            cache.advance(t)
        x = self.gpt_neox.final_layer_norm(x)

        out = CausalLMOutput(hidden_states=x)
        if return_recon and recons:
            out.layer_recon = recons
            out.recon_loss = torch.stack(recons).mean()
        if skip_logits:
            return out
        out.logits = self._lm_head(x)
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
        cfg = self.config
        cos, sin = rotary_cos_sin(torch.arange(input_ids.shape[1], device=input_ids.device),
                                  cfg.rotary_ndims, cfg.rotary_base)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        x = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers[:layer_idx]:
            x, _ = layer(x, cos, sin)
        layer = self.gpt_neox.layers[layer_idx]
        return layer.attention.project_qkv(layer.input_layernorm(x), cos, sin)[2]

    @torch.no_grad()
    def fit_v_pca_(self, batches, show_progress: bool = False, reduce_fn=None) -> List[float]:
        """Closed-form phase 1: set each layer's v_compress/v_restore to the mean-centred
        rank-R PCA of its V, layer by layer (layer l sees layers < l already compressed).

        batches: a callable returning a fresh iterable of input_ids (one pass per layer).
        reduce_fn: optional hook summing the statistics across processes (DDP).
        Returns, per layer, the fraction of V's variance the R components keep.
        """
        kept = []
        for idx, attn in enumerate(self.attention_modules()):
            if not attn.compressed:
                continue
            hd = attn.hidden_size
            dev = next(self.parameters()).device
            s1 = torch.zeros(hd, dtype=torch.float64, device=dev)
            s2 = torch.zeros(hd, hd, dtype=torch.float64, device=dev)
            n = torch.zeros((), dtype=torch.float64, device=dev)
            it = batches()
            if show_progress:
                try:
                    from tqdm.auto import tqdm
                    it = tqdm(it, desc=f"pca layer {idx}", leave=False)
                except ImportError:
                    pass
            for ids in it:
                v = self.layer_values(ids, idx).reshape(-1, hd).double()
                s1 += v.sum(0)
                s2 += v.T @ v
                n += v.shape[0]
            if reduce_fn is not None:
                s1, s2, n = reduce_fn(s1), reduce_fn(s2), reduce_fn(n)
            mean = s1 / n
            cov = s2 / n - torch.outer(mean, mean)
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            order = torch.argsort(evals, descending=True)[:attn.v_rank]
            components = evecs[:, order]
            if components.shape[1] < attn.v_rank:  # v_rank > H*D: pad with zero columns
                pad = components.new_zeros(hd, attn.v_rank - components.shape[1])
                components = torch.cat((components, pad), 1)
            attn.set_pca_(mean.float(), components.float())
            total = evals.clamp_min(0).sum()
            kept.append(float(evals[order].clamp_min(0).sum() / total) if total > 0 else 1.0)
        return kept

    # ---- inference
    def new_cache(self, batch_size: int, max_len: int, dtype=None):
        """An empty KV cache: CompressedKVCache when v_rank is set, else KVCache."""
        from . import cache as cache_mod
        cfg = self.config
        param = next(self.parameters())
        dtype = dtype or param.dtype
        if cfg.v_rank is not None:
            return cache_mod.CompressedKVCache(cfg.num_layers, batch_size, max_len,
                                               cfg.num_heads, cfg.head_dim, cfg.v_rank,
                                               dtype=dtype, device=param.device)
        return cache_mod.KVCache(cfg.num_layers, batch_size, max_len, cfg.num_heads,
                                 cfg.head_dim, dtype=dtype, device=param.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                 pad_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prompt followed by max_new_tokens generated tokens (greedy when temperature == 0).

        attention_mask (B, T), 1 on real tokens, lets prompts of different lengths share a
        batch, left or right padded. The real tokens are prefilled right-padded; the cache's
        seqlens are then set to the true lengths, so padding is never attended and is
        overwritten by the generated tokens. Sequences that emitted eos_token_id keep emitting
        pad_token_id (default: eos_token_id). The result keeps the caller's layout: appended
        after a left-padded (or unpadded) prompt, or after each real prompt with the padding
        moved to the end for right padding.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with T >= 1, got {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        b, t = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(dev).bool()
        lengths = mask.sum(1)
        if int(lengths.min()) < 1:
            raise ValueError("every sequence needs at least one real token in attention_mask")
        pad = pad_token_id if pad_token_id is not None else (
            eos_token_id if eos_token_id is not None else 0)
        left_layout = bool(mask[:, -1].all())
        # Real tokens, right-padded (stable sort keeps their order).
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        packed = torch.gather(input_ids, 1, order)
        packed = torch.where(torch.arange(t, device=dev) < lengths[:, None], packed,
                             torch.full_like(packed, pad))

        def pick(logits):
            logits = logits.float()
            if temperature == 0:
                return logits.argmax(-1)
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

        gen = torch.full((b, max_new_tokens), pad, dtype=input_ids.dtype, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        rows = torch.arange(b, device=dev)
        if max_new_tokens > 0:
            if use_cache:
                cache = self.new_cache(b, t + max_new_tokens)
                logits = self(packed, cache=cache).logits
                cache.seqlens.copy_(lengths.to(cache.seqlens))
            else:
                logits = self(packed).logits
            last = logits[rows, lengths - 1]
            for step in range(max_new_tokens):
                tok = pick(last)
                if eos_token_id is not None:
                    tok = torch.where(done, torch.full_like(tok, pad), tok)
                    done |= tok == eos_token_id
                gen[:, step] = tok
                if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                    break
                if use_cache:
                    last = self(tok[:, None], cache=cache).logits[:, -1]
                else:  # recompute everything (reference path for tests)
                    seq = torch.full((b, t + step + 1), pad, dtype=input_ids.dtype, device=dev)
                    seq[:, :t] = packed
                    cols = lengths[:, None] + torch.arange(step + 1, device=dev)
                    seq.scatter_(1, cols, gen[:, :step + 1])
                    last = self(seq).logits[rows, lengths + step]
        if left_layout:
            return torch.cat((input_ids, gen), 1)
        out = torch.full((b, t + max_new_tokens), pad, dtype=input_ids.dtype, device=dev)
        out[:, :t] = packed
        cols = lengths[:, None] + torch.arange(max_new_tokens, device=dev)
        out.scatter_(1, cols, gen)
        return out

    # ---- loading
    @classmethod
    def from_gpt_neox(cls, path, *, v_rank=None, init="pca", calibration_ids=None, **kwargs):
        """Load a Hugging Face GPT-NeoX checkpoint folder (see vdproj_ext.convert)."""
        from .convert import from_gpt_neox
        return from_gpt_neox(path, v_rank=v_rank, init=init, calibration_ids=calibration_ids,
                             **kwargs)


def _is_vproj(name: str) -> bool:
    return ".v_compress." in name or ".v_restore." in name
