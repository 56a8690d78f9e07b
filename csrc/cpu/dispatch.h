// What the CPU op wrappers (cpu_ops.cpp, latent_ops.cpp) share: the choice of instruction set,
// storage kinds, and the argument blocks of the kernels (kernel_args.h) filled from tensors.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "../common/optional_tensor.h"
#include "kernel_args.h"

// The kernels of kernels.h are compiled for several instruction sets (cpu_ops.cpp) when GCC
// targets x86-64; elsewhere only the baseline build exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VDPROJ_MULTI_ISA 1
#endif

namespace vdproj {

enum class Isa { Base, Avx2, Avx512 };

// Best instruction set of this CPU; VDPROJ_CPU_ISA=baseline|avx2|avx512 can lower it (tests).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Base;
#ifdef VDPROJ_MULTI_ISA
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
    if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      best = Isa::Avx512;
#endif
    const char* env = std::getenv("VDPROJ_CPU_ISA");
    if (env != nullptr) {
      const std::string want(env);
      if (want == "baseline") best = Isa::Base;
      if (want == "avx2" && best == Isa::Avx512) best = Isa::Avx2;
    }
    return best;
  }();
  return isa;
}

// Up to how many rows (tokens) a call of the decode_linear kernel beats CPU BLAS as W @ x.T,
// which vdproj_ext/ops/linear.py runs past it. With AVX-512 the kernel's passes of 8 rows go
// over 128 KiB blocks of weight rows: 1.01-2.04x BLAS at 20-32 rows on every pythia-70m layer,
// 0.85-1.36x at 48 (Zen 4, 2 threads, bench/cpu_linear.py shapes, 2026-12-07); the AVX2 and
// baseline builds lose to BLAS from 32 rows on (Zen 3).
inline int64_t decode_linear_max_rows() { return cpu_isa() == Isa::Avx512 ? 32 : 16; }

// AVX-512 VNNI (int8 dot products), used by int8 latent-key caches' decode (csrc/cpu/
// int8_vnni.h) within the AVX-512 variant.
inline bool cpu_supports_int8_vnni() {
#ifdef VDPROJ_MULTI_ISA
  static const bool yes = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
#else
  return false;
#endif
}

// Whether the kernels use it: where supported, unless VDPROJ_INT8_VNNI=0; switched at run time
// by the _set_cpu_int8_vnni binding (benchmarks compare both paths in one process).
inline std::atomic<bool>& int8_vnni_switch() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("VDPROJ_INT8_VNNI");
    return cpu_supports_int8_vnni() && (env == nullptr || std::string(env) != "0");
  }()};
  return on;
}
inline bool cpu_has_int8_vnni() { return int8_vnni_switch().load(std::memory_order_relaxed); }

#ifdef VDPROJ_MULTI_ISA
#define VDPROJ_ISA_CALL(fn, ...)                                          \
  switch (cpu_isa()) {                                                    \
    case Isa::Avx512: cpu::isa_avx512::fn(__VA_ARGS__); break;            \
    case Isa::Avx2: cpu::isa_avx2::fn(__VA_ARGS__); break;                \
    default: cpu::isa_base::fn(__VA_ARGS__); break;                       \
  }
#else
#define VDPROJ_ISA_CALL(fn, ...) cpu::isa_base::fn(__VA_ARGS__)
#endif

// The storage kind of a tensor whose dtype the checks have admitted.
inline cpu::Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return cpu::Kind::F64;
    case at::kBFloat16: return cpu::Kind::BF16;
    case at::kHalf: return cpu::Kind::F16;
    default: return cpu::Kind::F32;
  }
}

// How a cache tensor is stored: in the model's dtype, or quantized (SPEC 3c).
inline cpu::CacheKind cache_kind_of(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kChar: return cpu::CacheKind::I8;
    case at::kFloat8_e4m3fn: return cpu::CacheKind::E4M3;
    default: return cpu::CacheKind::Model;
  }
}

// A quantized cache's scales ((B, T, H) or (B, T) float32, any strides); none when absent.
inline cpu::RowScales row_scales(const std::optional<at::Tensor>& scale) {
  if (!scale.has_value()) return {nullptr, 0, 0, 0};
  const at::Tensor& s = *scale;
  return {s.data_ptr<float>(), s.stride(0), s.stride(1), s.dim() > 2 ? s.stride(2) : 0};
}

// The attention reads the per-head key segment, the shared key segment (if any) and the values
// through their storage kinds and scales.
inline void set_cache_reads(cpu::AttnArgs& a, const at::Tensor& keys,
                            const std::optional<at::Tensor>& k_scale,
                            const at::Tensor& values, const std::optional<at::Tensor>& v_scale) {
  a.k_kind = cache_kind_of(keys);
  a.k_scale = row_scales(k_scale);
  a.v_kind = cache_kind_of(values);
  a.v_scale = row_scales(v_scale);
}

// The kernels take queries (and return their gradient) in accumulation precision
// (accumulation_dtype, common/checks.h). to_accumulation is a no-op for float32 and float64.
inline at::Tensor to_accumulation(const at::Tensor& t) { return t.to(accumulation_dtype(t)); }

// The dispatcher sends an op here when its tensors are on the CPU; the checks compare every other
// input's device with q's.
inline void check_on_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "vdproj_ext CPU kernels: q must be a CPU tensor, got ",
              q.device());
}

// The attention's argument block: queries (B, Tq, H, Dk) in accumulation precision, keys
// (B, *, H, Dk) and values (B, *, R) read through their strides (a contiguous tensor or a
// cache); seqlen[b] keys of sequence b are visible. No shared key segment (set_shared_keys).
inline cpu::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& keys,
                               const at::Tensor& values, const at::Tensor& w_r,
                               const std::optional<at::Tensor>& b_r,
                               const std::vector<int64_t>& seqlen, bool causal,
                               double softmax_scale) {
  cpu::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = keys.data_ptr();
  a.k_sb = keys.stride(0);
  a.k_st = keys.stride(1);
  a.k_sh = keys.stride(2);
  a.vc = values.data_ptr();
  a.v_sb = values.stride(0);
  a.v_st = values.stride(1);
  a.w_r = w_r.data_ptr();
  a.b_r = opt_ptr(b_r);
  a.seqlen = seqlen.data();
  a.B = q.size(0);
  a.Tq = q.size(1);
  a.H = q.size(2);
  a.D = a.H > 0 ? w_r.size(0) / a.H : 0;  // the output's head_dim (w_r is (H*D, R))
  a.Dk = keys.size(3);
  a.R = values.size(2);
  a.causal = causal;
  a.scale = softmax_scale;
  return a;
}

// The backward's argument block without its outputs: grad_out (B, Tq, H, D), queries in
// accumulation precision, keys (B, Tk, H, Dk), values (B, Tk, R), all contiguous.
inline cpu::BwdArgs bwd_args(const at::Tensor& grad_out, const at::Tensor& q,
                             const at::Tensor& keys, const at::Tensor& values,
                             const at::Tensor& w_r, const at::Tensor& lse, const at::Tensor& ctx,
                             bool causal, double softmax_scale) {
  cpu::BwdArgs a{};
  a.dout = grad_out.data_ptr();
  a.q = q.data_ptr();
  a.k = keys.data_ptr();
  a.vc = values.data_ptr();
  a.w_r = w_r.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  a.B = grad_out.size(0);
  a.Tq = grad_out.size(1);
  a.H = grad_out.size(2);
  a.D = grad_out.size(3);
  a.Tk = keys.size(1);
  a.Dk = keys.size(3);
  a.R = values.size(2);
  a.causal = causal;
  a.scale = softmax_scale;
  return a;
}

// cache_seqlens as slots, once every length and Tnew more tokens are known to fit: called
// before anything is written, so a bad length leaves the caches untouched.
inline std::vector<int64_t> read_positions(const at::Tensor& cache_seqlens, int64_t B,
                                           int64_t max_len, int64_t t_new) {
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  if (B > 0) {
    const auto [lo, hi] = std::minmax_element(lp, lp + B);
    check_seqlens_range(*lo, *hi, max_len, t_new);
  }
  return std::vector<int64_t>(lp, lp + B);
}

// Compress-on-write without its jobs: k (B, Tnew, H, D) contiguous, of which the first
// k_cache.size(3) dims of each head are copied into k_cache at pos[b] onwards (quantized per
// head, with k_scale, when k_cache is).
inline cpu::AppendArgs append_args(const at::Tensor& k, const at::Tensor& k_cache,
                                   const std::optional<at::Tensor>& k_scale,
                                   const std::vector<int64_t>& pos) {
  cpu::AppendArgs a{};
  a.k = k.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.k_sb = k_cache.stride(0);
  a.k_st = k_cache.stride(1);
  a.k_sh = k_cache.stride(2);
  a.pos = pos.data();
  a.B = k.size(0);
  a.Tnew = k.size(1);
  a.H = k.size(2);
  a.D = k.size(3);
  a.Dk = k_cache.size(3);
  a.k_kind = cache_kind_of(k_cache);
  a.k_scale = row_scales(k_scale);
  return a;
}

// One compressed cache of an append: dst[b, pos[b] + t] = x[b, t] @ w.T + bias (x, w, bias
// contiguous; dst with a unit last stride), quantized with dst_scale when dst is.
inline cpu::CompressJob compress_job(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& dst,
                                     const std::optional<at::Tensor>& dst_scale) {
  return {x.data_ptr(), w.data_ptr(), opt_ptr(bias), dst.data_ptr(), dst.stride(0),
          dst.stride(1), x.size(-1), w.size(0), cache_kind_of(dst), row_scales(dst_scale)};
}

}  // namespace vdproj
