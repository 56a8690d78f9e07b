// Restore-on-read attention, absorbed form (SPEC section 1): for each (head, query) row,
//   ctx = softmax(scale * q . K_h^T) @ V_c        (R-wide, V_c shared by all heads)
// The restore (w_r[h] product + b_r) runs later, once per output row (restore_kernel in
// kvcache.cu, or ATen in cuda_api.cpp).
//
// One block = one batch element b, one group of kRowsPerBlock rows (row = h * Tq + i, head-major so
// a group touches few heads), one split of the key range (flash-decoding). Per tile of
// kTileKeys keys the block
//   1. stages K (only the heads of its rows) and V_c into shared memory with 16-byte cp.async,
//      double-buffered, zero-filling positions past the key range (NaN tails are never read);
//   2. scores: warp w owns row w, lane j owns key j; online softmax with warp shuffles;
//   3. P @ V_c: each thread owns kRowChunk r-values for all rows of the group, so every V_c
//      element read from shared memory serves all heads of the group.
// Quantized caches (SPEC 3c, C = int8_t or __nv_fp8_e4m3): K and V_c are staged as stored and
// dequantized in registers; a key's scale multiplies its score, a V_c row's scale its weight in
// P @ V_c (the softmax sum keeps the unscaled weights). Scales are read only for keys in range.
// Outputs: unnormalized partials (m, l, acc) per split for combine_kernel (kvcache.cu), or,
// with one split, the normalized ctx and the log-sum-exp directly ("final mode", cva_forward).
#include <vector>

#include "attn_tiles.h"

namespace vdproj {
namespace cuda {
namespace {

static_assert(kRowsPerBlock == kWarps, "one warp per row in the score phase");
static_assert(kTileKeys == 32, "one lane per key in the score phase");

// Shared-memory layout, in bytes from the start of the dynamic buffer (all offsets 16-aligned).
struct AttnLayout {
  int64_t k_row;     // elements per staged K row (heads_per_tile * D + 16-byte pad)
  int64_t q_off, p_off, misc_off, stage_off, stage_bytes, k_bytes, total;
};

// C: the storage type of the staged K and V_c rows.
template <typename C, int D>
__host__ __device__ inline AttnLayout attn_layout(int64_t heads_per_tile, int64_t R, int nstages) {
  AttnLayout L;
  // The pad shifts consecutive keys by 16 bytes so that lanes reading different keys at the
  // same offset hit different banks.
  L.k_row = heads_per_tile * D + 16 / int64_t(sizeof(C));
  L.q_off = 0;
  L.p_off = align16(L.q_off + int64_t(kRowsPerBlock) * D * 4);
  L.misc_off = align16(L.p_off + int64_t(kTileKeys) * kRowsPerBlock * 4);
  L.stage_off = align16(L.misc_off + 2 * kRowsPerBlock * 4);
  L.k_bytes = align16(int64_t(kTileKeys) * L.k_row * sizeof(C));
  L.stage_bytes = L.k_bytes + align16(int64_t(kTileKeys) * R * sizeof(C));
  L.total = L.stage_off + nstages * L.stage_bytes;
  return L;
}

// T: q's storage type; C: the caches' (T, or a quantized type).
template <typename T, typename C, int D>
__global__ void __launch_bounds__(kThreads)
attn_fwd_kernel(const AttnParams p, const int nstages) {
  constexpr bool kQuantized = CacheQuant<C>::kQuantized;
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnLayout lay = attn_layout<C, D>(p.heads_per_tile, p.R, nstages);
  const FwdScratch sc = fwd_scratch(smem, lay, kRowsPerBlock);
  float *qs = sc.qs, *ps = sc.ps, *alpha_s = sc.alpha_s, *l_s = sc.l_s;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t split = blockIdx.y, r0 = int64_t(blockIdx.x) * kRowsPerBlock, b = blockIdx.z;
  const int64_t Tq = p.Tq, R = p.R, nrows = p.nrows;
  const int64_t rows_here = nrows - r0 < kRowsPerBlock ? nrows - r0 : kRowsPerBlock;
  const int64_t h_lo = r0 / Tq, h_hi = (r0 + rows_here - 1) / Tq;
  const int nh = int(h_hi - h_lo + 1);  // <= p.heads_per_tile (host bound)
  const KeyRange kr = block_key_range(p, b, split, r0, rows_here);
  const int64_t kstop = kr.kstop;

  // This warp's row.
  const int64_t my_row = r0 + warp;
  const bool row_ok = warp < rows_here;
  const int64_t my_h = row_ok ? my_row / Tq : h_lo, my_i = row_ok ? my_row % Tq : 0;
  const int64_t my_limit = p.causal ? my_i + kr.L - Tq : kr.L;  // last visible key if causal

  // Queries of the group, as float.
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
  stage_query_rows(qs, kRowsPerBlock, D, r0, rows_here, Tq, tid, [&](int64_t h, int64_t i, int64_t d) {
    return to_float(qg[i * p.q_st + h * p.q_sh + d]);
  });

  const C* kb = static_cast<const C*>(p.k) + b * p.k_sb;
  const C* vb = static_cast<const C*>(p.vc) + b * p.vc_sb;
  auto stage_k = [&](int st) {
    return reinterpret_cast<C*>(smem + lay.stage_off + st * lay.stage_bytes);
  };
  auto stage_v = [&](int st) {
    return reinterpret_cast<C*>(smem + lay.stage_off + st * lay.stage_bytes + lay.k_bytes);
  };
  // K of the group's heads, then the V_c rows all heads share.
  auto load_tile = [&](int64_t t0, int st) {
    stage_tile_async(stage_k(st), lay.k_row, kb, p.k_st, p.k_sh, h_lo, nh, D, t0, kstop, tid);
    stage_tile_async(stage_v(st), R, vb, p.vc_st, 0, 0, 1, int(R), t0, kstop, tid);
  };

  float m_run = -INFINITY, l_run = 0.f;
  float acc[2][kRowsPerBlock][kRowChunk];
  zero_acc(acc);
  const int nchunk = int(R / kRowChunk);

  pipelined_key_tiles(kr.kstart, kr.ntiles, nstages, load_tile, [&](int64_t t0, int st) {
    // Scores (warp = row, lane = key) and online softmax (log2 domain).
    {
      const int64_t pos = t0 + lane;
      const bool in_range = pos < kstop;
      float s = -INFINITY;
      if (row_ok) {
        const C* krow = stage_k(st) + lane * lay.k_row + (my_h - h_lo) * D;
        float dot = dot_staged(qs + warp * D, krow, D, 0.f);
        if constexpr (kQuantized) {
          if (in_range) dot *= p.k_scale[b * p.ks_sb + pos * p.ks_st + my_h * p.ks_sh];
        }
        const bool visible = in_range && (!p.causal || pos <= my_limit);
        s = visible ? dot * p.scale_log2 : -INFINITY;
      }
      float alpha;
      float pr = online_softmax_step(s, m_run, l_run, alpha);
      if constexpr (kQuantized) {  // the V_c row's scale, after the softmax sum took pr
        if (pr != 0.f) pr *= p.vc_scale[b * p.vs_sb + pos * p.vs_st];
      }
      ps[lane * kRowsPerBlock + warp] = pr;
      if (lane == 0) alpha_s[warp] = alpha;
    }
    __syncthreads();

    // acc[row] = alpha[row] * acc[row] + sum_j P[row, j] * V_c[j]  (all rows share V_c[j]).
    const int jmax = int(min(int64_t(kTileKeys), kstop - t0));
    accumulate_pv<C, kRowsPerBlock>(acc, alpha_s, ps, stage_v(st), R, jmax, nchunk, tid);
  });

  if (lane == 0) l_s[warp] = l_run;
  __syncthreads();
  if (lane == 0 && row_ok) store_row_stats(p, b, split, my_row, m_run, l_run);
  store_row_acc(p, acc, l_s, b, split, r0, rows_here, R, nchunk, tid);
}

// Two stages when they fit, else one (no overlap of copy and math inside the block).
template <typename C, int D>
int choose_stages(const AttnParams& p, int64_t* bytes) {
  return choose_smem_stages(
      [&](int st) { return attn_layout<C, D>(p.heads_per_tile, p.R, st).total; }, bytes,
      "attention", "R=", p.R, ", head_dim=", D);
}

}  // namespace

size_t attn_min_smem_bytes(DType dtype, int head_dim, int64_t heads_per_tile, int64_t R,
                           CacheType cache) {
  return VDPROJ_DISPATCH_DTYPE(dtype, [&] {
    return VDPROJ_DISPATCH_CACHE(cache, [&] {
      return VDPROJ_DISPATCH_HEADDIM(head_dim, [&] {
        return size_t(attn_layout<C, kD>(heads_per_tile, R, 1).total);
      });
    });
  });
}

// Splits per (b, row group) over this device's block slots.
int64_t attn_num_splits(const AttnParams& p, int64_t max_keys) {
  if (p.final_mode) return 1;
  const int64_t groups = (p.nrows + kRowsPerBlock - 1) / kRowsPerBlock;
  return VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    return VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      return VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
        return splits_over_slots(attn_fwd_kernel<T, C, kD>, choose_stages<C, kD>, p, groups,
                                 max_keys);
      });
    });
  });
}

void launch_attention(const AttnParams& p, cudaStream_t stream) {
  const int64_t groups = (p.nrows + kRowsPerBlock - 1) / kRowsPerBlock;
  check_quantized_widths(p.cache, {p.R, p.head_dim});
  if (!attn_launch_checks(p, {p.R}, groups)) return;
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
        launch_split_attention(attn_fwd_kernel<T, C, kD>, choose_stages<C, kD>, p, groups, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace vdproj

namespace vdproj {
namespace cuda {
// The SM architectures this translation unit was compiled for (nvcc defines
// __CUDA_ARCH_LIST__, e.g. 800,900, in the host pass too); reported by backend_info().
std::vector<int64_t> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}
}  // namespace cuda
}  // namespace vdproj
