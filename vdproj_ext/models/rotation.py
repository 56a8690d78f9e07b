"""An orthogonal rotation of each cached latent, folded into its compress/restore pair.

For a latent L = W_c x + b_c restored as W_r L + b_r, and any orthogonal Q (Q^T Q = I),

    L' = (Q W_c) x + Q b_c,        W_r Q^T L' + b_r = W_r L + b_r,

so rotating the compress side by Q and the restore side by Q^T changes nothing in exact
arithmetic: the logits stay the same, only the cached rows change. It matters for a quantized
cache (SPEC 3c): one absmax scale per row is set by the row's largest entry, and a learned or
PCA latent concentrates its energy in a few leading channels. A Hadamard rotation spreads that
energy over many channels, which lowers the largest entry against the row's norm, and with it
the quantization step.

Q (rotation_matrix):
- "hadamard": block-diagonal, with normalized Sylvester Hadamard blocks (entries +-1/sqrt(n))
  of the largest power-of-2 size n that divides the rank (320 = 5 x 64, 192 = 3 x 64, 80 =
  5 x 16). A rank with no power-of-2 factor >= 8 (odd ranks, 12, ...) gets a random
  orthogonal matrix instead, seeded: blocks of 1, 2 or 4 would spread almost nothing.
- "random": a random orthogonal matrix (QR of a seeded Gaussian), for any rank.

What is rotated, per layer: v_compress / v_restore (the value latent, or the joint latent,
whose restore is both k_restore and v_restore) and, with separate latent keys,
k_compress / k_restore. The rotary keys and the uncompressed keys are not latents and stay as
they are. Restore biases are unchanged (they act after the rotation is undone).

rotate_latents works on a model folded by prepare_for_inference as well: the latents are then
the last rows of the fused query/key/value projection (folding.py), which are rotated instead
of v_compress / k_compress. Each latent gets the same Q in either form (its seed follows the
latent, "k" or "v", not its position), so rotating before or after folding gives the same model.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

ROTATIONS = ("hadamard", "random")
MIN_HADAMARD_BLOCK = 8


def hadamard_block_size(rank: int) -> int:
    """The largest power of 2 that divides rank."""
    return rank & -rank


def _sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (n a power of 2), normalized: orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def _random_orthogonal(rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes it Haar-distributed


def rotation_matrix(rank: int, kind: str = "hadamard", *, seed: int = 0) -> torch.Tensor:
    """An orthogonal (rank, rank) float64 matrix of the given kind (module docstring)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if kind not in ROTATIONS:
        raise ValueError(f"kind must be one of {ROTATIONS}, got {kind!r}")
    block = hadamard_block_size(rank)
    if kind == "random" or block < MIN_HADAMARD_BLOCK:
        return _random_orthogonal(rank, seed)
    return torch.block_diag(*[_sylvester_hadamard(block)] * (rank // block))


@torch.no_grad()
def _rotate_rows_(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: slice,
                  q: torch.Tensor) -> None:
    """The compress side: weight[rows] := Q weight[rows], bias[rows] := Q bias[rows]."""
    weight[rows] = (q @ weight[rows].double()).to(weight.dtype)
    if bias is not None:
        bias[rows] = (q @ bias[rows].double()).to(bias.dtype)


@torch.no_grad()
def _rotate_restore_(restore: nn.Linear, q: torch.Tensor) -> None:
    """The restore side: weight := weight Q^T (bias unchanged)."""
    restore.weight.copy_((restore.weight.double() @ q.T).to(restore.weight.dtype))


def _latents(attn) -> List[tuple]:
    """(name, compress weight, compress bias, its latent rows, restores) of each latent of a
    layer, unfolded (CompressedVAttention) or folded (FoldedVAttention). name is "v" for the
    value latent (or the joint latent) and "k" for a separate key latent: it identifies the
    latent whichever form the layer is in (the unfolded order is V, K, the folded one K, V)."""
    joint, latent_keys = attn.joint_kv, attn.latent_keys
    value_restores = [attn.k_restore, attn.v_restore] if joint else [attn.v_restore]
    if hasattr(attn, "fused"):  # folded: the latents are the fused projection's last rows
        w, b = attn.fused.weight, attn.fused.bias
        start = w.shape[0] - sum(attn.latent_widths)
        latents = [("v", value_restores)] if joint or not latent_keys else \
            [("k", [attn.k_restore]), ("v", value_restores)]
        out = []
        for width, (name, rest) in zip(attn.latent_widths, latents):
            out.append((name, w, b, slice(start, start + width), rest))
            start += width
        return out
    out = [("v", attn.v_compress.weight, attn.v_compress.bias, slice(None), value_restores)]
    if latent_keys and not joint:
        out.append(("k", attn.k_compress.weight, attn.k_compress.bias, slice(None),
                    [attn.k_restore]))
    return out


# The seed offset of each latent within its layer (rotate_latents): by identity, not by order.
_LATENT_SEED = {"v": 0, "k": 1}


def rotate_latents(model, kind: str = "hadamard", *, seed: int = 0):
    """Rotate every cached latent of a compressed VDProjForCausalLM by an orthogonal matrix
    (rotation_matrix(rank, kind)), folded into its compress/restore pair, in place; returns
    the model. Logits are unchanged up to float rounding; a quantized cache stores the
    rotated latents. Works before or after prepare_for_inference. Applying it twice composes
    the rotations (still orthogonal). seed picks the random matrices (kind "random", or a rank
    without a power-of-2 factor >= 8): layer i's latent j uses seed + 2 * i + j."""
    if kind not in ROTATIONS:
        raise ValueError(f"kind must be one of {ROTATIONS}, got {kind!r}")
    if getattr(model.config, "v_rank", None) is None:
        raise ValueError("rotate_latents needs a compressed model (config.v_rank is set): an "
                         "uncompressed cache has no latent to rotate")
    for i, layer in enumerate(model.gpt_neox.layers):
        for name, weight, bias, rows, restores in _latents(layer.attention):
            rank = restores[0].in_features
            q = rotation_matrix(rank, kind, seed=seed + 2 * i + _LATENT_SEED[name])
            q = q.to(weight.device)
            _rotate_rows_(weight, bias, rows, q)
            for restore in restores:
                _rotate_restore_(restore, q)
    return model
