// Math constants shared by the host wrappers and the CUDA kernels. Plain C++ (no torch, no CUDA
// headers), so nvcc, the host compiler and the CUDA emulator can all include it.
#pragma once

namespace vdproj {

// The kernels keep softmax statistics in base 2 (exp2f / log2f are single instructions on the
// GPU): scores are scaled by log2(e) on the way in, and log-sum-exps by ln(2) on the way out.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
// The float copies device code uses (float math only on the GPU). Each rounds to the float
// literal of the same digits.
constexpr float kLog2eF = static_cast<float>(kLog2e);
constexpr float kLn2F = static_cast<float>(kLn2);

}  // namespace vdproj
