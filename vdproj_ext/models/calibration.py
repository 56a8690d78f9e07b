"""Closed-form fits of v_compress / v_restore from statistics of a layer's values V.

Two entry points share one implementation (moments in float64, the fit, the variance kept):

* `fit_v_pca_(model, batches)`: phase 1 of training. It streams the batches once per layer
  and can sum its statistics across processes (reduce_fn, for DDP).
* `init_v_projection_(model, calibration_ids, init)`: converting a checkpoint. It keeps the
  calibration set's hidden states in memory between layers (N * T * hidden floats) and knows
  three inits:
  - "pca": the rank-R mean-centred PCA autoencoder of V (the closed-form optimum of phase 1's
    reconstruction loss): w_c = U_R^T, b_c = -U_R^T mu, w_r = U_R, b_r = mu. With
    v_rank = H*D it is lossless.
  - "whitened_svd" (Palu / SVD-LLM): truncate the SVD of W_v S, where S S^T = E[x x^T] is the
    second moment of the layer's input x (Cholesky factor; eigen factor if x's moment is
    singular). Then W_v x ~= U_R (U_R^T W_v x): the latent U_R^T W_v x is a linear function
    of V = W_v x + b_v, so w_c = U_R^T, b_c = -U_R^T b_v, w_r = U_R, b_r = b_v. This minimises
    the error of W_v x over the calibration inputs without centring (it equals an uncentred
    PCA of W_v x); "pca" also centres, so its reconstruction error is never larger.
  - "random": the model's own random orthogonal initialisation (no calibration needed).

Both fit the layers in order: layer l sees inputs that went through layers < l already
compressed, as the model will see them.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch

from .layers import rotary_cos_sin, split_fused_qkv

INITS = ("pca", "whitened_svd", "random")


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
# Fitting one layer's pair


@torch.no_grad()
def _set_projection_pair_(attn, basis: torch.Tensor, center: torch.Tensor) -> None:
    """v_compress / v_restore := V_c = U^T (V - center), V_r = U V_c + center, for a basis U
    (H*D, R) of orthonormal (or zero) columns."""
    if attn.v_compress.bias is None or attn.v_restore.bias is None:
        raise ValueError("fitting v_compress/v_restore needs v_bias=True (the fit centres V)")
    w = attn.v_compress.weight
    attn.v_compress.weight.copy_(basis.T.to(w))
    attn.v_restore.weight.copy_(basis.to(w))
    attn.v_compress.bias.copy_((-(basis.T @ center)).to(w))
    attn.v_restore.bias.copy_(center.to(w))


def _pad_columns(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """basis with zero columns appended up to `rank` (a rank above H*D leaves latent
    dimensions unused; the basis already spans all of V)."""
    return torch.cat((basis, basis.new_zeros(basis.shape[0], rank - basis.shape[1])), 1)


def _top_eigvecs(sym: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading eigenvectors of a symmetric matrix, as columns."""
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    return _pad_columns(evecs[:, torch.argsort(evals, descending=True)[:rank]], rank)


def _fit_pca_(attn, mean_v: torch.Tensor, cov_v: torch.Tensor) -> None:
    _set_projection_pair_(attn, _top_eigvecs(cov_v, attn.v_rank), mean_v)


def _fit_whitened_svd_(attn, second_x: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor,
                       eps: float = 1e-6) -> None:
    # S with S S^T = E[x x^T]; a tiny ridge keeps the Cholesky alive on degenerate inputs,
    # and the eigen factor takes over if it still fails.
    ridge = eps * float(second_x.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(second_x.shape[0], dtype=second_x.dtype, device=second_x.device)
    try:
        s = torch.linalg.cholesky(second_x + ridge * eye)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(second_x)
        s = evecs * evals.clamp_min(0).sqrt()
    u = torch.linalg.svd(w_v @ s, full_matrices=False)[0]
    _set_projection_pair_(attn, _pad_columns(u[:, :attn.v_rank], attn.v_rank), b_v)


def _variance_kept(attn, mean_v: torch.Tensor, cov_v: torch.Tensor) -> float:
    """Fraction of V's variance the layer's pair reconstructs: 1 - E||V - V_r||^2 / E||V - mu||^2.
    V_r = w_r (w_c V + b_c) + b_r, so V - V_r = A V - w_r b_c - b_r with A = I - w_r w_c."""
    w_c, w_r = attn.v_compress.weight.double(), attn.v_restore.weight.double()
    b_c, b_r = attn.v_compress.bias.double(), attn.v_restore.bias.double()
    a = torch.eye(w_r.shape[0], dtype=torch.float64, device=w_r.device) - w_r @ w_c
    offset = a @ mean_v - w_r @ b_c - b_r
    err = float(torch.trace(a @ cov_v @ a.T) + offset @ offset)
    total = float(torch.trace(cov_v))
    return 1.0 - err / total if total > 0 else 1.0


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
               reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[float]:
    """Closed-form phase 1: set each compressed layer's v_compress/v_restore to the
    mean-centred rank-R PCA of its V, layer by layer.

    batches: a callable returning a fresh iterable of input_ids (one pass per layer).
    reduce_fn: optional hook summing the statistics across processes (DDP).
    Returns, per layer, the fraction of V's variance the R components keep.
    """
    device = next(model.parameters()).device
    kept = []
    for idx, attn in enumerate(model.attention_modules()):
        if not attn.compressed:
            continue
        moments = _Moments(attn.hidden_size, device)
        for ids in _with_progress(batches(), show_progress, f"pca layer {idx}"):
            moments.add(model.layer_values(ids, idx))
        if reduce_fn is not None:
            moments.reduce_(reduce_fn)
        mean_v, cov_v = moments.mean(), moments.covariance()
        _fit_pca_(attn, mean_v, cov_v)
        kept.append(_variance_kept(attn, mean_v, cov_v))
    return kept


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


def _fit_layer_from_inputs_(attn, xs: List[torch.Tensor], init: str) -> float:
    """Fit one layer on its inputs xs (the input LayerNorm's outputs); returns the variance
    kept. V = W_v x + b_v, so V's moments follow from x's exactly."""
    w_v = split_fused_qkv(attn.query_key_value.weight, attn.num_heads)[1].double()
    qkv_bias = attn.query_key_value.bias
    b_v = (split_fused_qkv(qkv_bias, attn.num_heads)[1].double() if qkv_bias is not None
           else w_v.new_zeros(w_v.shape[0]))
    moments = _Moments(w_v.shape[1], w_v.device)
    for x in xs:
        moments.add(x)
    mean_v = w_v @ moments.mean() + b_v
    cov_v = w_v @ moments.covariance() @ w_v.T
    cov_v = (cov_v + cov_v.T) / 2
    if init == "pca":
        _fit_pca_(attn, mean_v, cov_v)
    else:
        _fit_whitened_svd_(attn, moments.second_moment(), w_v, b_v)
    return _variance_kept(attn, mean_v, cov_v)


@torch.no_grad()
def init_v_projection_(model, calibration_ids: Optional[torch.Tensor], init: str = "pca",
                       batch_size: int = 8) -> list:
    """Initialise every layer's v_compress/v_restore by `init` (see the module docstring).

    calibration_ids: LongTensor (N, T). Returns per layer the fraction of V's variance kept
    (an empty list for init="random").
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
        xs = [layer.input_layernorm(h) for h in hidden]
        kept.append(_fit_layer_from_inputs_(layer.attention, xs, init))
        hidden = [layer(h, cos, sin)[0] for h in hidden]
    model.train(was_training)
    return kept
