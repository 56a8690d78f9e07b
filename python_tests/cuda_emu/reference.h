// Float64 references of the chain the CUDA launchers implement (SPEC sections 1 and 3), on
// plain row-major arrays. Torch-free on purpose: the emulator build links no torch.
#pragma once

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace emu_ref {

using Vec = std::vector<double>;

// Attention of one (b, h, i) row over keys j < L: fills the softmax weights p (size L, zero
// for masked keys) and returns the log-sum-exp of the scaled scores, -inf when no key is
// visible. Causal masking is bottom-right aligned: key j is visible to query i iff
// j <= i + L - Tq.
inline double softmax_row(const double* q, const Vec& keys, int64_t L, int64_t D, double scale, bool causal,
                          int64_t i, int64_t Tq, Vec& p) {
  p.assign(size_t(L), 0.0);
  const int64_t n = causal ? std::min(L, std::max<int64_t>(0, i + L - Tq + 1)) : L;
  if (n == 0) return -std::numeric_limits<double>::infinity();
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += q[d] * keys[size_t(j * D + d)];
    p[size_t(j)] = s * scale;
    mx = std::max(mx, p[size_t(j)]);
  }
  double tot = 0.0;
  for (int64_t j = 0; j < n; ++j) tot += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
  for (int64_t j = 0; j < n; ++j) p[size_t(j)] /= tot;
  return mx + std::log(tot);
}

// keys (Tk, D) = the rows of head h of batch element b in k (B, Tk, H, D).
inline void head_keys(const Vec& k, int64_t b, int64_t h, int64_t Tk, int64_t H, int64_t D, Vec& keys) {
  for (int64_t j = 0; j < Tk; ++j)
    for (int64_t d = 0; d < D; ++d) keys[size_t(j * D + d)] = k[size_t(((b * Tk + j) * H + h) * D + d)];
}

// Training forward: ctx (B, Tq, H, R) = P @ v_c and lse (B, H, Tq) in natural log (-inf for a
// row that sees no key). q (B, Tq, H, D), k (B, Tk, H, D), vc (B, Tk, R).
struct AttnRef {
  Vec ctx, lse;
};
inline AttnRef attention_forward(const Vec& q, const Vec& k, const Vec& vc, int64_t B, int64_t Tq,
                                 int64_t Tk, int64_t H, int64_t D, int64_t R, double scale, bool causal) {
  AttnRef out{Vec(size_t(B * Tq * H * R), 0.0), Vec(size_t(B * H * Tq), 0.0)};
  Vec keys(static_cast<size_t>(Tk * D)), p;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      head_keys(k, b, h, Tk, H, D, keys);
      for (int64_t i = 0; i < Tq; ++i) {
        const double* qr = &q[size_t(((b * Tq + i) * H + h) * D)];
        double* c = &out.ctx[size_t(((b * Tq + i) * H + h) * R)];
        out.lse[size_t((b * H + h) * Tq + i)] = softmax_row(qr, keys, Tk, D, scale, causal, i, Tq, p);
        for (int64_t j = 0; j < Tk; ++j) {
          if (p[size_t(j)] == 0.0) continue;
          for (int64_t r = 0; r < R; ++r) c[r] += p[size_t(j)] * vc[size_t((b * Tk + j) * R + r)];
        }
      }
    }
  }
  return out;
}

// Training backward of the attention part, given dctx (B, Tq, H, R) = dO_h @ w_r[h]:
// dS = P (dctx . v_c_j - delta), delta = sum_j P dP; rows that see no key have no gradient.
// q (B, Tq, H, Dk), k (B, Tk, H, Dk), vc (B, Tk, R) -> dq, dk, dvc of the same shapes.
struct GradRef {
  Vec dq, dk, dvc;
};
inline GradRef attention_backward_dctx(const Vec& q, const Vec& k, const Vec& vc, const Vec& dctx_all,
                                       int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Dk, int64_t R,
                                       double scale, bool causal) {
  GradRef g{Vec(q.size(), 0.0), Vec(k.size(), 0.0), Vec(vc.size(), 0.0)};
  Vec keys(static_cast<size_t>(Tk * Dk)), p, dp(static_cast<size_t>(Tk));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      head_keys(k, b, h, Tk, H, Dk, keys);
      for (int64_t i = 0; i < Tq; ++i) {
        const double* qr = &q[size_t(((b * Tq + i) * H + h) * Dk)];
        if (std::isinf(softmax_row(qr, keys, Tk, Dk, scale, causal, i, Tq, p))) continue;
        const double* dctx = &dctx_all[size_t(((b * Tq + i) * H + h) * R)];
        double delta = 0.0;
        for (int64_t j = 0; j < Tk; ++j) {
          double a = 0.0;
          for (int64_t r = 0; r < R; ++r) a += dctx[r] * vc[size_t((b * Tk + j) * R + r)];
          dp[size_t(j)] = a;
          delta += p[size_t(j)] * a;
        }
        for (int64_t j = 0; j < Tk; ++j) {
          if (p[size_t(j)] == 0.0) continue;
          const double ds = p[size_t(j)] * (dp[size_t(j)] - delta) * scale;
          for (int64_t d = 0; d < Dk; ++d) {
            g.dq[size_t(((b * Tq + i) * H + h) * Dk + d)] += ds * keys[size_t(j * Dk + d)];
            g.dk[size_t(((b * Tk + j) * H + h) * Dk + d)] += ds * qr[d];
          }
          for (int64_t r = 0; r < R; ++r) g.dvc[size_t((b * Tk + j) * R + r)] += p[size_t(j)] * dctx[r];
        }
      }
    }
  }
  return g;
}

// dctx (B, Tq, H, R) = dout_h @ w_r[h] for the loss sum(dout * o), o = restore(ctx).
inline Vec restore_grad(const Vec& dout, const Vec& w_r, int64_t M, int64_t H, int64_t D, int64_t R) {
  Vec dctx(static_cast<size_t>(M * H * R), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        const double g = dout[size_t((m * H + h) * D + d)];
        for (int64_t r = 0; r < R; ++r) dctx[size_t((m * H + h) * R + r)] += g * w_r[size_t((h * D + d) * R + r)];
      }
  return dctx;
}

// Training backward of the attention part for the loss sum(dout * o): dq (B, Tq, H, D),
// dk (B, Tk, H, D), dvc (B, Tk, R).
inline GradRef attention_backward(const Vec& q, const Vec& k, const Vec& vc, const Vec& w_r, const Vec& dout,
                                  int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, int64_t R,
                                  double scale, bool causal) {
  return attention_backward_dctx(q, k, vc, restore_grad(dout, w_r, B * Tq, H, D, R), B, Tq, Tk, H, D, R,
                                 scale, causal);
}

// ---- latent keys (SPEC 3b) --------------------------------------------------------------------

// The absorbed query (M, H, Dr + Rk): [q_rope | q_nope @ w_kr[h]], q (M, H, D), w_kr (H*Dn, Rk).
inline Vec absorbed_query(const Vec& q, const Vec& w_kr, int64_t M, int64_t H, int64_t D, int64_t Dr,
                          int64_t Rk) {
  const int64_t Dn = D - Dr, Dq = Dr + Rk;
  Vec out(static_cast<size_t>(M * H * Dq), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      const double* qr = &q[size_t((m * H + h) * D)];
      double* o = &out[size_t((m * H + h) * Dq)];
      for (int64_t d = 0; d < Dr; ++d) o[d] = qr[d];
      for (int64_t n = 0; n < Dn; ++n)
        for (int64_t c = 0; c < Rk; ++c) o[Dr + c] += qr[Dr + n] * w_kr[size_t((h * Dn + n) * Rk + c)];
    }
  return out;
}

// One sequence of the latent attention in the restored form (independent of the absorption
// the kernels use): the key of head h at position j is [rope[j, h] | lat[j] @ w_kr[h].T] (D
// values). q (Tq, H, D), rope (L, H, Dr), lat (L, Rk), v (L, Rv), w_kr (H*Dn, Rk). Writes
// ctx (Tq, H, Rv) = P @ v and lse (H, Tq).
inline void latent_attention_seq(const double* q, const double* rope, const double* lat, const double* v,
                                 const Vec& w_kr, int64_t Tq, int64_t L, int64_t H, int64_t D, int64_t Dr,
                                 int64_t Rk, int64_t Rv, double scale, bool causal, double* ctx, double* lse) {
  const int64_t Dn = D - Dr;
  Vec keys(static_cast<size_t>(L * D)), p;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < L; ++j) {
      for (int64_t d = 0; d < Dr; ++d) keys[size_t(j * D + d)] = rope[(j * H + h) * Dr + d];
      for (int64_t n = 0; n < Dn; ++n) {
        double a = 0.0;
        for (int64_t c = 0; c < Rk; ++c) a += lat[j * Rk + c] * w_kr[size_t((h * Dn + n) * Rk + c)];
        keys[size_t(j * D + Dr + n)] = a;
      }
    }
    for (int64_t i = 0; i < Tq; ++i) {
      lse[h * Tq + i] = softmax_row(q + (i * H + h) * D, keys, L, D, scale, causal, i, Tq, p);
      double* c = ctx + (i * H + h) * Rv;
      for (int64_t r = 0; r < Rv; ++r) c[r] = 0.0;
      for (int64_t j = 0; j < L; ++j)
        if (p[size_t(j)] != 0.0)
          for (int64_t r = 0; r < Rv; ++r) c[r] += p[size_t(j)] * v[j * Rv + r];
    }
  }
}

// Backward of the latent attention in the absorbed form, given q_eff (B, Tq, H, Dq) and dctx:
// the attention of section 1 over keys [rope_h | lat] (Dq = Dr + Rk), whose shared latent's
// gradient sums over heads (and, with the joint latent, adds into dvc).
struct LatentGradRef {
  Vec dq_eff, dk_rope, dk_lat, dvc;
};
inline LatentGradRef latent_backward(const Vec& q_eff, const Vec& rope, const Vec& lat, const Vec& vc,
                                     const Vec& dctx, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Dr,
                                     int64_t Rk, int64_t Rv, bool joint, double scale, bool causal) {
  const int64_t Dq = Dr + Rk;
  Vec keys(static_cast<size_t>(B * Tk * H * Dq));
  for (int64_t bj = 0; bj < B * Tk; ++bj)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < Dr; ++d) keys[size_t((bj * H + h) * Dq + d)] = rope[size_t((bj * H + h) * Dr + d)];
      for (int64_t c = 0; c < Rk; ++c) keys[size_t((bj * H + h) * Dq + Dr + c)] = lat[size_t(bj * Rk + c)];
    }
  const GradRef g = attention_backward_dctx(q_eff, keys, vc, dctx, B, Tq, Tk, H, Dq, Rv, scale, causal);
  LatentGradRef out{g.dq, Vec(static_cast<size_t>(B * Tk * H * Dr), 0.0), Vec(static_cast<size_t>(B * Tk * Rk), 0.0),
                    g.dvc};
  for (int64_t bj = 0; bj < B * Tk; ++bj)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < Dr; ++d) out.dk_rope[size_t((bj * H + h) * Dr + d)] = g.dk[size_t((bj * H + h) * Dq + d)];
      for (int64_t c = 0; c < Rk; ++c) out.dk_lat[size_t(bj * Rk + c)] += g.dk[size_t((bj * H + h) * Dq + Dr + c)];
    }
  if (joint)
    for (size_t e = 0; e < out.dvc.size(); ++e) out.dvc[e] += out.dk_lat[e];
  return out;
}

// ||got - want|| / ||want|| (python_tests/conftest.py rel_error); +inf when got has a
// non-finite value where want is finite, or the reverse.
inline double rel_error(const Vec& got, const Vec& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isfinite(got[i]) != std::isfinite(want[i])) return std::numeric_limits<double>::infinity();
    if (!std::isfinite(want[i])) {
      if (got[i] != want[i]) return std::numeric_limits<double>::infinity();
      continue;
    }
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace emu_ref
