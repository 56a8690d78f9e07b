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

// Storage type of the caches of a call (SPEC 3c): the model's dtype (DType), or quantized,
// every cache tensor of the call alike, with one float32 scale per stored row (value = stored *
// scale; scales are read and written through their strides, in elements).
enum class CacheType : int { kModel = 0, kInt8 = 1, kE4M3 = 2 };

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

// Bound on the heads spanned by `rows` consecutive head-major rows (row = h * Tq + i): the heads
// whose K an attention block stages (0 without queries: no block runs). Host and device: the
// latent attention's blocks derive their shared-memory layout from it.
__host__ __device__ inline int64_t heads_per_tile(int64_t H, int64_t Tq,
                                                  int64_t rows = kRowsPerBlock) {
  if (Tq <= 0) return 0;
  const int64_t bound = (rows - 1) / Tq + 2;
  return bound < H ? bound : H;
}

// Flash-decoding split count shared by the attention launchers: minimize the tiles handled by
// the busiest block slot, counting whole waves, plus a small charge per split for the combine.
// slots: resident blocks on the device; base: blocks of one split (batch x row groups); tiles:
// key tiles of the longest key range. PLACEHOLDER cost model until measured on a GPU.
inline int64_t choose_num_splits(int64_t slots, int64_t base, int64_t tiles) {
  if (tiles <= 1) return 1;
  int64_t best = 1;
  double best_cost = -1.0;
  const int64_t max_split = tiles < kMaxSplits ? tiles : kMaxSplits;
  for (int64_t s = 1; s <= max_split; ++s) {
    const int64_t tps = (tiles + s - 1) / s;      // tiles per split
    const int64_t used = (tiles + tps - 1) / tps;  // splits that get work
    if (used != s) continue;                       // same as a smaller s
    const int64_t waves = (base * used + slots - 1) / slots;
    // In units of one tile's time: the busiest slot, plus the combine launch and its partials
    // (guessed at half a tile and 1% of a tile per split).
    const double cost = double(waves * tps) + (s > 1 ? 0.5 + 0.01 * double(s) : 0.0);
    if (best_cost < 0.0 || cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
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
  // Quantized k / vc (kvcache_attention only): k_scale (B, *, H), vc_scale (B, *).
  CacheType cache;
  const float* k_scale;
  int64_t ks_sb, ks_st, ks_sh;
  const float* vc_scale;
  int64_t vs_sb, vs_st;
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

// The combine / restore parameters of an attention launch (AttnParams or LatentAttnParams, R
// its V_c rank; outputs set by the caller). Shared by cuda_api.cpp and the CPU emulator's
// harness (python_tests/cuda_emu), which runs the same chain.
template <typename P>
inline CombineParams combine_params_of(const P& p, int64_t R) {
  CombineParams c{};
  c.part_acc = p.part_acc;
  c.part_ml = p.part_ml;
  c.B = p.B; c.Tq = p.Tq; c.H = p.H; c.R = R; c.nrows = p.nrows; c.nsplit = p.nsplit;
  c.dtype = p.dtype;
  c.head_dim = p.head_dim;
  return c;
}
inline CombineParams combine_params(const AttnParams& p) { return combine_params_of(p, p.R); }

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
  // Quantized caches: each new k row (token, head) and vc row gets its absmax scale.
  CacheType cache;
  float* k_scale;
  int64_t ks_sb, ks_st, ks_sh;
  float* vc_scale;
  int64_t vs_sb, vs_st;
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

// ---- latent keys (SPEC 3b) ------------------------------------------------------------------
// A key of head h is [k_rope_h (Dr) | K_lat (Rk)]: the rotary dims per head and one latent row
// that all heads share (K_c, or V_c itself with the joint latent). The restore of the latent is
// absorbed into the query: q_eff_h = [q_rope_h | q_nope_h @ w_kr[h]] (float32, Dq = Dr + Rk).

// q_eff (M, H, Dr + Rk) float32 from q (M, H, D) and w_kr (H*Dn, Rk), both contiguous (M = B*Tq).
struct LatentQueryParams {
  const void* q;
  const void* w_kr;
  float* q_eff;
  int64_t M, H, Dr, Rk;
  DType dtype;
  int head_dim;
};

// Restore-on-read attention over latent keys: as AttnParams (same partial / final outputs, so
// combine_kernel and restore_kernel serve both), with the absorbed query in float32.
struct LatentAttnParams {
  const float* q_eff;  // (B, Tq, H, Dr + Rk) contiguous
  const void* krope;   // (B, *, H, Dr)
  const void* klat;    // (B, *, Rk); ignored with the joint latent (the V_c rows serve)
  const void* vc;      // (B, *, Rv)
  int64_t kr_sb, kr_st, kr_sh;
  int64_t kl_sb, kl_st;
  int64_t vc_sb, vc_st;
  const int32_t* seqlens;  // as AttnParams: L_b = min((seqlens ? seqlens[b] : 0) + len_add, len_max)
  int64_t len_add, len_max;
  int64_t B, Tq, H, Dr, Rk, Rv;
  int64_t nrows;           // Tq * H, head-major
  int64_t nsplit;
  bool joint;
  float scale_log2;
  bool causal, final_mode;
  float* part_acc;  // [B][nsplit][nrows][Rv]
  float* part_ml;   // [B][nsplit][nrows][2]
  float* ctx_out;   // (B, Tq, H, Rv)
  float* lse_out;   // (B, H, Tq)
  DType dtype;
  int head_dim;
  // Quantized caches (ckv_kvcache_attention only): krope_scale (B, *, H), the key latent's
  // scale (B, *) (vc_scale itself with the joint latent) and vc_scale (B, *).
  CacheType cache;
  const float* kr_scale;
  int64_t krs_sb, krs_st, krs_sh;
  const float* kl_scale;
  int64_t kls_sb, kls_st;
  const float* vc_scale;
  int64_t vs_sb, vs_st;
};

// What the V-only and the latent attention's parameters share (P: AttnParams or
// LatentAttnParams), in final mode with one split: sequence b sees min((seqlens ? seqlens[b] :
// 0) + len_add, len_max) keys; rows are (head, query) pairs, head-major. Shared by cuda_api.cpp
// and the CPU emulator's harness, which fill the pointers, strides and ranks.
template <typename P>
inline void set_attn_common(P& p, const int32_t* seqlens, int64_t len_add, int64_t len_max,
                            int64_t B, int64_t Tq, int64_t H, int head_dim, DType dtype,
                            bool causal, double softmax_scale) {
  p.seqlens = seqlens;
  p.len_add = len_add;
  p.len_max = len_max;
  p.B = B; p.Tq = Tq; p.H = H;
  p.nrows = Tq * H;
  p.nsplit = 1;
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal;
  p.final_mode = true;
  p.dtype = dtype;
  p.head_dim = head_dim;
}

// (head, query) rows per latent attention block: 8 (one per warp) or 16 (two per warp), so that
// up to 16 heads of a decode step share one read of each cached row. PLACEHOLDER choice until
// measured on a GPU: two rows per warp take about 175-180 registers (ptxas, sm_90), so one block
// per SM, against about 128 for one row per warp.
constexpr int kLatentMaxRowsPerWarp = 2;
inline int latent_rows_per_block(int64_t nrows) {
  return nrows > kRowsPerBlock ? kRowsPerBlock * kLatentMaxRowsPerWarp : kRowsPerBlock;
}

inline CombineParams combine_params(const LatentAttnParams& p) { return combine_params_of(p, p.Rv); }

// Compress-on-write of new tokens with latent keys, at slots seqlens[b] + t:
//   krope_cache <- k[..., :Dr] of every head (bit for bit);
//   separate latents: kc_cache <- k_nope @ w_kc.T + b_kc, vc_cache <- v @ w_c.T + b_c;
//   joint latent:     vc_cache <- [k_nope | v] @ w_c.T + b_c.
struct LatentCompressParams {
  const void* k;     // (B, Tnew, H, D) contiguous
  const void* v;     // (B, Tnew, H*D) contiguous
  const void* w_kc;  // (Rk, H*Dn) contiguous; nullptr with the joint latent
  const void* b_kc;  // (Rk,) or nullptr
  const void* w_c;   // (Rv, H*D), or (Rv, H*Dn + H*D) with the joint latent; contiguous
  const void* b_c;   // (Rv,) or nullptr
  void* krope_cache;
  void* kc_cache;    // nullptr with the joint latent
  void* vc_cache;
  int64_t kr_sb, kr_st, kr_sh;
  int64_t kc_sb, kc_st;
  int64_t vc_sb, vc_st;
  const int32_t* seqlens;
  int64_t B, Tnew, H, Dr, Rk, Rv;
  int64_t len_max;  // slots outside [0, len_max) are never written (the op raises before)
  bool joint;
  DType dtype;
  int head_dim;
  // Quantized caches: each new rotary row (token, head), K_c row and V_c row gets its absmax
  // scale (rotary rows of Dr = 0 get scale 1). kc_scale is nullptr with the joint latent.
  CacheType cache;
  float* kr_scale;
  int64_t krs_sb, krs_st, krs_sh;
  float* kc_scale;
  int64_t kcs_sb, kcs_st;
  float* vc_scale;
  int64_t vs_sb, vs_st;
};

// Backward of the latent attention, given dctx = dO_h @ w_r[h] and delta = rowsum(dctx * ctx)
// (float32, as for BwdParams): dq_eff (accumulated atomically), dk_rope, dK_lat and dV_c, all
// float32. With the joint latent the key gradient of each latent row is added into dvc.
struct LatentBwdParams {
  const float* q_eff;  // (B, Tq, H, Dr + Rk)
  const void* krope;   // (B, Tk, H, Dr) contiguous
  const void* klat;    // (B, Tk, Rk) contiguous; ignored with the joint latent
  const void* vc;      // (B, Tk, Rv) contiguous
  const float* dctx;   // (B, Tq, H, Rv)
  const float* lse;    // (B, H, Tq), natural log
  const float* delta;  // (B, H, Tq)
  float* dq_eff;  // (B, Tq, H, Dr + Rk), zero-initialized, atomically accumulated
  float* dkrope;  // (B, Tk, H, Dr)
  float* dklat;   // (B, Tk, Rk); unused with the joint latent
  float* dvc;     // (B, Tk, Rv)
  int64_t B, Tq, Tk, H, Dr, Rk, Rv;
  float scale;
  bool causal, joint;
  DType dtype;
};

// Launchers (defined in the .cu files). Each checks its launches with C10_CUDA_KERNEL_LAUNCH_CHECK.
// Dynamic shared memory of the attention kernel with one stage: the least it can run with.
size_t attn_min_smem_bytes(DType dtype, int head_dim, int64_t heads_per_tile, int64_t R,
                           CacheType cache = CacheType::kModel);
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

// Latent keys (latent_attn.cu, latent_kvcache.cu, latent_bwd.cu). The smem functions give the
// least dynamic shared memory each kernel runs with (the attention with one stage).
size_t latent_query_smem_bytes(int64_t head_dim, int64_t Dr);
void launch_latent_query(const LatentQueryParams& p, cudaStream_t stream);
size_t latent_attn_min_smem_bytes(DType dtype, int64_t H, int64_t Tq, int64_t Dr, int64_t Rk,
                                  int64_t Rv, bool joint, CacheType cache = CacheType::kModel);
int64_t latent_num_splits(const LatentAttnParams& p, int64_t max_keys);
void launch_latent_attention(const LatentAttnParams& p, cudaStream_t stream);
// out_cols: the latent columns a token gets (Rk + Rv, or Rv with the joint latent), staged in
// shared memory for their scale when the caches are quantized.
size_t latent_compress_smem_bytes(int64_t H, int64_t head_dim, int64_t Dr,
                                  CacheType cache = CacheType::kModel, int64_t out_cols = 0);
void launch_latent_compress_write(const LatentCompressParams& p, cudaStream_t stream);
size_t latent_bwd_smem_bytes(int64_t Dr, int64_t Rk, int64_t Rv, bool joint);
void launch_latent_attention_bwd(const LatentBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vdproj
