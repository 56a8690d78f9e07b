// The block-level steps the attention kernels share: the V-only ones (attn_fwd.cu, attn_bwd.cu)
// and the latent-key ones (latent_attn.cu, latent_bwd.cu) differ in what a key is made of, not
// in how a block finds its keys, stages them, pipelines the tiles or writes its results. Each
// step is a __forceinline__ function, so the kernels compile to the code they had inline.
#pragma once

#include <initializer_list>

#include "device_utils.h"

namespace vdproj {
namespace cuda {

// ---- forward (split-K over the key range) ---------------------------------------------------
// The keys [kstart, kstop) one block scores, and L, the batch element's visible length.
struct KeyRange {
  int64_t L, kstart, kstop, ntiles;
};

// P: AttnParams or LatentAttnParams. The block holds rows r0 .. r0 + rows_here - 1 (head-major,
// row = h * Tq + i) and one split; causal blocks stop at the last key their latest query sees.
template <typename P>
__device__ __forceinline__ KeyRange block_key_range(const P& p, int64_t b, int64_t split,
                                                    int64_t r0, int64_t rows_here) {
  const int64_t Tq = p.Tq;
  KeyRange k;
  k.L = max(int64_t(0), min(p.len_max, (p.seqlens != nullptr ? int64_t(p.seqlens[b]) : int64_t(0)) +
                                           p.len_add));
  int64_t kend = k.L;
  if (p.causal) {
    int64_t max_i = 0;
    for (int64_t w = 0; w < rows_here; ++w) max_i = max(max_i, (r0 + w) % Tq);
    kend = min(k.L, max(int64_t(0), max_i + k.L - Tq + 1));
  }
  const int64_t per_split = (kend + p.nsplit - 1) / p.nsplit;
  const int64_t chunk = (per_split + kTileKeys - 1) / kTileKeys * kTileKeys;
  k.kstart = min(kend, split * chunk);
  k.kstop = min(kend, k.kstart + chunk);
  k.ntiles = (k.kstop - k.kstart + kTileKeys - 1) / kTileKeys;
  return k;
}

// The float scratch at the front of a forward block's shared memory (Layout: AttnLayout or
// LatentLayout, byte offsets): the queries [rows][width], P [keys][rows], alpha and l [rows].
struct FwdScratch {
  float *qs, *ps, *alpha_s, *l_s;
};
template <typename Layout>
__device__ __forceinline__ FwdScratch fwd_scratch(unsigned char* smem, const Layout& lay, int rows) {
  FwdScratch s;
  s.qs = reinterpret_cast<float*>(smem + lay.q_off);
  s.ps = reinterpret_cast<float*>(smem + lay.p_off);
  s.alpha_s = reinterpret_cast<float*>(smem + lay.misc_off);
  s.l_s = s.alpha_s + rows;
  return s;
}

// qs[w][d] = q(h, i, d) as float for the block's rows (zeros past rows_here), width per row.
template <typename LoadQ>
__device__ __forceinline__ void stage_query_rows(float* qs, int rows, int64_t width, int64_t r0,
                                                 int64_t rows_here, int64_t Tq, int tid,
                                                 LoadQ load_q) {
  for (int64_t idx = tid; idx < rows * width; idx += kThreads) {
    const int64_t w = idx / width, d = idx - w * width;
    float val = 0.f;
    if (w < rows_here) {
      const int64_t row = r0 + w, h = row / Tq, i = row - h * Tq;
      val = load_q(h, i, d);
    }
    qs[idx] = val;
  }
}

// One tile of keys [t0, t0 + kTileKeys) into shared memory with 16-byte cp.async: for each key j
// the rows of heads h_lo .. h_lo + nh - 1 (`width` elements each, back to back, dst_row elements
// apart per key; nh = 1 and s_h = 0 for a row all heads share). Positions at or past kstop are
// zero-filled and never read (NaN cache tails); src itself stands in as their mapped address.
template <typename T>
__device__ __forceinline__ void stage_tile_async(T* dst, int64_t dst_row, const T* src,
                                                 int64_t s_t, int64_t s_h, int64_t h_lo, int nh,
                                                 int width, int64_t t0, int64_t kstop, int tid) {
  constexpr int V = Vec16<T>::N;
  const int cpr = width / V;  // 16-byte chunks per (key, head)
  const int per_key = nh * cpr;
  for (int idx = tid; idx < kTileKeys * per_key; idx += kThreads) {
    const int j = idx / per_key, rem = idx - j * per_key;
    const int hh = rem / cpr, c = rem - hh * cpr;
    const int64_t pos = t0 + j;
    const bool ok = pos < kstop;
    cp_async16(dst + j * dst_row + hh * width + c * V,
               ok ? src + pos * s_t + (h_lo + hh) * s_h + c * V : src, ok);
  }
}

// The tile loop of a block over keys kstart .. kstart + ntiles * kTileKeys: load(t0, stage)
// issues a tile's cp.async copies; with two stages the next tile's copy runs under this tile's
// math. body(t0, stage) runs once the stage is visible to the block, and a barrier follows it:
// the stage and the block's scratch (P, alpha) are overwritten next.
template <typename Load, typename Body>
__device__ __forceinline__ void pipelined_key_tiles(int64_t kstart, int64_t ntiles, int nstages,
                                                    Load load, Body body) {
  if (ntiles > 0) {
    load(kstart, 0);
    cp_async_commit();
  }
  for (int64_t n = 0; n < ntiles; ++n) {
    const int64_t t0 = kstart + n * kTileKeys;
    if (nstages == 2 && n + 1 < ntiles) {
      load(t0 + kTileKeys, int((n + 1) & 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(t0, nstages == 2 ? int(n & 1) : 0);
    __syncthreads();
    if (nstages == 1 && n + 1 < ntiles) {  // single buffer: load the next tile only now
      load(t0 + kTileKeys, 0);
      cp_async_commit();
    }
  }
}

template <int ROWS>
__device__ __forceinline__ void zero_acc(float (&acc)[2][ROWS][kRowChunk]) {
#pragma unroll
  for (int kk = 0; kk < 2; ++kk)
#pragma unroll
    for (int w = 0; w < ROWS; ++w)
#pragma unroll
      for (int e = 0; e < kRowChunk; ++e) acc[kk][w][e] = 0.f;
}

// dot + q[0..n) . k[0..n): q float, k staged as T (16-byte loads). Fully unrolled when n is a
// compile-time constant at the call (the head dim), a plain loop otherwise.
template <typename T>
__device__ __forceinline__ float dot_staged(const float* q, const T* k, int64_t n, float dot) {
  constexpr int V = Vec16<T>::N;
#pragma unroll
  for (int64_t d = 0; d < n; d += V) {
    float kv[V];
    load16_as_float(k + d, kv);
#pragma unroll
    for (int e = 0; e < V; ++e) dot = fmaf(q[d + e], kv[e], dot);
  }
  return dot;
}

// A row's softmax statistics (lane 0 of its warp calls): the log-sum-exp (natural log) in final
// mode, else the split's (m, l) for combine_kernel.
template <typename P>
__device__ __forceinline__ void store_row_stats(const P& p, int64_t b, int64_t split, int64_t row,
                                                float m_run, float l_run) {
  if (p.final_mode) {
    const int64_t h = row / p.Tq, i = row - h * p.Tq;
    // l_run is 0 for a row that saw no key, NaN (propagated) after a NaN input
    p.lse_out[(b * p.H + h) * p.Tq + i] = l_run != 0.f ? (m_run + log2f(l_run)) * kLn2F : -INFINITY;
  } else {
    const int64_t base = (b * p.nsplit + split) * p.nrows;
    p.part_ml[(base + row) * 2 + 0] = m_run;
    p.part_ml[(base + row) * 2 + 1] = l_run;
  }
}

// The block's accumulators (R values per row): the normalized ctx (B, Tq, H, R) in final mode,
// else the split's unnormalized partials. l_s: the rows' softmax sums.
template <typename P, int ROWS>
__device__ __forceinline__ void store_row_acc(const P& p, const float (&acc)[2][ROWS][kRowChunk],
                                              const float* l_s, int64_t b, int64_t split,
                                              int64_t r0, int64_t rows_here, int64_t R,
                                              int nchunk, int tid) {
  // Per row: its destination and scale once, then the thread's chunks c = tid + kk * kThreads.
#pragma unroll
  for (int w = 0; w < ROWS; ++w) {
    if (w >= rows_here) continue;
    const int64_t row = r0 + w, h = row / p.Tq, i = row - h * p.Tq;
    float* dst;
    float inv = 1.f;  // exact: the partials keep their bits
    if (p.final_mode) {
      dst = p.ctx_out + ((b * p.Tq + i) * p.H + h) * R;
      inv = l_s[w] != 0.f ? 1.f / l_s[w] : 0.f;
    } else {
      dst = p.part_acc + ((b * p.nsplit + split) * p.nrows + row) * R;
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int c = tid + kk * kThreads;
      if (c < nchunk) {
        *reinterpret_cast<float2*>(dst + c * kRowChunk) =
            make_float2(acc[kk][w][0] * inv, acc[kk][w][1] * inv);
      }
    }
  }
}

// Two stages when they fit the device's opt-in shared memory, else one. layout_total(st): the
// bytes a block needs with st stages; what: the message's tail naming the shape.
template <typename Total, typename... What>
int choose_smem_stages(Total layout_total, int64_t* bytes, const char* kernel, const What&... what) {
  const int64_t limit = max_smem_optin();
  for (int st = 2; st >= 1; --st) {
    const int64_t need = layout_total(st);
    if (need <= limit) {
      *bytes = need;
      return st;
    }
  }
  TORCH_CHECK(false, "vdproj_ext CUDA ", kernel, ": a tile of ", kTileKeys, " keys needs ",
              layout_total(1), " bytes of shared memory, more than the device's ", limit, " (",
              what..., ")");
  return 0;
}

// The checks every forward attention launch makes (P: AttnParams or LatentAttnParams; ranks:
// its V_c rank, and its key latent's; groups: row groups per batch element). False when there
// is nothing to launch.
template <typename P>
bool attn_launch_checks(const P& p, std::initializer_list<int64_t> ranks, int64_t groups) {
  TORCH_CHECK(!p.final_mode || p.nsplit == 1, "vdproj_ext CUDA: final mode needs one split");
  for (const int64_t rank : ranks) {
    TORCH_CHECK(rank % 8 == 0 && rank > 0 && rank <= kMaxRank,
                "vdproj_ext CUDA: rank must be a positive multiple of 8 and at most ", kMaxRank,
                ", got ", rank);
  }
  TORCH_CHECK(groups <= 2147483647 && p.B <= 65535 && p.nsplit <= kMaxSplits,
              "vdproj_ext CUDA: grid too large (rows=", p.nrows, ", batch=", p.B, ")");
  return p.B > 0 && p.nrows > 0;
}

// Quantized caches hold 1-byte elements: every staged row width (elements) must fill whole
// 16-byte cp.async copies, i.e. be a multiple of 16 (kernel_support declines the others).
inline void check_quantized_widths(CacheType cache, std::initializer_list<int64_t> widths) {
  if (cache == CacheType::kModel) return;
  for (const int64_t w : widths) {
    TORCH_CHECK(w % 16 == 0, "vdproj_ext CUDA: quantized cache rows must be a multiple of 16 "
                "elements wide (16-byte copies), got ", w);
  }
}

// The launch of a split-K attention kernel (P: AttnParams or LatentAttnParams) over `groups`
// row groups: stages(p, &bytes) picks its stage count and shared memory.
template <typename Kernel, typename P>
void launch_split_attention(Kernel kernel, int (*stages)(const P&, int64_t*), const P& p,
                            int64_t groups, cudaStream_t stream) {
  int64_t bytes = 0;
  const int nstages = stages(p, &bytes);
  // Row groups on x (up to 2^31 - 1 blocks: long prefills), splits on y, batch on z.
  const dim3 grid(unsigned(groups), unsigned(p.nsplit), unsigned(p.B));
  launch_kernel(kernel, grid, size_t(bytes), stream, p, nstages);
}

// Flash-decoding splits for that launch: choose_num_splits (vdproj_cuda.h) over this device's
// block slots for the kernel with its shared memory; max_keys bounds the key range.
template <typename Kernel, typename P>
int64_t splits_over_slots(Kernel kernel, int (*stages)(const P&, int64_t*), const P& p,
                          int64_t groups, int64_t max_keys) {
  int64_t bytes = 0;
  stages(p, &bytes);
  const int per_sm = blocks_per_sm(kernel, size_t(bytes));
  const int64_t slots = int64_t(current_device_sms()) * (per_sm > 0 ? per_sm : 1);
  return choose_num_splits(slots, p.B * groups, (max_keys + kTileKeys - 1) / kTileKeys);
}

// ---- backward (one block = kTileKeys keys, query rows in groups of kRowsPerBlock) ------------
// The query group's part of a backward shared-memory layout, in floats from `start`: the q
// rows (Dq wide), the dctx rows (R wide), lse (log2 domain), delta, P and dS ([rows][keys]).
struct BwdGroupLayout {
  int64_t qs, dcs, lse2, delta, pp, pds, end;
};
inline __host__ __device__ BwdGroupLayout bwd_group_layout(int64_t start, int64_t Dq, int64_t R) {
  BwdGroupLayout g;
  g.qs = start;
  g.dcs = g.qs + kRowsPerBlock * Dq;
  g.lse2 = g.dcs + kRowsPerBlock * R;
  g.delta = g.lse2 + kRowsPerBlock;
  g.pp = g.delta + kRowsPerBlock;
  g.pds = g.pp + kRowsPerBlock * kTileKeys;
  g.end = g.pds + kRowsPerBlock * kTileKeys;
  return g;
}

// acc + a[0..n) . b[0..n), float4 loads (n a multiple of 4). N > 0: n == N, fully unrolled.
template <int N = 0>
__device__ __forceinline__ float dot4(const float* a, const float* b, int64_t n, float acc) {
  if constexpr (N > 0) {
#pragma unroll
    for (int d = 0; d < N; d += 4) {
      const float4 x = *reinterpret_cast<const float4*>(a + d);
      const float4 y = *reinterpret_cast<const float4*>(b + d);
      acc = fmaf(x.x, y.x, fmaf(x.y, y.y, fmaf(x.z, y.z, fmaf(x.w, y.w, acc))));
    }
  } else {
    for (int64_t d = 0; d < n; d += 4) {
      const float4 x = *reinterpret_cast<const float4*>(a + d);
      const float4 y = *reinterpret_cast<const float4*>(b + d);
      acc = fmaf(x.x, y.x, fmaf(x.y, y.y, fmaf(x.z, y.z, fmaf(x.w, y.w, acc))));
    }
  }
  return acc;
}

// dst[j][0..n) (dst_row floats apart) = the rows of keys j0 + j as float (src_row elements
// apart in global memory), zeros past Tk; grad[0 .. kTileKeys * n), when given, is zeroed.
template <typename T>
__device__ __forceinline__ void stage_key_rows(float* dst, int64_t dst_row, float* grad,
                                               const T* src, int64_t src_row, int64_t n,
                                               int64_t j0, int64_t Tk, int tid) {
  for (int64_t idx = tid; idx < kTileKeys * n; idx += kThreads) {
    const int64_t j = idx / n, c = idx - j * n, pos = j0 + j;
    dst[j * dst_row + c] = pos < Tk ? to_float(src[pos * src_row + c]) : 0.f;
    if (grad != nullptr) grad[idx] = 0.f;
  }
}

// The query rows i0 .. i0 + kRowsPerBlock - 1 of head h (zeros / -inf past Tq): q (width Dq, as
// float), dctx (R wide), the log-sum-exp in the log2 domain and delta. P: BwdParams or
// LatentBwdParams.
template <typename P, typename Q>
__device__ __forceinline__ void stage_query_group(const P& p, const Q* q, int64_t Dq, int64_t R,
                                                  float* qs, float* dcs, float* lse2,
                                                  float* delta, int64_t b, int64_t h, int64_t i0,
                                                  int tid) {
  const int64_t Tq = p.Tq, H = p.H;
  for (int64_t idx = tid; idx < kRowsPerBlock * Dq; idx += kThreads) {
    const int64_t w = idx / Dq, d = idx - w * Dq, i = i0 + w;
    qs[idx] = i < Tq ? to_float(q[((b * Tq + i) * H + h) * Dq + d]) : 0.f;
  }
  for (int64_t idx = tid; idx < kRowsPerBlock * R; idx += kThreads) {
    const int64_t w = idx / R, r = idx - w * R, i = i0 + w;
    dcs[idx] = i < Tq ? p.dctx[((b * Tq + i) * H + h) * R + r] : 0.f;
  }
  if (tid < kRowsPerBlock) {
    const int64_t i = i0 + tid;
    lse2[tid] = i < Tq ? p.lse[(b * H + h) * Tq + i] * kLog2eF : -INFINITY;
    delta[tid] = i < Tq ? p.delta[(b * H + h) * Tq + i] : 0.f;
  }
}

// Warp = query row i0 + warp, lane = key j0 + lane: P (recomputed from the log-sum-exp) and
// dS = P (dP - delta) * scale into pp, pds ([rows][kTileKeys]); zeros where the key is not
// visible. score(): the row's raw score q . k of the lane's key.
template <typename P, typename Score>
__device__ __forceinline__ void probs_and_dscores(const P& p, Score score, const float* dcs,
                                                  const float* vs, int64_t VP, int64_t R,
                                                  const float* lse2, const float* delta,
                                                  float* pp, float* pds, int64_t i0, int64_t j0,
                                                  int warp, int lane) {
  const int64_t Tq = p.Tq, Tk = p.Tk, i = i0 + warp, pos = j0 + lane;
  const bool valid = i < Tq && pos < Tk && (!p.causal || pos <= i + Tk - Tq) &&
                     lse2[warp] != -INFINITY;
  float pr = 0.f, ds = 0.f;
  if (valid) {
    pr = exp2f(score() * (p.scale * kLog2eF) - lse2[warp]);
    const float dp = dot4(dcs + warp * R, vs + lane * VP, R, 0.f);
    ds = pr * (dp - delta[warp]) * p.scale;
  }
  pp[warp * kTileKeys + lane] = pr;
  pds[warp * kTileKeys + lane] = ds;
}

// acc[j][c] (acc_row floats apart) += sum_w coef[w][j] * rows[w][c] over the group's rows, for
// keys j < kTileKeys and c < n. Each thread owns fixed (j, c): no races, no atomics.
__device__ __forceinline__ void accumulate_key_grads(float* acc, int64_t acc_row, int64_t n,
                                                     const float* coef, const float* rows,
                                                     int64_t row_stride, int tid) {
  for (int64_t idx = tid; idx < kTileKeys * n; idx += kThreads) {
    const int64_t j = idx / n, c = idx - j * n;
    float a = acc[j * acc_row + c];
#pragma unroll
    for (int w = 0; w < kRowsPerBlock; ++w) a = fmaf(coef[w * kTileKeys + j], rows[w * row_stride + c], a);
    acc[j * acc_row + c] = a;
  }
}

// dq[row i0 + w of head h][d] += sum_j dS[w][j] key_j[d] (atomically: other key tiles add to
// the same rows), d < width. column(d, stride) gives key column d's staged floats, stride apart.
template <typename Column>
__device__ __forceinline__ void accumulate_query_grads(float* dq, int64_t width, Column column,
                                                       const float* pds, int64_t Tq, int64_t H,
                                                       int64_t b, int64_t h, int64_t i0, int tid) {
  for (int64_t idx = tid; idx < kRowsPerBlock * width; idx += kThreads) {
    const int64_t w = idx / width, d = idx - w * width, i = i0 + w;
    if (i >= Tq) continue;
    int64_t stride = 0;
    const float* col = column(d, stride);
    float a = 0.f;
#pragma unroll 8
    for (int j = 0; j < kTileKeys; ++j) a = fmaf(pds[w * kTileKeys + j], col[j * stride], a);
    atomicAdd(dq + ((b * Tq + i) * H + h) * width + d, a);
  }
}

// The first query that sees some key of the tile at j0 (i + Tk - Tq >= j0 when causal).
__device__ __forceinline__ int64_t first_query_of_tile(bool causal, int64_t j0, int64_t Tq,
                                                       int64_t Tk) {
  return causal ? max(int64_t(0), j0 + Tq - Tk) : int64_t(0);
}

}  // namespace cuda
}  // namespace vdproj
