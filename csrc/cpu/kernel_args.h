// Shared declarations of the CPU kernels: argument blocks passed from the op wrappers
// (cpu_ops.cpp) to the ISA-specific implementations (kernels.h, compiled once per
// instruction set and chosen at run time).
#pragma once

#include <cstdint>

namespace vdproj {
namespace cpu {

// Storage dtypes. bf16 and fp16 are upcast: converted to float32 when loaded, accumulated in
// float32, rounded once when stored. float64 runs natively with float64 accumulation.
enum class Kind { F32, F64, BF16, F16 };

// How a cache tensor is stored (SPEC 3c): in the model's dtype (Kind), or quantized with one
// float32 scale per row, the value being stored * scale.
enum class CacheKind { Model, I8, E4M3 };

// A quantized cache's scales: row (b, j[, h]) at p + b*sb + j*st (+ h*sh). p null: not quantized.
struct RowScales {
  float* p;  // written by the append, read by the attention
  int64_t sb, st, sh;
};

// Attention over a key/value source with per-sequence key counts, in the absorbed form.
// A key has two segments, and the query of head h is the matching [q_h1 | q_h2]:
//   per head:          k + b*k_sb + j*k_st + h*k_sh, width Dk (unit stride);
//   shared by heads:   kl + b*kl_sb + j*kl_st, width Dl (0: none), read once for all heads.
// The V-only ops use Dk = D, Dl = 0; the latent-key ops Dk = Dr and the key latent as kl
// (kl_is_vc: the joint latent, kl is the V_c row itself).
// q: (B, Tq, H, Dk + Dl) contiguous, in accumulation precision (float32, or float64 for
// float64). Compressed values: vc + b*v_sb + j*v_st (unit stride in R). w_r (H*D, R), b_r
// (H*D,) contiguous. out (B, Tq, H, D); lse (B, H, Tq) float32 and ctx (B, Tq, H, R) are
// optional outputs.
struct AttnArgs {
  const void* q;
  const void* k;
  int64_t k_sb, k_st, k_sh;
  const void* kl;           // may be null when Dl = 0
  int64_t kl_sb, kl_st;
  bool kl_is_vc;
  const void* vc;
  int64_t v_sb, v_st;
  const void* w_r;
  const void* b_r;          // may be null
  const int64_t* seqlen;    // (B,) keys visible to sequence b (before causal masking)
  void* out;
  float* lse;               // may be null
  void* ctx;                // may be null
  int64_t B, Tq, H, D, Dk, Dl, R;
  bool causal;
  double scale;
  CacheKind k_kind, kl_kind, v_kind;
  RowScales k_scale, kl_scale, v_scale;
};

// Backward of the attention above, all tensors contiguous: q (B, Tq, H, Dk + Dl) and dq (its
// gradient) in accumulation precision; k (B, Tk, H, Dk), kl (B, Tk, Dl) and v_c (B, Tk, R) and
// the other gradients in storage precision. With kl_is_vc (joint latent) the shared segment's
// gradient is added into dvc and dkl is null.
struct BwdArgs {
  const void* dout;
  const void* q;
  const void* k;
  const void* kl;
  bool kl_is_vc;
  const void* vc;
  const void* w_r;
  const float* lse;
  const void* ctx;
  void* dq;
  void* dk;
  void* dkl;
  void* dvc;
  void* dwr;
  void* dbr;
  int64_t B, Tq, Tk, H, D, Dk, Dl, R;
  bool causal;
  double scale;
};

// One compressed cache written on append: dst[b, pos[b] + t] = x[b, t] @ w.T + bias, quantized
// per row (into dst_kind, with its scale written to dst_scale) when the cache is.
struct CompressJob {
  const void* x;            // (B, Tnew, K) contiguous
  const void* w;            // (R, K) contiguous
  const void* bias;         // (R,) or null
  void* dst;                // (B, Tmax, R), unit stride in R
  int64_t sb, st;
  int64_t K, R;
  CacheKind dst_kind;
  RowScales dst_scale;
};

// Compress-on-write of Tnew new tokens at slots pos[b] .. pos[b] + Tnew - 1:
// k_cache[b, pos[b] + t, h] = k[b, t, h, :Dk] (copied exactly), then each compress job.
struct AppendArgs {
  const void* k;            // (B, Tnew, H, D) contiguous
  void* k_cache;            // (B, Tmax, H, Dk), unit stride in Dk
  int64_t k_sb, k_st, k_sh;
  const int64_t* pos;       // (B,) first slot written
  int64_t B, Tnew, H, D, Dk;
  CacheKind k_kind;         // quantized per (token, head) into k_scale when not Model
  RowScales k_scale;
  CompressJob jobs[2];
  int njobs;
};

// The absorbed query of the latent-key ops: q_eff[n, h] = [q[n, h, :Dr] | q[n, h, Dr:] @
// w_kr[h]] with w_kr[h] = rows h*(D-Dr) .. (h+1)*(D-Dr) of w_kr (H*(D-Dr), Rk). q (rows, H, D)
// and w_kr contiguous in storage precision; q_eff (rows, H, Dr + Rk) in accumulation precision.
struct QueryArgs {
  const void* q;
  const void* w_kr;
  void* q_eff;
  int64_t rows, H, D, Dr, Rk;
};

// Quantize-on-write of rows computed elsewhere (a folded model's latents): values (B, T, heads,
// n) contiguous in storage kind `kind` go, quantized per row (SPEC 3c), to dst rows
// (b, pos[b] + t, h) at dst + b*d_sb + (pos[b]+t)*d_st + h*d_sh, scales alike.
struct QuantWriteArgs {
  const void* values;
  void* dst;
  int64_t d_sb, d_st, d_sh;
  CacheKind dst_kind;
  RowScales scale;
  const int64_t* pos;
  int64_t B, T, heads, n;
};

// Decode-sized linear: y (M, N) = x (M, K) @ w (N, K).T + bias (N,), all contiguous, float32
// or float64, optionally through GELU (a GPT-NeoX MLP's first layer).
struct LinearArgs {
  const void* x;
  const void* w;
  const void* bias;         // may be null
  void* y;
  int64_t M, N, K;
  bool gelu;                // y = gelu(x @ w.T + bias), exact (erf) GELU
};

// One implementation per instruction set; see kernels.h.
#define VDPROJ_DECLARE_ISA(ns)                                     \
  namespace ns {                                                   \
  void attention(Kind kind, const AttnArgs& a);                    \
  void attention_backward(Kind kind, const BwdArgs& a);            \
  void append(Kind kind, const AppendArgs& a);                     \
  void effective_query(Kind kind, const QueryArgs& a);             \
  void linear(Kind kind, const LinearArgs& a);                     \
  void quantize_into(Kind kind, const QuantWriteArgs& a);          \
  }
VDPROJ_DECLARE_ISA(isa_avx512)
VDPROJ_DECLARE_ISA(isa_avx2)
VDPROJ_DECLARE_ISA(isa_base)
#undef VDPROJ_DECLARE_ISA

}  // namespace cpu
}  // namespace vdproj
