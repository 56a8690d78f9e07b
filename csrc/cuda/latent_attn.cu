// Latent keys (SPEC 3b), forward side: the absorbed query and the restore-on-read attention.
//
//   latent_query_kernel  q_eff_h = [q_rope_h | q_nope_h @ w_kr[h]] in float32, once per query
//   latent_attn_kernel   ctx = softmax(scale * q_eff_h . [k_rope_h | K_lat]^T) @ V_c
//
// The attention follows attn_fwd.cu (one block = one batch element, one group of head-major
// (head, query) rows, one split of the key range; tiles of kTileKeys keys staged with 16-byte
// cp.async, double-buffered when they fit; online softmax in the log2 domain) with two changes:
//   * a key is [k_rope_h (Dr, per head) | K_lat (Rk, one row for all heads)]: each tile stages
//     the rotary keys of the group's heads, the latent rows once (with the joint latent the V_c
//     rows themselves), and the V_c rows once;
//   * a block holds up to 16 rows (two per warp when H * Tq > 8), so that the 16 heads of a
//     decode step read each cached row once. Lane j scores key j for all the warp's rows, each
//     latent vector it loads serving all of them.
// Quantized caches (SPEC 3c) as in attn_fwd.cu: rows staged as stored, dequantized in registers,
// the key's two scales (rotary per head, latent per token) folded into the score's two parts and
// the V_c row's scale into its weight in P @ V_c.
// Outputs are those of attn_fwd_kernel (split partials for combine_kernel, or ctx and lse), so
// combine_kernel and restore_kernel (kvcache.cu) finish the decode step as for the V-only op.
#include "attn_tiles.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int kQueryRows = 16;  // (b, i) rows per block of latent_query_kernel

static_assert(kTileKeys == 32, "one lane per key in the score phase");

// ---- the absorbed query ---------------------------------------------------------------------
// Block = kQueryRows (b, i) rows of one head h: their q_nope staged as float; each thread owns
// output columns c (coalesced reads of a w_kr row) for all staged rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) latent_query_kernel(const LatentQueryParams p) {
  extern __shared__ __align__(16) float qn[];  // [kQueryRows][Dn]
  const int tid = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.x) * kQueryRows, h = blockIdx.y;
  const int64_t D = p.head_dim, Dr = p.Dr, Dn = D - Dr, Rk = p.Rk, Dq = Dr + Rk, H = p.H;
  const int64_t rows = min(int64_t(kQueryRows), p.M - m0);
  const T* q = static_cast<const T*>(p.q);
  for (int64_t idx = tid; idx < kQueryRows * Dn; idx += kThreads) {
    const int64_t m = idx / Dn, n = idx - m * Dn;
    qn[idx] = m < rows ? to_float(q[((m0 + m) * H + h) * D + Dr + n]) : 0.f;
  }
  for (int64_t idx = tid; idx < rows * Dr; idx += kThreads) {  // the rotary part, upcast
    const int64_t m = idx / Dr, d = idx - m * Dr;
    p.q_eff[((m0 + m) * H + h) * Dq + d] = to_float(q[((m0 + m) * H + h) * D + d]);
  }
  __syncthreads();

  const T* w = static_cast<const T*>(p.w_kr) + h * Dn * Rk;
  for (int64_t c = tid; c < Rk; c += kThreads) {
    float acc[kQueryRows];
#pragma unroll
    for (int m = 0; m < kQueryRows; ++m) acc[m] = 0.f;
    for (int64_t n = 0; n < Dn; ++n) {
      const float wv = to_float(w[n * Rk + c]);
#pragma unroll
      for (int m = 0; m < kQueryRows; ++m) acc[m] = fmaf(qn[m * Dn + n], wv, acc[m]);
    }
#pragma unroll
    for (int m = 0; m < kQueryRows; ++m) {
      if (m < rows) p.q_eff[((m0 + m) * H + h) * Dq + Dr + c] = acc[m];
    }
  }
}

// ---- the attention --------------------------------------------------------------------------
// Shared-memory layout in bytes (all offsets 16-aligned). Staged rows are padded by 16 bytes so
// that lanes reading different keys at the same offset hit different banks.
struct LatentLayout {
  int64_t kr_row, kl_row, v_row;  // elements per staged row: rotary (all staged heads), K_c, V_c
  int64_t q_off, p_off, misc_off, stage_off, kr_bytes, kl_bytes, stage_bytes, total;
};

// C: the storage type of the staged cache rows.
template <typename C>
__host__ __device__ inline LatentLayout latent_layout(int rows, int64_t heads, int64_t Dr,
                                                      int64_t Rk, int64_t Rv, bool joint,
                                                      int nstages) {
  constexpr int64_t pad = 16 / int64_t(sizeof(C));
  LatentLayout L;
  L.kr_row = heads * Dr + pad;
  L.kl_row = joint ? 0 : Rk + pad;
  L.v_row = Rv + pad;
  L.q_off = 0;
  L.p_off = align16(L.q_off + int64_t(rows) * (Dr + Rk) * 4);
  L.misc_off = align16(L.p_off + int64_t(kTileKeys) * rows * 4);
  L.stage_off = align16(L.misc_off + 2 * int64_t(rows) * 4);
  L.kr_bytes = Dr > 0 ? align16(int64_t(kTileKeys) * L.kr_row * int64_t(sizeof(C))) : 0;
  L.kl_bytes = joint ? 0 : align16(int64_t(kTileKeys) * L.kl_row * int64_t(sizeof(C)));
  L.stage_bytes = L.kr_bytes + L.kl_bytes + align16(int64_t(kTileKeys) * L.v_row * int64_t(sizeof(C)));
  L.total = L.stage_off + nstages * L.stage_bytes;
  return L;
}

// RPW: rows per warp (1 or 2); a block holds kWarps * RPW rows. C: the caches' storage type.
template <typename C, int RPW>
__global__ void __launch_bounds__(kThreads)
latent_attn_kernel(const LatentAttnParams p, const int nstages) {
  constexpr int V = Vec16<C>::N;
  constexpr bool kQuantized = CacheQuant<C>::kQuantized;
  constexpr int ROWS = kWarps * RPW;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t Dr = p.Dr, Rk = p.Rk, Rv = p.Rv, Dq = Dr + Rk, Tq = p.Tq, nrows = p.nrows;
  const LatentLayout lay =
      latent_layout<C>(ROWS, heads_per_tile(p.H, Tq, ROWS), Dr, Rk, Rv, p.joint, nstages);
  const FwdScratch sc = fwd_scratch(smem, lay, ROWS);
  float *qs = sc.qs, *ps = sc.ps, *alpha_s = sc.alpha_s, *l_s = sc.l_s;  // qs: [rows][Dq]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t split = blockIdx.y, r0 = int64_t(blockIdx.x) * ROWS, b = blockIdx.z;
  const int64_t rows_here = nrows - r0 < ROWS ? nrows - r0 : ROWS;
  const int64_t h_lo = r0 / Tq, h_hi = (r0 + rows_here - 1) / Tq;
  const int nh = int(h_hi - h_lo + 1);  // <= heads_per_tile(H, Tq, ROWS)
  const KeyRange kr = block_key_range(p, b, split, r0, rows_here);
  const int64_t kstop = kr.kstop;

  // This warp's rows: local row w = warp + kWarps * rr.
  bool row_ok[RPW];
  int64_t my_h[RPW], my_limit[RPW];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t w = warp + kWarps * rr;
    row_ok[rr] = w < rows_here;
    const int64_t row = r0 + w, i = row_ok[rr] ? row % Tq : 0;
    my_h[rr] = row_ok[rr] ? row / Tq : h_lo;
    my_limit[rr] = p.causal ? i + kr.L - Tq : kr.L;  // last visible key (inclusive) if causal
  }

  // The group's absorbed queries (zeros for rows past the end).
  const float* qg = p.q_eff + b * Tq * p.H * Dq;
  stage_query_rows(qs, ROWS, Dq, r0, rows_here, Tq, tid, [&](int64_t h, int64_t i, int64_t d) {
    return qg[(i * p.H + h) * Dq + d];
  });

  // (No offset is applied to a pointer the launch leaves null: no rotary dims, joint latent.)
  const C* vb = static_cast<const C*>(p.vc) + b * p.vc_sb;
  const C* krb = Dr > 0 ? static_cast<const C*>(p.krope) + b * p.kr_sb : vb;
  const C* klb = p.joint ? vb : static_cast<const C*>(p.klat) + b * p.kl_sb;
  auto stage = [&](int st) { return smem + lay.stage_off + st * lay.stage_bytes; };
  auto stage_kr = [&](int st) { return reinterpret_cast<C*>(stage(st)); };
  auto stage_kl = [&](int st) { return reinterpret_cast<C*>(stage(st) + lay.kr_bytes); };
  auto stage_v = [&](int st) {
    return reinterpret_cast<C*>(stage(st) + lay.kr_bytes + lay.kl_bytes);
  };
  // One tile: the rotary keys of the group's heads, the latent rows, the V_c rows.
  auto load_tile = [&](int64_t t0, int st) {
    if (Dr > 0) {
      stage_tile_async(stage_kr(st), lay.kr_row, krb, p.kr_st, p.kr_sh, h_lo, nh, int(Dr), t0,
                       kstop, tid);
    }
    if (!p.joint) stage_tile_async(stage_kl(st), lay.kl_row, klb, p.kl_st, 0, 0, 1, int(Rk), t0, kstop, tid);
    stage_tile_async(stage_v(st), lay.v_row, vb, p.vc_st, 0, 0, 1, int(Rv), t0, kstop, tid);
  };

  float m_run[RPW], l_run[RPW];
  float acc[2][ROWS][kRowChunk];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.f;
  }
  zero_acc(acc);
  const int nchunk = int(Rv / kRowChunk);

  pipelined_key_tiles(kr.kstart, kr.ntiles, nstages, load_tile, [&](int64_t t0, int st) {
    const C* vs = stage_v(st);
    // Scores: lane = key, for each of the warp's rows; online softmax (log2 domain).
    {
      const int64_t pos = t0 + lane;
      const bool in_range = pos < kstop;
      float dot[RPW];
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) dot[rr] = 0.f;
      const C* lrow = p.joint ? vs + lane * lay.v_row : stage_kl(st) + lane * lay.kl_row;
      for (int64_t c = 0; c < Rk; c += V) {  // the shared latent: one load for all rows
        float kv[V];
        load16_as_float(lrow + c, kv);
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
          const float* qrow = qs + (warp + kWarps * rr) * Dq + Dr + c;
#pragma unroll
          for (int e = 0; e < V; ++e) dot[rr] = fmaf(qrow[e], kv[e], dot[rr]);
        }
      }
      if constexpr (kQuantized) {  // the latent row's scale (V_c's with the joint latent)
        const float ls = !in_range ? 0.f
                         : p.joint ? p.vc_scale[b * p.vs_sb + pos * p.vs_st]
                                   : p.kl_scale[b * p.kls_sb + pos * p.kls_st];
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) dot[rr] *= ls;
      }
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) {  // each row's own head: the rotary part
        const C* krow = stage_kr(st) + lane * lay.kr_row + (my_h[rr] - h_lo) * Dr;
        if constexpr (kQuantized) {
          if (Dr > 0 && in_range) {
            const float rs = p.kr_scale[b * p.krs_sb + pos * p.krs_st + my_h[rr] * p.krs_sh];
            dot[rr] = fmaf(rs, dot_staged(qs + (warp + kWarps * rr) * Dq, krow, Dr, 0.f), dot[rr]);
          }
        } else {
          dot[rr] = dot_staged(qs + (warp + kWarps * rr) * Dq, krow, Dr, dot[rr]);
        }
      }
      // The V_c row's scale, for P @ V_c (the softmax sums take the unscaled weights).
      float vsc = 1.f;
      if constexpr (kQuantized) vsc = in_range ? p.vc_scale[b * p.vs_sb + pos * p.vs_st] : 0.f;
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) {
        const bool visible = row_ok[rr] && in_range && (!p.causal || pos <= my_limit[rr]);
        float alpha;
        float pr = online_softmax_step(visible ? dot[rr] * p.scale_log2 : -INFINITY,
                                       m_run[rr], l_run[rr], alpha);
        if constexpr (kQuantized) pr = pr != 0.f ? pr * vsc : 0.f;
        const int w = warp + kWarps * rr;
        ps[lane * ROWS + w] = pr;
        if (lane == 0) alpha_s[w] = alpha;
      }
    }
    __syncthreads();

    // acc[row] = alpha[row] * acc[row] + sum_j P[row, j] * V_c[j]  (all rows share V_c[j]).
    const int jmax = int(min(int64_t(kTileKeys), kstop - t0));
    accumulate_pv<C, ROWS>(acc, alpha_s, ps, vs, lay.v_row, jmax, nchunk, tid);
  });

  if (lane == 0) {
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) l_s[warp + kWarps * rr] = l_run[rr];
  }
  __syncthreads();
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    if (lane == 0 && row_ok[rr]) store_row_stats(p, b, split, r0 + warp + kWarps * rr, m_run[rr], l_run[rr]);
  }
  store_row_acc(p, acc, l_s, b, split, r0, rows_here, Rv, nchunk, tid);
}

// Rows per warp of the launch: a compile-time constant kRPW for the kernel template.
#define VDPROJ_DISPATCH_LATENT_RPW(NROWS, ...)                                            \
  [&] {                                                                                   \
    if (latent_rows_per_block(NROWS) > kRowsPerBlock) { constexpr int kRPW = 2; return __VA_ARGS__(); } \
    constexpr int kRPW = 1;                                                               \
    return __VA_ARGS__();                                                                 \
  }()

template <typename C, int RPW>
LatentLayout layout_of(const LatentAttnParams& p, int nstages) {
  constexpr int rows = kWarps * RPW;
  return latent_layout<C>(rows, heads_per_tile(p.H, p.Tq, rows), p.Dr, p.Rk, p.Rv, p.joint,
                          nstages);
}

// Two stages when they fit, else one.
template <typename C, int RPW>
int latent_stages(const LatentAttnParams& p, int64_t* bytes) {
  return choose_smem_stages([&](int st) { return layout_of<C, RPW>(p, st).total; }, bytes,
                            "latent attention", "Dr=", p.Dr, ", Rk=", p.Rk, ", Rv=", p.Rv);
}

}  // namespace

size_t latent_query_smem_bytes(int64_t head_dim, int64_t Dr) {
  return size_t(kQueryRows) * size_t(head_dim - Dr) * sizeof(float);
}

void launch_latent_query(const LatentQueryParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.H == 0) return;
  const int64_t blocks = (p.M + kQueryRows - 1) / kQueryRows;
  TORCH_CHECK(blocks <= 2147483647 && p.H <= 65535, "vdproj_ext CUDA: query grid too large");
  const size_t bytes = latent_query_smem_bytes(p.head_dim, p.Dr);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    launch_kernel(latent_query_kernel<T>, dim3(unsigned(blocks), unsigned(p.H)), bytes, stream, p);
  });
}

size_t latent_attn_min_smem_bytes(DType dtype, int64_t H, int64_t Tq, int64_t Dr, int64_t Rk,
                                  int64_t Rv, bool joint, CacheType cache) {
  LatentAttnParams p{};
  p.H = H; p.Tq = Tq; p.Dr = Dr; p.Rk = Rk; p.Rv = Rv; p.joint = joint;
  return VDPROJ_DISPATCH_DTYPE(dtype, [&] {
    return VDPROJ_DISPATCH_CACHE(cache, [&] {
      return VDPROJ_DISPATCH_LATENT_RPW(Tq * H, [&] {
        return size_t(layout_of<C, kRPW>(p, 1).total);
      });
    });
  });
}

// Splits per (b, row group) over this device's block slots.
int64_t latent_num_splits(const LatentAttnParams& p, int64_t max_keys) {
  if (p.final_mode) return 1;
  const int64_t rows = latent_rows_per_block(p.nrows);
  return VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    return VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      return VDPROJ_DISPATCH_LATENT_RPW(p.nrows, [&] {
        return splits_over_slots(latent_attn_kernel<C, kRPW>, latent_stages<C, kRPW>, p,
                                 (p.nrows + rows - 1) / rows, max_keys);
      });
    });
  });
}

void launch_latent_attention(const LatentAttnParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.Dr >= 0 && p.Dr % 8 == 0 && p.Dr < p.head_dim,
              "vdproj_ext CUDA: rotary dims Dr must be a multiple of 8 below head_dim, got ", p.Dr);
  TORCH_CHECK(!p.joint || p.Rk == p.Rv, "vdproj_ext CUDA: the joint latent needs Rk == Rv");
  const int64_t rows = latent_rows_per_block(p.nrows);
  const int64_t groups = (p.nrows + rows - 1) / rows;
  check_quantized_widths(p.cache, {p.Dr, p.Rk, p.Rv});
  if (!attn_launch_checks(p, {p.Rk, p.Rv}, groups)) return;
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      VDPROJ_DISPATCH_LATENT_RPW(p.nrows, [&] {
        launch_split_attention(latent_attn_kernel<C, kRPW>, latent_stages<C, kRPW>, p, groups,
                               stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace vdproj
