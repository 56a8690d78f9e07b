// Input checks of the attention ops, shared by the CPU wrappers (csrc/cpu/cpu_ops.cpp) and the
// CUDA wrappers (csrc/cuda/cuda_api.cpp).
//
// They raise what the public validator of vdproj_ext.ops raises, in the same order, with the
// same text: ValueError (TORCH_CHECK_VALUE) for ranks, shapes, devices, strides and values,
// TypeError (TORCH_CHECK_TYPE) for dtypes. A direct torch.ops.vdproj_ext call and the public API
// therefore report one bad input the same way. Shapes, dtypes and devices are printed as Python
// prints them: (2, 5, 3, 8), torch.float32, cuda:0.
//
// What a backend's kernels cannot take (e.g. CUDA head_dim 96) is not bad input: it is asked
// separately (csrc/cuda/kernel_support.cpp) and raises a RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "optional_tensor.h"

namespace vdproj {

// ---- Python-style formatting ------------------------------------------------------------------

// A shape or stride tuple as Python prints it: (2, 5, 3, 8), (4,), ().
inline std::string py_tuple(at::IntArrayRef values) {
  std::ostringstream out;
  out << '(';
  for (size_t i = 0; i < values.size(); ++i) out << (i > 0 ? ", " : "") << values[i];
  if (values.size() == 1) out << ',';
  out << ')';
  return out.str();
}

// A dtype as Python prints it: torch.float32.
inline std::string py_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + c10::toString(type);
  }
}

// A non-finite float as Python prints it (the only floats these messages print).
inline std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::ostringstream out;
  out << x;
  return out.str();
}

// ---- single checks ------------------------------------------------------------------------------

inline void check_dim(const at::Tensor* t, const char* name, int64_t ndim) {
  if (t == nullptr) return;
  TORCH_CHECK_VALUE(t->dim() == ndim, name, " must be ", ndim, "-D, got shape ",
                    py_tuple(t->sizes()));
}

inline void check_shape(const at::Tensor* t, const char* name,
                        std::initializer_list<int64_t> expected) {
  if (t == nullptr) return;
  const at::IntArrayRef want(expected.begin(), expected.size());
  TORCH_CHECK_VALUE(t->sizes() == want, name, " must have shape ", py_tuple(want), ", got ",
                    py_tuple(t->sizes()));
}

inline void check_scale(double softmax_scale) {
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "softmax_scale must be finite, got ",
                    py_float(softmax_scale));
}

// 0 <= every length <= Tmax, and Tnew more tokens fit: lo and hi are the smallest and largest of
// cache_seqlens, read by the caller before it writes anything.
inline void check_seqlens_range(int64_t lo, int64_t hi, int64_t max_len, int64_t t_new) {
  TORCH_CHECK_VALUE(lo >= 0 && hi <= max_len, "cache_seqlens must lie in [0, ", max_len,
                    "] (the cache's Tmax), got values in [", lo, ", ", hi, "]");
  TORCH_CHECK_VALUE(hi + t_new <= max_len, "writing ", t_new, " new tokens at cache_seqlens (max ",
                    hi, ") would overflow the cache of Tmax=", max_len, "; nothing was written");
}

// ---- groups of inputs: the first present tensor is the one the others must match -------------

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// The first present tensor of a group: the one the others must match.
inline const NamedTensor& first_present(std::initializer_list<NamedTensor> named) {
  for (const NamedTensor& item : named) {
    if (item.second != nullptr) return item;
  }
  TORCH_INTERNAL_ASSERT(false, "a group of inputs without a tensor");
}

inline void check_same_device(std::initializer_list<NamedTensor> named) {
  const auto& [first_name, first] = first_present(named);
  for (const auto& [name, t] : named) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->device() == first->device(), name, " must be on ",
                      first->device().str(), " like ", first_name, ", got ", t->device().str());
  }
}

inline void check_same_dtype(std::initializer_list<NamedTensor> named) {
  const auto& [first_name, first] = first_present(named);
  const at::ScalarType want = first->scalar_type();
  TORCH_CHECK_TYPE(want == at::kFloat || want == at::kHalf || want == at::kBFloat16 ||
                       want == at::kDouble,
                   first_name, " must be float32, float16, bfloat16 or float64, got ",
                   py_dtype(want));
  for (const auto& [name, t] : named) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == want, name, " must have dtype ", py_dtype(want),
                     " like ", first_name, ", got ", py_dtype(t->scalar_type()));
  }
}

// ---- quantized caches (SPEC 3c) ------------------------------------------------------------------

inline bool is_quantized(const at::Tensor* cache) {
  return cache != nullptr && (cache->scalar_type() == at::kChar ||
                              cache->scalar_type() == at::kFloat8_e4m3fn);
}

// A cache tensor and the scale that comes with it when it is quantized.
struct CacheWithScale {
  const char* cache_name;
  const at::Tensor* cache;
  const char* scale_name;
  const at::Tensor* scale;
};

// Each cache has the model's dtype (q's) or is quantized.
inline void check_cache_dtypes(const at::Tensor& q, std::initializer_list<CacheWithScale> caches) {
  for (const CacheWithScale& c : caches) {
    if (c.cache == nullptr || c.cache->scalar_type() == q.scalar_type() || is_quantized(c.cache))
      continue;
    TORCH_CHECK_TYPE(false, c.cache_name, " must have dtype ", py_dtype(q.scalar_type()),
                     " like q, or be quantized (torch.int8 or torch.float8_e4m3fn with ",
                     c.scale_name, "), got ", py_dtype(c.cache->scalar_type()));
  }
}

// The scale of one cache tensor: required (float32, of the rows' shape) when the cache is
// quantized, None when it is not. Any strides: it is written in place through them.
inline void check_cache_scale(const CacheWithScale& c, at::IntArrayRef rows) {
  const bool quantized = is_quantized(c.cache);
  if (c.scale == nullptr) {
    TORCH_CHECK_VALUE(!quantized, c.scale_name, " (float32, shape ", py_tuple(rows),
                      ") is required: ", c.cache_name, " is ",
                      quantized ? py_dtype(c.cache->scalar_type()) : "");
    return;
  }
  TORCH_CHECK_VALUE(quantized, c.scale_name, " must be None: ", c.cache_name, " is ",
                    c.cache == nullptr ? std::string("None") : py_dtype(c.cache->scalar_type()),
                    ", not quantized (scales come with torch.int8 or torch.float8_e4m3fn "
                    "caches)");
  TORCH_CHECK_TYPE(c.scale->scalar_type() == at::kFloat, c.scale_name,
                   " must have dtype torch.float32, got ", py_dtype(c.scale->scalar_type()));
  TORCH_CHECK_VALUE(c.scale->sizes() == rows, c.scale_name, " must have shape ", py_tuple(rows),
                    ", got ", py_tuple(c.scale->sizes()));
}

// ---- the inputs of each op, in the order of vdproj_ext/ops/checks.py: ranks, devices, the
// softmax scale, then dtypes, shapes, strides ------------------------------------------------

struct AttnDims {
  int64_t B, Tq, H, D, Tk, R;
};

// cva_forward: q (B, Tq, H, D), k (B, Tk, H, D), v_c (B, Tk, R), w_r (H*D, R), b_r (H*D,).
inline AttnDims check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v_c, const at::Tensor& w_r,
                                       const at::Tensor* b_r, double softmax_scale) {
  check_dim(&q, "q", 4);
  check_dim(&k, "k", 4);
  check_dim(&v_c, "v_c", 3);
  check_dim(&w_r, "w_r", 2);
  check_dim(b_r, "b_r", 1);
  check_same_device({{"q", &q}, {"k", &k}, {"v_c", &v_c}, {"w_r", &w_r}, {"b_r", b_r}});
  check_scale(softmax_scale);
  check_same_dtype({{"q", &q}, {"k", &k}, {"v_c", &v_c}, {"w_r", &w_r}, {"b_r", b_r}});
  const AttnDims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), v_c.size(-1)};
  check_shape(&k, "k", {d.B, d.Tk, d.H, d.D});
  check_shape(&v_c, "v_c", {d.B, d.Tk, d.R});
  check_shape(&w_r, "w_r", {d.H * d.D, d.R});
  check_shape(b_r, "b_r", {d.H * d.D});
  return d;
}

// Accumulation precision: float64 for float64, float32 otherwise.
inline at::ScalarType accumulation_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// What a backward op takes besides its forward's inputs: grad_out (B, Tq, H, D) like q, ctx
// (B, Tq, H, R) in accumulation_dtype(q), and softmax_lse (B, H, Tq) float32 (as the forward
// returned them). The backward's row sums dctx . ctx and dW_r read ctx; saved as bf16 it gave
// up to 4.6x the gradient error of a float32-accumulating implementation (CPU, 2026-12-05).
inline void check_backward_extras(const at::Tensor& q, const at::Tensor& grad_out,
                                  const at::Tensor& softmax_lse, const at::Tensor& ctx,
                                  const AttnDims& d) {
  check_dim(&grad_out, "grad_out", 4);
  check_dim(&ctx, "ctx", 4);
  check_dim(&softmax_lse, "softmax_lse", 3);
  check_same_device({{"q", &q}, {"grad_out", &grad_out}, {"ctx", &ctx},
                     {"softmax_lse", &softmax_lse}});
  check_same_dtype({{"q", &q}, {"grad_out", &grad_out}});
  TORCH_CHECK_TYPE(ctx.scalar_type() == accumulation_dtype(q), "ctx must have dtype ",
                   py_dtype(accumulation_dtype(q)), " (as the forward returned it) for q of ",
                   py_dtype(q.scalar_type()), ", got ",
                   py_dtype(ctx.scalar_type()));
  TORCH_CHECK_TYPE(softmax_lse.scalar_type() == at::kFloat,
                   "softmax_lse must have dtype torch.float32, got ",
                   py_dtype(softmax_lse.scalar_type()));
  check_shape(&grad_out, "grad_out", {d.B, d.Tq, d.H, d.D});
  check_shape(&ctx, "ctx", {d.B, d.Tq, d.H, d.R});
  check_shape(&softmax_lse, "softmax_lse", {d.B, d.H, d.Tq});
}

// cva_backward: the forward's inputs and the backward extras.
inline AttnDims check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v_c,
                                      const at::Tensor& w_r, const at::Tensor& softmax_lse,
                                      const at::Tensor& ctx, double softmax_scale) {
  const AttnDims d = check_attention_inputs(q, k, v_c, w_r, nullptr, softmax_scale);
  check_backward_extras(q, grad_out, softmax_lse, ctx, d);
  return d;
}

struct KvcacheDims {
  int64_t B, Tq, H, D, Tmax, R, Tnew;
};

struct KvcacheInputs {
  const at::Tensor& q;
  const at::Tensor& k_cache;
  const at::Tensor& vc_cache;
  const at::Tensor& w_r;
  const at::Tensor* b_r;
  const at::Tensor* k;
  const at::Tensor* v;
  const at::Tensor* w_c;
  const at::Tensor* b_c;
  const at::Tensor& cache_seqlens;
  const at::Tensor* k_scale;   // quantized k_cache only (SPEC 3c)
  const at::Tensor* vc_scale;  // quantized vc_cache only
};

// New tokens: k (B, Tnew, H, D) and v (B, Tnew, H*D) together or neither. Whether given.
inline bool check_new_kv(const at::Tensor* k, const at::Tensor* v, int64_t B, int64_t H,
                         int64_t D) {
  TORCH_CHECK_VALUE((k == nullptr) == (v == nullptr),
                    "k and v must be given together (new tokens to append) or both None");
  if (k == nullptr) return false;
  const int64_t t_new = k->size(1);
  check_shape(k, "k", {B, t_new, H, D});
  check_shape(v, "v", {B, t_new, H * D});
  return true;
}

// The caches are written in place through their last dimension: it must be unit-stride.
inline void check_written_in_place(std::initializer_list<NamedTensor> caches) {
  for (const auto& [name, cache] : caches) {
    if (cache == nullptr) continue;
    TORCH_CHECK_VALUE(cache->stride(-1) == 1, name,
                      " must have a unit stride in its last dimension (got strides ",
                      py_tuple(cache->strides()), "); it is written in place");
  }
}

// Tensors written in place need one memory location per element: in a view with a stride of 0
// (as expand gives) one batch row's new tokens would overwrite another's.
inline void check_no_shared_elements(std::initializer_list<NamedTensor> written) {
  for (const auto& [name, t] : written) {
    if (t == nullptr) continue;
    bool shared = false;
    for (int64_t i = 0; i < t->dim(); ++i) shared |= t->stride(i) == 0 && t->size(i) > 1;
    TORCH_CHECK_VALUE(!shared, name, " has elements that share memory (shape ",
                      py_tuple(t->sizes()), ", strides ", py_tuple(t->strides()),
                      ", as from expand); new tokens are written into it in place, so pass a "
                      "tensor that owns each element (for example .contiguous())");
  }
}

inline void check_seqlens_tensor(const at::Tensor& lens, int64_t B) {
  TORCH_CHECK_TYPE(lens.scalar_type() == at::kInt,
                   "cache_seqlens must have dtype torch.int32, got ", py_dtype(lens.scalar_type()));
  TORCH_CHECK_VALUE(lens.dim() == 1 && lens.size(0) == B, "cache_seqlens must have shape (",
                    B, ",), got ", py_tuple(lens.sizes()));
}

// The new tokens of kvcache_attention: k and v (check_new_kv), then w_c (R, H*D) required,
// b_c (R,). Returns Tnew (0 without new tokens).
inline int64_t check_new_tokens(const KvcacheInputs& in, const KvcacheDims& d) {
  if (!check_new_kv(in.k, in.v, d.B, d.H, d.D)) return 0;
  const int64_t t_new = in.k->size(1);
  TORCH_CHECK_VALUE(in.w_c != nullptr,
                    "w_c (shape (R, H*D)) is required when new k and v are given");
  check_shape(in.w_c, "w_c", {d.R, d.H * d.D});
  check_shape(in.b_c, "b_c", {d.R});
  return t_new;
}

// kvcache_attention: q (B, Tq, H, D), k_cache (B, Tmax, H, D), vc_cache (B, Tmax, R) (both with
// a unit last stride: written in place), w_r (H*D, R), b_r (H*D,), the new tokens, and
// cache_seqlens int32 (B,). The range of cache_seqlens is checked by the caller, which reads it.
inline KvcacheDims check_kvcache_inputs(const KvcacheInputs& in, double softmax_scale) {
  check_dim(&in.q, "q", 4);
  check_dim(&in.k_cache, "k_cache", 4);
  check_dim(&in.vc_cache, "vc_cache", 3);
  check_dim(&in.w_r, "w_r", 2);
  check_dim(in.b_r, "b_r", 1);
  check_dim(in.k, "k", 4);
  check_dim(in.v, "v", 3);
  check_dim(in.w_c, "w_c", 2);
  check_dim(in.b_c, "b_c", 1);
  check_dim(in.k_scale, "k_scale", 3);
  check_dim(in.vc_scale, "vc_scale", 2);
  check_same_device({{"q", &in.q}, {"k_cache", &in.k_cache}, {"vc_cache", &in.vc_cache},
                     {"w_r", &in.w_r}, {"b_r", in.b_r}, {"k", in.k}, {"v", in.v},
                     {"w_c", in.w_c}, {"b_c", in.b_c}, {"cache_seqlens", &in.cache_seqlens},
                     {"k_scale", in.k_scale}, {"vc_scale", in.vc_scale}});
  check_scale(softmax_scale);
  check_same_dtype({{"q", &in.q}, {"w_r", &in.w_r}, {"b_r", in.b_r}, {"k", in.k},
                    {"v", in.v}, {"w_c", in.w_c}, {"b_c", in.b_c}});
  const CacheWithScale k_entry{"k_cache", &in.k_cache, "k_scale", in.k_scale};
  const CacheWithScale vc_entry{"vc_cache", &in.vc_cache, "vc_scale", in.vc_scale};
  check_cache_dtypes(in.q, {k_entry, vc_entry});
  KvcacheDims d{in.q.size(0), in.q.size(1), in.q.size(2), in.q.size(3), in.k_cache.size(1),
                in.vc_cache.size(-1), 0};
  check_shape(&in.k_cache, "k_cache", {d.B, d.Tmax, d.H, d.D});
  check_shape(&in.vc_cache, "vc_cache", {d.B, d.Tmax, d.R});
  check_shape(&in.w_r, "w_r", {d.H * d.D, d.R});
  check_shape(in.b_r, "b_r", {d.H * d.D});
  check_written_in_place({{"k_cache", &in.k_cache}, {"vc_cache", &in.vc_cache}});
  check_cache_scale(k_entry, {d.B, d.Tmax, d.H});
  check_cache_scale(vc_entry, {d.B, d.Tmax});
  d.Tnew = check_new_tokens(in, d);
  if (in.k != nullptr)
    check_no_shared_elements({{"k_cache", &in.k_cache}, {"vc_cache", &in.vc_cache},
                              {"k_scale", in.k_scale}, {"vc_scale", in.vc_scale}});
  check_seqlens_tensor(in.cache_seqlens, d.B);
  return d;
}

// ---- latent keys (SPEC 3b): ckv_forward, ckv_backward, ckv_kvcache_attention ----------------
// Dr (rotary dims per head) is read from k_rope / krope_cache. The key latent is k_c /
// kc_cache, or the value latent itself when that is absent (the joint latent).

struct LatentDims {
  int64_t B, Tq, H, D, Dr, T, Rk, Rv;  // T: Tk, or Tmax for the caches
};

// The shapes both latent ops share: rope (B, T, H, Dr) with 0 <= Dr < D, the key latent
// (B, T, Rk) (absent: the joint latent, Rk = Rv), the value latent (B, T, Rv),
// w_kr (H*(D-Dr), Rk), w_r (H*D, Rv), b_r (H*D,).
inline LatentDims check_latent_shapes(const at::Tensor& q, NamedTensor rope, NamedTensor k_lat,
                                      NamedTensor v_lat, const at::Tensor& w_kr,
                                      const at::Tensor& w_r, const at::Tensor* b_r) {
  const auto& [rope_name, rope_t] = rope;
  LatentDims d{q.size(0), q.size(1), q.size(2), q.size(3), rope_t->size(-1), rope_t->size(1),
               0, v_lat.second->size(-1)};
  TORCH_CHECK_VALUE(0 <= d.Dr && d.Dr < d.D, rope_name,
                    " must have 0 <= Dr < D rotary dims in its last dimension (D=", d.D,
                    ", q's head_dim), got Dr=", d.Dr);
  d.Rk = k_lat.second != nullptr ? k_lat.second->size(-1) : d.Rv;
  check_shape(rope_t, rope_name, {d.B, d.T, d.H, d.Dr});
  check_shape(k_lat.second, k_lat.first, {d.B, d.T, d.Rk});
  check_shape(v_lat.second, v_lat.first, {d.B, d.T, d.Rv});
  check_shape(&w_kr, "w_kr", {d.H * (d.D - d.Dr), d.Rk});
  check_shape(&w_r, "w_r", {d.H * d.D, d.Rv});
  check_shape(b_r, "b_r", {d.H * d.D});
  return d;
}

// ckv_forward: q (B, Tq, H, D), k_rope (B, Tk, H, Dr), k_c (B, Tk, Rk) or none, v_c (B, Tk, Rv),
// w_kr (H*(D-Dr), Rk), w_r (H*D, Rv), b_r (H*D,).
inline LatentDims check_latent_attention_inputs(const at::Tensor& q, const at::Tensor& k_rope,
                                                const at::Tensor* k_c, const at::Tensor& v_c,
                                                const at::Tensor& w_kr, const at::Tensor& w_r,
                                                const at::Tensor* b_r, double softmax_scale) {
  check_dim(&q, "q", 4);
  check_dim(&k_rope, "k_rope", 4);
  check_dim(k_c, "k_c", 3);
  check_dim(&v_c, "v_c", 3);
  check_dim(&w_kr, "w_kr", 2);
  check_dim(&w_r, "w_r", 2);
  check_dim(b_r, "b_r", 1);
  check_same_device({{"q", &q}, {"k_rope", &k_rope}, {"k_c", k_c}, {"v_c", &v_c},
                     {"w_kr", &w_kr}, {"w_r", &w_r}, {"b_r", b_r}});
  check_scale(softmax_scale);
  check_same_dtype({{"q", &q}, {"k_rope", &k_rope}, {"k_c", k_c}, {"v_c", &v_c},
                    {"w_kr", &w_kr}, {"w_r", &w_r}, {"b_r", b_r}});
  return check_latent_shapes(q, {"k_rope", &k_rope}, {"k_c", k_c}, {"v_c", &v_c}, w_kr, w_r,
                             b_r);
}

// ckv_backward: the forward's inputs and the backward extras (ctx (B, Tq, H, Rv)).
inline LatentDims check_latent_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                               const at::Tensor& k_rope, const at::Tensor* k_c,
                                               const at::Tensor& v_c, const at::Tensor& w_kr,
                                               const at::Tensor& w_r,
                                               const at::Tensor& softmax_lse,
                                               const at::Tensor& ctx, double softmax_scale) {
  const LatentDims d =
      check_latent_attention_inputs(q, k_rope, k_c, v_c, w_kr, w_r, nullptr, softmax_scale);
  check_backward_extras(q, grad_out, softmax_lse, ctx, {d.B, d.Tq, d.H, d.D, d.T, d.Rv});
  return d;
}

struct LatentKvcacheInputs {
  const at::Tensor& q;
  const at::Tensor& krope_cache;
  const at::Tensor* kc_cache;  // null: the joint latent
  const at::Tensor& vc_cache;
  const at::Tensor& w_kr;
  const at::Tensor& w_r;
  const at::Tensor* b_r;
  const at::Tensor* k;
  const at::Tensor* v;
  const at::Tensor* w_kc;
  const at::Tensor* b_kc;
  const at::Tensor* w_c;
  const at::Tensor* b_c;
  const at::Tensor& cache_seqlens;
  const at::Tensor* krope_scale;  // quantized caches only (SPEC 3c)
  const at::Tensor* kc_scale;
  const at::Tensor* vc_scale;
};

// The new tokens of ckv_kvcache_attention and their compress weights: w_kc (Rk, H*Dn) and b_kc
// with separate latents (never with the joint latent, new tokens or not); w_c (Rv, H*D), or
// (Rv, H*Dn + H*D) for the joint latent, and b_c. Returns Tnew (0 without new tokens).
inline int64_t check_new_latent_tokens(const LatentKvcacheInputs& in, const LatentDims& d) {
  const bool joint = in.kc_cache == nullptr;
  const int64_t nope = d.H * (d.D - d.Dr);
  TORCH_CHECK_VALUE(!joint || (in.w_kc == nullptr && in.b_kc == nullptr),
                    in.w_kc != nullptr ? "w_kc" : "b_kc",
                    " must be None with the joint latent (kc_cache is None): w_c compresses "
                    "[k_nope | v] into vc_cache");
  if (!check_new_kv(in.k, in.v, d.B, d.H, d.D)) return 0;
  if (!joint) {
    TORCH_CHECK_VALUE(in.w_kc != nullptr,
                      "w_kc (shape (Rk, H*Dn)) is required when new k and v are given with a "
                      "separate key latent (kc_cache)");
    check_shape(in.w_kc, "w_kc", {d.Rk, nope});
    check_shape(in.b_kc, "b_kc", {d.Rk});
  }
  TORCH_CHECK_VALUE(in.w_c != nullptr, "w_c (shape (R, ", joint ? "H*Dn + H*D" : "H*D",
                    ")) is required when new k and v are given");
  check_shape(in.w_c, "w_c", {d.Rv, joint ? nope + d.H * d.D : d.H * d.D});
  check_shape(in.b_c, "b_c", {d.Rv});
  return in.k->size(1);
}

// ckv_kvcache_attention: q (B, Tq, H, D), krope_cache (B, Tmax, H, Dr), kc_cache (B, Tmax, Rk)
// or none, vc_cache (B, Tmax, Rv) (all with a unit last stride: written in place), w_kr, w_r,
// b_r, the new tokens, and cache_seqlens int32 (B,). Returns the dims and Tnew. The range of
// cache_seqlens is checked by the caller, which reads it.
inline std::pair<LatentDims, int64_t> check_latent_kvcache_inputs(const LatentKvcacheInputs& in,
                                                                  double softmax_scale) {
  check_dim(&in.q, "q", 4);
  check_dim(&in.krope_cache, "krope_cache", 4);
  check_dim(in.kc_cache, "kc_cache", 3);
  check_dim(&in.vc_cache, "vc_cache", 3);
  check_dim(&in.w_kr, "w_kr", 2);
  check_dim(&in.w_r, "w_r", 2);
  check_dim(in.b_r, "b_r", 1);
  check_dim(in.k, "k", 4);
  check_dim(in.v, "v", 3);
  check_dim(in.w_c, "w_c", 2);
  check_dim(in.b_c, "b_c", 1);
  check_dim(in.w_kc, "w_kc", 2);
  check_dim(in.b_kc, "b_kc", 1);
  check_dim(in.krope_scale, "krope_scale", 3);
  check_dim(in.kc_scale, "kc_scale", 2);
  check_dim(in.vc_scale, "vc_scale", 2);
  check_same_device({{"q", &in.q}, {"krope_cache", &in.krope_cache}, {"kc_cache", in.kc_cache},
                     {"vc_cache", &in.vc_cache}, {"w_kr", &in.w_kr}, {"w_r", &in.w_r},
                     {"b_r", in.b_r}, {"k", in.k}, {"v", in.v}, {"w_kc", in.w_kc},
                     {"b_kc", in.b_kc}, {"w_c", in.w_c}, {"b_c", in.b_c},
                     {"cache_seqlens", &in.cache_seqlens}, {"krope_scale", in.krope_scale},
                     {"kc_scale", in.kc_scale}, {"vc_scale", in.vc_scale}});
  check_scale(softmax_scale);
  check_same_dtype({{"q", &in.q}, {"w_kr", &in.w_kr}, {"w_r", &in.w_r}, {"b_r", in.b_r},
                    {"k", in.k}, {"v", in.v}, {"w_kc", in.w_kc}, {"b_kc", in.b_kc},
                    {"w_c", in.w_c}, {"b_c", in.b_c}});
  const CacheWithScale rope_entry{"krope_cache", &in.krope_cache, "krope_scale", in.krope_scale};
  const CacheWithScale kc_entry{"kc_cache", in.kc_cache, "kc_scale", in.kc_scale};
  const CacheWithScale vc_entry{"vc_cache", &in.vc_cache, "vc_scale", in.vc_scale};
  check_cache_dtypes(in.q, {rope_entry, kc_entry, vc_entry});
  const LatentDims d = check_latent_shapes(in.q, {"krope_cache", &in.krope_cache},
                                           {"kc_cache", in.kc_cache}, {"vc_cache", &in.vc_cache},
                                           in.w_kr, in.w_r, in.b_r);
  check_written_in_place({{"krope_cache", &in.krope_cache}, {"kc_cache", in.kc_cache},
                          {"vc_cache", &in.vc_cache}});
  check_cache_scale(rope_entry, {d.B, d.T, d.H});
  check_cache_scale(kc_entry, {d.B, d.T});
  check_cache_scale(vc_entry, {d.B, d.T});
  const int64_t t_new = check_new_latent_tokens(in, d);
  if (in.k != nullptr)
    check_no_shared_elements({{"krope_cache", &in.krope_cache}, {"kc_cache", in.kc_cache},
                              {"vc_cache", &in.vc_cache}, {"krope_scale", in.krope_scale},
                              {"kc_scale", in.kc_scale}, {"vc_scale", in.vc_scale}});
  check_seqlens_tensor(in.cache_seqlens, d.B);
  return {d, t_new};
}

}  // namespace vdproj
