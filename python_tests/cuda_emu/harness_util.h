// Shared pieces of the emulator harness (harness.cpp, latent_cases.cpp): storage types,
// "device" buffers the emulator checks, tensors with float64 copies of what they store, the
// outcome of a case, and the devices the cases run on.
#pragma once

#include "vdproj_cuda.h"  // the rewritten copy: parameter structs, launchers, heads_per_tile

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "reference.h"

namespace emu_harness {

using vdproj::cuda::DType;
using emu_ref::Vec;

constexpr double kLog2e = 1.4426950408889634;  // cuda_api.cpp: scale_log2 = scale * log2(e)

// ---- storage types --------------------------------------------------------------------------------
inline size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
inline const char* dtype_name(DType dt) {
  return dt == DType::kFloat32 ? "f32" : dt == DType::kFloat16 ? "f16" : "bf16";
}
// Relative-error bounds against float64 (python_tests/conftest.py TOLERANCES).
inline double tolerance(DType dt) { return dt == DType::kFloat32 ? 1e-5 : dt == DType::kFloat16 ? 5e-3 : 3e-2; }

inline double load(DType dt, const void* base, size_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return 0.0;
}
// Stores x rounded to the storage type and returns the stored value.
inline double store(DType dt, void* base, size_t i, double x) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(base)[i] = float(x); break;
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(float(x)); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(float(x)); break;
  }
  return load(dt, base, i);
}

// ---- "device" memory: exact-size heap blocks (ASan sees one element past the end), registered
// so that cp.async checks its reads, and filled with NaN like uninitialized GPU memory in tests.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, unsigned char fill = 0xFF) : bytes_(bytes) {
    if (posix_memalign(&p_, 16, bytes > 0 ? bytes : 16) != 0) throw std::bad_alloc();
    std::memset(p_, fill, bytes);
    emu::register_global(p_, bytes);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~Buffer() {
    if (p_ == nullptr) return;
    emu::unregister_global(p_);
    std::free(p_);
  }
  void* get() const { return p_; }
  float* f32() const { return static_cast<float*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// A tensor of the case's storage type with random values; `values` keeps what was stored.
struct Tensor {
  DType dt;
  Buffer buf;
  Vec values;
  Tensor(DType d, size_t n) : dt(d), buf(n * dtype_size(d)), values(n) {}
  void fill(std::mt19937_64& rng, double stddev, double mean = 0.0) {
    std::normal_distribution<double> nd(mean, stddev);
    for (size_t i = 0; i < values.size(); ++i) values[i] = store(dt, buf.get(), i, nd(rng));
  }
  Vec read() const {
    Vec out(values.size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = load(dt, buf.get(), i);
    return out;
  }
};

inline Vec read_f32(const Buffer& b, size_t n) {
  Vec v(n);
  for (size_t i = 0; i < n; ++i) v[i] = b.f32()[i];
  return v;
}

// ---- results --------------------------------------------------------------------------------------
struct Outcome {
  std::vector<std::string> failures;
  std::string notes;
  void expect_close(const char* what, const Vec& got, const Vec& want, double tol) {
    const double err = emu_ref::rel_error(got, want);
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s %.1e", what, err);
    notes += (notes.empty() ? "" : ", ") + std::string(buf);
    if (!(err <= tol)) {
      std::snprintf(buf, sizeof buf, "%s: relative error %.3g > %.1g", what, err, tol);
      failures.push_back(buf);
    }
  }
  void expect(bool ok, const std::string& what) {
    if (!ok) failures.push_back(what);
  }
};

inline uint64_t seed_of(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ uint64_t(uint8_t(c))) * 1099511628211ull;
  return h;
}

inline int device_for(const emu::DeviceConfig& cfg) {
  static int next = 0;
  const int index = ++next;  // a fresh device index: the launchers cache occupancy per device
  emu::set_device_config(index, cfg);
  if (cudaSetDevice(index) != cudaSuccess) throw std::runtime_error("cudaSetDevice failed");
  return index;
}

// The launch records added since `from` (what the launchers actually ran).
inline std::vector<emu::LaunchRecord> launches_since(size_t from) {
  size_t n = 0;
  const emu::LaunchRecord* log = emu::launch_log(&n);
  return std::vector<emu::LaunchRecord>(log + from, log + n);
}
inline size_t launch_count() {
  size_t n = 0;
  emu::launch_log(&n);
  return n;
}


inline Buffer copy_of(const Buffer& b) {
  Buffer c(b.bytes());
  std::memcpy(c.get(), b.get(), b.bytes());
  return c;
}

struct Case {
  std::string name;
  std::function<Outcome()> run;
};

inline emu::DeviceConfig big_device() { return emu::DeviceConfig{}; }  // H100-like: 132 SMs, 227 KB per block
// One SM that holds one block: the split heuristic keeps one split.
inline emu::DeviceConfig one_sm(int smem_optin) {
  emu::DeviceConfig d;
  d.sm_count = 1;
  d.smem_per_block_optin = smem_optin;
  d.smem_per_sm = smem_optin + 1024;
  return d;
}

// Strides (elements) of the caches as torch views. A per-head cache (B, Tmax, H, W): with
// `strided`, a (B, H, Tmax + 2, W) buffer seen as (B, Tmax, H, W), else contiguous.
struct HeadCacheStrides {
  int64_t sb, st, sh;
};
inline HeadCacheStrides head_cache_strides(int64_t Tmax, int64_t H, int64_t W, bool strided) {
  HeadCacheStrides s{};
  if (strided) {
    s.st = W;
    s.sh = (Tmax + 2) * W;
    s.sb = H * s.sh;
  } else {
    s.sh = W;
    s.st = H * W;
    s.sb = Tmax * s.st;
  }
  return s;
}
// A cache of rows all heads share (B, Tmax, W): with `strided`, rows padded by 8 elements and
// one spare row per sequence, else contiguous.
struct RowCacheStrides {
  int64_t sb, st;
};
inline RowCacheStrides row_cache_strides(int64_t Tmax, int64_t W, bool strided) {
  const int64_t st = strided ? W + 8 : W;
  return RowCacheStrides{(strided ? Tmax + 1 : Tmax) * st, st};
}

// dctx = dout_h @ w_r[h] and delta = rowsum(dctx * ctx) in float32, as the ATen part of
// cva_backward / ckv_backward computes them from the ctx the forward returned in the storage
// dtype; rows that see no key get no gradient. dout (B, Tq, H, D), w_r (H*D, R).
inline void backward_inputs(DType dt, int64_t B, int64_t Tq, int64_t H, int64_t D, int64_t R, const Vec& dout,
                            const Vec& w_r, const Buffer& ctx_f, const Buffer& lse, Buffer& dctx, Buffer& delta) {
  Buffer ctx_t(size_t(B * Tq * H * R) * dtype_size(dt));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Tq; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const bool empty = std::isinf(lse.f32()[(b * H + h) * Tq + i]);
        double dl = 0.0;
        for (int64_t r = 0; r < R; ++r) {
          double a = 0.0;
          for (int64_t d = 0; d < D && !empty; ++d)
            a += dout[size_t(((b * Tq + i) * H + h) * D + d)] * w_r[size_t((h * D + d) * R + r)];
          const size_t at = size_t(((b * Tq + i) * H + h) * R + r);
          dctx.f32()[at] = float(a);
          dl += double(dctx.f32()[at]) * float(store(dt, ctx_t.get(), at, ctx_f.f32()[at]));
        }
        delta.f32()[(b * H + h) * Tq + i] = float(dl);
      }
    }
  }
}

// What the two backward kernels' parameters share (BwdParams, LatentBwdParams): the inputs
// backward_inputs made, the saved lse, the shape and the flags.
template <typename P>
void set_backward_common(P& g, const Buffer& dctx, const Buffer& lse, const Buffer& delta, int64_t B, int64_t Tq,
                         int64_t Tk, int64_t H, double scale, bool causal, DType dt) {
  g.dctx = dctx.f32();
  g.lse = lse.f32();
  g.delta = delta.f32();
  g.B = B; g.Tq = Tq; g.Tk = Tk; g.H = H;
  g.scale = static_cast<float>(scale);
  g.causal = causal;
  g.dtype = dt;
}

// The restore of a decode step: w_r, b_r (or nullptr), the output's head_dim and dtype.
struct RestoreArgs {
  const void* w_r;
  const void* b_r;
  int D;
  DType dt;
};

// attend_combine_restore of cuda_api.cpp, for the V-only or the latent attention: p in partial
// mode with its split count chosen; one split runs in final mode, several write partials that
// the combine reduces; then the restore into a fresh output (B, Tq, H, D). Notes the path taken
// and checks it against what the case needs: want_splits (0 any, 1 one, 2 several) and
// want_stages (0 any, 1 or 2 cp.async stages; min_smem: the attention's one-stage bytes).
template <typename Params>
Buffer attend_combine_restore(Params p, void (*launch)(const Params&, cudaStream_t), size_t min_smem,
                              const RestoreArgs& r, int want_splits, int want_stages, Outcome& res) {
  const int64_t R = vdproj::cuda::combine_params(p).R;
  Buffer out(size_t(p.B * p.Tq * p.H * r.D) * dtype_size(r.dt));
  Buffer ctx_f(size_t(p.B * p.Tq * p.H * R) * 4), lse(size_t(p.B * p.H * p.Tq) * 4), part_acc, part_ml;
  const size_t before = launch_count();
  if (p.nsplit == 1) {
    p.final_mode = true;
    p.ctx_out = ctx_f.f32();
    p.lse_out = lse.f32();
    launch(p, nullptr);
  } else {
    part_acc = Buffer(size_t(p.B * p.nsplit * p.nrows * R) * 4);
    part_ml = Buffer(size_t(p.B * p.nsplit * p.nrows * 2) * 4);
    p.part_acc = part_acc.f32();
    p.part_ml = part_ml.f32();
    launch(p, nullptr);
    vdproj::cuda::launch_combine(vdproj::cuda::combine_params(p), ctx_f.f32(), lse.f32(), nullptr);
  }
  const std::vector<emu::LaunchRecord> attn = launches_since(before);
  const int stages = attn.empty() ? 0 : attn[0].dynamic_smem == min_smem ? 1 : 2;
  res.notes += "splits " + std::to_string(p.nsplit) + ", stages " + std::to_string(stages);
  res.expect(want_splits == 0 || (want_splits == 1) == (p.nsplit == 1),
             "coverage: the case needs " + std::string(want_splits == 1 ? "one split" : "several splits") +
                 ", the launcher chose " + std::to_string(p.nsplit));
  res.expect(want_stages == 0 || want_stages == stages,
             "coverage: the case needs " + std::to_string(want_stages) + " cp.async stage(s), the launch used " +
                 std::to_string(stages));
  vdproj::cuda::CombineParams cp = vdproj::cuda::combine_params(p);
  cp.w_r = r.w_r;
  cp.b_r = r.b_r;
  cp.out = out.get();
  vdproj::cuda::launch_restore(cp, ctx_f.f32(), lse.f32(), nullptr);
  return out;
}

// `launch` must refuse with a shared-memory error and launch nothing (a device too small for
// one tile); `what` names it in the failures.
inline void expect_smem_refusal(const std::function<void()>& launch, const std::string& what, Outcome& res) {
  bool threw = false;
  const size_t before = launch_count();
  try {
    launch();
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("shared memory") != std::string::npos;
  }
  res.expect(threw, what + " on a 16 KB device did not refuse with a shared-memory error");
  res.expect(launch_count() == before, what + " launched a kernel it has no shared memory for");
}

}  // namespace emu_harness
