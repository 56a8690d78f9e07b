// Latent keys (SPEC 3b), decode side: compress-on-write of the new tokens. The attention, the
// combine and the restore of the decode step are latent_attn.cu's and kvcache.cu's kernels.
//
// Block = up to kCompressTokens new tokens of one sequence. Their inputs are staged once as
// float rows X = [k_nope (H*Dn) | v (H*D)]; each warp then produces output columns with a
// 16-byte-vectorized dot over the slice of X it compresses:
//   separate latents: columns 0..Rk-1 are K_c = k_nope @ w_kc.T + b_kc (X[:H*Dn]), columns
//                     Rk..Rk+Rv-1 are V_c = v @ w_c.T + b_c (X[H*Dn:]);
//   joint latent:     columns 0..Rv-1 are [k_nope | v] @ w_c.T + b_c (all of X).
// The rotary dims of every head are copied bit for bit into krope_cache.
// Quantized caches (C = int8_t or __nv_fp8_e4m3, SPEC 3c): a warp quantizes each new rotary row
// (token, head) with its absmax scale (scale 1 for Dr = 0); the latent columns of the block's
// tokens are staged in shared memory, then a warp per (token, latent) row quantizes it.
#include "device_utils.h"

namespace vdproj {
namespace cuda {
namespace {

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) latent_compress_kernel(const LatentCompressParams p) {
  constexpr int V = Vec16<T>::N;
  constexpr bool kQuantized = CacheQuant<C>::kQuantized;
  // [kCompressTokens][X], then (quantized) the latent columns [kCompressTokens][nout]
  extern __shared__ __align__(16) float xs[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.y, t0 = int64_t(blockIdx.x) * kCompressTokens;
  const int64_t D = p.head_dim, Dr = p.Dr, Dn = D - Dr, H = p.H;
  const int64_t HD = H * D, HDn = H * Dn, X = HDn + HD;
  const int64_t nt = min(int64_t(kCompressTokens), p.Tnew - t0);
  const int64_t pos0 = int64_t(p.seqlens[b]) + t0;  // first cache slot written by this block
  const T* k = static_cast<const T*>(p.k) + (b * p.Tnew + t0) * HD;
  const T* v = static_cast<const T*>(p.v) + (b * p.Tnew + t0) * HD;

  // X rows (zeros past the block's tokens): k_nope of each head, then v.
  const int64_t ncpr = Dn / V;  // 16-byte chunks of one head's k_nope
  for (int64_t idx = tid; idx < kCompressTokens * H * ncpr; idx += kThreads) {
    const int64_t m = idx / (H * ncpr), rem = idx - m * (H * ncpr);
    const int64_t h = rem / ncpr, c = rem - h * ncpr;
    float vals[V];
    load16_or_zero(k + m * HD + h * D + Dr + c * V, m < nt, vals);
#pragma unroll
    for (int e = 0; e < V; ++e) xs[m * X + h * Dn + c * V + e] = vals[e];
  }
  for (int64_t idx = tid; idx < kCompressTokens * (HD / V); idx += kThreads) {
    const int64_t m = idx / (HD / V), c = idx - m * (HD / V);
    float vals[V];
    load16_or_zero(v + m * HD + c * V, m < nt, vals);
#pragma unroll
    for (int e = 0; e < V; ++e) xs[m * X + HDn + c * V + e] = vals[e];
  }
  if constexpr (kQuantized) {
    // Rotary keys: a warp per (token, head) row, quantized with its own scale.
    C* kr = static_cast<C*>(p.krope_cache) + (Dr > 0 ? b * p.kr_sb : 0);
    for (int64_t row = warp; row < nt * H; row += kWarps) {
      const int64_t m = row / H, h = row - m * H, pos = pos0 + m;
      if (pos < 0 || pos >= p.len_max) continue;  // defensive: the op raises first
      const T* x = k + m * HD + h * D;
      // (No offset on the pointer of an empty rotary cache, which may be null.)
      warp_quantize_row<C>([&](int64_t e) { return to_float(x[e]); }, Dr,
                           Dr > 0 ? kr + pos * p.kr_st + h * p.kr_sh : kr,
                           p.kr_scale + b * p.krs_sb + pos * p.krs_st + h * p.krs_sh, lane);
    }
  } else if (Dr > 0) {
    // Rotary keys: plain 16-byte copies into the (possibly strided) cache.
    T* kr = static_cast<T*>(p.krope_cache) + b * p.kr_sb;
    const int64_t rcpr = Dr / V;
    for (int64_t idx = tid; idx < nt * H * rcpr; idx += kThreads) {
      const int64_t m = idx / (H * rcpr), rem = idx - m * (H * rcpr);
      const int64_t h = rem / rcpr, c = rem - h * rcpr, pos = pos0 + m;
      if (pos < 0 || pos >= p.len_max) continue;  // defensive: the op raises first
      *reinterpret_cast<uint4*>(kr + pos * p.kr_st + h * p.kr_sh + c * V) =
          *reinterpret_cast<const uint4*>(k + m * HD + h * D + c * V);
    }
  }
  __syncthreads();

  const int64_t nout = p.joint ? p.Rv : p.Rk + p.Rv;
  float* os = xs + kCompressTokens * X;  // quantized: [kCompressTokens][nout]
  for (int64_t o = warp; o < nout; o += kWarps) {
    const bool key = !p.joint && o < p.Rk;
    const int64_t r = key ? o : (p.joint ? o : o - p.Rk);  // column of its cache
    const int64_t x0 = key || p.joint ? 0 : HDn;            // the slice of X it compresses
    const int64_t width = key ? HDn : (p.joint ? X : HD);
    const T* wrow = static_cast<const T*>(key ? p.w_kc : p.w_c) + r * width;
    const T* bias = static_cast<const T*>(key ? p.b_kc : p.b_c);
    float acc[kCompressTokens];
    warp_rows_dot(wrow, xs + x0, X, width, lane, acc);
    const float bv = bias != nullptr ? to_float(bias[r]) : 0.f;
#pragma unroll
    for (int m = 0; m < kCompressTokens; ++m) {
      const float total = warp_sum(acc[m]);
      const int64_t pos = pos0 + m;
      if constexpr (kQuantized) {
        if (lane == 0) os[m * nout + o] = total + bv;
      } else {
        T* cache = static_cast<T*>(key ? p.kc_cache : p.vc_cache) + b * (key ? p.kc_sb : p.vc_sb);
        const int64_t st = key ? p.kc_st : p.vc_st;
        if (lane == 0 && m < nt && pos >= 0 && pos < p.len_max) cache[pos * st + r] = from_float<T>(total + bv);
      }
    }
  }
  if constexpr (kQuantized) {
    // The latent rows of each token: K_c (columns 0..Rk-1) then V_c, or the joint latent.
    __syncthreads();
    const int64_t per_token = p.joint ? 1 : 2;
    for (int64_t row = warp; row < nt * per_token; row += kWarps) {
      const int64_t m = row / per_token, pos = pos0 + m;
      const bool key = !p.joint && row % 2 == 0;
      if (pos < 0 || pos >= p.len_max) continue;
      const float* x = os + m * nout + (key || p.joint ? 0 : p.Rk);
      C* dst = static_cast<C*>(key ? p.kc_cache : p.vc_cache) + b * (key ? p.kc_sb : p.vc_sb) +
               pos * (key ? p.kc_st : p.vc_st);
      float* scale = key ? p.kc_scale + b * p.kcs_sb + pos * p.kcs_st
                         : p.vc_scale + b * p.vs_sb + pos * p.vs_st;
      warp_quantize_row<C>([&](int64_t e) { return x[e]; }, key ? p.Rk : p.Rv, dst, scale, lane);
    }
  }
}

}  // namespace

size_t latent_compress_smem_bytes(int64_t H, int64_t head_dim, int64_t Dr, CacheType cache,
                                  int64_t out_cols) {
  const int64_t staged_out = cache == CacheType::kModel ? 0 : out_cols;
  return size_t(kCompressTokens) * size_t(H * (2 * head_dim - Dr) + staged_out) * sizeof(float);
}

void launch_latent_compress_write(const LatentCompressParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tnew == 0) return;
  TORCH_CHECK(p.Dr >= 0 && p.Dr % 8 == 0 && p.Dr < p.head_dim,
              "vdproj_ext CUDA: rotary dims Dr must be a multiple of 8 below head_dim, got ", p.Dr);
  TORCH_CHECK(p.joint == (p.kc_cache == nullptr), "vdproj_ext CUDA: kc_cache is absent exactly "
              "with the joint latent");
  const int64_t blocks = (p.Tnew + kCompressTokens - 1) / kCompressTokens;
  TORCH_CHECK(blocks <= 2147483647 && p.B <= 65535, "vdproj_ext CUDA: too many new tokens");
  const size_t bytes = latent_compress_smem_bytes(p.H, p.head_dim, p.Dr, p.cache,
                                                  p.joint ? p.Rv : p.Rk + p.Rv);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_CACHE(p.cache, [&] {
      launch_kernel(latent_compress_kernel<T, C>, dim3(unsigned(blocks), unsigned(p.B)), bytes,
                    stream, p);
    });
  });
}

}  // namespace cuda
}  // namespace vdproj
