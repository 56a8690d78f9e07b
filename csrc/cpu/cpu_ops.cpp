// CPU implementations of the V-only vdproj_ext ops and decode_linear (schemas in
// csrc/bindings.cpp; the latent-key ops are in latent_ops.cpp): input checks
// (csrc/common/checks.h), argument blocks (dispatch.h), and the kernels themselves.
#include <torch/extension.h>

#include "../common/checks.h"
#include "dispatch.h"
#include "prelude.h"

#include "kernel_variants.h"  // the kernels, once per instruction set

namespace vdproj {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cva_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_c_in,
    const at::Tensor& w_r_in, const std::optional<at::Tensor>& b_r_in, bool causal,
    double softmax_scale) {
  const AttnDims d = check_attention_inputs(q_in, k_in, v_c_in, w_r_in, opt(b_r_in),
                                            softmax_scale);
  check_on_cpu(q_in);
  // The public API passes contiguous tensors; a direct call with views still works (copied).
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v_c = v_c_in.contiguous(),
                   w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> b_r = opt_contiguous(b_r_in);

  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, q.options().dtype(at::kFloat));
  at::Tensor ctx = at::empty({d.B, d.Tq, d.H, d.R}, q.options().dtype(accumulation_dtype(q)));
  const std::vector<int64_t> seqlen(d.B, d.Tk);
  const at::Tensor q_acc = to_accumulation(q);
  cpu::AttnArgs a = attn_args(q_acc, k, v_c, w_r, b_r, seqlen, causal, softmax_scale);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  VDPROJ_ISA_CALL(attention, kind_of(q), a);
  return {out, lse, ctx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cva_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_c_in, const at::Tensor& w_r_in, const at::Tensor& lse_in,
    const at::Tensor& ctx_in, bool causal, double softmax_scale) {
  const AttnDims d = check_backward_inputs(grad_out_in, q_in, k_in, v_c_in, w_r_in, lse_in,
                                           ctx_in, softmax_scale);
  check_on_cpu(q_in);
  const at::Tensor dout = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v_c = v_c_in.contiguous(), w_r = w_r_in.contiguous(),
                   lse = lse_in.contiguous(), ctx = ctx_in.contiguous();
  const auto opts = q.options();
  const at::Tensor q_acc = to_accumulation(q);
  at::Tensor dq = at::empty_like(q_acc), dk = at::empty(k.sizes(), opts),
             dvc = at::empty(v_c.sizes(), opts), dwr = at::empty(w_r.sizes(), opts),
             dbr = at::empty({d.H * d.D}, opts);
  cpu::BwdArgs a = bwd_args(dout, q_acc, k, v_c, w_r, lse, ctx, causal, softmax_scale);
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dvc = dvc.data_ptr();
  a.dwr = dwr.data_ptr();
  a.dbr = dbr.data_ptr();
  VDPROJ_ISA_CALL(attention_backward, kind_of(q), a);
  return {dq.to(q.scalar_type()), dk, dvc, dwr, dbr};
}

// Compress-on-write of Tnew new tokens at slots pos[b] .. pos[b] + Tnew - 1.
// Quantized caches get their rows quantized with per-row scales (SPEC 3c).
void append_new_tokens(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& w_c_in,
                       const std::optional<at::Tensor>& b_c_in, at::Tensor& k_cache,
                       at::Tensor& vc_cache, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& vc_scale,
                       const std::vector<int64_t>& pos) {
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous(), w_c = w_c_in.contiguous();
  const std::optional<at::Tensor> b_c = opt_contiguous(b_c_in);
  cpu::AppendArgs a = append_args(k, k_cache, k_scale, pos);
  a.jobs[0] = compress_job(v, w_c, b_c, vc_cache, vc_scale);
  a.njobs = 1;
  VDPROJ_ISA_CALL(append, kind_of(k), a);
}

at::Tensor kvcache_attention_cpu(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& vc_cache, const at::Tensor& w_r_in,
    const std::optional<at::Tensor>& b_r_in, const std::optional<at::Tensor>& k_in,
    const std::optional<at::Tensor>& v_in, const std::optional<at::Tensor>& w_c_in,
    const std::optional<at::Tensor>& b_c_in, const at::Tensor& cache_seqlens, bool causal,
    double softmax_scale, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& vc_scale) {
  const KvcacheDims d = check_kvcache_inputs(
      {q_in, k_cache, vc_cache, w_r_in, opt(b_r_in), opt(k_in), opt(v_in), opt(w_c_in),
       opt(b_c_in), cache_seqlens, opt(k_scale), opt(vc_scale)},
      softmax_scale);
  check_on_cpu(q_in);
  const std::vector<int64_t> pos = read_positions(cache_seqlens, d.B, d.Tmax, d.Tnew);
  std::vector<int64_t> seqlen(pos);
  for (int64_t& len : seqlen) len += d.Tnew;

  if (d.Tnew > 0 && d.B > 0) {
    append_new_tokens(*k_in, *v_in, *w_c_in, b_c_in, k_cache, vc_cache, k_scale, vc_scale, pos);
  }

  const at::Tensor q = q_in.contiguous(), w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> b_r = opt_contiguous(b_r_in);
  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.D}, q.options());
  const at::Tensor q_acc = to_accumulation(q);
  cpu::AttnArgs a = attn_args(q_acc, k_cache, vc_cache, w_r, b_r, seqlen, causal, softmax_scale);
  set_cache_reads(a, k_cache, k_scale, vc_cache, vc_scale);
  a.out = out.data_ptr();
  VDPROJ_ISA_CALL(attention, kind_of(q), a);
  return out;
}

// y = x @ weight.T + bias, or gelu of it, for decode-sized inputs (see linear_impl in kernels.h;
// the GELU is applied to each thread's outputs as they are finished). Forward only:
// the public decode_linear calls it when no gradient is needed and F.linear otherwise, so it has
// no Python validator to agree with; its checks raise RuntimeError.
at::Tensor decode_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in, bool gelu) {
  TORCH_CHECK(x_in.device().is_cpu(), "vdproj_ext: decode_linear: x must be a CPU tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "vdproj_ext: decode_linear: x must be float32 or float64, got ",
              py_dtype(x_in.scalar_type()));
  TORCH_CHECK(x_in.dim() >= 1, "vdproj_ext: decode_linear: x must have at least 1 dimension");
  TORCH_CHECK(weight_in.dim() == 2, "vdproj_ext: decode_linear: weight must be 2-D, got shape ",
              py_tuple(weight_in.sizes()));
  const int64_t K = x_in.size(-1), N = weight_in.size(0);
  const std::initializer_list<NamedTensor> params{{"weight", &weight_in}, {"bias", opt(bias_in)}};
  for (const auto& [name, t] : params) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x_in.scalar_type(),
                "vdproj_ext: decode_linear: ", name, " must have dtype ",
                py_dtype(x_in.scalar_type()), " and be on the CPU like x, got ",
                py_dtype(t->scalar_type()), " on ", t->device());
  }
  TORCH_CHECK(weight_in.size(1) == K, "vdproj_ext: decode_linear: weight must have shape (N, ",
              K, ") to match x's last dimension, got ", py_tuple(weight_in.sizes()));
  TORCH_CHECK(!bias_in.has_value() || bias_in->sizes() == at::IntArrayRef{N},
              "vdproj_ext: decode_linear: bias must have shape (", N, ",), got ",
              py_tuple(bias_in.has_value() ? bias_in->sizes() : at::IntArrayRef{}));
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = opt_contiguous(bias_in);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (K == 0) {  // an empty sum: y is the bias (or zeros)
    if (bias.has_value()) y.copy_(bias->expand_as(y)); else y.zero_();
    return gelu ? at::gelu(y) : y;
  }
  cpu::LinearArgs a{};
  a.x = x.data_ptr();
  a.w = weight.data_ptr();
  a.bias = opt_ptr(bias);
  a.y = y.data_ptr();
  a.M = x.numel() / K;
  a.N = N;
  a.K = K;
  a.gelu = gelu;
  VDPROJ_ISA_CALL(linear, kind_of(x), a);
  return y;
}

// Rows computed elsewhere (a folded model's latents and rotary keys), quantized into a cache at
// cache_seqlens[b] onwards (SPEC 3c), as the kvcache ops quantize the rows they compute. One
// call instead of the ten small ATen ops of vdproj_ext/ops/quant.py's write_rows.
void quantize_into_cpu(at::Tensor& cache, at::Tensor& scale, const at::Tensor& values_in,
                       const at::Tensor& cache_seqlens) {
  TORCH_CHECK_VALUE(cache.device().is_cpu() && scale.device().is_cpu() &&
                        values_in.device().is_cpu() && cache_seqlens.device().is_cpu(),
                    "quantize_into: cache, scale, values and cache_seqlens must be CPU tensors");
  TORCH_CHECK_TYPE(is_quantized(&cache), "quantize_into: cache must be torch.int8 or "
                   "torch.float8_e4m3fn, got ", py_dtype(cache.scalar_type()));
  TORCH_CHECK_VALUE(cache.dim() == 3 || cache.dim() == 4,
                    "quantize_into: cache must be (B, Tmax, n) or (B, Tmax, H, n), got shape ",
                    py_tuple(cache.sizes()));
  check_written_in_place({{"cache", &cache}});
  check_no_shared_elements({{"cache", &cache}, {"scale", &scale}});
  const at::ScalarType vt = values_in.scalar_type();
  TORCH_CHECK_TYPE(vt == at::kFloat || vt == at::kDouble || vt == at::kBFloat16 ||
                       vt == at::kHalf,
                   "quantize_into: values must be floating, got ", py_dtype(vt));
  const int64_t B = cache.size(0), T = values_in.dim() > 1 ? values_in.size(1) : 0;
  std::vector<int64_t> want(cache.sizes().begin(), cache.sizes().end());
  want[1] = T;
  TORCH_CHECK_VALUE(values_in.sizes() == at::IntArrayRef(want), "quantize_into: values must "
                    "have shape ", py_tuple(want), ", got ", py_tuple(values_in.sizes()));
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "quantize_into: scale must be "
                   "torch.float32, got ", py_dtype(scale.scalar_type()));
  const at::IntArrayRef rows = cache.sizes().slice(0, cache.dim() - 1);
  TORCH_CHECK_VALUE(scale.sizes() == rows, "quantize_into: scale must have shape ",
                    py_tuple(rows), ", got ", py_tuple(scale.sizes()));
  check_seqlens_tensor(cache_seqlens, B);
  const std::vector<int64_t> pos = read_positions(cache_seqlens, B, cache.size(1), T);
  if (B == 0 || T == 0) return;
  const at::Tensor values = values_in.contiguous();
  const bool heads = cache.dim() == 4;
  cpu::QuantWriteArgs a{};
  a.values = values.data_ptr();
  a.dst = cache.data_ptr();
  a.d_sb = cache.stride(0);
  a.d_st = cache.stride(1);
  a.d_sh = heads ? cache.stride(2) : 0;
  a.dst_kind = cache_kind_of(cache);
  a.scale = row_scales(scale);
  a.pos = pos.data();
  a.B = B;
  a.T = T;
  a.heads = heads ? cache.size(2) : 1;
  a.n = cache.size(-1);
  VDPROJ_ISA_CALL(quantize_into, kind_of(values), a);
}

}  // namespace
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CPU, m) {
  m.impl("cva_forward", &vdproj::cva_forward_cpu);
  m.impl("cva_backward", &vdproj::cva_backward_cpu);
  m.impl("kvcache_attention", &vdproj::kvcache_attention_cpu);
  m.impl("decode_linear", &vdproj::decode_linear_cpu);
  m.impl("quantize_into", &vdproj::quantize_into_cpu);
}
