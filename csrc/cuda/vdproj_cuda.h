// Parameter structs and launcher declarations shared by cuda_api.cpp (host compiler, sees torch)
// and the .cu files (nvcc, see only this header, the CUDA runtime and light c10 headers).
// Plain data only: pointers, int64 sizes/strides (in elements), scales and flags.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "../common/constants.h"

namespace vdproj {
namespace cuda {

// Storage type of q/k/v_c/w_r/...; accumulation is always float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tile constants shared by host-side sizing (cuda_api.cpp, kernel_support.cpp) and kernels.
constexpr int kThreads = 256;       // threads per block of every kernel here
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = 32;       // keys per tile: one lane per key in the score phase
constexpr int kRowsPerBlock = 8;    // (head, query) rows per attention block: one warp per row
constexpr int kRowChunk = 2;        // r-values per thread in the P @ V_c update
constexpr int kMaxRank = kThreads * kRowChunk * 2;  // 1024: two chunks per thread at most
constexpr int kMaxSplits = 256;     // flash-decoding splits per (batch, row group)
constexpr int kCombineRows = 16;    // (b, i) rows per block in combine + restore
constexpr int kCompressTokens = 4;  // new tokens per block in compress-on-write

// Bound on the heads spanned by kRowsPerBlock consecutive head-major rows (row = h * Tq + i):
// the heads whose K an attention block stages (0 without queries: no block runs).
inline int64_t heads_per_tile(int64_t H, int64_t Tq) {
  if (Tq <= 0) return 0;
  const int64_t bound = (kRowsPerBlock - 1) / Tq + 2;
  return bound < H ? bound : H;
}

// Restore-on-read attention over a key range: the forward of compressed_v_attention (one split,
// normalized result) and the attention part of kvcache_attention (split-K partial results).
// Rows are (head, query) pairs flattened head-major: row = h * Tq + i.
struct AttnParams {
  const void* q;   // (B, Tq, H, D)
  const void* k;   // (B, *, H, D), keys; positions [0, L_b) are read
  const void* vc;  // (B, *, R)
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_st, k_sh;
  int64_t vc_sb, vc_st;
  const int32_t* seqlens;  // (B,) or nullptr; L_b = min((seqlens ? seqlens[b] : 0) + len_add, len_max)
  int64_t len_add;
  int64_t len_max;        // never read past this many positions (the cache's Tmax)
  int64_t B, Tq, H, R;
  int64_t nrows;          // Tq * H
  int64_t nsplit;         // splits of the key range
  int64_t heads_per_tile; // heads whose K a block stages (bound over all row groups)
  float scale_log2;       // softmax_scale * log2(e)
  bool causal;            // bottom-right aligned: key j visible to query i iff j <= i + L - Tq
  bool final_mode;        // true: write ctx_out / lse_out (needs nsplit == 1); false: partials
  // partial outputs (final_mode == false), row-major [B][nsplit][nrows](R | 2)
  float* part_acc;
  float* part_ml;  // (running max in log2 units, running sum)
  // final outputs (final_mode == true)
  float* ctx_out;  // (B, Tq, H, R), normalized P @ V_c
  float* lse_out;  // (B, H, Tq), natural log, -inf for rows that see no key
  DType dtype;
  int head_dim;
};

// Combine split partials (launch_combine) and restore (launch_restore):
// out[b,i,h] = w_r[h] @ ctx + b_r[h]; the two kernels share this struct.
struct CombineParams {
  const float* part_acc;  // [B][nsplit][nrows][R]
  const float* part_ml;   // [B][nsplit][nrows][2]
  const void* w_r;  // (H*D, R) contiguous
  const void* b_r;  // (H*D,) or nullptr
  void* out;        // (B, Tq, H, D) contiguous
  int64_t B, Tq, H, R, nrows, nsplit;
  DType dtype;
  int head_dim;
};

// The combine / restore parameters of an attention launch (outputs set by the caller). Shared
// by cuda_api.cpp and the CPU emulator's harness (python_tests/cuda_emu), which runs the same chain.
inline CombineParams combine_params(const AttnParams& p) {
  CombineParams c{};
  c.part_acc = p.part_acc;
  c.part_ml = p.part_ml;
  c.B = p.B; c.Tq = p.Tq; c.H = p.H; c.R = p.R; c.nrows = p.nrows; c.nsplit = p.nsplit;
  c.dtype = p.dtype;
  c.head_dim = p.head_dim;
  return c;
}

// Compress-on-write: vc_cache[b, seqlens[b] + t] = v[b, t] @ w_c.T + b_c; k_cache[b, ...] = k[b, t].
struct CompressParams {
  const void* k;    // (B, Tnew, H, D) contiguous
  const void* v;    // (B, Tnew, H*D) contiguous
  const void* w_c;  // (R, H*D) contiguous
  const void* b_c;  // (R,) or nullptr
  void* k_cache;
  void* vc_cache;
  int64_t kc_sb, kc_st, kc_sh;
  int64_t vcc_sb, vcc_st;
  const int32_t* seqlens;
  int64_t B, Tnew, H, R;
  int64_t len_max;  // slots outside [0, len_max) are never written (the op raises before)
  DType dtype;
  int head_dim;
};

// Backward of the attention part: given dctx = dO_h @ w_r[h] (float32) and delta = rowsum(dctx *
// ctx), produce dq (accumulated atomically, float32), dk and dv_c (float32).
struct BwdParams {
  const void* q;   // (B, Tq, H, D) contiguous
  const void* k;   // (B, Tk, H, D) contiguous
  const void* vc;  // (B, Tk, R) contiguous
  const float* dctx;   // (B, Tq, H, R)
  const float* lse;    // (B, H, Tq), natural log
  const float* delta;  // (B, H, Tq)
  float* dq;  // (B, Tq, H, D), zero-initialized, atomically accumulated
  float* dk;  // (B, Tk, H, D)
  float* dvc; // (B, Tk, R)
  int64_t B, Tq, Tk, H, R;
  float scale;
  bool causal;
  DType dtype;
  int head_dim;
};

// Launchers (defined in the .cu files). Each checks its launches with C10_CUDA_KERNEL_LAUNCH_CHECK.
// Dynamic shared memory of the attention kernel with one stage: the least it can run with.
size_t attn_min_smem_bytes(DType dtype, int head_dim, int64_t heads_per_tile, int64_t R);
// Flash-decoding split count for partial mode; max_keys bounds the key range (e.g. Tmax).
int64_t attn_num_splits(const AttnParams& p, int64_t max_keys);
void launch_attention(const AttnParams& p, cudaStream_t stream);
// Split partials -> normalized ctx (B, Tq, H, R) float and lse (B, H, Tq), as final mode writes.
void launch_combine(const CombineParams& p, float* ctx_out, float* lse_out, cudaStream_t stream);
// out (B, Tq, H, D) = w_r[h] @ ctx + b_r[h], zeros where lse == -inf.
void launch_restore(const CombineParams& p, const float* ctx, const float* lse, cudaStream_t stream);
size_t compress_smem_bytes(const CompressParams& p);
void launch_compress_write(const CompressParams& p, cudaStream_t stream);
size_t bwd_smem_bytes(const BwdParams& p);
void launch_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vdproj
