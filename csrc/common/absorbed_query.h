// The gradients of the absorbed query (SPEC 3b), shared by the CPU and CUDA ckv_backward: the
// kernels differentiate q_eff_h = [q_rope_h | q_nope_h @ w_kr[h]]; this returns the gradients
// of q and w_kr from that of q_eff. ATen only, so either device runs it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace vdproj {

// dq = [dq_rope | dq_lat_h @ w_kr[h].T] and dw_kr[h] = sum over (b, i) of q_nope_h^T dq_lat_h:
// per-head GEMMs in dq_eff's (accumulation) precision, rounded once to the inputs' dtypes.
// q (B, Tq, H, D), w_kr (H*Dn, Rk), dq_eff (B, Tq, H, Dr + Rk).
inline std::pair<at::Tensor, at::Tensor> absorbed_query_grads(const at::Tensor& q,
                                                              const at::Tensor& w_kr,
                                                              const at::Tensor& dq_eff,
                                                              int64_t rope_dim) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), Dn = q.size(3) - rope_dim;
  const int64_t Rk = w_kr.size(1);
  const at::Tensor w = w_kr.to(dq_eff.scalar_type()).view({H, Dn, Rk});
  // (H, B*Tq, *): one batch entry per head.
  const at::Tensor dq_lat =
      dq_eff.narrow(3, rope_dim, Rk).reshape({B * Tq, H, Rk}).transpose(0, 1);
  const at::Tensor q_nope = q.narrow(3, rope_dim, Dn).to(dq_eff.scalar_type())
                                .reshape({B * Tq, H, Dn}).transpose(0, 1);
  const at::Tensor dq_nope = at::bmm(dq_lat, w.transpose(1, 2)).transpose(0, 1);
  const at::Tensor dq =
      at::cat({dq_eff.narrow(3, 0, rope_dim), dq_nope.reshape({B, Tq, H, Dn})}, 3);
  const at::Tensor dw = at::bmm(q_nope.transpose(1, 2), dq_lat).reshape({H * Dn, Rk});
  return {dq.to(q.scalar_type()), dw.to(w_kr.scalar_type())};
}

}  // namespace vdproj
