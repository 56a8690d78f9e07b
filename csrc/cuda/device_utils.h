// Device helpers for the .cu files: element conversions, cp.async, warp reductions, dispatch.
// Written against torch's default nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ and friends), so
// every conversion goes through an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "vdproj_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "vdproj_ext CUDA kernels need sm_80 or newer (cp.async, bf16)"
#endif

namespace vdproj {
namespace cuda {

// Byte offsets of shared-memory layouts are kept 16-byte aligned (cp.async, float4 accesses).
__host__ __device__ inline int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }

// ---- element <-> float ---------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// Quantized cache elements (SPEC 3c), before their row's scale.
__device__ __forceinline__ float to_float(int8_t x) { return float(x); }
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E4M3)));
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two adjacent elements (p must be 2-element aligned) -> float2.
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load2(const int8_t* p) {
  const char2 c = *reinterpret_cast<const char2*>(p);
  return make_float2(float(c.x), float(c.y));
}
__device__ __forceinline__ float2 load2(const __nv_fp8_e4m3* p) {
  const __nv_fp8x2_storage_t raw = *reinterpret_cast<const __nv_fp8x2_storage_t*>(p);
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(raw, __NV_E4M3)));
}

// ---- quantized caches (SPEC 3c) --------------------------------------------------------------
// C: the storage type of the caches, the model's dtype (T) or int8_t / __nv_fp8_e4m3, whose
// rows come with a float32 scale each (value = stored * scale).
template <typename C> struct CacheQuant { static constexpr bool kQuantized = false; };
template <> struct CacheQuant<int8_t> {
  static constexpr bool kQuantized = true;
  static constexpr float kMax = 127.f;  // scale = max|x| / kMax
};
template <> struct CacheQuant<__nv_fp8_e4m3> {
  static constexpr bool kQuantized = true;
  static constexpr float kMax = 448.f;
};

// a / b correctly rounded (also under fast-math), so the bytes match the CPU's quantization.
__device__ __forceinline__ float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// x / scale (already divided) to the cache type: int8 rounds half to even and clamps to
// [-127, 127]; e4m3 rounds to nearest even (saturating, as c10 for in-range values).
template <typename C> __device__ __forceinline__ C quantize_scaled(float v);
template <> __device__ __forceinline__ int8_t quantize_scaled<int8_t>(float v) {
  return int8_t(fminf(fmaxf(rintf(v), -127.f), 127.f));
}
template <> __device__ __forceinline__ __nv_fp8_e4m3 quantize_scaled<__nv_fp8_e4m3>(float v) {
  __nv_fp8_e4m3 out;
  out.__x = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  return out;
}

// 16 bytes (p must be 16-byte aligned) -> float[16 / sizeof(T)].
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load16_as_float(const T* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int v = 0; v < Vec16<T>::N; ++v) out[v] = to_float(e[v]);
}

// ---- cp.async (sm_80+) ----------------------------------------------------------------------
// Copies 16 bytes global -> shared, or writes 16 zero bytes when `valid` is false. With
// src-size 0 nothing is read from global memory, so masked positions (NaN cache tails) are
// never touched; `src` must still be some mapped address.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---- warp reductions ------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- the attention's inner steps (attn_fwd.cu, latent_attn.cu) ------------------------------
// One step of a row's online softmax over a tile of keys, in the log2 domain: lane j holds the
// scaled score s of key j (-inf when masked). Returns the lane's unnormalized weight P and sets
// alpha, the factor that rescales what the row accumulated before. All 32 lanes call it.
__device__ __forceinline__ float online_softmax_step(float s, float& m_run, float& l_run,
                                                     float& alpha) {
  float tile_max = warp_max(s);  // fmaxf skips NaN
  // Only NaN visible (a NaN input): a finite max lets the NaN reach l_run, as it must.
  if (tile_max == -INFINITY && __any_sync(0xffffffffu, s != s)) tile_max = 0.f;
  const float m_new = fmaxf(m_run, tile_max);
  float pr;
  if (m_new == -INFINITY) {  // nothing visible yet: keep everything at zero
    pr = 0.f;
    alpha = 1.f;
  } else {
    pr = exp2f(s - m_new);
    alpha = exp2f(m_run - m_new);
  }
  l_run = l_run * alpha + warp_sum(pr);
  m_run = m_new;
  return pr;
}

// acc[row] = alpha[row] * acc[row] + sum_j P[j, row] * V_c[j] over jmax staged keys, for the
// thread's r-chunks (chunk c = tid + kk * kThreads, r = c * kRowChunk, c < nchunk): every V_c
// element read from shared memory serves all ROWS rows (a multiple of 4). ps: [keys][ROWS];
// vs: the staged V_c rows, v_row elements apart.
template <typename T, int ROWS>
__device__ __forceinline__ void accumulate_pv(float (&acc)[2][ROWS][kRowChunk],
                                              const float* alpha_s, const float* ps, const T* vs,
                                              int64_t v_row, int jmax, int nchunk, int tid) {
  static_assert(ROWS % 4 == 0 && kRowChunk == 2, "float4 reads of P, float2 reads of V_c");
  float al[ROWS];
#pragma unroll
  for (int w = 0; w < ROWS; ++w) al[w] = alpha_s[w];
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    const int c = tid + kk * kThreads;
    if (c >= nchunk) continue;
#pragma unroll
    for (int w = 0; w < ROWS; ++w) {
      acc[kk][w][0] *= al[w];
      acc[kk][w][1] *= al[w];
    }
    const T* vcol = vs + c * kRowChunk;
#pragma unroll 4
    for (int j = 0; j < jmax; ++j) {
      const float2 v = load2(vcol + j * v_row);
      float pw[ROWS];
#pragma unroll
      for (int w = 0; w < ROWS; w += 4) {
        const float4 pq = *reinterpret_cast<const float4*>(ps + j * ROWS + w);
        pw[w] = pq.x; pw[w + 1] = pq.y; pw[w + 2] = pq.z; pw[w + 3] = pq.w;
      }
#pragma unroll
      for (int w = 0; w < ROWS; ++w) {
        acc[kk][w][0] = fmaf(pw[w], v.x, acc[kk][w][0]);
        acc[kk][w][1] = fmaf(pw[w], v.y, acc[kk][w][1]);
      }
    }
  }
}

// acc[m] = w . xs[m] over n elements, partial per lane (warp_sum finishes it): a warp walks
// the global row w (T, 16-byte loads, lane l from l * V in steps of 32 * V) once for all M
// staged float rows of xs (x_row floats apart, 16-byte aligned), so each weight serves M rows.
template <typename T, int M>
__device__ __forceinline__ void warp_rows_dot(const T* w, const float* xs, int64_t x_row,
                                              int64_t n, int lane, float (&acc)[M]) {
  constexpr int V = Vec16<T>::N;
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t e0 = int64_t(lane) * V; e0 < n; e0 += 32 * V) {
    float wv[V];
    load16_as_float(w + e0, wv);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float* x = xs + m * x_row + e0;
#pragma unroll
      for (int e = 0; e < V; e += 4) {
        const float4 xv = *reinterpret_cast<const float4*>(x + e);
        acc[m] = fmaf(wv[e], xv.x, fmaf(wv[e + 1], xv.y, fmaf(wv[e + 2], xv.z, fmaf(wv[e + 3], xv.w, acc[m]))));
      }
    }
  }
}

// 16 bytes as float, or zeros when `ok` is false (nothing is read then).
template <typename T>
__device__ __forceinline__ void load16_or_zero(const T* p, bool ok, float* out) {
  if (ok) {
    load16_as_float(p, out);
  } else {
#pragma unroll
    for (int v = 0; v < Vec16<T>::N; ++v) out[v] = 0.f;
  }
}

// One warp quantizes a row of n values (x(e), float) into dst[0..n) and writes its scale:
// symmetric absmax, scale = max|x| / kMax, 1 for an all-zero (or empty) row. All lanes call.
template <typename C, typename X>
__device__ __forceinline__ void warp_quantize_row(X x, int64_t n, C* dst, float* scale_dst,
                                                  int lane) {
  float amax = 0.f;
  for (int64_t e = lane; e < n; e += 32) amax = fmaxf(amax, fabsf(x(e)));
  amax = warp_max(amax);
  const float scale = amax > 0.f ? div_rn(amax, CacheQuant<C>::kMax) : 1.f;
  for (int64_t e = lane; e < n; e += 32) dst[e] = quantize_scaled<C>(div_rn(x(e), scale));
  if (lane == 0) *scale_dst = scale;
}

// ---- host-side helpers ----------------------------------------------------------------------
// Raise a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
inline void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Launches `kernel` with kThreads threads and `bytes` of dynamic shared memory (raising the
// kernel's limit first when needed) and checks the launch.
template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, dim3 grid, size_t bytes, cudaStream_t stream,
                          const Args&... args) {
  set_smem_limit(kernel, bytes);
  kernel<<<grid, kThreads, bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int current_device_sms() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Shared memory one block may opt in to on the current device (bytes).
inline int max_smem_optin() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// Resident blocks per SM of `kernel` with `bytes` of dynamic shared memory on the current
// device. It depends on nothing else, and a decode step asks for every layer while the
// occupancy query costs microseconds of host time, so it is cached per (device, kernel, bytes)
// (the instantiations of a kernel template share a function type: the pointer tells them apart).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), bytes);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  set_smem_limit(kernel, bytes);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes));
  cache.emplace(key, per_sm);
  return per_sm;
}

// Static switches: dtype -> storage type, head dim -> compile-time constant.
#define VDPROJ_DISPATCH_DTYPE(DT, ...)                                        \
  [&] {                                                                       \
    switch (DT) {                                                             \
      case ::vdproj::cuda::DType::kFloat32: { using T = float; return __VA_ARGS__(); }          \
      case ::vdproj::cuda::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }         \
      case ::vdproj::cuda::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                         \
    TORCH_CHECK(false, "vdproj_ext CUDA: unsupported dtype");                 \
  }()

// Cache storage type C for a kernel whose other tensors are T (inside VDPROJ_DISPATCH_DTYPE).
#define VDPROJ_DISPATCH_CACHE(CT, ...)                                        \
  [&] {                                                                       \
    switch (CT) {                                                             \
      case ::vdproj::cuda::CacheType::kModel: { using C = T; return __VA_ARGS__(); }              \
      case ::vdproj::cuda::CacheType::kInt8: { using C = int8_t; return __VA_ARGS__(); }          \
      case ::vdproj::cuda::CacheType::kE4M3: { using C = __nv_fp8_e4m3; return __VA_ARGS__(); }  \
    }                                                                         \
    TORCH_CHECK(false, "vdproj_ext CUDA: unsupported cache type");            \
  }()

#define VDPROJ_DISPATCH_HEADDIM(HD, ...)                                      \
  [&] {                                                                       \
    if ((HD) == 64) { constexpr int kD = 64; return __VA_ARGS__(); }          \
    if ((HD) == 128) { constexpr int kD = 128; return __VA_ARGS__(); }        \
    TORCH_CHECK(false, "vdproj_ext CUDA: head_dim must be 64 or 128, got ", (HD)); \
  }()

}  // namespace cuda
}  // namespace vdproj
