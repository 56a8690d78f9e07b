"""VDProjConfig: the shape of a GPT-NeoX model and of its V-DProj value projection.

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
from typing import Optional


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

    def param_counts(self) -> dict:
        """Parameter counts of the model this config builds, without building it."""
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
