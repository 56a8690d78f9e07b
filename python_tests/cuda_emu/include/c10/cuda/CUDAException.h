// Stand-in for c10/cuda/CUDAException.h in the CUDA emulator: C10_CUDA_CHECK throws on an
// error, and a launch check also reports the emulator's fault (a barrier mismatch, a bad
// cp.async, a shuffle rendezvous that cannot complete, ...) of the launch just made.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../util/Exception.h"

namespace emu {
const char* last_fault();
}

namespace emu_c10 {
[[noreturn]] inline void cuda_failed(cudaError_t err, const char* file, int line, const char* expr) {
  std::string msg = std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + expr + ") at " +
                    file + ":" + std::to_string(line);
  const char* fault = ::emu::last_fault();
  if (fault != nullptr && fault[0] != '\0') msg += "\n  kernel fault: " + std::string(fault);
  throw std::runtime_error(msg);
}
}  // namespace emu_c10

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t emu_err_ = (EXPR);                                                  \
    if (emu_err_ != cudaSuccess) ::emu_c10::cuda_failed(emu_err_, __FILE__, __LINE__, #EXPR); \
  } while (0)
#define C10_CUDA_CHECK_WARN(EXPR) ((void)(EXPR))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
