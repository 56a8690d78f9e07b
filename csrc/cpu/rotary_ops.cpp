// rotary_pair (schema in csrc/bindings.cpp): GPT-NeoX's rotary embedding applied to a decode
// step's queries and keys in one call. The model's Python apply_rotary takes about seven ATen
// ops per tensor, twice a layer, for a few hundred numbers, where each op's dispatch costs more
// than its arithmetic (0.5 ms of a 10 ms batch-1 step at pythia-70m's shape, bench/RESULTS.md).
//
// Same bits as apply_rotary (vdproj_ext/models/layers.py), which computes in x's dtype with one
// rounding per op: cos and sin are first rounded to x's dtype, then for the rotated dims
//   out[i] = x[i] * cos[i] - x[i + half] * sin[i]   (i < half)
//   out[i] = x[i] * cos[i] + x[i - half] * sin[i]   (i >= half),
// each product rounded before the sum (never contracted into a fused multiply-add), and the
// dims past the rotated ones copied.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>

#include "../common/checks.h"

namespace vdproj {
namespace {

// A product kept as its own rounded value: the asm hides it from the compiler, which could
// otherwise fuse it with the sum into an FMA (a different rounding from two ATen ops).
template <typename T> inline T rounded(T v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value)
    asm("" : "+x"(v));
#endif
  return v;
}

// out (B, T, H, D) contiguous from x (B, T, H, D; any strides) and cos_t, sin_t (B, T, 1, rot;
// unit stride in rot), both already in T's precision: rows of (b, t) split over threads.
template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos_t, const at::Tensor& sin_t,
            at::Tensor& out) {
  const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t rot = cos_t.size(3), half = rot / 2;
  const T* xp = x.data_ptr<T>();
  const T* cp = cos_t.data_ptr<T>();
  const T* sp = sin_t.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xsb = x.stride(0), xst = x.stride(1), xsh = x.stride(2), xsd = x.stride(3);
  const int64_t csb = cos_t.stride(0), cst = cos_t.stride(1);
  const int64_t ssb = sin_t.stride(0), sst = sin_t.stride(1);
  // about 4k elements per task: a decode step runs on the calling thread
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * Tn, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const T* c = cp + b * csb + t * cst;
      const T* s = sp + b * ssb + t * sst;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = xp + b * xsb + t * xst + h * xsh;
        T* o = op + (r * H + h) * D;
        // xsd: 1 but for a transposed projection output (decode_linear's weight-major rows)
        for (int64_t i = 0; i < half; ++i)
          o[i] = rounded<T>(xr[i * xsd] * c[i]) - rounded<T>(xr[(i + half) * xsd] * s[i]);
        for (int64_t i = half; i < rot; ++i)
          o[i] = rounded<T>(xr[i * xsd] * c[i]) + rounded<T>(xr[(i - half) * xsd] * s[i]);
        if (xsd == 1) {
          if (D > rot) std::memcpy(o + rot, xr + rot, (D - rot) * sizeof(T));
        } else {
          for (int64_t i = rot; i < D; ++i) o[i] = xr[i * xsd];
        }
      }
    }
  });
}

void check_rotary_input(const char* name, const at::Tensor& x, const at::Tensor& cos_t) {
  check_dim(&x, name, 4);
  TORCH_CHECK_VALUE(x.size(0) == cos_t.size(0) && x.size(1) == cos_t.size(1),
                    "rotary_pair: ", name, " must have the batch and length of cos (",
                    cos_t.size(0), ", ", cos_t.size(1), "), got shape ", py_tuple(x.sizes()));
  TORCH_CHECK_VALUE(x.size(3) >= cos_t.size(3), "rotary_pair: ", name, " has head_dim ",
                    x.size(3), ", fewer than the ", cos_t.size(3), " rotary dims of cos");
}

std::tuple<at::Tensor, at::Tensor> rotary_pair_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos_in,
                                                   const at::Tensor& sin_in) {
  const std::initializer_list<std::pair<const char*, const at::Tensor*>> all{
      {"q", &q}, {"k", &k}, {"cos", &cos_in}, {"sin", &sin_in}};
  for (const auto& [name, t] : all)
    TORCH_CHECK_VALUE(t->device().is_cpu(), "rotary_pair: ", name, " must be a CPU tensor, got ",
                      t->device());
  check_same_dtype({{"q", &q}, {"k", &k}});
  const at::ScalarType dt = q.scalar_type();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"cos", &cos_in},
                                {"sin", &sin_in}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "rotary_pair: ", name,
                     " must be float32, got ", py_dtype(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(2) == 1, "rotary_pair: ", name,
                      " must be (B, T, 1, rotary_dims), got shape ", py_tuple(t->sizes()));
  }
  TORCH_CHECK_VALUE(sin_in.sizes() == cos_in.sizes(), "rotary_pair: sin must have cos's shape ",
                    py_tuple(cos_in.sizes()), ", got ", py_tuple(sin_in.sizes()));
  TORCH_CHECK_VALUE(cos_in.size(3) % 2 == 0, "rotary_pair: the rotary dims must be even, got ",
                    cos_in.size(3));
  TORCH_CHECK_VALUE(cos_in.size(3) <= 1 || (cos_in.stride(3) == 1 && sin_in.stride(3) == 1),
                    "rotary_pair: cos and sin must have unit stride in their last dimension");
  check_rotary_input("q", q, cos_in);
  check_rotary_input("k", k, cos_in);
  // apply_rotary rounds cos and sin to x's dtype first (exact for float32 and float64)
  const at::Tensor cos_t = cos_in.to(dt), sin_t = sin_in.to(dt);
  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rotary_pair", [&] {
    if (q.numel() > 0) rotate<scalar_t>(q, cos_t, sin_t, q_out);
    if (k.numel() > 0) rotate<scalar_t>(k, cos_t, sin_t, k_out);
  });
  return {q_out, k_out};
}

}  // namespace
}  // namespace vdproj

TORCH_LIBRARY_IMPL(vdproj_ext, CPU, m) { m.impl("rotary_pair", &vdproj::rotary_pair_cpu); }
