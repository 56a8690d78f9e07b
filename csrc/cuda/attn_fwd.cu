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
// Outputs: unnormalized partials (m, l, acc) per split for combine_kernel (kvcache.cu), or,
// with one split, the normalized ctx and the log-sum-exp directly ("final mode", cva_forward).
#include <vector>

#include "device_utils.h"

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

template <typename T, int D>
__host__ __device__ inline AttnLayout attn_layout(int64_t heads_per_tile, int64_t R, int nstages) {
  AttnLayout L;
  // The pad shifts consecutive keys by 16 bytes so that lanes reading different keys at the
  // same offset hit different banks.
  L.k_row = heads_per_tile * D + 16 / int64_t(sizeof(T));
  L.q_off = 0;
  L.p_off = align16(L.q_off + int64_t(kRowsPerBlock) * D * 4);
  L.misc_off = align16(L.p_off + int64_t(kTileKeys) * kRowsPerBlock * 4);
  L.stage_off = align16(L.misc_off + 2 * kRowsPerBlock * 4);
  L.k_bytes = align16(int64_t(kTileKeys) * L.k_row * sizeof(T));
  L.stage_bytes = L.k_bytes + align16(int64_t(kTileKeys) * R * sizeof(T));
  L.total = L.stage_off + nstages * L.stage_bytes;
  return L;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
attn_fwd_kernel(const AttnParams p, const int nstages) {
  constexpr int V = Vec16<T>::N;  // elements per 16-byte vector
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnLayout lay = attn_layout<T, D>(p.heads_per_tile, p.R, nstages);
  float* qs = reinterpret_cast<float*>(smem + lay.q_off);     // [rows][D]
  float* ps = reinterpret_cast<float*>(smem + lay.p_off);     // [keys][rows]
  float* alpha_s = reinterpret_cast<float*>(smem + lay.misc_off);  // [rows]
  float* l_s = alpha_s + kRowsPerBlock;                              // [rows]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t split = blockIdx.y, r0 = int64_t(blockIdx.x) * kRowsPerBlock, b = blockIdx.z;
  const int64_t Tq = p.Tq, R = p.R, nrows = p.nrows;
  const int64_t rows_here = nrows - r0 < kRowsPerBlock ? nrows - r0 : kRowsPerBlock;
  const int64_t h_lo = r0 / Tq, h_hi = (r0 + rows_here - 1) / Tq;
  const int64_t nh = h_hi - h_lo + 1;  // <= p.heads_per_tile (host bound)

  // Key range of this (b, group, split).
  const int64_t L = max(int64_t(0), min(p.len_max, (p.seqlens != nullptr ? int64_t(p.seqlens[b])
                                                                         : int64_t(0)) + p.len_add));
  int64_t kend = L;
  if (p.causal) {
    int64_t max_i = 0;
    for (int64_t w = 0; w < rows_here; ++w) max_i = max(max_i, (r0 + w) % Tq);
    kend = min(L, max(int64_t(0), max_i + L - Tq + 1));
  }
  const int64_t per_split = (kend + p.nsplit - 1) / p.nsplit;
  const int64_t chunk = (per_split + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t kstart = min(kend, split * chunk);
  const int64_t kstop = min(kend, kstart + chunk);
  const int64_t ntiles = (kstop - kstart + kTileKeys - 1) / kTileKeys;

  // This warp's row.
  const int64_t my_row = r0 + warp;
  const bool row_ok = warp < rows_here;
  const int64_t my_h = row_ok ? my_row / Tq : h_lo, my_i = row_ok ? my_row % Tq : 0;
  const int64_t my_limit = p.causal ? my_i + L - Tq : L;  // last visible key (inclusive) if causal

  // Queries of the group, as float.
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
  for (int idx = tid; idx < kRowsPerBlock * D; idx += kThreads) {
    const int w = idx / D, d = idx - w * D;
    float val = 0.f;
    if (w < rows_here) {
      const int64_t row = r0 + w, h = row / Tq, i = row - h * Tq;
      val = to_float(qg[i * p.q_st + h * p.q_sh + d]);
    }
    qs[idx] = val;
  }

  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb;
  const T* vb = static_cast<const T*>(p.vc) + b * p.vc_sb;
  auto stage_k = [&](int st) {
    return reinterpret_cast<T*>(smem + lay.stage_off + st * lay.stage_bytes);
  };
  auto stage_v = [&](int st) {
    return reinterpret_cast<T*>(smem + lay.stage_off + st * lay.stage_bytes + lay.k_bytes);
  };
  auto load_tile = [&](int64_t t0, int st) {
    T* ks = stage_k(st);
    T* vs = stage_v(st);
    constexpr int kcpr = D / V;  // 16-byte chunks per (key, head)
    const int nkc = int(kTileKeys * nh * kcpr);
    for (int idx = tid; idx < nkc; idx += kThreads) {
      const int j = idx / int(nh * kcpr);
      const int rem = idx - j * int(nh * kcpr);
      const int hh = rem / kcpr, c = rem - hh * kcpr;
      const int64_t pos = t0 + j;
      const bool ok = pos < kstop;
      const T* src = ok ? kb + pos * p.k_st + (h_lo + hh) * p.k_sh + c * V : kb;
      cp_async16(ks + j * lay.k_row + hh * D + c * V, src, ok);
    }
    const int vcpr = int(R / V);
    for (int idx = tid; idx < kTileKeys * vcpr; idx += kThreads) {
      const int j = idx / vcpr, c = idx - j * vcpr;
      const int64_t pos = t0 + j;
      const bool ok = pos < kstop;
      const T* src = ok ? vb + pos * p.vc_st + c * V : vb;
      cp_async16(vs + j * R + c * V, src, ok);
    }
  };

  float m_run = -INFINITY, l_run = 0.f;
  float acc[2][kRowsPerBlock][kRowChunk];
#pragma unroll
  for (int kk = 0; kk < 2; ++kk)
#pragma unroll
    for (int w = 0; w < kRowsPerBlock; ++w)
#pragma unroll
      for (int e = 0; e < kRowChunk; ++e) acc[kk][w][e] = 0.f;
  const int nchunk = int(R / kRowChunk);

  if (ntiles > 0) {
    load_tile(kstart, 0);
    cp_async_commit();
  }
  for (int64_t n = 0; n < ntiles; ++n) {
    const int64_t t0 = kstart + n * kTileKeys;
    if (nstages == 2 && n + 1 < ntiles) {
      load_tile(t0 + kTileKeys, int((n + 1) & 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = nstages == 2 ? int(n & 1) : 0;
    const T* ks = stage_k(st);
    const T* vs = stage_v(st);

    // 2. scores and online softmax (log2 domain).
    {
      const int64_t pos = t0 + lane;
      float s = -INFINITY;
      if (row_ok) {
        const T* krow = ks + lane * lay.k_row + (my_h - h_lo) * D;
        const float* qrow = qs + warp * D;
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < D; d += V) {
          float kv[V];
          load16_as_float(krow + d, kv);
#pragma unroll
          for (int e = 0; e < V; ++e) dot = fmaf(qrow[d + e], kv[e], dot);
        }
        const bool visible = pos < kstop && (!p.causal || pos <= my_limit);
        s = visible ? dot * p.scale_log2 : -INFINITY;
      }
      float alpha;
      const float pr = online_softmax_step(s, m_run, l_run, alpha);
      ps[lane * kRowsPerBlock + warp] = pr;
      if (lane == 0) alpha_s[warp] = alpha;
    }
    __syncthreads();

    // 3. acc[row] = alpha[row] * acc[row] + sum_j P[row, j] * V_c[j]  (all rows share V_c[j]).
    const int jmax = int(min(int64_t(kTileKeys), kstop - t0));
    accumulate_pv<T, kRowsPerBlock>(acc, alpha_s, ps, vs, R, jmax, nchunk, tid);
    __syncthreads();  // the stage and ps are overwritten next iteration
    if (nstages == 1 && n + 1 < ntiles) {  // single buffer: load the next tile only now
      load_tile(t0 + kTileKeys, 0);
      cp_async_commit();
    }
  }

  if (lane == 0) l_s[warp] = l_run;
  __syncthreads();

  if (p.final_mode) {
    if (lane == 0 && row_ok) {
      p.lse_out[(b * p.H + my_h) * Tq + my_i] =
          l_run > 0.f ? (m_run + log2f(l_run)) * kLn2F : -INFINITY;
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int c = tid + kk * kThreads;
      if (c >= nchunk) continue;
#pragma unroll
      for (int w = 0; w < kRowsPerBlock; ++w) {
        if (w >= rows_here) continue;
        const int64_t row = r0 + w, h = row / Tq, i = row - h * Tq;
        const float inv = l_s[w] > 0.f ? 1.f / l_s[w] : 0.f;
        float2 out = make_float2(acc[kk][w][0] * inv, acc[kk][w][1] * inv);
        *reinterpret_cast<float2*>(p.ctx_out + ((b * Tq + i) * p.H + h) * R + c * kRowChunk) = out;
      }
    }
  } else {
    const int64_t base = (b * p.nsplit + split) * nrows;
    if (lane == 0 && row_ok) {
      p.part_ml[(base + my_row) * 2 + 0] = m_run;
      p.part_ml[(base + my_row) * 2 + 1] = l_run;
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int c = tid + kk * kThreads;
      if (c >= nchunk) continue;
#pragma unroll
      for (int w = 0; w < kRowsPerBlock; ++w) {
        if (w >= rows_here) continue;
        *reinterpret_cast<float2*>(p.part_acc + (base + r0 + w) * R + c * kRowChunk) =
            make_float2(acc[kk][w][0], acc[kk][w][1]);
      }
    }
  }
}

// Two stages when they fit, else one (no overlap of copy and math inside the block).
template <typename T, int D>
int choose_stages(const AttnParams& p, int64_t* bytes) {
  const int64_t limit = max_smem_optin();
  for (int st = 2; st >= 1; --st) {
    const int64_t b = attn_layout<T, D>(p.heads_per_tile, p.R, st).total;
    if (b <= limit) {
      *bytes = b;
      return st;
    }
  }
  TORCH_CHECK(false, "vdproj_ext CUDA attention: a tile of ", kTileKeys, " keys needs ",
              attn_layout<T, D>(p.heads_per_tile, p.R, 1).total, " bytes of shared memory, more "
              "than the device's ", limit, " (R=", p.R, ", head_dim=", D, ")");
  return 0;
}

}  // namespace

size_t attn_min_smem_bytes(DType dtype, int head_dim, int64_t heads_per_tile, int64_t R) {
  return VDPROJ_DISPATCH_DTYPE(dtype, [&] {
    return VDPROJ_DISPATCH_HEADDIM(head_dim, [&] {
      return size_t(attn_layout<T, kD>(heads_per_tile, R, 1).total);
    });
  });
}

// Splits per (b, row group): choose_num_splits (vdproj_cuda.h) over this device's block slots.
int64_t attn_num_splits(const AttnParams& p, int64_t max_keys) {
  if (p.final_mode) return 1;
  return VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    return VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
      int64_t bytes = 0;
      const int nstages = choose_stages<T, kD>(p, &bytes);
      (void)nstages;
      auto kernel = attn_fwd_kernel<T, kD>;
      const int per_sm = blocks_per_sm(kernel, size_t(bytes));
      const int64_t slots = int64_t(current_device_sms()) * (per_sm > 0 ? per_sm : 1);
      const int64_t groups = (p.nrows + kRowsPerBlock - 1) / kRowsPerBlock;
      return choose_num_splits(slots, p.B * groups, (max_keys + kTileKeys - 1) / kTileKeys);
    });
  });
}

void launch_attention(const AttnParams& p, cudaStream_t stream) {
  TORCH_CHECK(!p.final_mode || p.nsplit == 1, "vdproj_ext CUDA: final mode needs one split");
  TORCH_CHECK(p.R % 8 == 0 && p.R > 0 && p.R <= kMaxRank,
              "vdproj_ext CUDA: rank R must be a positive multiple of 8 and at most ", kMaxRank,
              ", got ", p.R);
  const int64_t groups = (p.nrows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(groups <= 2147483647 && p.B <= 65535 && p.nsplit <= kMaxSplits,
              "vdproj_ext CUDA: grid too large (rows=", p.nrows, ", batch=", p.B, ")");
  if (p.B == 0 || p.nrows == 0) return;
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
      int64_t bytes = 0;
      const int nstages = choose_stages<T, kD>(p, &bytes);
      auto kernel = attn_fwd_kernel<T, kD>;
      set_smem_limit(kernel, size_t(bytes));
      // Row groups on x (up to 2^31 - 1 blocks: long prefills), splits on y, batch on z.
      const dim3 grid(unsigned(groups), unsigned(p.nsplit), unsigned(p.B));
      kernel<<<grid, kThreads, size_t(bytes), stream>>>(p, nstages);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
