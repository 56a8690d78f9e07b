// CPU implementations of the latent-key ops (SPEC 3b; schemas in csrc/bindings.cpp):
// ckv_forward, ckv_backward, ckv_kvcache_attention.
//
// They run the kernels of the V-only ops (kernels.h, compiled in cpu_ops.cpp) on an absorbed
// query: per head, q_eff = [q_rope | q_nope @ w_kr[h]] scores the key [k_rope | K_c], whose
// K_c segment all heads share (or the V_c row itself, with the joint latent). The kernels read
// each cached row once for all heads.
#include <torch/extension.h>

#include "../common/absorbed_query.h"
#include "../common/checks.h"
#include "dispatch.h"

namespace vdproj {
namespace {

// q_eff (B, Tq, H, Dr + Rk) in accumulation precision (q and w_kr contiguous).
at::Tensor effective_query(const at::Tensor& q, const at::Tensor& w_kr, int64_t rope_dim) {
  const int64_t H = q.size(2), Rk = w_kr.size(1);
  at::Tensor q_eff = at::empty({q.size(0), q.size(1), H, rope_dim + Rk},
                               q.options().dtype(accumulation_dtype(q)));
  cpu::QueryArgs a{q.data_ptr(), w_kr.data_ptr(), q_eff.data_ptr(), q.size(0) * q.size(1), H,
                   q.size(3), rope_dim, Rk};
  VDPROJ_ISA_CALL(effective_query, kind_of(q), a);
  return q_eff;
}

// The key latent as the attention's shared key segment: K_c, or V_c itself (joint latent),
// with its scales when it is quantized.
void set_shared_keys(cpu::AttnArgs& a, const at::Tensor& latent, bool is_values,
                     const std::optional<at::Tensor>& latent_scale = std::nullopt) {
  a.kl = latent.data_ptr();
  a.kl_sb = latent.stride(0);
  a.kl_st = latent.stride(1);
  a.Dl = latent.size(2);
  a.kl_is_vc = is_values;
  a.kl_kind = cache_kind_of(latent);
  a.kl_scale = row_scales(latent_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ckv_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_rope_in, const std::optional<at::Tensor>& k_c_in,
    const at::Tensor& v_c_in, const at::Tensor& w_kr_in, const at::Tensor& w_r_in,
    const std::optional<at::Tensor>& b_r_in, bool causal, double softmax_scale) {
  const LatentDims d = check_latent_attention_inputs(q_in, k_rope_in, opt(k_c_in), v_c_in,
                                                     w_kr_in, w_r_in, opt(b_r_in), softmax_scale);
  check_on_cpu(q_in);
  // The public API passes contiguous tensors; a direct call with views still works (copied).
  const at::Tensor q = q_in.contiguous(), k_rope = k_rope_in.contiguous(),
                   v_c = v_c_in.contiguous(), w_kr = w_kr_in.contiguous(),
                   w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> k_c = opt_contiguous(k_c_in), b_r = opt_contiguous(b_r_in);

  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, q.options().dtype(at::kFloat));
  at::Tensor ctx = at::empty({d.B, d.Tq, d.H, d.Rv}, q.options().dtype(accumulation_dtype(q)));
  const std::vector<int64_t> seqlen(d.B, d.T);
  const at::Tensor q_eff = effective_query(q, w_kr, d.Dr);
  cpu::AttnArgs a = attn_args(q_eff, k_rope, v_c, w_r, b_r, seqlen, causal, softmax_scale);
  set_shared_keys(a, k_c.has_value() ? *k_c : v_c, !k_c.has_value());
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  VDPROJ_ISA_CALL(attention, kind_of(q), a);
  return {out, lse, ctx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ckv_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                 const at::Tensor& k_rope_in, const std::optional<at::Tensor>& k_c_in,
                 const at::Tensor& v_c_in, const at::Tensor& w_kr_in, const at::Tensor& w_r_in,
                 const at::Tensor& lse_in, const at::Tensor& ctx_in, bool causal,
                 double softmax_scale) {
  const LatentDims d = check_latent_backward_inputs(grad_out_in, q_in, k_rope_in, opt(k_c_in),
                                                    v_c_in, w_kr_in, w_r_in, lse_in, ctx_in,
                                                    softmax_scale);
  check_on_cpu(q_in);
  const at::Tensor dout = grad_out_in.contiguous(), q = q_in.contiguous(),
                   k_rope = k_rope_in.contiguous(), v_c = v_c_in.contiguous(),
                   w_kr = w_kr_in.contiguous(), w_r = w_r_in.contiguous(),
                   lse = lse_in.contiguous(), ctx = ctx_in.contiguous();
  const std::optional<at::Tensor> k_c = opt_contiguous(k_c_in);
  const auto opts = q.options();
  const at::Tensor q_eff = effective_query(q, w_kr, d.Dr);
  at::Tensor dq_eff = at::empty_like(q_eff), dk_rope = at::empty(k_rope.sizes(), opts),
             dk_c = at::empty(k_c.has_value() ? k_c->sizes() : at::IntArrayRef{0}, opts),
             dvc = at::empty(v_c.sizes(), opts), dwr = at::empty(w_r.sizes(), opts),
             dbr = at::empty({d.H * d.D}, opts);
  cpu::BwdArgs a = bwd_args(dout, q_eff, k_rope, v_c, w_r, lse, ctx, causal, softmax_scale);
  a.kl = k_c.has_value() ? k_c->data_ptr() : v_c.data_ptr();
  a.kl_is_vc = !k_c.has_value();
  a.Dl = d.Rk;
  a.dq = dq_eff.data_ptr();
  a.dk = dk_rope.data_ptr();
  a.dkl = k_c.has_value() ? dk_c.data_ptr() : nullptr;
  a.dvc = dvc.data_ptr();
  a.dwr = dwr.data_ptr();
  a.dbr = dbr.data_ptr();
  VDPROJ_ISA_CALL(attention_backward, kind_of(q), a);
  const auto [dq, dw_kr] = absorbed_query_grads(q, w_kr, dq_eff, d.Dr);
  return {dq, dk_rope, dk_c, dvc, dw_kr, dwr, dbr};
}

// Compress-on-write of the new tokens at pos[b] onwards: k's rotary dims into krope_cache,
// then k_nope @ w_kc.T + b_kc into kc_cache and v @ w_c.T + b_c into vc_cache, or the joint
// latent [k_nope | v] @ w_c.T + b_c into vc_cache (kc_cache absent).
void append_latent_tokens(const LatentKvcacheInputs& in, int64_t rope_dim,
                          const std::vector<int64_t>& pos) {
  const at::Tensor k = in.k->contiguous(), v = in.v->contiguous(), w_c = in.w_c->contiguous();
  const std::optional<at::Tensor> b_c = opt_contiguous(in.b_c);
  const int64_t B = k.size(0), Tn = k.size(1), H = k.size(2), Dn = k.size(3) - rope_dim;
  const at::Tensor k_nope = k.narrow(3, rope_dim, Dn).reshape({B, Tn, H * Dn}).contiguous();
  cpu::AppendArgs a = append_args(k, in.krope_cache, opt_tensor(in.krope_scale), pos);
  at::Tensor joint_x, w_kc;
  std::optional<at::Tensor> b_kc;
  if (in.kc_cache != nullptr) {
    w_kc = in.w_kc->contiguous();
    b_kc = opt_contiguous(in.b_kc);
    a.jobs[0] = compress_job(k_nope, w_kc, b_kc, *in.kc_cache, opt_tensor(in.kc_scale));
    a.jobs[1] = compress_job(v, w_c, b_c, in.vc_cache, opt_tensor(in.vc_scale));
    a.njobs = 2;
  } else {
    joint_x = at::cat({k_nope, v}, 2);
    a.jobs[0] = compress_job(joint_x, w_c, b_c, in.vc_cache, opt_tensor(in.vc_scale));
    a.njobs = 1;
  }
  VDPROJ_ISA_CALL(append, kind_of(k), a);
}

at::Tensor ckv_kvcache_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& krope_cache,
    const std::optional<at::Tensor>& kc_cache, const at::Tensor& vc_cache,
    const at::Tensor& w_kr_in, const at::Tensor& w_r_in, const std::optional<at::Tensor>& b_r_in,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& w_kc, const std::optional<at::Tensor>& b_kc,
    const std::optional<at::Tensor>& w_c, const std::optional<at::Tensor>& b_c,
    const at::Tensor& cache_seqlens, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& krope_scale, const std::optional<at::Tensor>& kc_scale,
    const std::optional<at::Tensor>& vc_scale) {
  const LatentKvcacheInputs in{q_in, krope_cache, opt(kc_cache), vc_cache, w_kr_in, w_r_in,
                               opt(b_r_in), opt(k), opt(v), opt(w_kc), opt(b_kc), opt(w_c),
                               opt(b_c), cache_seqlens, opt(krope_scale), opt(kc_scale),
                               opt(vc_scale)};
  const auto [d, t_new] = check_latent_kvcache_inputs(in, softmax_scale);
  check_on_cpu(q_in);
  const std::vector<int64_t> pos = read_positions(cache_seqlens, d.B, d.T, t_new);
  if (t_new > 0 && d.B > 0) append_latent_tokens(in, d.Dr, pos);

  std::vector<int64_t> seqlen(pos);
  for (int64_t& len : seqlen) len += t_new;
  const at::Tensor q = q_in.contiguous(), w_kr = w_kr_in.contiguous(), w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> b_r = opt_contiguous(b_r_in);
  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.D}, q.options());
  const at::Tensor q_eff = effective_query(q, w_kr, d.Dr);
  cpu::AttnArgs a =
      attn_args(q_eff, krope_cache, vc_cache, w_r, b_r, seqlen, causal, softmax_scale);
  set_cache_reads(a, krope_cache, krope_scale, vc_cache, vc_scale);
  set_shared_keys(a, kc_cache.has_value() ? *kc_cache : vc_cache, !kc_cache.has_value(),
                  kc_cache.has_value() ? kc_scale : vc_scale);
  a.out = out.data_ptr();
  VDPROJ_ISA_CALL(attention, kind_of(q), a);
  return out;
}

}  // namespace
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CPU, m) {
  m.impl("ckv_forward", &vdproj::ckv_forward_cpu);
  m.impl("ckv_backward", &vdproj::ckv_backward_cpu);
  m.impl("ckv_kvcache_attention", &vdproj::ckv_kvcache_attention_cpu);
}
