"""Closed-form fits of the compress/restore pairs from statistics of a layer's input.

Every pair compresses an affine function z = A x + a of the layer's input x (the input
LayerNorm's output): V (v_compress), k_nope, the non-rotary dims of all heads' keys
(k_compress), or [k_nope | v] (the joint latent's v_compress). So one statistic per layer, the
moments of x in float64, gives the moments of every z exactly, and one fit serves all pairs
(_fit_layer_). Two entry points share it:

* `fit_v_pca_(model, batches)`: phase 1 of training ("pca"). It streams the batches once per
  layer and can sum its statistics across processes (reduce_fn, for DDP).
* `init_v_projection_(model, calibration_ids, init)`: converting a checkpoint. It keeps the
  calibration set's hidden states in memory between layers (N * T * hidden floats) and knows
  four inits:
  - "pca": the rank-R mean-centred PCA autoencoder of z (the closed-form optimum of phase 1's
    reconstruction loss): w_c = U_R^T, b_c = -U_R^T mu, w_r = U_R, b_r = mu. At full rank
    (v_rank = H*D, k_rank = H*Dn, joint H*Dn + H*D) it is lossless. The joint latent is
    fitted in the metric of the reconstruction loss (k_nope's and V's mean squared errors
    weighted equally, module _metric).
  - "score_aware": values as "pca"; keys fitted to preserve the attention scores q . k
    rather than the keys. The error e of a restored k_nope changes head h's score by
    q_nope_h . e_h, whose mean square over the calibration queries is e_h^T M_h e_h with
    M_h = E[q_nope_h q_nope_h^T] (uncentred: a mean query counts). So the fit is the PCA of
    G k_nope with G = blockdiag_h(M_h^(1/2)) (the query-whitened keys), mapped back:
    w_kc = U^T G, w_kr = G^-1 U, both biases from the mean key (k_restore's cancels in the
    softmax anyway).
  - "whitened_svd" (Palu / SVD-LLM): truncate the SVD of A S, where S S^T = E[x x^T] is the
    second moment of the layer's input x (Cholesky factor; eigen factor if x's moment is
    singular). Then A x ~= U_R (U_R^T A x): the latent U_R^T A x is a linear function
    of z = A x + a, so w_c = U_R^T, b_c = -U_R^T a, w_r = U_R, b_r = a. This minimises
    the error of A x over the calibration inputs without centring (it equals an uncentred
    PCA of A x); "pca" also centres, so its reconstruction error is never larger.
  - "random": the model's own random orthogonal initialisation (no calibration needed).
  In general a fit minimises ||G (z - z_r)||^2 for a metric G: latent = U^T G (z - c),
  z_r = G^-1 U latent + c, U the leading R directions of G z.

Both fit the layers in order: layer l sees inputs that went through layers < l already
compressed, as the model will see them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .layers import fused_qkv_parts, rotary_cos_sin

INITS = ("pca", "score_aware", "whitened_svd", "random")


class _Moments:
    """Running sums over row vectors, in float64: enough for their mean, second moment and
    covariance. Tensors (the count too), so that a DDP hook can sum them across processes."""

    def __init__(self, dim: int, device):
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, self.s1.shape[0]).double()
        self.s1 += rows.sum(0)
        self.s2 += rows.T @ rows
        self.n += rows.shape[0]

    def reduce_(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.s1, self.s2, self.n = reduce_fn(self.s1), reduce_fn(self.s2), reduce_fn(self.n)

    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    def second_moment(self) -> torch.Tensor:
        m = self.s2 / self.n
        return (m + m.T) / 2

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return self.second_moment() - torch.outer(mean, mean)


# ---------------------------------------------------------------------------------------------
# The pairs of a layer and what they compress


@dataclass
class _Pair:
    """One compress Linear, the restore Linears that read its latent (with their names,
    "k" or "v"), and what it compresses: z = A x + a, an affine function of the layer's input
    x, with the rows of each restore in order (blocks)."""
    compress: nn.Linear
    restores: List[Tuple[str, nn.Linear]]
    a_w: torch.Tensor   # (n, hidden) float64
    a_b: torch.Tensor   # (n,) float64

    def blocks(self) -> List[Tuple[str, slice]]:
        out, start = [], 0
        for name, lin in self.restores:
            out.append((name, slice(start, start + lin.out_features)))
            start += lin.out_features
        return out


def _projection_parts(attn):
    """query_key_value's weight and bias (zeros if it has none) split by role, in float64
    (layers.fused_qkv_parts): each part p of the projection is w[p] x + b[p]."""
    qkv = attn.query_key_value
    weight = qkv.weight.detach().double()
    bias = (qkv.bias.detach().double() if qkv.bias is not None
            else weight.new_zeros(weight.shape[0]))
    return (fused_qkv_parts(weight, attn.num_heads, attn.rope_dims),
            fused_qkv_parts(bias, attn.num_heads, attn.rope_dims))


def _layer_pairs(attn) -> List[_Pair]:
    """The layer's compress/restore pairs (one, or two with separate key and value latents)."""
    w, b = _projection_parts(attn)
    if attn.joint_kv:
        return [_Pair(attn.v_compress, [("k", attn.k_restore), ("v", attn.v_restore)],
                      torch.cat((w["k_nope"], w["v"])), torch.cat((b["k_nope"], b["v"])))]
    pairs = [_Pair(attn.v_compress, [("v", attn.v_restore)], w["v"], b["v"])]
    if attn.k_rank is not None:
        pairs.append(_Pair(attn.k_compress, [("k", attn.k_restore)], w["k_nope"], b["k_nope"]))
    return pairs


def _query_metric(attn, mean_x, second_x, cov_k) -> torch.Tensor:
    """G (H*Dn, H*Dn) with ||G e||^2 = sum_h E_q[(q_nope_h . e_h)^2]: block diagonal, the
    square root of each head's query second moment E[q q^T] (uncentred: the score error is
    q . e, so the queries' mean counts), scaled so that trace(G cov_k G^T) = trace(cov_k)."""
    weights, biases = _projection_parts(attn)
    w, b = weights["q_nope"], biases["q_nope"]
    mean_q = w @ mean_x + b
    second_q = w @ (second_x - torch.outer(mean_x, mean_x)) @ w.T + torch.outer(mean_q, mean_q)
    dn = w.shape[0] // attn.num_heads
    g = torch.zeros_like(second_q)
    for h in range(attn.num_heads):
        blk = slice(h * dn, (h + 1) * dn)
        evals, evecs = torch.linalg.eigh((second_q[blk, blk] + second_q[blk, blk].T) / 2)
        ridge = 1e-6 * float(evals.clamp_min(0).mean().clamp_min(1e-30))
        g[blk, blk] = (evecs * (evals.clamp_min(0) + ridge).sqrt()) @ evecs.T
    total = float(torch.trace(cov_k))
    scaled = float(torch.trace(g @ cov_k @ g.T))
    return g * (total / scaled) ** 0.5 if scaled > 0 and total > 0 else g


def _metric(pair: _Pair, init: str, attn, mean_x, second_x, cov_z) -> torch.Tensor:
    """G, the metric the fit minimises ||G (z - z_r)||^2 in. Each block is weighted by
    sqrt(n / (blocks * its width)), so that a joint latent weighs k_nope and V as the
    reconstruction loss does (the mean of the two mean squared errors) and a lone block gets
    G = I (an orthonormal PCA pair). With init="score_aware" the k_nope block is the query
    metric instead (times the same weight)."""
    g = torch.zeros_like(cov_z)
    blocks = pair.blocks()
    for name, rows in blocks:
        width = rows.stop - rows.start
        if name == "k" and init == "score_aware":
            g[rows, rows] = _query_metric(attn, mean_x, second_x, cov_z[rows, rows])
        else:
            g[rows, rows] = torch.eye(width, dtype=g.dtype, device=g.device)
        g[rows, rows] *= (g.shape[0] / (len(blocks) * width)) ** 0.5
    return g


@torch.no_grad()
def _set_pair_(pair: _Pair, g: torch.Tensor, basis: torch.Tensor, center: torch.Tensor) -> None:
    """latent = U^T G (z - center), z_r = G^-1 U latent + center, for a basis U (n, R) of
    orthonormal (or zero) columns; the restores get the rows of G^-1 U and center."""
    for lin in [pair.compress] + [r for _, r in pair.restores]:
        if lin.bias is None:
            raise ValueError("fitting a compress/restore pair needs v_bias=True (the fit "
                             "centres what it compresses)")
    w_c = basis.T @ g
    w_r = torch.linalg.solve(g, basis)
    pair.compress.weight.copy_(w_c.to(pair.compress.weight))
    pair.compress.bias.copy_((-(w_c @ center)).to(pair.compress.weight))
    for (_, lin), rows in zip(pair.restores, (r for _, r in pair.blocks())):
        lin.weight.copy_(w_r[rows].to(lin.weight))
        lin.bias.copy_(center[rows].to(lin.weight))


def _pad_columns(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """basis with zero columns appended up to `rank` (a rank above the compressed width
    leaves latent dimensions unused; the basis already spans all of it)."""
    return torch.cat((basis, basis.new_zeros(basis.shape[0], rank - basis.shape[1])), 1)


def _top_eigvecs(sym: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading eigenvectors of a symmetric matrix, as columns."""
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    return _pad_columns(evecs[:, torch.argsort(evals, descending=True)[:rank]], rank)


def _input_factor(second_x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """S with S S^T = E[x x^T]; a tiny ridge keeps the Cholesky alive on degenerate inputs,
    and the eigen factor takes over if it still fails."""
    ridge = eps * float(second_x.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(second_x.shape[0], dtype=second_x.dtype, device=second_x.device)
    try:
        return torch.linalg.cholesky(second_x + ridge * eye)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(second_x)
        return evecs * evals.clamp_min(0).sqrt()


def _variance_kept(pair: _Pair, mean_z: torch.Tensor, cov_z: torch.Tensor) -> dict:
    """Per restored block ("k", "v"), the fraction of its variance the pair reconstructs:
    1 - E||z_b - z_r,b||^2 / E||z_b - mu_b||^2, where z_b - z_r,b = A z - w_r,b b_c - b_r,b
    with A = S_b - w_r,b w_c (S_b selects the block's rows of z)."""
    w_c, b_c = pair.compress.weight.double(), pair.compress.bias.double()
    eye = torch.eye(cov_z.shape[0], dtype=torch.float64, device=cov_z.device)
    kept = {}
    for (name, lin), (_, rows) in zip(pair.restores, pair.blocks()):
        w_r, b_r = lin.weight.double(), lin.bias.double()
        a = eye[rows] - w_r @ w_c
        offset = a @ mean_z - w_r @ b_c - b_r
        err = float(torch.trace(a @ cov_z @ a.T) + offset @ offset)
        total = float(torch.trace(cov_z[rows, rows]))
        kept[name] = 1.0 - err / total if total > 0 else 1.0
    return kept


def _fit_layer_(attn, moments: "_Moments", init: str) -> dict:
    """Fit every pair of one layer from the moments of its input x (z = A x + a, so the
    moments of what each pair compresses follow exactly); returns the variance kept per
    restored signal, {"v": ..., and "k": ... with latent keys}. init: "pca" (the optimum
    of the reconstruction loss), "score_aware" (keys fitted to preserve the scores) or
    "whitened_svd" (see the module docstring)."""
    mean_x, cov_x, second_x = moments.mean(), moments.covariance(), moments.second_moment()
    kept = {}
    for pair in _layer_pairs(attn):
        mean_z = pair.a_w @ mean_x + pair.a_b
        cov_z = pair.a_w @ cov_x @ pair.a_w.T
        cov_z = (cov_z + cov_z.T) / 2
        g = _metric(pair, init, attn, mean_x, second_x, cov_z)
        rank = pair.compress.out_features
        if init == "whitened_svd":
            u = torch.linalg.svd(g @ pair.a_w @ _input_factor(second_x), full_matrices=False)[0]
            _set_pair_(pair, g, _pad_columns(u[:, :rank], rank), pair.a_b)
        else:
            _set_pair_(pair, g, _top_eigvecs(g @ cov_z @ g.T, rank), mean_z)
        kept.update(_variance_kept(pair, mean_z, cov_z))
    return dict(sorted(kept.items()))


# ---------------------------------------------------------------------------------------------
# Phase 1 of training


def _with_progress(iterable: Iterable, show: bool, desc: str) -> Iterable:
    if not show:
        return iterable
    try:  # tqdm is optional: without it, no progress bar
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def fit_v_pca_(model, batches: Callable[[], Iterable[torch.Tensor]], *,
               show_progress: bool = False,
               reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               by_pair: bool = False) -> list:
    """Closed-form phase 1: set every compress/restore pair of each compressed layer to the
    mean-centred PCA of what it compresses (V; with latent keys also k_nope, or the joint
    [k_nope | v]), layer by layer: the optimum of the reconstruction loss.

    batches: a callable returning a fresh iterable of input_ids (one pass per layer).
    reduce_fn: optional hook summing the statistics across processes (DDP).
    Returns, per layer, the fraction of V's variance the latent keeps; with by_pair=True a
    dict per layer, {"v": ..., and "k": the fraction of k_nope's with latent keys}.
    """
    device = next(model.parameters()).device
    kept = []
    for idx, attn in enumerate(model.attention_modules()):
        if not attn.compressed:
            continue
        moments = _Moments(attn.hidden_size, device)
        for ids in _with_progress(batches(), show_progress, f"pca layer {idx}"):
            moments.add(model.layer_inputs(ids, idx))
        if reduce_fn is not None:
            moments.reduce_(reduce_fn)
        kept.append(_fit_layer_(attn, moments, "pca"))
    return kept if by_pair else [k["v"] for k in kept]


# ---------------------------------------------------------------------------------------------
# Converting a checkpoint


def check_calibration_ids(ids, vocab_size: int, init: str) -> torch.Tensor:
    """calibration_ids as a LongTensor (N, T) of valid token ids, or a clear error."""
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


@torch.no_grad()
def init_v_projection_(model, calibration_ids: Optional[torch.Tensor], init: str = "pca",
                       batch_size: int = 8, by_pair: bool = False) -> list:
    """Initialise every layer's compress/restore pairs by `init` (see the module docstring).

    calibration_ids: LongTensor (N, T). Returns per layer the fraction of V's variance kept
    (with by_pair=True a dict per layer, "k" too with latent keys); an empty list for
    init="random".
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cfg = model.config
    if cfg.v_rank is None:
        raise ValueError("model has no v_compress/v_restore (config.v_rank is None)")
    if init == "random":
        return []
    ids = check_calibration_ids(calibration_ids, cfg.vocab_size, init)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    cos, sin = rotary_cos_sin(positions, cfg.rotary_ndims, cfg.rotary_base)
    hidden = [model.gpt_neox.embed_in(chunk.to(device)) for chunk in ids.split(batch_size)]
    kept = []
    for layer in model.gpt_neox.layers:
        moments = _Moments(cfg.hidden_size, device)
        for h in hidden:
            moments.add(layer.input_layernorm(h))
        kept.append(_fit_layer_(layer.attention, moments, init))
        hidden = [layer(h, cos, sin)[0] for h in hidden]
    model.train(was_training)
    return kept if by_pair else [k["v"] for k in kept]
