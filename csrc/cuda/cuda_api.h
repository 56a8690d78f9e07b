// Host-side exports of the CUDA part, for the wrappers (cuda_api.cpp) and the Python module
// (csrc/bindings.cpp). Sees torch; the kernels' own interface is vdproj_cuda.h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vdproj_cuda.h"

namespace vdproj {
namespace cuda {

// The SM architectures the kernels were compiled for, e.g. {80, 90} (attn_fwd.cu).
std::vector<int64_t> compiled_archs();

// The kernels' storage type for a dtype, or nullopt when they do not take it.
std::optional<DType> kernel_dtype(at::ScalarType type);

// Whether the fused kernels take these inputs: "" when they do, else a short reason. See the
// docstring of cuda_kernel_support in csrc/bindings.cpp (kernel_support.cpp). rope_dim and
// k_rank describe the latent keys of the "ckv" ops (k_rank 0: the joint latent).
std::string kernel_support(const std::string& op, const at::Tensor& q, int64_t rank,
                           const std::vector<std::optional<at::Tensor>>& vector_loaded,
                           int64_t t_new, bool backward, int64_t rope_dim = 0,
                           int64_t k_rank = 0);

// Shared memory (bytes) each kernel needs at the least for a shape: {attention with one stage
// (0 without queries), compress-on-write (0 without new tokens), backward} (kernel_support.cpp).
std::vector<int64_t> kernel_smem_bytes(const std::string& dtype, int64_t Tq, int64_t H,
                                       int64_t D, int64_t R, int64_t Tnew);

}  // namespace cuda
}  // namespace vdproj
