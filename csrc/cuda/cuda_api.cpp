// CUDA implementations of the vdproj_ext ops (schemas in csrc/vdproj_ops.cpp): input checks,
// device guard, current stream, workspace allocation, parameter structs, and the GEMM parts
// (restore in the forward, dctx / dw_r / db_r in the backward) through ATen / cuBLAS.
// The kernels themselves are in the .cu files of this folder (see vdproj_cuda.h).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "vdproj_cuda.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634;

DType storage_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "vdproj_ext CUDA kernels: ", name, " must be float32, float16 or bfloat16, "
              "got ", t.scalar_type(), " (float64 runs on the reference backend)");
  return DType::kFloat32;
}

// Device, dtype and rank of one input, against the reference tensor q.
void check_input(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "vdproj_ext CUDA: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "vdproj_ext CUDA: ", name, " must be on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vdproj_ext CUDA: ", name, " must have dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "vdproj_ext CUDA: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "vdproj_ext CUDA: ", name,
              " must have a unit stride in its last dimension, got strides ", t.strides());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "vdproj_ext CUDA: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "vdproj_ext CUDA: ", name, " must be contiguous");
}

struct AttnDims {
  int64_t B, Tq, H, D, Tk, R;
};

// q (B, Tq, H, D), k (B, Tk, H, D), v_c (B, Tk, R), w_r (H*D, R): the inputs forward and
// backward share. Checks device, dtype, rank and shapes against q; returns the sizes.
AttnDims check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c,
                                const at::Tensor& w_r) {
  check_input(q, "q", q, 4);
  check_input(k, "k", q, 4);
  check_input(v_c, "v_c", q, 3);
  check_input(w_r, "w_r", q, 2);
  const AttnDims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), v_c.size(2)};
  check_shape(k, "k", {d.B, d.Tk, d.H, d.D});
  check_shape(v_c, "v_c", {d.B, d.Tk, d.R});
  check_shape(w_r, "w_r", {d.H * d.D, d.R});
  return d;
}

// The kernels move 16-byte vectors: the base address and every outer stride of a tensor they
// read that way must be 16-byte aligned.
void check_vector_aligned(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  const int64_t elt = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "vdproj_ext CUDA: ", name,
              " must start at a 16-byte aligned address (e.g. not a view at an odd offset)");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || (t.stride(d) * elt) % 16 == 0, "vdproj_ext CUDA: ", name,
                " strides must be multiples of 16 bytes in every dimension but the last, got ",
                t.strides());
  }
}

void check_dims(int64_t head_dim, int64_t rank) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128,
              "vdproj_ext CUDA kernels support head_dim 64 or 128, got ", head_dim);
  TORCH_CHECK(rank > 0 && rank % 8 == 0 && rank <= kMaxRank,
              "vdproj_ext CUDA kernels need the rank R (last dim of v_c / vc_cache) to be a "
              "positive multiple of 8 and at most ", kMaxRank, ", got ", rank);
}

void check_scale(double softmax_scale) {
  TORCH_CHECK(std::isfinite(softmax_scale), "vdproj_ext CUDA: softmax_scale must be finite, got ",
              softmax_scale);
}

// Bound on the heads spanned by kRowsPerBlock consecutive head-major rows.
int64_t heads_per_tile(int64_t H, int64_t Tq) {
  const int64_t bound = (kRowsPerBlock - 1) / Tq + 2;
  return bound < H ? bound : H;
}

const void* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// out (B, Tq, H, D) = ctx_h @ w_r[h].T + b_r[h], zero rows where lse == -inf; float32 math.
at::Tensor restore_with_aten(const at::Tensor& ctx_f, const at::Tensor& lse, const at::Tensor& w_r,
                             const c10::optional<at::Tensor>& b_r, at::ScalarType out_dtype) {
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
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c, const at::Tensor& w_r,
    const c10::optional<at::Tensor>& b_r, bool causal, double softmax_scale) {
  const AttnDims dims = check_attention_inputs(q, k, v_c, w_r);
  const int64_t B = dims.B, Tq = dims.Tq, H = dims.H, D = dims.D, Tk = dims.Tk, R = dims.R;
  const DType dt = storage_dtype(q, "q");
  if (b_r.has_value()) {
    check_input(*b_r, "b_r", q, 1);
    check_shape(*b_r, "b_r", {H * D});
  }
  check_dims(D, R);
  check_scale(softmax_scale);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"},
                         {&v_c, "v_c"}, {&w_r, "w_r"}}) {
    check_contiguous(*t, name);
  }
  check_vector_aligned(k, "k");  // staged with 16-byte cp.async
  check_vector_aligned(v_c, "v_c");

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({B, Tq, H, R}, fopts);
  at::Tensor lse = at::empty({B, H, Tq}, fopts);

  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.vc = v_c.data_ptr();
  p.q_sb = q.stride(0); p.q_st = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k.stride(0); p.k_st = k.stride(1); p.k_sh = k.stride(2);
  p.vc_sb = v_c.stride(0); p.vc_st = v_c.stride(1);
  p.seqlens = nullptr;
  p.len_add = Tk;
  p.len_max = Tk;
  p.B = B; p.Tq = Tq; p.H = H; p.R = R;
  p.nrows = Tq * H;
  p.nsplit = 1;
  p.heads_per_tile = heads_per_tile(H, Tq);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.final_mode = true;
  p.ctx_out = ctx_f.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  p.dtype = dt;
  p.head_dim = static_cast<int>(D);
  if (B * Tq * H > 0) launch_attention(p, stream);

  at::Tensor out = restore_with_aten(ctx_f, lse, w_r, b_r, q.scalar_type());
  return {out, lse, ctx_f.to(q.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cva_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c,
    const at::Tensor& w_r, const at::Tensor& softmax_lse, const at::Tensor& ctx, bool causal,
    double softmax_scale) {
  const AttnDims dims = check_attention_inputs(q, k, v_c, w_r);
  const int64_t B = dims.B, Tq = dims.Tq, H = dims.H, D = dims.D, Tk = dims.Tk, R = dims.R;
  check_input(grad_out, "grad_out", q, 4);
  check_input(ctx, "ctx", q, 4);
  const DType dt = storage_dtype(q, "q");
  check_shape(grad_out, "grad_out", {B, Tq, H, D});
  check_shape(ctx, "ctx", {B, Tq, H, R});
  TORCH_CHECK(softmax_lse.is_cuda() && softmax_lse.device() == q.device() &&
                  softmax_lse.scalar_type() == at::kFloat,
              "vdproj_ext CUDA: softmax_lse must be a float32 tensor on ", q.device());
  check_shape(softmax_lse, "softmax_lse", {B, H, Tq});
  check_dims(D, R);
  check_scale(softmax_scale);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"},
                         {&v_c, "v_c"}}) {
    check_contiguous(*t, name);
  }

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
  p.dtype = dt;
  p.head_dim = static_cast<int>(D);
  launch_attention_bwd(p, stream);

  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dvc.to(st), dw.to(st), db.to(st)};
}

at::Tensor kvcache_attention_cuda(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& vc_cache, const at::Tensor& w_r,
    const c10::optional<at::Tensor>& b_r, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& w_c,
    const c10::optional<at::Tensor>& b_c, const at::Tensor& cache_seqlens, bool causal,
    double softmax_scale) {
  check_input(q, "q", q, 4);
  check_input(k_cache, "k_cache", q, 4);
  check_input(vc_cache, "vc_cache", q, 3);
  check_input(w_r, "w_r", q, 2);
  const DType dt = storage_dtype(q, "q");
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tmax = k_cache.size(1), R = vc_cache.size(2);
  check_shape(k_cache, "k_cache", {B, Tmax, H, D});
  check_shape(vc_cache, "vc_cache", {B, Tmax, R});
  check_shape(w_r, "w_r", {H * D, R});
  if (b_r.has_value()) {
    check_input(*b_r, "b_r", q, 1);
    check_shape(*b_r, "b_r", {H * D});
  }
  check_dims(D, R);
  check_scale(softmax_scale);
  check_contiguous(q, "q");
  check_contiguous(w_r, "w_r");
  if (b_r.has_value()) check_contiguous(*b_r, "b_r");
  if (b_c.has_value()) check_contiguous(*b_c, "b_c");
  check_vector_aligned(k_cache, "k_cache");
  check_vector_aligned(vc_cache, "vc_cache");
  check_vector_aligned(w_r, "w_r");
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.device() == q.device(),
              "vdproj_ext CUDA: cache_seqlens must be on ", q.device());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt,
              "vdproj_ext CUDA: cache_seqlens must be int32, got ", cache_seqlens.scalar_type());
  check_shape(cache_seqlens, "cache_seqlens", {B});
  TORCH_CHECK(k.has_value() == v.has_value(), "vdproj_ext CUDA: k and v must be given together");
  const int64_t Tnew = k.has_value() ? k->size(1) : 0;
  if (k.has_value()) {
    check_input(*k, "k", q, 4);
    check_input(*v, "v", q, 3);
    check_shape(*k, "k", {B, Tnew, H, D});
    check_shape(*v, "v", {B, Tnew, H * D});
    TORCH_CHECK(w_c.has_value(), "vdproj_ext CUDA: w_c (shape (R, H*D)) is required with new k, v");
    check_input(*w_c, "w_c", q, 2);
    check_shape(*w_c, "w_c", {R, H * D});
    if (b_c.has_value()) {
      check_input(*b_c, "b_c", q, 1);
      check_shape(*b_c, "b_c", {R});
    }
    for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&*k, "k"}, {&*v, "v"},
                           {&*w_c, "w_c"}}) {
      check_contiguous(*t, name);
      check_vector_aligned(*t, name);
    }
    TORCH_CHECK(Tnew <= Tmax, "vdproj_ext CUDA: ", Tnew, " new tokens cannot fit a cache of Tmax=",
                Tmax);
  }

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor seqlens = cache_seqlens.contiguous();
  // Validate the lengths before writing anything, as the CPU op does (ValueError, the messages
  // of ops.py, which leaves this check to the op): one device-to-host read per call. While a CUDA graph is
  // being captured no sync is allowed; the kernels then clamp lengths to [0, Tmax] and drop
  // writes past Tmax, so bad lengths cannot write out of bounds, but go unreported.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (B > 0 && capture == cudaStreamCaptureStatusNone) {
    const auto [lo_t, hi_t] = at::aminmax(seqlens);
    const at::Tensor range = at::stack({lo_t, hi_t}).to(at::kCPU);
    const int64_t lo = range[0].item<int32_t>(), hi = range[1].item<int32_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= Tmax, "cache_seqlens must lie in [0, ", Tmax,
                      "] (the cache's Tmax), got values in [", lo, ", ", hi, "]");
    TORCH_CHECK_VALUE(hi + Tnew <= Tmax, "writing ", Tnew, " new tokens at cache_seqlens (max ",
                      hi, ") would overflow the cache of Tmax=", Tmax, "; nothing was written");
  }
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());

  // 1. Compress-on-write of the new tokens, right before the attention that reads them (also
  // when there is no query to answer: the write still happens, as on the CPU).
  if (Tnew > 0) {
    CompressParams c{};
    c.k = k->data_ptr();
    c.v = v->data_ptr();
    c.w_c = w_c->data_ptr();
    c.b_c = opt_ptr(b_c);
    c.k_cache = k_cache.data_ptr();
    c.vc_cache = vc_cache.data_ptr();
    c.kc_sb = k_cache.stride(0); c.kc_st = k_cache.stride(1); c.kc_sh = k_cache.stride(2);
    c.vcc_sb = vc_cache.stride(0); c.vcc_st = vc_cache.stride(1);
    c.seqlens = seqlens.data_ptr<int32_t>();
    c.B = B; c.Tnew = Tnew; c.H = H; c.R = R;
    c.len_max = Tmax;
    c.dtype = dt;
    c.head_dim = static_cast<int>(D);
    launch_compress_write(c, stream);
  }
  if (B == 0 || Tq == 0 || H == 0) return out;

  // 2. Restore-on-read attention over the valid prefix, split-K when B * H is small.
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.vc = vc_cache.data_ptr();
  p.q_sb = q.stride(0); p.q_st = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k_cache.stride(0); p.k_st = k_cache.stride(1); p.k_sh = k_cache.stride(2);
  p.vc_sb = vc_cache.stride(0); p.vc_st = vc_cache.stride(1);
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.len_add = Tnew;
  p.len_max = Tmax;
  p.B = B; p.Tq = Tq; p.H = H; p.R = R;
  p.nrows = Tq * H;
  p.heads_per_tile = heads_per_tile(H, Tq);
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.final_mode = false;
  p.dtype = dt;
  p.head_dim = static_cast<int>(D);
  p.nsplit = attn_num_splits(p, Tmax);

  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ctx_f = at::empty({B, Tq, H, R}, fopts);
  at::Tensor lse = at::empty({B, H, Tq}, fopts);
  CombineParams cp{};
  if (p.nsplit == 1) {
    p.final_mode = true;
    p.ctx_out = ctx_f.data_ptr<float>();
    p.lse_out = lse.data_ptr<float>();
    launch_attention(p, stream);
  } else {
    at::Tensor part_acc = at::empty({B, p.nsplit, p.nrows, R}, fopts);
    at::Tensor part_ml = at::empty({B, p.nsplit, p.nrows, 2}, fopts);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
    launch_attention(p, stream);
    cp.part_acc = p.part_acc;
    cp.part_ml = p.part_ml;
    cp.B = B; cp.Tq = Tq; cp.H = H; cp.R = R; cp.nrows = p.nrows; cp.nsplit = p.nsplit;
    cp.dtype = dt;
    cp.head_dim = static_cast<int>(D);
    launch_combine(cp, ctx_f.data_ptr<float>(), lse.data_ptr<float>(), stream);
    // part_acc / part_ml are freed here but stay valid for the kernels queued on this stream
    // (the caching allocator reuses them only for work ordered after them on the same stream).
  }

  // 3. Restore once per output row, after the weighted sum.
  cp.w_r = w_r.data_ptr();
  cp.b_r = opt_ptr(b_r);
  cp.out = out.data_ptr();
  cp.B = B; cp.Tq = Tq; cp.H = H; cp.R = R; cp.nrows = p.nrows; cp.nsplit = p.nsplit;
  cp.dtype = dt;
  cp.head_dim = static_cast<int>(D);
  launch_restore(cp, ctx_f.data_ptr<float>(), lse.data_ptr<float>(), stream);
  return out;
}

}  // namespace

// Shared memory (bytes) each kernel needs at the least for a shape: {attention with one stage
// (0 without queries), compress-on-write (0 without new tokens), backward}. ops.py compares
// these with the device's per-block limit and sends larger shapes to its ATen paths; asking
// here keeps the sizes in one place, next to the layouts. dtype: float32, float16 or bfloat16.
std::vector<int64_t> kernel_smem_bytes(const std::string& dtype, int64_t Tq, int64_t H, int64_t D,
                                       int64_t R, int64_t Tnew) {
  DType dt = DType::kFloat32;
  if (dtype == "float16") dt = DType::kFloat16;
  else if (dtype == "bfloat16") dt = DType::kBFloat16;
  else TORCH_CHECK(dtype == "float32", "kernel_smem_bytes: dtype must be float32, float16 or "
                   "bfloat16, got ", dtype);
  check_dims(D, R);
  const int64_t attention =
      Tq > 0 ? int64_t(attn_min_smem_bytes(dt, int(D), heads_per_tile(H, Tq), R)) : 0;
  CompressParams c{};
  c.H = H;
  c.head_dim = static_cast<int>(D);
  const int64_t compress = Tnew > 0 ? int64_t(compress_smem_bytes(c)) : 0;
  BwdParams b{};
  b.head_dim = static_cast<int>(D);
  b.R = R;
  return {attention, compress, int64_t(bwd_smem_bytes(b))};
}

}  // namespace cuda
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CUDA, m) {
  m.impl("cva_forward", &vdproj::cuda::cva_forward_cuda);
  m.impl("cva_backward", &vdproj::cuda::cva_backward_cuda);
  m.impl("kvcache_attention", &vdproj::cuda::kvcache_attention_cuda);
}
