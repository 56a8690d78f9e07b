// CUDA implementations of the vdproj_ext ops (schemas in csrc/bindings.cpp): input checks
// (csrc/common/checks.h), what the kernels take (kernel_support.cpp), device guard, current
// stream, workspace allocation, parameter structs, and the GEMM parts (restore in the forward,
// dctx / dw_r / db_r in the backward) through ATen / cuBLAS.
// The kernels themselves are in the .cu files of this folder (see vdproj_cuda.h).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "cuda_api.h"

namespace vdproj {
namespace cuda {
namespace {

// Inputs the checks admit but the kernels do not take (the public API routes them to its ATen
// paths first) raise a RuntimeError with the reason.
void check_kernels_take(const char* op, const at::Tensor& q, int64_t rank,
                        const std::vector<std::optional<at::Tensor>>& vector_loaded,
                        int64_t t_new, bool backward) {
  const std::string why = kernel_support(op, q, rank, vector_loaded, t_new, backward);
  TORCH_CHECK(why.empty(), "vdproj_ext CUDA kernels cannot take these inputs: ", why);
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
  p.seqlens = seqlens;
  p.len_add = len_add;
  p.len_max = len_max;
  p.B = q.size(0); p.Tq = q.size(1); p.H = q.size(2); p.R = values.size(2);
  p.nrows = p.Tq * p.H;
  p.nsplit = 1;
  p.heads_per_tile = heads_per_tile(p.H, p.Tq);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.final_mode = true;
  p.dtype = *kernel_dtype(q.scalar_type());
  p.head_dim = static_cast<int>(q.size(3));
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
  return {out, lse, ctx_f.to(q.scalar_type())};
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

  // Rows that see no key output a constant zero: no gradient flows through them at all.
  const at::Tensor empty =
      lse.eq(-std::numeric_limits<float>::infinity()).permute({0, 2, 1}).unsqueeze(-1);
  const at::Tensor dout = grad_out.to(at::kFloat).masked_fill(empty, 0.0).contiguous();
  const at::Tensor w = w_r.to(at::kFloat).reshape({H, D, R});
  const at::Tensor dout_h = dout.view({B * Tq, H, D}).transpose(0, 1);  // (H, B*Tq, D)
  const at::Tensor ctx_f = ctx.to(at::kFloat).contiguous();
  const at::Tensor ctx_h = ctx_f.view({B * Tq, H, R}).transpose(0, 1);  // (H, B*Tq, R)
  const at::Tensor dctx = at::matmul(dout_h, w).transpose(0, 1).contiguous();  // (B*Tq, H, R)
  const at::Tensor delta =
      (dctx.view({B, Tq, H, R}) * ctx_f).sum(-1).permute({0, 2, 1}).contiguous();  // (B, H, Tq)
  const at::Tensor dw = at::matmul(dout_h.transpose(1, 2), ctx_h).reshape({H * D, R});
  const at::Tensor db = dout.sum({0, 1}).reshape({H * D});

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

// Compress-on-write of the new tokens k, v (contiguous) at slots seqlens[b] + t.
void compress_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& w_c,
                         const std::optional<at::Tensor>& b_c, at::Tensor& k_cache,
                         at::Tensor& vc_cache, const at::Tensor& seqlens, const KvcacheDims& d,
                         cudaStream_t stream) {
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
  launch_compress_write(c, stream);
}

// Restore-on-read attention over each sequence's valid prefix, split-K (flash-decoding) when
// B * H is small, then the restore once per output row.
at::Tensor attend_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& vc_cache,
                        const at::Tensor& w_r, const std::optional<at::Tensor>& b_r,
                        const at::Tensor& seqlens, const KvcacheDims& d, bool causal,
                        double softmax_scale, cudaStream_t stream) {
  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.D}, q.options());
  if (d.B == 0 || d.Tq == 0 || d.H == 0) return out;
  AttnParams p = attn_params(q, k_cache, vc_cache, seqlens.data_ptr<int32_t>(), d.Tnew, d.Tmax,
                             causal, softmax_scale);
  p.final_mode = false;
  p.nsplit = attn_num_splits(p, d.Tmax);

  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({d.B, d.Tq, d.H, d.R}, fopts);
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, fopts);
  if (p.nsplit == 1) {
    p.final_mode = true;
    p.ctx_out = ctx_f.data_ptr<float>();
    p.lse_out = lse.data_ptr<float>();
    launch_attention(p, stream);
  } else {
    at::Tensor part_acc = at::empty({d.B, p.nsplit, p.nrows, d.R}, fopts);
    at::Tensor part_ml = at::empty({d.B, p.nsplit, p.nrows, 2}, fopts);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
    launch_attention(p, stream);
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

at::Tensor kvcache_attention_cuda(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& vc_cache, const at::Tensor& w_r_in,
    const std::optional<at::Tensor>& b_r_in, const std::optional<at::Tensor>& k_in,
    const std::optional<at::Tensor>& v_in, const std::optional<at::Tensor>& w_c_in,
    const std::optional<at::Tensor>& b_c_in, const at::Tensor& cache_seqlens, bool causal,
    double softmax_scale) {
  const KvcacheDims d = check_kvcache_inputs(
      {q_in, k_cache, vc_cache, w_r_in, opt(b_r_in), opt(k_in), opt(v_in), opt(w_c_in),
       opt(b_c_in), cache_seqlens},
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
  if (d.Tnew > 0) compress_new_tokens(*k, *v, *w_c, b_c, k_cache, vc_cache, seqlens, d, stream);
  return attend_cache(q, k_cache, vc_cache, w_r, b_r, seqlens, d, causal, softmax_scale, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CUDA, m) {
  m.impl("cva_forward", &vdproj::cuda::cva_forward_cuda);
  m.impl("cva_backward", &vdproj::cuda::cva_backward_cuda);
  m.impl("kvcache_attention", &vdproj::cuda::kvcache_attention_cuda);
}
