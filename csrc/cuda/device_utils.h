// Device helpers for the .cu files: element conversions, cp.async, warp reductions, dispatch.
// Written against torch's default nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ and friends), so
// every conversion goes through an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "vdproj_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "vdproj_ext CUDA kernels need sm_80 or newer (cp.async, bf16)"
#endif

namespace vdproj {
namespace cuda {

// ---- element <-> float ---------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

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

// ---- host-side helpers ----------------------------------------------------------------------
// Raise a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
inline void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

inline int current_device_sms() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
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

#define VDPROJ_DISPATCH_HEADDIM(HD, ...)                                      \
  [&] {                                                                       \
    if ((HD) == 64) { constexpr int kD = 64; return __VA_ARGS__(); }          \
    if ((HD) == 128) { constexpr int kD = 128; return __VA_ARGS__(); }        \
    TORCH_CHECK(false, "vdproj_ext CUDA: head_dim must be 64 or 128, got ", (HD)); \
  }()

}  // namespace cuda
}  // namespace vdproj
