// Decode-side kernels around the attention of attn_fwd.cu:
//   compress_write_kernel  compress-on-write of the new tokens (runs right before the attention)
//   combine_kernel         flash-decoding combine of the split partials -> normalized ctx, lse
//   restore_kernel         out = w_r[h] @ ctx + b_r[h], once per output row, after the weighted sum
#include "device_utils.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int kCombineCols = 128;  // r-values per combine block: 32 lanes x float4

// ---- compress-on-write ----------------------------------------------------------------------
// Block = (up to kCompressTokens new tokens of one sequence). V rows are staged as float; each
// warp produces r-values: a 16-byte-vectorized dot of a w_c row with every staged V row.
// Quantized caches (C = int8_t or __nv_fp8_e4m3, SPEC 3c): a warp quantizes each new k row
// (token, head) with its absmax scale; the V_c rows are staged whole in shared memory first,
// then a warp per token quantizes its row.
template <typename T, typename C, int D>
__global__ void __launch_bounds__(kThreads) compress_write_kernel(const CompressParams p) {
  constexpr int V = Vec16<T>::N;
  constexpr bool kQuantized = CacheQuant<C>::kQuantized;
  extern __shared__ __align__(16) float vs[];  // [kCompressTokens][H*D], then (quantized) [kCompressTokens][R]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.y, t0 = int64_t(blockIdx.x) * kCompressTokens;
  const int64_t HD = p.H * D;
  const int64_t nt = min(int64_t(kCompressTokens), p.Tnew - t0);
  const int64_t pos0 = int64_t(p.seqlens[b]) + t0;  // first cache slot written by this block

  const T* v = static_cast<const T*>(p.v) + (b * p.Tnew + t0) * HD;
  const int64_t vchunks = kCompressTokens * HD / V;
  for (int64_t idx = tid; idx < vchunks; idx += kThreads) {
    const int64_t m = idx / (HD / V), c = idx - m * (HD / V);
    float vals[V];
    load16_or_zero(v + m * HD + c * V, m < nt, vals);
#pragma unroll
    for (int e = 0; e < V; ++e) vs[m * HD + c * V + e] = vals[e];
  }
  const T* k = static_cast<const T*>(p.k) + (b * p.Tnew + t0) * HD;
  C* kc = static_cast<C*>(p.k_cache) + b * p.kc_sb;
  if constexpr (kQuantized) {
    // k rows: a warp per (token, head) row, quantized with its own scale.
    for (int64_t row = warp; row < nt * p.H; row += kWarps) {
      const int64_t m = row / p.H, h = row - m * p.H, pos = pos0 + m;
      if (pos < 0 || pos >= p.len_max) continue;  // defensive: the op raises first
      const T* x = k + m * HD + h * D;
      warp_quantize_row<C>([&](int64_t e) { return to_float(x[e]); }, D,
                           kc + pos * p.kc_st + h * p.kc_sh,
                           p.k_scale + b * p.ks_sb + pos * p.ks_st + h * p.ks_sh, lane);
    }
  } else {
    // k rows: plain 16-byte copies into the (possibly strided) key cache.
    const int64_t kchunks = nt * p.H * (D / V);
    for (int64_t idx = tid; idx < kchunks; idx += kThreads) {
      const int64_t m = idx / (p.H * (D / V));
      const int64_t rem = idx - m * (p.H * (D / V));
      const int64_t h = rem / (D / V), c = rem - h * (D / V);
      if (pos0 + m < 0 || pos0 + m >= p.len_max) continue;  // defensive: the op raises first
      *reinterpret_cast<uint4*>(kc + (pos0 + m) * p.kc_st + h * p.kc_sh + c * V) =
          *reinterpret_cast<const uint4*>(k + m * HD + h * D + c * V);
    }
  }
  __syncthreads();

  const T* wc = static_cast<const T*>(p.w_c);
  const T* bc = static_cast<const T*>(p.b_c);
  C* vcc = static_cast<C*>(p.vc_cache) + b * p.vcc_sb;
  float* os = vs + kCompressTokens * HD;  // quantized: [kCompressTokens][R], the V_c rows
  for (int64_t r = warp; r < p.R; r += kWarps) {
    float acc[kCompressTokens];
    warp_rows_dot(wc + r * HD, vs, HD, HD, lane, acc);
    const float bias = bc != nullptr ? to_float(bc[r]) : 0.f;
#pragma unroll
    for (int m = 0; m < kCompressTokens; ++m) {
      const float total = warp_sum(acc[m]);
      const int64_t pos = pos0 + m;
      if constexpr (kQuantized) {
        if (lane == 0) os[m * p.R + r] = total + bias;
      } else {
        if (lane == 0 && m < nt && pos >= 0 && pos < p.len_max) vcc[pos * p.vcc_st + r] = from_float<T>(total + bias);
      }
    }
  }
  if constexpr (kQuantized) {
    __syncthreads();
    for (int64_t m = warp; m < nt; m += kWarps) {
      const int64_t pos = pos0 + m;
      if (pos < 0 || pos >= p.len_max) continue;
      const float* x = os + m * p.R;
      warp_quantize_row<C>([&](int64_t e) { return x[e]; }, p.R, vcc + pos * p.vcc_st,
                           p.vc_scale + b * p.vs_sb + pos * p.vs_st, lane);
    }
  }
}

// ---- combine --------------------------------------------------------------------------------
// Block = one (b, row) and kCombineCols r-values; warps split the splits, lanes own a float4.
__global__ void __launch_bounds__(kThreads)
combine_kernel(const CombineParams p, float* __restrict__ ctx_out, float* __restrict__ lse_out) {
  __shared__ float4 red[kWarps][32];
  __shared__ float s_max, s_tot;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t br = blockIdx.x, b = br / p.nrows, row = br - b * p.nrows;
  const int64_t h = row / p.Tq, i = row - h * p.Tq;
  const int64_t ml_stride = p.nrows * 2;  // between consecutive splits
  const float* ml = p.part_ml + (b * p.nsplit * p.nrows + row) * 2;

  if (warp == 0) {
    float mx = -INFINITY;
    for (int64_t s = lane; s < p.nsplit; s += 32) mx = fmaxf(mx, ml[s * ml_stride]);
    mx = warp_max(mx);
    float tot = 0.f;
    if (mx != -INFINITY) {
      for (int64_t s = lane; s < p.nsplit; s += 32)
        tot += exp2f(ml[s * ml_stride] - mx) * ml[s * ml_stride + 1];
    }
    tot = warp_sum(tot);
    if (lane == 0) {
      s_max = mx;
      s_tot = tot;
    }
  }
  __syncthreads();
  const float mx = s_max, tot = s_tot;
  const bool empty = mx == -INFINITY;
  const int64_t r = int64_t(blockIdx.y) * kCombineCols + lane * 4;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty && r < p.R) {
#pragma unroll 4
    for (int64_t s = warp; s < p.nsplit; s += kWarps) {
      const float wgt = exp2f(ml[s * ml_stride] - mx);
      const float4 v = *reinterpret_cast<const float4*>(
          p.part_acc + ((b * p.nsplit + s) * p.nrows + row) * p.R + r);
      a.x = fmaf(wgt, v.x, a.x);
      a.y = fmaf(wgt, v.y, a.y);
      a.z = fmaf(wgt, v.z, a.z);
      a.w = fmaf(wgt, v.w, a.w);
    }
  }
  red[warp][lane] = a;
  __syncthreads();
  if (warp == 0) {
    float4 t = red[0][lane];
    for (int w = 1; w < kWarps; ++w) {
      const float4 u = red[w][lane];
      t.x += u.x; t.y += u.y; t.z += u.z; t.w += u.w;
    }
    const float inv = empty ? 0.f : 1.f / tot;
    if (r < p.R) {
      *reinterpret_cast<float4*>(ctx_out + ((b * p.Tq + i) * p.H + h) * p.R + r) =
          make_float4(t.x * inv, t.y * inv, t.z * inv, t.w * inv);
    }
    if (blockIdx.y == 0 && lane == 0)
      lse_out[(b * p.H + h) * p.Tq + i] = empty ? -INFINITY : (mx + log2f(tot)) * kLn2F;
  }
}

// ---- restore --------------------------------------------------------------------------------
// Block = kCombineRows output rows (b, i) of one head h: ctx rows staged in shared memory, each
// warp computes outputs d with one coalesced pass over the w_r row, shared by all staged rows.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
restore_kernel(const CombineParams p, const float* __restrict__ ctx, const float* __restrict__ lse) {
  constexpr int BM = kCombineRows;
  extern __shared__ __align__(16) float cs[];  // [BM][R]
  __shared__ int empty_s[BM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t M = p.B * p.Tq, m0 = int64_t(blockIdx.x) * BM, h = blockIdx.y, R = p.R;

  const int64_t r4 = R / 4;
  for (int64_t idx = tid; idx < BM * r4; idx += kThreads) {
    const int64_t m = idx / r4, c = idx - m * r4, mm = m0 + m;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mm < M) val = *reinterpret_cast<const float4*>(ctx + (mm * p.H + h) * R + c * 4);
    *reinterpret_cast<float4*>(cs + m * R + c * 4) = val;
  }
  if (tid < BM) {
    const int64_t mm = m0 + tid;
    bool empty = true;
    if (mm < M) {
      const int64_t b = mm / p.Tq, i = mm - b * p.Tq;
      empty = lse[(b * p.H + h) * p.Tq + i] == -INFINITY;
    }
    empty_s[tid] = empty ? 1 : 0;
  }
  __syncthreads();

  const T* w = static_cast<const T*>(p.w_r);
  const T* bias = static_cast<const T*>(p.b_r);
  T* out = static_cast<T*>(p.out);
  for (int d = warp; d < D; d += kWarps) {
    float o[BM];
    warp_rows_dot(w + (h * D + d) * R, cs, R, R, lane, o);
    const float bv = bias != nullptr ? to_float(bias[h * D + d]) : 0.f;
#pragma unroll
    for (int m = 0; m < BM; ++m) {
      const float total = warp_sum(o[m]);
      const int64_t mm = m0 + m;
      if (lane == m && mm < M) {
        const int64_t b = mm / p.Tq, i = mm - b * p.Tq;
        out[((b * p.Tq + i) * p.H + h) * D + d] = from_float<T>(empty_s[m] ? 0.f : total + bv);
      }
    }
  }
}

}  // namespace

size_t compress_smem_bytes(const CompressParams& p) {
  const size_t staged_v = size_t(p.H) * size_t(p.head_dim);
  const size_t staged_out = p.cache == CacheType::kModel ? 0 : size_t(p.R);
  return size_t(kCompressTokens) * (staged_v + staged_out) * sizeof(float);
}

void launch_compress_write(const CompressParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tnew == 0) return;
  const int64_t blocks = (p.Tnew + kCompressTokens - 1) / kCompressTokens;
  TORCH_CHECK(blocks <= 2147483647 && p.B <= 65535, "vdproj_ext CUDA: too many new tokens");
  const size_t bytes = compress_smem_bytes(p);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
        launch_kernel(compress_write_kernel<T, C, kD>, dim3(unsigned(blocks), unsigned(p.B)), bytes,
                      stream, p);
      });
    });
  });
}

void launch_combine(const CombineParams& p, float* ctx_out, float* lse_out, cudaStream_t stream) {
  if (p.B == 0 || p.nrows == 0) return;
  const int64_t rows = p.B * p.nrows;
  TORCH_CHECK(rows <= 2147483647, "vdproj_ext CUDA: too many rows to combine");
  const dim3 grid(unsigned(rows), unsigned((p.R + kCombineCols - 1) / kCombineCols));
  combine_kernel<<<grid, kThreads, 0, stream>>>(p, ctx_out, lse_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_restore(const CombineParams& p, const float* ctx, const float* lse, cudaStream_t stream) {
  if (p.B == 0 || p.Tq == 0 || p.H == 0) return;
  const int64_t mt = (p.B * p.Tq + kCombineRows - 1) / kCombineRows;
  TORCH_CHECK(mt <= 2147483647 && p.H <= 65535, "vdproj_ext CUDA: restore grid too large");
  const size_t bytes = size_t(kCombineRows) * size_t(p.R) * sizeof(float);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
      launch_kernel(restore_kernel<T, kD>, dim3(unsigned(mt), unsigned(p.H)), bytes, stream, p, ctx, lse);
    });
  });
}

}  // namespace cuda
}  // namespace vdproj
