// CUDA device-side API for running the project's kernels on the CPU (see ../README.md).
//
// Every translation unit produced by rewrite.py starts with `#include "cuda_emu.h"`, before
// any line of the kernel sources. The CUDA toolkit's own headers are used in host mode
// (types, dim3, __half, __nv_bfloat16 and their conversions round exactly as on the GPU);
// this header adds what only exists in device code: the built-in indices, barriers, warp
// shuffles and votes, atomics, the shared-memory windows and the inline-PTX cp.async that
// rewrite.py turns into calls of emu::ptx. The behaviour lives in runtime.cpp; what is
// inline here is only what must be a template.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Device-only qualifiers that host mode leaves undefined or meaningful.
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

// The built-in variables of the CUDA thread that runs on the current fiber.
struct Builtins {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local const Builtins* tls_builtins;

// ---- barriers, warp-synchronous operations ---------------------------------------------------
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask);

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
// Rendezvous of exactly the lanes in `mask`; returns the payload this lane receives.
uint64_t warp_exchange(WarpOp op, const char* file, int line, unsigned mask, uint64_t payload,
                       int arg, int width);

template <typename T>
T shfl(WarpOp op, const char* file, int line, unsigned mask, T var, int arg, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "emu: shuffles move trivially copyable values of at most 8 bytes");
  uint64_t raw = 0;
  std::memcpy(&raw, &var, sizeof(T));
  raw = warp_exchange(op, file, line, mask, raw, arg, width);
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

// ---- shared memory ---------------------------------------------------------------------------
// The block's dynamic shared memory (`extern __shared__ T name[];` after rewrite.py).
void* dynamic_smem(size_t align);
// A static `__shared__` variable: one object per block, NaN-poisoned, found by its site.
void* shared_object(const char* name, const char* file, int line, size_t bytes, size_t align);
template <typename T, size_t Align = alignof(T)>
T& shared_var(const char* name, const char* file, int line) {
  static_assert(std::is_trivially_destructible<T>::value, "emu: __shared__ objects are POD");
  return *static_cast<T*>(shared_object(name, file, line, sizeof(T), Align > alignof(T) ? Align : alignof(T)));
}
// 32-bit shared-window address of a generic pointer into shared memory, and back.
uint32_t shared_address(const void* p, const char* file, int line);
void* shared_pointer(uint32_t addr, size_t bytes, const char* file, int line);

// ---- atomics (compare-and-swap on the host) --------------------------------------------------
void atomic_hook();  // a possible preemption point, as atomics are where blocks meet
template <typename T, typename F>
T atomic_rmw(T* addr, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "emu: 4- or 8-byte atomics only");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  atomic_hook();
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_val;
    std::memcpy(&old_val, &old_bits, sizeof(T));
    const T new_val = f(old_val);
    U new_bits;
    std::memcpy(&new_bits, &new_val, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
      return old_val;
  }
}

// Called at the top of every __global__ function body (inserted by rewrite.py): records that
// the kernel ran, so the harness can fail when a kernel of the sources is never executed.
void kernel_entered(const char* name);

// ---- launches --------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
  const void* kernel;
};
// Runs every block of the grid; `body` runs one CUDA thread (called on each fiber).
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "emu: kernel launched with a wrong argument count");
    // Kernel parameters are copied once, as cudaLaunchKernel does, and every thread gets them
    // by value.
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(cfg, [](void* c) {
      Ctx* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, x->params);
    }, &ctx);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                    cudaStream_t stream = nullptr) {
  return Launch<P...>{kernel, LaunchConfig{grid, block, smem, stream, reinterpret_cast<const void*>(kernel)}};
}

// ---- inline PTX (rewrite.py turns `asm("op.a.b ...")` into emu::ptx::op_a_b(...)) -----------
namespace ptx {
void cp_async_cg_shared_global(uint32_t dst, const void* src, int cp_size, int src_size);
void cp_async_ca_shared_global(uint32_t dst, const void* src, int cp_size, int src_size);
inline void cp_async_cg_shared_global(uint32_t dst, const void* src, int cp_size) {
  cp_async_cg_shared_global(dst, src, cp_size, cp_size);
}
inline void cp_async_ca_shared_global(uint32_t dst, const void* src, int cp_size) {
  cp_async_ca_shared_global(dst, src, cp_size, cp_size);
}
void cp_async_commit_group();
void cp_async_wait_group(int n);
void cp_async_wait_all();
}  // namespace ptx

// ---- host side: the emulated devices and global memory ---------------------------------------
struct DeviceConfig {
  int sm_count = 132;
  int smem_per_block_optin = 227 * 1024;
  int smem_per_sm = 228 * 1024;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
};
// Defines (or redefines) device `index`; cudaSetDevice selects it.
void set_device_config(int index, const DeviceConfig& cfg);

// Global memory is ordinary host memory; registering a buffer lets cp.async check that it
// reads only inside some allocation.
void register_global(const void* p, size_t bytes);
void unregister_global(const void* p);

// One record per launch, for the harness to see which paths the launchers took.
struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
  size_t dynamic_smem;
};
const LaunchRecord* launch_log(size_t* count);
void clear_launch_log();

// Schedules, cp.async timing and threads (set by the harness from its command line).
enum class Order : int { kForward, kReverse, kRandom };
enum class CopyTiming : int { kAtIssue, kAtWait };
struct RunOptions {
  Order order = Order::kForward;
  CopyTiming copy_timing = CopyTiming::kAtIssue;
  unsigned seed = 1;
  int workers = 1;  // OS threads that run blocks of one grid (TSan build: > 1)
};
void set_run_options(const RunOptions& o);
const RunOptions& run_options();

// The first fault of the last launch ("" if none), also reported by cudaGetLastError.
const char* last_fault();
// Kernel names seen by kernel_entered in this process, '\n'-separated.
const char* kernels_entered();

[[noreturn]] void fatal(const char* file, int line, const char* what);

}  // namespace emu

// The C++ overloads of the runtime API that cuda_runtime.h declares only under nvcc.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*func)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, void (*func)(P...),
                                                                 int block_size, size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
      num_blocks, reinterpret_cast<const void*>(func), block_size, dynamic_smem, cudaOccupancyDefault);
}

// ---- the device built-ins ------------------------------------------------------------------
#define threadIdx (::emu::tls_builtins->thread_idx)
#define blockIdx (::emu::tls_builtins->block_idx)
#define blockDim (::emu::tls_builtins->block_dim)
#define gridDim (::emu::tls_builtins->grid_dim)
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__, ::emu_detail::mask_or_all(__VA_ARGS__))
#define __shfl_sync(...) ::emu::shfl(::emu::WarpOp::kShflIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(::emu::WarpOp::kShflUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(::emu::WarpOp::kShflDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(::emu::WarpOp::kShflXor, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(m, p) \
  static_cast<unsigned>(::emu::warp_exchange(::emu::WarpOp::kBallot, __FILE__, __LINE__, (m), (p) ? 1u : 0u, 0, 32))
#define __any_sync(m, p) \
  static_cast<int>(::emu::warp_exchange(::emu::WarpOp::kAny, __FILE__, __LINE__, (m), (p) ? 1u : 0u, 0, 32))
#define __all_sync(m, p) \
  static_cast<int>(::emu::warp_exchange(::emu::WarpOp::kAll, __FILE__, __LINE__, (m), (p) ? 1u : 0u, 0, 32))
#define __cvta_generic_to_shared(p) (static_cast<size_t>(::emu::shared_address((p), __FILE__, __LINE__)))
#define __cvta_shared_to_generic(a) (::emu::shared_pointer(static_cast<uint32_t>(a), 1, __FILE__, __LINE__))
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

namespace emu_detail {
inline unsigned mask_or_all() { return 0xffffffffu; }
inline unsigned mask_or_all(unsigned m) { return m; }
}  // namespace emu_detail

// ---- atomics ---------------------------------------------------------------------------------
#define EMU_ATOMIC(NAME, T, EXPR) \
  inline T NAME(T* address, T val) { return ::emu::atomic_rmw(address, [&](T old) -> T { (void)old; return EXPR; }); }
EMU_ATOMIC(atomicAdd, float, old + val)
EMU_ATOMIC(atomicAdd, double, old + val)
EMU_ATOMIC(atomicAdd, int, int(unsigned(old) + unsigned(val)))
EMU_ATOMIC(atomicAdd, unsigned int, old + val)
EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
EMU_ATOMIC(atomicSub, int, int(unsigned(old) - unsigned(val)))
EMU_ATOMIC(atomicSub, unsigned int, old - val)
EMU_ATOMIC(atomicExch, int, val)
EMU_ATOMIC(atomicExch, unsigned int, val)
EMU_ATOMIC(atomicExch, unsigned long long, val)
EMU_ATOMIC(atomicExch, float, val)
EMU_ATOMIC(atomicMax, int, old > val ? old : val)
EMU_ATOMIC(atomicMax, unsigned int, old > val ? old : val)
EMU_ATOMIC(atomicMin, int, old < val ? old : val)
EMU_ATOMIC(atomicMin, unsigned int, old < val ? old : val)
EMU_ATOMIC(atomicOr, unsigned int, old | val)
EMU_ATOMIC(atomicAnd, unsigned int, old & val)
#undef EMU_ATOMIC
inline int atomicCAS(int* address, int compare, int val) {
  return ::emu::atomic_rmw(address, [&](int old) { return old == compare ? val : old; });
}
inline unsigned int atomicCAS(unsigned int* address, unsigned int compare, unsigned int val) {
  return ::emu::atomic_rmw(address, [&](unsigned int old) { return old == compare ? val : old; });
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long val) {
  return ::emu::atomic_rmw(address, [&](unsigned long long old) { return old == compare ? val : old; });
}

// ---- device math that host libm lacks, and CUDA's integer min/max --------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// CUDA overloads min/max for every arithmetic pair (the usual conversions apply).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(a) : C(b);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}
