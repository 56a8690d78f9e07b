"""VDProjConfig: the shape of a GPT-NeoX model and of its V-DProj value (and key) projections.

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

Latent keys (SPEC 3b): k_rank compresses the non-rotary part of every head's key, k_nope
(H*Dn wide, Dn = head_dim - rope_dims), into one latent of k_rank values per token, and
joint_kv makes the keys share the values' v_rank latent instead. Per token and layer the cache
then holds H*Dr rotary keys + k_rank + v_rank values (joint: H*Dr + v_rank), against 2*H*D
uncompressed. Valid combinations (check_latent_ranks):
    v_rank=None                        uncompressed baseline (k_rank must be None, joint False)
    v_rank=R                           V-DProj: compressed values, full keys
    v_rank=Rv, k_rank=Rk               separate key and value latents
    v_rank=R, joint_kv=True            one latent for both (k_rank must stay None)
Latent keys need at least one non-rotary dimension per head (rotary_pct < 1). A rank above
the width it compresses (hidden_size for v_rank, H*Dn for k_rank, H*Dn + hidden_size for a
joint v_rank) caches more than the dims it replaces: the config warns
(oversized_rank), and the training experiment refuses it.

Dr, the per-head rotary dims kept whole (`rope_dims`), is what rotary actually rotates:
rotary_ndims rounded up to even. GPT-NeoX (here and in transformers) rotates cos.shape[-1] =
2 * ceil(rotary_ndims / 2) dims, so for an odd rotary_ndims (e.g. int(64 * 0.3) = 19) one more
dim than rotary_ndims depends on the position and cannot go into the latent.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
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
    k_rank: Optional[int] = None         # None: uncompressed keys (SPEC 3b)
    joint_kv: bool = False               # True: keys share the v_rank latent

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "intermediate_size", "max_positions"):
            check_positive_int(name, getattr(self, name))
        check_attention_shape(self.hidden_size, self.num_heads, self.rotary_pct,
                              self.rotary_base)
        check_latent_ranks(self.v_rank, self.k_rank, self.joint_kv, self.head_dim,
                           self.rope_dims)
        if self.oversized_rank():  # legal, but rarely meant: the experiment refuses it
            warnings.warn(self.oversized_rank(), stacklevel=3)

    def oversized_rank(self) -> Optional[str]:
        """Why a rank exceeds the width it compresses (None if none does): that latent then
        caches more than the dims it replaces (with v_rank, kv_cache_reduction goes below 0).
        Full rank is fine (exact conversion)."""
        nope = self.num_heads * (self.head_dim - self.rope_dims)
        if self.v_rank is not None:
            width, what = ((self.hidden_size + nope, "[k_nope | v] (H*(D-Dr) + hidden_size)")
                           if self.joint_kv else (self.hidden_size, "hidden_size"))
            if self.v_rank > width:
                return (f"v_rank={self.v_rank} exceeds the {width} dims it compresses "
                        f"({what}): the latent would be wider than what it replaces")
        if self.k_rank is not None and self.k_rank > nope:
            return (f"k_rank={self.k_rank} exceeds the {nope} non-rotary key dims it "
                    f"compresses (H*(D-Dr)): the latent would be wider than what it "
                    f"replaces")
        return None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def rope_dims(self) -> int:
        """Dr: the dims of each head that rotary rotates (module docstring)."""
        return rope_dims(self.rotary_ndims)

    @property
    def latent_keys(self) -> bool:
        """Whether keys are compressed (k_rank set, or joint_kv)."""
        return self.k_rank is not None or self.joint_kv

    def replace(self, **changes) -> "VDProjConfig":
        return dataclasses.replace(self, **changes)

    def uncompressed(self) -> "VDProjConfig":
        """The plain GPT-NeoX baseline of this shape (no value or key latent)."""
        return self.replace(v_rank=None, k_rank=None, joint_kv=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VDProjConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    PRESETS = ("pythia-70m", "cpu-small", "cpu-study", "smoke", "pythia-70m-kv", "cpu-small-kv",
               "smoke-kv")

    @classmethod
    def preset(cls, name: str, **overrides) -> "VDProjConfig":
        """Named shapes. Every preset keeps R = 0.625 * H * D, the reference ratio; the "-kv"
        ones add latent keys with k_rank = 0.375 * H * D (with rotary on 25% of each head, as
        in pythia-70m and cpu-small, the cache is then 640/1024 of the uncompressed one)."""
        if name in ("pythia-70m-kv", "cpu-small-kv", "smoke-kv"):
            base = cls.preset(name[:-3])
            cfg = base.replace(k_rank=int(0.375 * base.hidden_size))
        elif name == "pythia-70m":  # the reference shape: Pythia-70m plus 512 -> 320 -> 512
            cfg = cls()
        elif name == "cpu-small":  # the default main job on a 2-core CPU (vocab: small BPE)
            cfg = cls(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4,
                      intermediate_size=512, max_positions=512, v_rank=80)
        elif name == "cpu-study":
            # The study's overfitting regime (vdproj-study): the cpu-small shape over only 128
            # training samples (PRESET_SETTINGS): 921,088 parameters (962,464 compressed) per
            # 16,384 training tokens is 56-59 per token, the reference's ratio (72.4M over
            # 10,000 x 128 tokens: 56.6).
            cfg = cls.preset("cpu-small")
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
        vb = 1 if self.v_bias else 0

        def pair(width, rank):  # Linear(width, rank) + Linear(rank, width)
            return width * rank + rank * vb + rank * width + width * vb

        vproj = kproj = 0
        if self.v_rank is not None:
            vproj = self.num_layers * pair(h, self.v_rank)
        if self.latent_keys:
            nope = self.num_heads * (self.head_dim - self.rope_dims)
            rank = self.v_rank if self.joint_kv else self.k_rank
            # joint: v_compress also reads k_nope (nope * rank more weights) and k_restore
            # restores from the shared latent; separate: a pair of its own
            kproj = self.num_layers * (pair(nope, rank) - (rank * vb if self.joint_kv else 0))
        return {"total": base + vproj + kproj, "v_projection": vproj + kproj,
                "k_projection": kproj, "without_v_projection": base}

    def cache_values_per_token(self) -> int:
        """Values one token occupies in one layer's KV cache."""
        hd, rope = self.hidden_size, self.num_heads * self.rope_dims
        values = hd if self.v_rank is None else self.v_rank
        if not self.latent_keys:
            return hd + values
        return rope + values + (0 if self.joint_kv else self.k_rank)

    @property
    def kv_cache_reduction(self) -> float:
        """Fraction of KV-cache values saved against 2*H*D per token and layer: H*D keys and
        R compressed values; with latent keys H*Dr rotary keys, k_rank key latent (none when
        joint) and v_rank values (pythia-70m-kv: 1 - 640/1024 = 0.375)."""
        return 1.0 - self.cache_values_per_token() / (2 * self.hidden_size)


def rope_dims(rotary_ndims: int) -> int:
    """The dims of each head rotary rotates: rotary_ndims rounded up to even."""
    return 2 * ((rotary_ndims + 1) // 2)


def check_positive_int(name: str, value, optional: bool = False) -> None:
    """value an int > 0 (bool excluded), or None when optional."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, "
                         f"got {value!r}")


def check_attention_shape(hidden_size, num_heads, rotary_pct, rotary_base) -> None:
    """The shape of an attention layer (VDProjConfig and CompressedVAttention both check it)."""
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_heads", num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                         f"({num_heads})")
    if (isinstance(rotary_pct, bool) or not isinstance(rotary_pct, (int, float))
            or not 0.0 <= rotary_pct <= 1.0):
        raise ValueError(f"rotary_pct must be a number in [0, 1], got {rotary_pct!r}")
    # base ** (-2i/d) is the rotary frequency: a base <= 0 gives NaN (or inf) angles
    if (isinstance(rotary_base, bool) or not isinstance(rotary_base, (int, float))
            or not math.isfinite(rotary_base) or rotary_base <= 0):
        raise ValueError(f"rotary_base must be a finite number > 0, got {rotary_base!r}")


def check_latent_ranks(v_rank, k_rank, joint_kv, head_dim: int, rope_dims: int) -> None:
    """The combinations of v_rank, k_rank and joint_kv a layer supports (module docstring)."""
    check_positive_int("v_rank", v_rank, optional=True)
    check_positive_int("k_rank", k_rank, optional=True)
    if not isinstance(joint_kv, bool):
        raise TypeError(f"joint_kv must be a bool, got {type(joint_kv).__name__}")
    if not (k_rank is not None or joint_kv):
        return
    what = "joint_kv=True" if joint_kv else f"k_rank={k_rank}"
    if v_rank is None:
        raise ValueError(f"{what} needs v_rank: latent keys come with compressed values (the "
                         f"latent-key ops restore values from V_c; v_rank=H*D keeps them whole)")
    if joint_kv and k_rank is not None:
        raise ValueError(f"joint_kv=True makes the keys share the v_rank={v_rank} latent; "
                         f"leave k_rank=None (got k_rank={k_rank})")
    if rope_dims >= head_dim:
        raise ValueError(f"latent keys ({what}) need non-rotary dims in each head, but rotary "
                         f"covers {rope_dims} of head_dim={head_dim} (use rotary_pct < 1)")
