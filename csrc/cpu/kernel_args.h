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

// Attention over a key/value source with per-sequence key counts.
// q, out: (B, Tq, H, D) contiguous. Keys: k + b*k_sb + j*k_st + h*k_sh (unit stride in D).
// Compressed values: vc + b*v_sb + j*v_st (unit stride in R). w_r (H*D, R), b_r (H*D,)
// contiguous. lse (B, H, Tq) float32 and ctx (B, Tq, H, R) are optional outputs.
struct AttnArgs {
  const void* q;
  const void* k;
  int64_t k_sb, k_st, k_sh;
  const void* vc;
  int64_t v_sb, v_st;
  const void* w_r;
  const void* b_r;          // may be null
  const int64_t* seqlen;    // (B,) keys visible to sequence b (before causal masking)
  void* out;
  float* lse;               // may be null
  void* ctx;                // may be null
  int64_t B, Tq, H, D, R;
  bool causal;
  double scale;
};

// Backward of cva_forward. All tensors contiguous; grads are outputs of the input shapes.
struct BwdArgs {
  const void* dout;
  const void* q;
  const void* k;
  const void* vc;
  const void* w_r;
  const float* lse;
  const void* ctx;
  void* dq;
  void* dk;
  void* dvc;
  void* dwr;
  void* dbr;
  int64_t B, Tq, Tk, H, D, R;
  bool causal;
  double scale;
};

// Compress-on-write: vc_cache[b, pos[b] + t] = v[b, t] @ w_c.T + b_c and k_cache[b, pos[b] + t]
// = k[b, t] for t < Tnew. Cache strides as in AttnArgs.
struct AppendArgs {
  const void* k;            // (B, Tnew, H, D) contiguous
  const void* v;            // (B, Tnew, H*D) contiguous
  const void* w_c;          // (R, H*D) contiguous
  const void* b_c;          // (R,) or null
  void* k_cache;
  int64_t k_sb, k_st, k_sh;
  void* vc_cache;
  int64_t v_sb, v_st;
  const int64_t* pos;       // (B,) first slot written
  int64_t B, Tnew, H, D, R;
};

// Decode-sized linear: y (M, N) = x (M, K) @ w (N, K).T + bias (N,), all contiguous, float32
// or float64.
struct LinearArgs {
  const void* x;
  const void* w;
  const void* bias;         // may be null
  void* y;
  int64_t M, N, K;
};

// One implementation per instruction set; see kernels.h.
#define VDPROJ_DECLARE_ISA(ns)                                     \
  namespace ns {                                                   \
  void attention(Kind kind, const AttnArgs& a);                    \
  void attention_backward(Kind kind, const BwdArgs& a);            \
  void append(Kind kind, const AppendArgs& a);                     \
  void linear(Kind kind, const LinearArgs& a);                     \
  }
VDPROJ_DECLARE_ISA(isa_avx512)
VDPROJ_DECLARE_ISA(isa_avx2)
VDPROJ_DECLARE_ISA(isa_base)
#undef VDPROJ_DECLARE_ISA

}  // namespace cpu
}  // namespace vdproj
