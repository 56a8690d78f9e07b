// Self-test kernels of the CUDA emulator (run by harness.cpp as the "emu/..." cases): what the
// emulator computes for warp operations and atomics, and that it refuses what a GPU leaves
// undefined. Plain CUDA; rewrite.py prepares it like the project's kernels.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "selftest.h"

namespace emu_selftest {
namespace {

__global__ void warp_ops_kernel(unsigned* out) {
  const unsigned t = threadIdx.x, lane = t & 31;
  unsigned* o = out + t * 8;
  o[0] = __shfl_sync(0xffffffffu, t * 3, 5, 8);
  o[1] = __shfl_up_sync(0xffffffffu, t * 5, 3, 16);
  o[2] = __shfl_down_sync(0xffffffffu, t * 7, 2, 16);
  o[3] = __shfl_xor_sync(0xffffffffu, t * 11, 9);
  o[4] = __ballot_sync(0xffffffffu, (lane % 3) == 0);
  o[5] = __any_sync(0xffffffffu, t == 40);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  o[7] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, t, 1) : __shfl_xor_sync(0xffff0000u, t, 2);
}

__global__ void atomic_kernel(float* sum) { atomicAdd(sum, 1.0f); }

__global__ void lockstep_kernel(float* out, bool sync) {
  __shared__ float buf[32];
  const int lane = threadIdx.x;
  buf[lane] = float(lane + 1);
  if (sync) __syncwarp();
  for (int o = 16; o > 0; o >>= 1) {
    const float v = lane < o ? buf[lane + o] : 0.f;
    if (sync) __syncwarp();
    if (lane < o) buf[lane] += v;
    if (sync) __syncwarp();
  }
  if (lane == 0) out[sync ? 1 : 0] = buf[0];
}

__global__ void two_lines_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exit_kernel() {
  if (threadIdx.x == 7) return;
  __syncthreads();
}

__global__ void mask_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x7fffffffu, 1.f, 1); }

__global__ void half_warp_kernel(float* out) {
  float x = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}

__device__ void copy16(void* smem, const void* src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(16));
}

__global__ void past_end_kernel(const float* src) {
  extern __shared__ __align__(16) float tile[];
  copy16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x);
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
}

__global__ void never_waited_kernel(const float* src) {
  extern __shared__ __align__(16) float tile[];
  copy16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x);
  asm volatile("cp.async.commit_group;\n" ::);
}

__global__ void static_overflow_kernel() {
  __shared__ int small[8];
  small[threadIdx.x] = 1;  // 9 threads: one past the end
}

// Zeroed host memory that cp.async may read (emu::register_global); freed by release().
template <typename T>
T* device_buffer(size_t n) {
  T* p = static_cast<T*>(std::calloc(n, sizeof(T)));
  emu::register_global(p, n * sizeof(T));
  return p;
}
void release(void* p) {
  emu::unregister_global(p);
  std::free(p);
}

}  // namespace

std::vector<unsigned> warp_ops() {
  unsigned* out = device_buffer<unsigned>(64 * 8);
  warp_ops_kernel<<<1, 64>>>(out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<unsigned> r(out, out + 64 * 8);
  release(out);
  return r;
}

float atomic_count(int blocks) {
  float* sum = device_buffer<float>(1);
  atomic_kernel<<<blocks, 256>>>(sum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float r = *sum;
  release(sum);
  return r;
}

std::vector<float> lockstep_sum(bool unsynced) {
  float* out = device_buffer<float>(2);
  out[0] = std::nanf("");
  if (unsynced) {
    lockstep_kernel<<<1, 32>>>(out, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  lockstep_kernel<<<1, 32>>>(out, true);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<float> r(out, out + 2);
  release(out);
  return r;
}

void barrier_at_two_lines() {
  two_lines_kernel<<<1, 64>>>();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void barrier_after_exit() {
  exit_kernel<<<1, 64>>>();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void shuffle_lane_outside_mask() {
  float* out = device_buffer<float>(32);
  mask_kernel<<<1, 32>>>(out);
  release(out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void shuffle_by_half_a_warp() {
  float* out = device_buffer<float>(64);
  half_warp_kernel<<<1, 64>>>(out);
  release(out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cp_async_past_shared_end() {
  float* src = device_buffer<float>(4 * 64);
  past_end_kernel<<<1, 64, 63 * 16 + 8>>>(src);  // the last 16-byte copy crosses the end
  release(src);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cp_async_never_waited() {
  float* src = device_buffer<float>(4 * 64);
  never_waited_kernel<<<1, 64, 4 * 64 * sizeof(float)>>>(src);
  release(src);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void static_shared_overflow() {
  static_overflow_kernel<<<1, 9>>>();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace emu_selftest
