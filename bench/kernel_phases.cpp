// Where a latent-key decode step spends its time, per cached position and per phase, with the
// working set in L1/L2, in L3 or in DRAM. Built by bench/kernel_phases.py (JIT, ninja); not
// part of the package. It calls the CPU kernels' own building blocks (csrc/cpu/kernels.h), in
// the order of attend_range's fused path for one query and H = 8 heads:
//   scores : each pair of keys scored for all heads (key_scores_pair), with the next block's
//            rows prefetched into L2 as the kernel does;
//   values : the block's softmax weights (row_max, exp_row) and P @ V_c (rank_update), with
//            the same prefetch;
//   step   : both, which is the kernel's inner loop without its bookkeeping.
// The same rows are read every iteration, so the working set decides where they come from.
#include <torch/extension.h>

#include "dispatch.h"
#include "prelude.h"

#include <chrono>
#include <random>
#include <string>

#ifndef VDPROJ_MULTI_ISA
#error "bench/kernel_phases.cpp times the x86-64 kernel variants: it needs GCC on x86-64"
#endif

#include "kernel_variants.h"

namespace {

// The variant timed: isa_avx512 unless the build says otherwise (kernel_phases.py --isa).
#ifndef KERNEL_PHASES_ISA
#define KERNEL_PHASES_ISA isa_avx512
#define KERNEL_PHASES_NEEDS Avx512
#endif
#define KERNEL_PHASES_STR2(x) #x
#define KERNEL_PHASES_STR(x) KERNEL_PHASES_STR2(x)
#define KERNEL_PHASES_NAME KERNEL_PHASES_STR(KERNEL_PHASES_NEEDS)
using namespace vdproj::cpu::KERNEL_PHASES_ISA;

constexpr int kHeads = 8;

enum Phase { kScores = 1, kValues = 2, kStep = 3 };

template <typename L>
double ns_per_key(int64_t keys, int64_t iters, int phase, int64_t Dr, int64_t Rk, int64_t Rv) {
  using E = typename L::E;
  const int64_t H = kHeads, Dq = Dr + Rk, block = kKeyBlock;
  std::mt19937 gen(0);
  std::uniform_int_distribution<int> small(-60, 60);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::vector<float> q(H * Dq), p(H * block), acc(H * Rv, 0.0f);
  std::vector<E> krope(keys * H * Dr), kc(keys * Rk), vc(keys * Rv);
  for (auto& x : q) x = unit(gen) * 0.05f;
  // Small integers: valid int8 / e4m3 / bf16 / float32 values alike (the timing does not
  // depend on the values; e4m3 bytes of this range are ordinary normals and subnormals).
  for (auto* v : {&krope, &kc, &vc})
    for (auto& x : *v) x = static_cast<E>(small(gen) & (std::is_same<E, uint8_t>::value ? 0x77 : ~0));
  std::vector<float> kscale(keys * H, 0.01f), lscale(keys, 0.02f);
  auto prefetch_next_block = [&](int64_t j) {
    if (j + block >= keys) return;
    prefetch_l2(krope.data() + (j + block) * H * Dr, H * Dr * sizeof(E));
    prefetch_l2(kc.data() + (j + block) * Rk, Rk * sizeof(E));
    prefetch_l2(vc.data() + (j + block) * Rv, Rv * sizeof(E));
  };
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t jb = 0; jb + block <= keys; jb += block) {
      for (int64_t jj = 0; jj < block; jj += 2) {
        const int64_t j = jb + jj;
        prefetch_next_block(j);
        prefetch_next_block(j + 1);
        if (phase & kScores)
          key_scores_pair<float, L>(q.data(), Dq, krope.data() + j * H * Dr,
                                    krope.data() + (j + 1) * H * Dr, Dr, Dr, kc.data() + j * Rk,
                                    kc.data() + (j + 1) * Rk, Rk, H, p.data() + jj,
                                    p.data() + jj + 1, block, kscale.data() + j * H,
                                    kscale.data() + (j + 1) * H, lscale[j], lscale[j + 1]);
      }
      if (phase & kValues) {
        for (int64_t r = 0; r < H; ++r)
          exp_row(p.data() + r * block, block, row_max(p.data() + r * block, block, -INFINITY));
        rank_update<float, L>(acc.data(), Rv, p.data(), block, vc.data() + jb * Rv, Rv, H, block,
                              Rv);
      }
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float sink = p[1] + acc[3];  // keeps the work observable
  (void)sink;
  return seconds * 1e9 / (double(iters) * (keys / block * block));
}

double phase_ns_per_key(const std::string& dtype, int64_t keys, int64_t iters,
                        const std::string& phase, int64_t Dr, int64_t Rk, int64_t Rv) {
  TORCH_CHECK(static_cast<int>(vdproj::cpu_isa()) >=
                  static_cast<int>(vdproj::Isa::KERNEL_PHASES_NEEDS),
              "kernel_phases: this CPU lacks the instruction set of the kernels it was built "
              "to time (", KERNEL_PHASES_NAME, ")");
  TORCH_CHECK(keys >= kKeyBlock && iters >= 1, "keys: expected at least ", kKeyBlock,
              ", iters at least 1; got ", keys, " and ", iters);
  TORCH_CHECK(Dr % 16 == 0 && Rk % 16 == 0 && Rv % 16 == 0 && Dr > 0 && Rk > 0 && Rv > 0,
              "Dr, Rk, Rv: expected positive multiples of 16");
  const int ph = phase == "scores" ? kScores : phase == "values" ? kValues : phase == "step" ? kStep : 0;
  TORCH_CHECK(ph != 0, "phase: expected 'scores', 'values' or 'step', got '", phase, "'");
  if (dtype == "float32") return ns_per_key<RowLoader<float>>(keys, iters, ph, Dr, Rk, Rv);
  // bfloat16: the loader this build's kernels use (Bf16Rows); the other two for A/Bs
  if (dtype == "bfloat16") return ns_per_key<Bf16Rows>(keys, iters, ph, Dr, Rk, Rv);
  if (dtype == "bfloat16-pairs") return ns_per_key<Bf16PairRows>(keys, iters, ph, Dr, Rk, Rv);
  if (dtype == "bfloat16-inorder")
    return ns_per_key<RowLoader<c10::BFloat16>>(keys, iters, ph, Dr, Rk, Rv);
  if (dtype == "int8") return ns_per_key<Int8Rows>(keys, iters, ph, Dr, Rk, Rv);
  if (dtype == "float8_e4m3fn") return ns_per_key<E4m3Rows>(keys, iters, ph, Dr, Rk, Rv);
  TORCH_CHECK(false, "dtype: expected float32, bfloat16, bfloat16-pairs, bfloat16-inorder, int8 or "
              "float8_e4m3fn, got '", dtype,
              "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("phase_ns_per_key", &phase_ns_per_key, "nanoseconds per cached position of one phase");
}
