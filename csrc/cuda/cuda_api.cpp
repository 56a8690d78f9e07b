// CUDA implementations of the vdproj_ext ops (schemas in csrc/bindings.cpp), V-only and latent
// keys (SPEC 3b): input checks (csrc/common/checks.h), what the kernels take
// (kernel_support.cpp), device guard, current stream, workspace allocation, parameter structs,
// and the GEMM parts (restore in the forward, dctx / dw_r / db_r in the backward, dq / dw_kr of
// the absorbed query) through ATen / cuBLAS.
// The kernels themselves are in the .cu files of this folder (see vdproj_cuda.h).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../common/absorbed_query.h"
#include "../common/checks.h"
#include "cuda_api.h"

namespace vdproj {
namespace cuda {
namespace {

// Inputs the checks admit but the kernels do not take (the public API routes them to its ATen
// paths first) raise a RuntimeError with the reason.
void check_kernels_take(const char* op, const at::Tensor& q, int64_t rank,
                        const std::vector<std::optional<at::Tensor>>& vector_loaded,
                        int64_t t_new, bool backward, int64_t rope_dim = 0, int64_t k_rank = 0) {
  const std::string why =
      kernel_support(op, q, rank, vector_loaded, t_new, backward, rope_dim, k_rank);
  TORCH_CHECK(why.empty(), "vdproj_ext CUDA kernels cannot take these inputs: ", why);
}

// The caches' storage (SPEC 3c): kernel_support admits quantized caches only when every cache
// tensor of the call has the same quantized dtype.
CacheType cache_type_of(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kChar: return CacheType::kInt8;
    case at::kFloat8_e4m3fn: return CacheType::kE4M3;
    default: return CacheType::kModel;
  }
}

// The attention's parameters, in final mode with one split. keys (B, *, H, D) and values
// (B, *, R) are read through their strides (contiguous inputs or the caches); sequence b sees
// min((seqlens ? seqlens[b] : 0) + len_add, len_max) keys.
AttnParams attn_params(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                       const int32_t* seqlens, int64_t len_add, int64_t len_max, bool causal,
                       double softmax_scale) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = keys.data_ptr();
  p.vc = values.data_ptr();
  p.q_sb = q.stride(0); p.q_st = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = keys.stride(0); p.k_st = keys.stride(1); p.k_sh = keys.stride(2);
  p.vc_sb = values.stride(0); p.vc_st = values.stride(1);
  set_attn_common(p, seqlens, len_add, len_max, q.size(0), q.size(1), q.size(2),
                  static_cast<int>(q.size(3)), *kernel_dtype(q.scalar_type()), causal, softmax_scale);
  p.R = values.size(2);
  p.heads_per_tile = heads_per_tile(p.H, p.Tq);
  return p;
}

// out (B, Tq, H, D) = ctx_h @ w_r[h].T + b_r[h], zero rows where lse == -inf; float32 math.
at::Tensor restore_with_aten(const at::Tensor& ctx_f, const at::Tensor& lse, const at::Tensor& w_r,
                             const std::optional<at::Tensor>& b_r, at::ScalarType out_dtype) {
  const int64_t B = ctx_f.size(0), Tq = ctx_f.size(1), H = ctx_f.size(2), R = ctx_f.size(3);
  const int64_t D = w_r.size(0) / H;
  const at::Tensor w = w_r.to(at::kFloat).reshape({H, D, R});
  at::Tensor o = at::matmul(ctx_f.view({B * Tq, H, R}).transpose(0, 1), w.transpose(1, 2));
  o = o.transpose(0, 1).reshape({B, Tq, H, D});
  if (b_r.has_value()) o.add_(b_r->to(at::kFloat).view({H, D}));
  o.masked_fill_(lse.eq(-std::numeric_limits<float>::infinity()).permute({0, 2, 1}).unsqueeze(-1),
                 0.0);
  return o.to(out_dtype);
}

// The GEMM part of a backward through the restore, in float32: dctx (B*Tq, H, R) = dO_h @ w_r[h],
// delta (B, H, Tq) = rowsum(dctx * ctx), and the gradients of w_r and b_r. Rows that see no key
// (lse = -inf) output a constant zero: no gradient flows through them at all.
struct RestoreGrads {
  at::Tensor dctx, delta, dw, db;
};
RestoreGrads restore_backward(const at::Tensor& grad_out, const at::Tensor& w_r,
                              const at::Tensor& lse, const at::Tensor& ctx) {
  const int64_t B = grad_out.size(0), Tq = grad_out.size(1), H = grad_out.size(2);
  const int64_t D = grad_out.size(3), R = ctx.size(3);
  const at::Tensor empty =
      lse.eq(-std::numeric_limits<float>::infinity()).permute({0, 2, 1}).unsqueeze(-1);
  const at::Tensor dout = grad_out.to(at::kFloat).masked_fill(empty, 0.0).contiguous();
  const at::Tensor w = w_r.to(at::kFloat).reshape({H, D, R});
  const at::Tensor dout_h = dout.view({B * Tq, H, D}).transpose(0, 1);  // (H, B*Tq, D)
  const at::Tensor ctx_f = ctx.to(at::kFloat).contiguous();
  const at::Tensor ctx_h = ctx_f.view({B * Tq, H, R}).transpose(0, 1);  // (H, B*Tq, R)
  RestoreGrads g;
  g.dctx = at::matmul(dout_h, w).transpose(0, 1).contiguous();  // (B*Tq, H, R)
  g.delta = (g.dctx.view({B, Tq, H, R}) * ctx_f).sum(-1).permute({0, 2, 1}).contiguous();
  g.dw = at::matmul(dout_h.transpose(1, 2), ctx_h).reshape({H * D, R});
  g.db = dout.sum(at::IntArrayRef{0, 1}).reshape({H * D});
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cva_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_c_in,
    const at::Tensor& w_r_in, const std::optional<at::Tensor>& b_r, bool causal,
    double softmax_scale) {
  const AttnDims d = check_attention_inputs(q_in, k_in, v_c_in, w_r_in, opt(b_r), softmax_scale);
  // The public API passes contiguous tensors; a direct call with views still works (copied).
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v_c = v_c_in.contiguous();
  check_kernels_take("cva", q, d.R, {k, v_c}, 0, false);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({d.B, d.Tq, d.H, d.R}, fopts);
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, fopts);
  AttnParams p = attn_params(q, k, v_c, nullptr, d.Tk, d.Tk, causal, softmax_scale);
  p.ctx_out = ctx_f.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  if (d.B * d.Tq * d.H > 0) launch_attention(p, stream);

  at::Tensor out = restore_with_aten(ctx_f, lse, w_r_in, b_r, q.scalar_type());
  return {out, lse, ctx_f};  // ctx in accumulation precision (check_backward_extras)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cva_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_c_in, const at::Tensor& w_r, const at::Tensor& softmax_lse,
    const at::Tensor& ctx, bool causal, double softmax_scale) {
  const AttnDims d = check_backward_inputs(grad_out, q_in, k_in, v_c_in, w_r, softmax_lse, ctx,
                                           softmax_scale);
  const int64_t B = d.B, Tq = d.Tq, H = d.H, D = d.D, Tk = d.Tk, R = d.R;
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v_c = v_c_in.contiguous();
  check_kernels_take("cva", q, R, {}, 0, true);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto fopts = q.options().dtype(at::kFloat);
  const at::Tensor lse = softmax_lse.contiguous();

  const RestoreGrads g = restore_backward(grad_out, w_r, lse, ctx);
  const at::Tensor &dctx = g.dctx, &delta = g.delta, &dw = g.dw, &db = g.db;

  at::Tensor dq = at::zeros({B, Tq, H, D}, fopts);
  at::Tensor dk = at::zeros({B, Tk, H, D}, fopts);
  at::Tensor dvc = at::zeros({B, Tk, R}, fopts);
  BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.vc = v_c.data_ptr();
  p.dctx = dctx.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dvc = dvc.data_ptr<float>();
  p.B = B; p.Tq = Tq; p.Tk = Tk; p.H = H; p.R = R;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.dtype = *kernel_dtype(q.scalar_type());
  p.head_dim = static_cast<int>(D);
  launch_attention_bwd(p, stream);

  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dvc.to(st), dw.to(st), db.to(st)};
}

// The lengths are validated before anything is written, as on the CPU: one device-to-host read
// per call. While a CUDA graph is being captured no sync is allowed; the kernels then clamp
// lengths to [0, Tmax] and drop writes past Tmax, so bad lengths cannot write out of bounds,
// but go unreported.
void check_seqlens_on_device(const at::Tensor& seqlens, const KvcacheDims& d,
                             cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (d.B == 0 || capture != cudaStreamCaptureStatusNone) return;
  const auto [lo, hi] = at::aminmax(seqlens);
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU);
  check_seqlens_range(range[0].item<int32_t>(), range[1].item<int32_t>(), d.Tmax, d.Tnew);
}

// The row scales of a quantized V-only cache (SPEC 3c), for the write and the attention alike.
template <typename Params>
void set_cache_scales(Params& p, const at::Tensor& k_scale, const at::Tensor& vc_scale) {
  p.k_scale = k_scale.data_ptr<float>();
  p.ks_sb = k_scale.stride(0); p.ks_st = k_scale.stride(1); p.ks_sh = k_scale.stride(2);
  p.vc_scale = vc_scale.data_ptr<float>();
  p.vs_sb = vc_scale.stride(0); p.vs_st = vc_scale.stride(1);
}

// Compress-on-write of the new tokens k, v (contiguous) at slots seqlens[b] + t; quantized
// caches get their rows' scales in k_scale and vc_scale (through their strides).
void compress_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& w_c,
                         const std::optional<at::Tensor>& b_c, at::Tensor& k_cache,
                         at::Tensor& vc_cache, const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& vc_scale, const at::Tensor& seqlens,
                         const KvcacheDims& d, cudaStream_t stream) {
  CompressParams c{};
  c.k = k.data_ptr();
  c.v = v.data_ptr();
  c.w_c = w_c.data_ptr();
  c.b_c = opt_ptr(b_c);
  c.k_cache = k_cache.data_ptr();
  c.vc_cache = vc_cache.data_ptr();
  c.kc_sb = k_cache.stride(0); c.kc_st = k_cache.stride(1); c.kc_sh = k_cache.stride(2);
  c.vcc_sb = vc_cache.stride(0); c.vcc_st = vc_cache.stride(1);
  c.seqlens = seqlens.data_ptr<int32_t>();
  c.B = d.B; c.Tnew = d.Tnew; c.H = d.H; c.R = d.R;
  c.len_max = d.Tmax;
  c.dtype = *kernel_dtype(k.scalar_type());
  c.head_dim = static_cast<int>(d.D);
  c.cache = cache_type_of(k_cache);
  if (c.cache != CacheType::kModel) set_cache_scales(c, *k_scale, *vc_scale);
  launch_compress_write(c, stream);
}

// The decode step after compress-on-write, for the V-only and the latent-key attention (same
// outputs): the attention p (partial mode, p.nsplit chosen) over each sequence's valid prefix,
// the combine when split, then the restore once per output row: out (B, Tq, H, D) like q.
template <typename Params>
at::Tensor attend_combine_restore(Params p, void (*launch)(const Params&, cudaStream_t),
                                  const at::Tensor& q, const at::Tensor& w_r,
                                  const std::optional<at::Tensor>& b_r, cudaStream_t stream) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), R = w_r.size(1);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (B == 0 || Tq == 0 || H == 0) return out;
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({B, Tq, H, R}, fopts);
  at::Tensor lse = at::empty({B, H, Tq}, fopts);
  if (p.nsplit == 1) {
    p.final_mode = true;
    p.ctx_out = ctx_f.data_ptr<float>();
    p.lse_out = lse.data_ptr<float>();
    launch(p, stream);
  } else {
    at::Tensor part_acc = at::empty({B, p.nsplit, p.nrows, R}, fopts);
    at::Tensor part_ml = at::empty({B, p.nsplit, p.nrows, 2}, fopts);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
    launch(p, stream);
    launch_combine(combine_params(p), ctx_f.data_ptr<float>(), lse.data_ptr<float>(), stream);
    // part_acc / part_ml are freed here but stay valid for the kernels queued on this stream
    // (the caching allocator reuses them only for work ordered after them on the same stream).
  }
  CombineParams c = combine_params(p);
  c.w_r = w_r.data_ptr();
  c.b_r = opt_ptr(b_r);
  c.out = out.data_ptr();
  launch_restore(c, ctx_f.data_ptr<float>(), lse.data_ptr<float>(), stream);
  return out;
}

// Restore-on-read attention over each sequence's valid prefix, split-K (flash-decoding) when
// B * H is small, then the restore once per output row.
at::Tensor attend_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& vc_cache,
                        const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& vc_scale, const at::Tensor& w_r,
                        const std::optional<at::Tensor>& b_r, const at::Tensor& seqlens,
                        const KvcacheDims& d, bool causal, double softmax_scale,
                        cudaStream_t stream) {
  AttnParams p = attn_params(q, k_cache, vc_cache, seqlens.data_ptr<int32_t>(), d.Tnew, d.Tmax,
                             causal, softmax_scale);
  p.cache = cache_type_of(k_cache);
  if (p.cache != CacheType::kModel) set_cache_scales(p, *k_scale, *vc_scale);
  p.final_mode = false;
  if (d.B > 0 && d.Tq > 0 && d.H > 0) p.nsplit = attn_num_splits(p, d.Tmax);
  return attend_combine_restore(p, &launch_attention, q, w_r, b_r, stream);
}

at::Tensor kvcache_attention_cuda(
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
  const at::Tensor q = q_in.contiguous(), w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> b_r = opt_contiguous(b_r_in), k = opt_contiguous(k_in),
                                  v = opt_contiguous(v_in), w_c = opt_contiguous(w_c_in),
                                  b_c = opt_contiguous(b_c_in);
  check_kernels_take("kvcache", q, d.R, {k_cache, vc_cache, w_r, k, v, w_c}, d.Tnew, false);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor seqlens = cache_seqlens.contiguous();
  check_seqlens_on_device(seqlens, d, stream);
  // The write happens also when there is no query to answer, as on the CPU.
  if (d.Tnew > 0) {
    compress_new_tokens(*k, *v, *w_c, b_c, k_cache, vc_cache, k_scale, vc_scale, seqlens, d,
                        stream);
  }
  return attend_cache(q, k_cache, vc_cache, k_scale, vc_scale, w_r, b_r, seqlens, d, causal,
                      softmax_scale, stream);
}

// ---- latent keys (SPEC 3b) ---------------------------------------------------------------------

// The absorbed query q_eff (B, Tq, H, Dr + Rk) in float32, from q and w_kr (contiguous).
at::Tensor absorbed_query(const at::Tensor& q, const at::Tensor& w_kr, int64_t rope_dim,
                          cudaStream_t stream) {
  at::Tensor q_eff = at::empty({q.size(0), q.size(1), q.size(2), rope_dim + w_kr.size(1)},
                               q.options().dtype(at::kFloat));
  LatentQueryParams p{};
  p.q = q.data_ptr();
  p.w_kr = w_kr.data_ptr();
  p.q_eff = q_eff.data_ptr<float>();
  p.M = q.size(0) * q.size(1); p.H = q.size(2); p.Dr = rope_dim; p.Rk = w_kr.size(1);
  p.dtype = *kernel_dtype(q.scalar_type());
  p.head_dim = static_cast<int>(q.size(3));
  launch_latent_query(p, stream);
  return q_eff;
}

// The latent attention's parameters, in final mode with one split: rotary keys (B, *, H, Dr), the
// key latent (B, *, Rk) or none (the joint latent: the V_c rows) and the values (B, *, Rv), read
// through their strides; sequence b sees min((seqlens ? seqlens[b] : 0) + len_add, len_max) keys.
LatentAttnParams latent_attn_params(const at::Tensor& q, const at::Tensor& q_eff,
                                    const at::Tensor& rope, const at::Tensor* k_lat,
                                    const at::Tensor& values, const int32_t* seqlens,
                                    int64_t len_add, int64_t len_max, bool causal,
                                    double softmax_scale) {
  LatentAttnParams p{};
  const at::Tensor& lat = k_lat != nullptr ? *k_lat : values;
  p.q_eff = q_eff.data_ptr<float>();
  p.krope = rope.data_ptr();
  p.klat = lat.data_ptr();
  p.vc = values.data_ptr();
  p.kr_sb = rope.stride(0); p.kr_st = rope.stride(1); p.kr_sh = rope.stride(2);
  p.kl_sb = lat.stride(0); p.kl_st = lat.stride(1);
  p.vc_sb = values.stride(0); p.vc_st = values.stride(1);
  set_attn_common(p, seqlens, len_add, len_max, q.size(0), q.size(1), q.size(2),
                  static_cast<int>(q.size(3)), *kernel_dtype(q.scalar_type()), causal, softmax_scale);
  p.Dr = rope.size(3); p.Rk = lat.size(2); p.Rv = values.size(2);
  p.joint = k_lat == nullptr;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ckv_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_rope_in, const std::optional<at::Tensor>& k_c_in,
    const at::Tensor& v_c_in, const at::Tensor& w_kr_in, const at::Tensor& w_r,
    const std::optional<at::Tensor>& b_r, bool causal, double softmax_scale) {
  const LatentDims d = check_latent_attention_inputs(q_in, k_rope_in, opt(k_c_in), v_c_in,
                                                     w_kr_in, w_r, opt(b_r), softmax_scale);
  // The public API passes contiguous tensors; a direct call with views still works (copied).
  const at::Tensor q = q_in.contiguous(), k_rope = k_rope_in.contiguous(),
                   v_c = v_c_in.contiguous(), w_kr = w_kr_in.contiguous();
  const std::optional<at::Tensor> k_c = opt_contiguous(k_c_in);
  check_kernels_take("ckv", q, d.Rv, {k_rope, k_c, v_c}, 0, false, d.Dr, k_c ? d.Rk : 0);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({d.B, d.Tq, d.H, d.Rv}, fopts);
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, fopts);
  const at::Tensor q_eff = absorbed_query(q, w_kr, d.Dr, stream);
  LatentAttnParams p = latent_attn_params(q, q_eff, k_rope, opt(k_c), v_c, nullptr, d.T, d.T,
                                          causal, softmax_scale);
  p.ctx_out = ctx_f.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  if (d.B * d.Tq * d.H > 0) launch_latent_attention(p, stream);

  at::Tensor out = restore_with_aten(ctx_f, lse, w_r, b_r, q.scalar_type());
  return {out, lse, ctx_f};  // ctx in accumulation precision (check_backward_extras)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ckv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q_in,
                  const at::Tensor& k_rope_in, const std::optional<at::Tensor>& k_c_in,
                  const at::Tensor& v_c_in, const at::Tensor& w_kr_in, const at::Tensor& w_r,
                  const at::Tensor& softmax_lse, const at::Tensor& ctx, bool causal,
                  double softmax_scale) {
  const LatentDims d = check_latent_backward_inputs(grad_out, q_in, k_rope_in, opt(k_c_in),
                                                    v_c_in, w_kr_in, w_r, softmax_lse, ctx,
                                                    softmax_scale);
  const at::Tensor q = q_in.contiguous(), k_rope = k_rope_in.contiguous(),
                   v_c = v_c_in.contiguous(), w_kr = w_kr_in.contiguous();
  const std::optional<at::Tensor> k_c = opt_contiguous(k_c_in);
  check_kernels_take("ckv", q, d.Rv, {}, 0, true, d.Dr, k_c ? d.Rk : 0);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto fopts = q.options().dtype(at::kFloat);
  const at::Tensor lse = softmax_lse.contiguous();
  const RestoreGrads g = restore_backward(grad_out, w_r, lse, ctx);
  const at::Tensor q_eff = absorbed_query(q, w_kr, d.Dr, stream);

  at::Tensor dq_eff = at::zeros(q_eff.sizes(), fopts);
  at::Tensor dk_rope = at::zeros({d.B, d.T, d.H, d.Dr}, fopts);
  at::Tensor dk_c = at::zeros({k_c ? d.B : 0, d.T, d.Rk}, fopts);
  at::Tensor dvc = at::zeros({d.B, d.T, d.Rv}, fopts);
  LatentBwdParams p{};
  p.q_eff = q_eff.data_ptr<float>();
  p.krope = k_rope.data_ptr();
  p.klat = opt_ptr(k_c);
  p.vc = v_c.data_ptr();
  p.dctx = g.dctx.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = g.delta.data_ptr<float>();
  p.dq_eff = dq_eff.data_ptr<float>();
  p.dkrope = dk_rope.data_ptr<float>();
  p.dklat = dk_c.data_ptr<float>();
  p.dvc = dvc.data_ptr<float>();
  p.B = d.B; p.Tq = d.Tq; p.Tk = d.T; p.H = d.H; p.Dr = d.Dr; p.Rk = d.Rk; p.Rv = d.Rv;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.joint = !k_c.has_value();
  p.dtype = *kernel_dtype(q.scalar_type());
  launch_latent_attention_bwd(p, stream);

  const auto [dq, dw_kr] = absorbed_query_grads(q, w_kr, dq_eff, d.Dr);
  const auto st = q.scalar_type();
  return {dq, dk_rope.to(st), k_c ? dk_c.to(st) : at::empty({0}, q.options()), dvc.to(st),
          dw_kr, g.dw.to(st), g.db.to(st)};
}

// The new tokens of a latent decode step and their compress weights, contiguous.
struct LatentNewTokens {
  at::Tensor k, v, w_c;
  std::optional<at::Tensor> b_c, w_kc, b_kc;
};

// The scales of quantized latent-key caches (SPEC 3c), each None or (B, Tmax[, H]) float32.
struct LatentScales {
  const at::Tensor* krope;
  const at::Tensor* kc;
  const at::Tensor* vc;
};

// The row scales of the rotary keys and V_c in a quantized latent-key cache, for the write
// and the attention alike (the key latent's differ: the joint latent reads V_c's).
template <typename Params>
void set_rope_and_value_scales(Params& p, const LatentScales& scales) {
  p.kr_scale = scales.krope->data_ptr<float>();
  p.krs_sb = scales.krope->stride(0); p.krs_st = scales.krope->stride(1);
  p.krs_sh = scales.krope->stride(2);
  p.vc_scale = scales.vc->data_ptr<float>();
  p.vs_sb = scales.vc->stride(0); p.vs_st = scales.vc->stride(1);
}

// Compress-on-write at slots seqlens[b] + t: the rotary keys, then the key and value latents
// (or the joint latent); quantized caches get their rows' scales.
void compress_latent_tokens(const LatentNewTokens& n, const at::Tensor& krope_cache,
                            const std::optional<at::Tensor>& kc_cache,
                            const at::Tensor& vc_cache, const LatentScales& scales,
                            const at::Tensor& seqlens, const LatentDims& d, cudaStream_t stream) {
  LatentCompressParams c{};
  c.k = n.k.data_ptr();
  c.v = n.v.data_ptr();
  c.w_kc = opt_ptr(n.w_kc);
  c.b_kc = opt_ptr(n.b_kc);
  c.w_c = n.w_c.data_ptr();
  c.b_c = opt_ptr(n.b_c);
  c.krope_cache = krope_cache.data_ptr();
  c.kc_cache = kc_cache ? kc_cache->data_ptr() : nullptr;
  c.vc_cache = vc_cache.data_ptr();
  c.kr_sb = krope_cache.stride(0); c.kr_st = krope_cache.stride(1); c.kr_sh = krope_cache.stride(2);
  c.kc_sb = kc_cache ? kc_cache->stride(0) : 0; c.kc_st = kc_cache ? kc_cache->stride(1) : 0;
  c.vc_sb = vc_cache.stride(0); c.vc_st = vc_cache.stride(1);
  c.seqlens = seqlens.data_ptr<int32_t>();
  c.B = d.B; c.Tnew = n.k.size(1); c.H = d.H; c.Dr = d.Dr; c.Rk = d.Rk; c.Rv = d.Rv;
  c.len_max = d.T;
  c.joint = !kc_cache.has_value();
  c.dtype = *kernel_dtype(n.k.scalar_type());
  c.head_dim = static_cast<int>(d.D);
  c.cache = cache_type_of(vc_cache);
  if (c.cache != CacheType::kModel) {
    set_rope_and_value_scales(c, scales);
    c.kc_scale = scales.kc != nullptr ? scales.kc->data_ptr<float>() : nullptr;
    c.kcs_sb = scales.kc != nullptr ? scales.kc->stride(0) : 0;
    c.kcs_st = scales.kc != nullptr ? scales.kc->stride(1) : 0;
  }
  launch_latent_compress_write(c, stream);
}

at::Tensor ckv_kvcache_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& krope_cache,
    const std::optional<at::Tensor>& kc_cache, const at::Tensor& vc_cache,
    const at::Tensor& w_kr_in, const at::Tensor& w_r_in, const std::optional<at::Tensor>& b_r_in,
    const std::optional<at::Tensor>& k_in, const std::optional<at::Tensor>& v_in,
    const std::optional<at::Tensor>& w_kc_in, const std::optional<at::Tensor>& b_kc_in,
    const std::optional<at::Tensor>& w_c_in, const std::optional<at::Tensor>& b_c_in,
    const at::Tensor& cache_seqlens, bool causal, double softmax_scale,
    const std::optional<at::Tensor>& krope_scale, const std::optional<at::Tensor>& kc_scale,
    const std::optional<at::Tensor>& vc_scale) {
  const LatentKvcacheInputs in{q_in, krope_cache, opt(kc_cache), vc_cache, w_kr_in, w_r_in,
                               opt(b_r_in), opt(k_in), opt(v_in), opt(w_kc_in), opt(b_kc_in),
                               opt(w_c_in), opt(b_c_in), cache_seqlens, opt(krope_scale),
                               opt(kc_scale), opt(vc_scale)};
  const auto [d, t_new] = check_latent_kvcache_inputs(in, softmax_scale);
  const at::Tensor q = q_in.contiguous(), w_kr = w_kr_in.contiguous(), w_r = w_r_in.contiguous();
  const std::optional<at::Tensor> b_r = opt_contiguous(b_r_in), k = opt_contiguous(k_in),
                                  v = opt_contiguous(v_in), w_kc = opt_contiguous(w_kc_in),
                                  w_c = opt_contiguous(w_c_in);
  const int64_t k_rank = kc_cache ? d.Rk : 0;
  const LatentScales scales{opt(krope_scale), opt(kc_scale), opt(vc_scale)};
  check_kernels_take("ckv_kvcache", q, d.Rv, {krope_cache, kc_cache, vc_cache, w_r, k, v, w_kc, w_c},
                     t_new, false, d.Dr, k_rank);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor seqlens = cache_seqlens.contiguous();
  check_seqlens_on_device(seqlens, KvcacheDims{d.B, d.Tq, d.H, d.D, d.T, d.Rv, t_new}, stream);
  // The write happens also when there is no query to answer, as on the CPU.
  if (t_new > 0) {
    const LatentNewTokens n{*k, *v, *w_c, opt_contiguous(b_c_in), w_kc, opt_contiguous(b_kc_in)};
    compress_latent_tokens(n, krope_cache, kc_cache, vc_cache, scales, seqlens, d, stream);
  }
  const at::Tensor q_eff = absorbed_query(q, w_kr, d.Dr, stream);
  LatentAttnParams p = latent_attn_params(q, q_eff, krope_cache, opt(kc_cache), vc_cache,
                                          seqlens.data_ptr<int32_t>(), t_new, d.T, causal,
                                          softmax_scale);
  p.cache = cache_type_of(vc_cache);
  if (p.cache != CacheType::kModel) {
    set_rope_and_value_scales(p, scales);
    const at::Tensor& lat_scale = scales.kc != nullptr ? *scales.kc : *scales.vc;  // joint: V_c's
    p.kl_scale = lat_scale.data_ptr<float>();
    p.kls_sb = lat_scale.stride(0); p.kls_st = lat_scale.stride(1);
  }
  p.final_mode = false;
  if (d.B > 0 && d.Tq > 0 && d.H > 0) p.nsplit = latent_num_splits(p, d.T);
  return attend_combine_restore(p, &launch_latent_attention, q, w_r, b_r, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CUDA, m) {
  m.impl("cva_forward", &vdproj::cuda::cva_forward_cuda);
  m.impl("cva_backward", &vdproj::cuda::cva_backward_cuda);
  m.impl("kvcache_attention", &vdproj::cuda::kvcache_attention_cuda);
  m.impl("ckv_forward", &vdproj::cuda::ckv_forward_cuda);
  m.impl("ckv_backward", &vdproj::cuda::ckv_backward_cuda);
  m.impl("ckv_kvcache_attention", &vdproj::cuda::ckv_kvcache_attention_cuda);
}
