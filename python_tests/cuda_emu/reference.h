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
      for (int64_t j = 0; j < Tk; ++j)
        for (int64_t d = 0; d < D; ++d) keys[size_t(j * D + d)] = k[size_t(((b * Tk + j) * H + h) * D + d)];
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

// Training backward of the attention part for the loss sum(dout * o), o = restore(ctx):
// dctx = dout_h @ w_r[h]; dS = P (dctx . v_c_j - delta), delta = sum_j P dP; rows that see
// no key have no gradient. dq (B, Tq, H, D), dk (B, Tk, H, D), dvc (B, Tk, R).
struct GradRef {
  Vec dq, dk, dvc;
};
inline GradRef attention_backward(const Vec& q, const Vec& k, const Vec& vc, const Vec& w_r, const Vec& dout,
                                  int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, int64_t R,
                                  double scale, bool causal) {
  GradRef g{Vec(q.size(), 0.0), Vec(k.size(), 0.0), Vec(vc.size(), 0.0)};
  Vec keys(static_cast<size_t>(Tk * D)), p, dctx(static_cast<size_t>(R)), dp(static_cast<size_t>(Tk));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < Tk; ++j)
        for (int64_t d = 0; d < D; ++d) keys[size_t(j * D + d)] = k[size_t(((b * Tk + j) * H + h) * D + d)];
      for (int64_t i = 0; i < Tq; ++i) {
        const double* qr = &q[size_t(((b * Tq + i) * H + h) * D)];
        if (std::isinf(softmax_row(qr, keys, Tk, D, scale, causal, i, Tq, p))) continue;
        for (int64_t r = 0; r < R; ++r) {
          double a = 0.0;
          for (int64_t d = 0; d < D; ++d)
            a += dout[size_t(((b * Tq + i) * H + h) * D + d)] * w_r[size_t((h * D + d) * R + r)];
          dctx[size_t(r)] = a;
        }
        double delta = 0.0;
        for (int64_t j = 0; j < Tk; ++j) {
          double a = 0.0;
          for (int64_t r = 0; r < R; ++r) a += dctx[size_t(r)] * vc[size_t((b * Tk + j) * R + r)];
          dp[size_t(j)] = a;
          delta += p[size_t(j)] * a;
        }
        for (int64_t j = 0; j < Tk; ++j) {
          if (p[size_t(j)] == 0.0) continue;
          const double ds = p[size_t(j)] * (dp[size_t(j)] - delta) * scale;
          for (int64_t d = 0; d < D; ++d) {
            g.dq[size_t(((b * Tq + i) * H + h) * D + d)] += ds * keys[size_t(j * D + d)];
            g.dk[size_t(((b * Tk + j) * H + h) * D + d)] += ds * qr[d];
          }
          for (int64_t r = 0; r < R; ++r) g.dvc[size_t((b * Tk + j) * R + r)] += p[size_t(j)] * dctx[size_t(r)];
        }
      }
    }
  }
  return g;
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
