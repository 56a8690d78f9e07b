// Drives the real CUDA launchers (compiled for the emulator by .ci/cuda_emu) through the chains
// csrc/cuda/cuda_api.cpp runs, and compares every result with a float64 reference:
//   decode:   compress-on-write -> split-K attention -> combine (when split) -> restore
//   training: attention forward (final mode: ctx, lse) -> attention backward (dq, dk, dv_c)
// and the same chains of the latent-key ops (latent_cases.cpp) and of quantized caches
// (quant_cases.cpp).
// Every case runs in a child process (a sanitizer abort or a hang fails that case only).
//
//   harness --kernels K.txt [--order forward|reverse|random] [--copy issue|wait] [--seed N]
//           [--workers N] [--filter SUBSTR] [--timeout S] [--no-fork] [--list] [--label L]
#include "vdproj_cuda.h"  // the rewritten copy: parameter structs, launchers, heads_per_tile

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness_util.h"
#include "reference.h"
#include "selftest.h"

// The latent-key cases (latent_cases.cpp) and the quantized caches' (quant_cases.cpp).
void add_latent_cases(std::vector<emu_harness::Case>& cases);
void add_quant_cases(std::vector<emu_harness::Case>& cases);

namespace {

using namespace emu_harness;
using vdproj::cuda::DType;
using emu_ref::Vec;

// ---- decode: compressed_attn_with_kvcache --------------------------------------------------------
struct DecodeCase {
  std::string name;
  DType dt;
  int D, B, H, Tq, R, Tmax, Tnew;
  std::vector<int> seqlens;
  bool causal = true, bias = true;
  bool strided = false;  // caches as views with non-contiguous strides and padding
  emu::DeviceConfig dev;
  int want_splits = 0;  // 0: any, 1: one split (final mode), 2: several (partials + combine)
  int want_stages = 0;  // 0: any, 1 or 2 cp.async stages
};

// Cache strides (elements): k_cache (B, Tmax, H, D) and vc_cache (B, Tmax, R) as torch views.
struct CacheLayout {
  int64_t kc_sb, kc_st, kc_sh, kc_elems;
  int64_t vc_sb, vc_st, vc_elems;
};
CacheLayout cache_layout(const DecodeCase& c) {
  CacheLayout L{};
  const HeadCacheStrides k = head_cache_strides(c.Tmax, c.H, c.D, c.strided);
  const RowCacheStrides v = row_cache_strides(c.Tmax, c.R, c.strided);
  L.kc_sb = k.sb; L.kc_st = k.st; L.kc_sh = k.sh;
  L.vc_sb = v.sb; L.vc_st = v.st;
  L.kc_elems = c.B * L.kc_sb;
  L.vc_elems = c.B * L.vc_sb;
  return L;
}

struct DecodeInputs {
  CacheLayout lay;
  Buffer k_cache, vc_cache, seqlens;
  Tensor q, k, v, w_c, b_c, w_r, b_r;
  Vec kc_keys;  // float64 copy of the valid cache prefix keys, (B, Tmax, H, D)
  Vec vc_vals;  // (B, Tmax, R)
};

DecodeInputs make_decode_inputs(const DecodeCase& c, std::mt19937_64& rng) {
  const int64_t HD = int64_t(c.H) * c.D;
  DecodeInputs in{cache_layout(c), Buffer(), Buffer(), Buffer(size_t(c.B) * 4, 0),
                  Tensor(c.dt, size_t(c.B) * c.Tq * HD), Tensor(c.dt, size_t(c.B) * c.Tnew * HD),
                  Tensor(c.dt, size_t(c.B) * c.Tnew * HD), Tensor(c.dt, size_t(c.R) * HD),
                  Tensor(c.dt, size_t(c.R)), Tensor(c.dt, size_t(HD) * c.R), Tensor(c.dt, size_t(HD)),
                  Vec(size_t(c.B) * c.Tmax * HD, 0.0), Vec(size_t(c.B) * c.Tmax * c.R, 0.0)};
  in.k_cache = Buffer(size_t(in.lay.kc_elems) * dtype_size(c.dt));  // NaN everywhere
  in.vc_cache = Buffer(size_t(in.lay.vc_elems) * dtype_size(c.dt));
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int b = 0; b < c.B; ++b) {
    static_cast<int32_t*>(in.seqlens.get())[b] = c.seqlens[size_t(b)];
    for (int t = 0; t < c.seqlens[size_t(b)]; ++t) {
      for (int64_t e = 0; e < HD; ++e) {
        const int64_t h = e / c.D, d = e % c.D;
        in.kc_keys[size_t((int64_t(b) * c.Tmax + t) * HD + e)] =
            store(c.dt, in.k_cache.get(), size_t(b * in.lay.kc_sb + t * in.lay.kc_st + h * in.lay.kc_sh + d), nd(rng));
      }
      for (int r = 0; r < c.R; ++r) {
        in.vc_vals[size_t((int64_t(b) * c.Tmax + t) * c.R + r)] =
            store(c.dt, in.vc_cache.get(), size_t(b * in.lay.vc_sb + t * in.lay.vc_st + r), nd(rng));
      }
    }
  }
  in.q.fill(rng, 1.5);
  in.k.fill(rng, 1.0);
  in.v.fill(rng, 1.0);
  in.w_c.fill(rng, 1.0 / std::sqrt(double(HD)));
  in.b_c.fill(rng, 0.1);
  in.w_r.fill(rng, 1.0 / std::sqrt(double(c.R)));
  in.b_r.fill(rng, 0.1);
  return in;
}

// The float64 result of the whole decode step, and the v_c rows compress-on-write must store.
struct DecodeRef {
  Vec out;     // (B, Tq, H, D)
  Vec vc_new;  // (B, Tnew, R)
};
DecodeRef decode_reference(const DecodeCase& c, const DecodeInputs& in, double scale) {
  const int64_t HD = int64_t(c.H) * c.D;
  DecodeRef ref{Vec(size_t(c.B) * c.Tq * HD, 0.0), Vec(size_t(c.B) * c.Tnew * c.R, 0.0)};
  for (int64_t m = 0; m < int64_t(c.B) * c.Tnew; ++m) {
    for (int r = 0; r < c.R; ++r) {
      double a = c.bias ? in.b_c.values[size_t(r)] : 0.0;
      for (int64_t e = 0; e < HD; ++e) a += in.v.values[size_t(m * HD + e)] * in.w_c.values[size_t(r * HD + e)];
      ref.vc_new[size_t(m * c.R + r)] = a;
    }
  }
  Vec keys, p, ctx(static_cast<size_t>(c.R));
  for (int b = 0; b < c.B; ++b) {
    const int64_t L = c.seqlens[size_t(b)] + c.Tnew, s0 = c.seqlens[size_t(b)];
    auto key = [&](int64_t j, int64_t e) {
      return j < s0 ? in.kc_keys[size_t((b * c.Tmax + j) * HD + e)]
                    : in.k.values[size_t((int64_t(b) * c.Tnew + j - s0) * HD + e)];
    };
    auto vrow = [&](int64_t j, int r) {
      return j < s0 ? in.vc_vals[size_t((b * c.Tmax + j) * c.R + r)]
                    : ref.vc_new[size_t((int64_t(b) * c.Tnew + j - s0) * c.R + r)];
    };
    for (int h = 0; h < c.H; ++h) {
      keys.assign(size_t(L * c.D), 0.0);
      for (int64_t j = 0; j < L; ++j)
        for (int d = 0; d < c.D; ++d) keys[size_t(j * c.D + d)] = key(j, h * c.D + d);
      for (int i = 0; i < c.Tq; ++i) {
        const double* qr = &in.q.values[size_t((int64_t(b) * c.Tq + i) * HD + h * c.D)];
        if (std::isinf(emu_ref::softmax_row(qr, keys, L, c.D, scale, c.causal, i, c.Tq, p))) continue;
        std::fill(ctx.begin(), ctx.end(), 0.0);
        for (int64_t j = 0; j < L; ++j)
          if (p[size_t(j)] != 0.0)
            for (int r = 0; r < c.R; ++r) ctx[size_t(r)] += p[size_t(j)] * vrow(j, r);
        for (int d = 0; d < c.D; ++d) {
          double o = c.bias ? in.b_r.values[size_t(h * c.D + d)] : 0.0;
          for (int r = 0; r < c.R; ++r) o += in.w_r.values[size_t((h * c.D + d) * c.R + r)] * ctx[size_t(r)];
          ref.out[size_t((int64_t(b) * c.Tq + i) * HD + h * c.D + d)] = o;
        }
      }
    }
  }
  return ref;
}

// compress_new_tokens of cuda_api.cpp.
void run_compress(const DecodeCase& c, DecodeInputs& in) {
  vdproj::cuda::CompressParams p{};
  p.k = in.k.buf.get();
  p.v = in.v.buf.get();
  p.w_c = in.w_c.buf.get();
  p.b_c = c.bias ? in.b_c.buf.get() : nullptr;
  p.k_cache = in.k_cache.get();
  p.vc_cache = in.vc_cache.get();
  p.kc_sb = in.lay.kc_sb; p.kc_st = in.lay.kc_st; p.kc_sh = in.lay.kc_sh;
  p.vcc_sb = in.lay.vc_sb; p.vcc_st = in.lay.vc_st;
  p.seqlens = static_cast<const int32_t*>(in.seqlens.get());
  p.B = c.B; p.Tnew = c.Tnew; p.H = c.H; p.R = c.R;
  p.len_max = c.Tmax;
  p.dtype = c.dt;
  p.head_dim = c.D;
  vdproj::cuda::launch_compress_write(p, nullptr);
}

// The attention's parameters in final mode with one split: cuda_api.cpp's attn_params, from
// sizes and strides instead of tensors.
vdproj::cuda::AttnParams attn_params(DType dt, int D, int B, int Tq, int H, int R, const void* q, const void* k,
                                     const void* vc, int64_t k_sb, int64_t k_st, int64_t k_sh, int64_t vc_sb,
                                     int64_t vc_st, const int32_t* seqlens, int64_t len_add, int64_t len_max,
                                     bool causal, double scale) {
  vdproj::cuda::AttnParams p{};
  p.q = q;
  p.k = k;
  p.vc = vc;
  p.q_sb = int64_t(Tq) * H * D; p.q_st = int64_t(H) * D; p.q_sh = D;
  p.k_sb = k_sb; p.k_st = k_st; p.k_sh = k_sh;
  p.vc_sb = vc_sb; p.vc_st = vc_st;
  vdproj::cuda::set_attn_common(p, seqlens, len_add, len_max, B, Tq, H, D, dt, causal, scale);
  p.R = R;
  p.heads_per_tile = vdproj::cuda::heads_per_tile(H, Tq);
  return p;
}

// attend_cache of cuda_api.cpp: split-K attention, combine when split, restore.
Buffer run_attend_cache(const DecodeCase& c, DecodeInputs& in, double scale, Outcome& res) {
  vdproj::cuda::AttnParams p =
      attn_params(c.dt, c.D, c.B, c.Tq, c.H, c.R, in.q.buf.get(), in.k_cache.get(), in.vc_cache.get(),
                  in.lay.kc_sb, in.lay.kc_st, in.lay.kc_sh, in.lay.vc_sb, in.lay.vc_st,
                  static_cast<const int32_t*>(in.seqlens.get()), c.Tnew, c.Tmax, c.causal, scale);
  p.final_mode = false;
  p.nsplit = vdproj::cuda::attn_num_splits(p, c.Tmax);
  const size_t min_bytes = vdproj::cuda::attn_min_smem_bytes(c.dt, c.D, p.heads_per_tile, c.R);
  const RestoreArgs restore{in.w_r.buf.get(), c.bias ? in.b_r.buf.get() : nullptr, c.D, c.dt};
  return attend_combine_restore(p, &vdproj::cuda::launch_attention, min_bytes, restore, c.want_splits,
                                c.want_stages, res);
}

// Cache slots outside the new tokens must keep their bytes (NaN tails included); the new slots
// hold k exactly and v @ w_c.T + b_c.
void check_caches(const DecodeCase& c, const DecodeInputs& in, const Buffer& kc_before, const Buffer& vc_before,
                  const DecodeRef& ref, Outcome& res) {
  const size_t es = dtype_size(c.dt);
  const int64_t HD = int64_t(c.H) * c.D;
  std::vector<char> k_written(size_t(in.lay.kc_elems), 0), v_written(size_t(in.lay.vc_elems), 0);
  Vec vc_got, vc_want;
  bool k_exact = true;
  for (int b = 0; b < c.B; ++b) {
    for (int t = 0; t < c.Tnew; ++t) {
      const int64_t pos = c.seqlens[size_t(b)] + t;
      for (int64_t e = 0; e < HD; ++e) {
        const size_t i = size_t(b * in.lay.kc_sb + pos * in.lay.kc_st + (e / c.D) * in.lay.kc_sh + e % c.D);
        k_written[i] = 1;
        k_exact = k_exact && std::memcmp(static_cast<const char*>(in.k_cache.get()) + i * es,
                                         static_cast<const char*>(in.k.buf.get()) +
                                             size_t((int64_t(b) * c.Tnew + t) * HD + e) * es,
                                         es) == 0;
      }
      for (int r = 0; r < c.R; ++r) {
        const size_t i = size_t(b * in.lay.vc_sb + pos * in.lay.vc_st + r);
        v_written[i] = 1;
        vc_got.push_back(load(c.dt, in.vc_cache.get(), i));
        vc_want.push_back(ref.vc_new[size_t((int64_t(b) * c.Tnew + t) * c.R + r)]);
      }
    }
  }
  res.expect(k_exact, "k_cache: the new keys are not stored bit for bit at cache_seqlens[b] + t");
  if (!vc_got.empty()) res.expect_close("vc_cache", vc_got, vc_want, tolerance(c.dt));
  size_t k_changed = 0, v_changed = 0;
  for (size_t i = 0; i < k_written.size(); ++i)
    k_changed += !k_written[i] && std::memcmp(static_cast<const char*>(in.k_cache.get()) + i * es,
                                              static_cast<const char*>(kc_before.get()) + i * es, es) != 0;
  for (size_t i = 0; i < v_written.size(); ++i)
    v_changed += !v_written[i] && std::memcmp(static_cast<const char*>(in.vc_cache.get()) + i * es,
                                              static_cast<const char*>(vc_before.get()) + i * es, es) != 0;
  res.expect(k_changed == 0, std::to_string(k_changed) + " k_cache elements outside the new tokens changed");
  res.expect(v_changed == 0, std::to_string(v_changed) + " vc_cache elements outside the new tokens changed");
}

Outcome run_decode(const DecodeCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  DecodeInputs in = make_decode_inputs(c, rng);
  const double scale = 1.0 / std::sqrt(double(c.D));
  const DecodeRef ref = decode_reference(c, in, scale);
  const Buffer kc_before = copy_of(in.k_cache), vc_before = copy_of(in.vc_cache);
  if (c.Tnew > 0) run_compress(c, in);
  const Buffer out = run_attend_cache(c, in, scale, res);
  const int64_t n = int64_t(c.B) * c.Tq * c.H * c.D;
  Vec got(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) got[size_t(i)] = load(c.dt, out.get(), size_t(i));
  res.expect_close("out", got, ref.out, tolerance(c.dt));
  check_caches(c, in, kc_before, vc_before, ref, res);
  return res;
}

// A NaN in one visible cached key (batch 0, head 0, position 0, dim 0): batch 0's head-0
// outputs are NaN, as in float math (never zeros, as an online softmax that skips NaN in its
// max once gave), and every other output matches the float64 reference.
Outcome run_decode_nan_key(const DecodeCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  DecodeInputs in = make_decode_inputs(c, rng);
  const double scale = 1.0 / std::sqrt(double(c.D));
  const DecodeRef ref = decode_reference(c, in, scale);  // the heads the NaN does not reach
  store(c.dt, in.k_cache.get(), 0, std::nan(""));
  if (c.Tnew > 0) run_compress(c, in);
  const Buffer out = run_attend_cache(c, in, scale, res);
  const int64_t HD = int64_t(c.H) * c.D, n = int64_t(c.B) * c.Tq * HD;
  Vec got, want;
  int64_t not_nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double o = load(c.dt, out.get(), size_t(i));
    if (i < c.Tq * HD && (i % HD) < c.D) {
      not_nan += !std::isnan(o);
    } else {
      got.push_back(o);
      want.push_back(ref.out[size_t(i)]);
    }
  }
  res.expect(not_nan == 0, std::to_string(not_nan) + " outputs of the NaN key's head are not NaN");
  res.expect_close("out (other heads)", got, want, tolerance(c.dt));
  return res;
}

// ---- training: compressed_v_attention forward and backward ----------------------------------------
struct TrainCase {
  std::string name;
  DType dt;
  int D, B, H, Tq, Tk, R;
  bool causal;
  emu::DeviceConfig dev;
};

struct TrainInputs {
  Tensor q, k, vc, w_r, dout;
};

// cva_forward: final mode, one split, every sequence of length Tk. Fills ctx_f and lse.
void train_forward(const TrainCase& c, const TrainInputs& in, double scale, Buffer& ctx_f, Buffer& lse,
                   Outcome& res) {
  const int64_t HD = int64_t(c.H) * c.D, Tk = c.Tk;
  vdproj::cuda::AttnParams p = attn_params(c.dt, c.D, c.B, c.Tq, c.H, c.R, in.q.buf.get(), in.k.buf.get(),
                                           in.vc.buf.get(), Tk * HD, HD, c.D, Tk * c.R, c.R, nullptr, Tk, Tk,
                                           c.causal, scale);
  p.ctx_out = ctx_f.f32();
  p.lse_out = lse.f32();
  vdproj::cuda::launch_attention(p, nullptr);
  const emu_ref::AttnRef want = emu_ref::attention_forward(in.q.values, in.k.values, in.vc.values, c.B, c.Tq, Tk,
                                                           c.H, c.D, c.R, scale, c.causal);
  res.expect_close("ctx", read_f32(ctx_f, want.ctx.size()), want.ctx, tolerance(c.dt));
  res.expect_close("lse", read_f32(lse, want.lse.size()), want.lse, tolerance(c.dt));
}

// cva_backward's kernel part: dq (zeroed, accumulated atomically across key tiles), dk, dv_c.
void train_backward(const TrainCase& c, const TrainInputs& in, double scale, const Buffer& ctx_f,
                    const Buffer& lse, Outcome& res) {
  const int64_t HD = int64_t(c.H) * c.D, B = c.B, Tq = c.Tq, Tk = c.Tk, R = c.R;
  Buffer dctx(size_t(B * Tq * c.H * R) * 4), delta(size_t(B * c.H * Tq) * 4);
  backward_inputs(c.dt, B, Tq, c.H, c.D, R, in.dout.values, in.w_r.values, ctx_f, lse, dctx, delta);
  Buffer dq(size_t(B * Tq * HD) * 4, 0), dk(size_t(B * Tk * HD) * 4, 0), dvc(size_t(B * Tk * R) * 4, 0);
  vdproj::cuda::BwdParams g{};
  g.q = in.q.buf.get();
  g.k = in.k.buf.get();
  g.vc = in.vc.buf.get();
  set_backward_common(g, dctx, lse, delta, B, Tq, Tk, c.H, scale, c.causal, c.dt);
  g.dq = dq.f32();
  g.dk = dk.f32();
  g.dvc = dvc.f32();
  g.R = R;
  g.head_dim = c.D;
  vdproj::cuda::launch_attention_bwd(g, nullptr);
  const emu_ref::GradRef want = emu_ref::attention_backward(in.q.values, in.k.values, in.vc.values, in.w_r.values,
                                                            in.dout.values, B, Tq, Tk, c.H, c.D, R, scale, c.causal);
  res.expect_close("dq", read_f32(dq, want.dq.size()), want.dq, tolerance(c.dt));
  res.expect_close("dk", read_f32(dk, want.dk.size()), want.dk, tolerance(c.dt));
  res.expect_close("dv_c", read_f32(dvc, want.dvc.size()), want.dvc, tolerance(c.dt));
}

Outcome run_train(const TrainCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  const size_t HD = size_t(c.H) * size_t(c.D);
  TrainInputs in{Tensor(c.dt, size_t(c.B * c.Tq) * HD), Tensor(c.dt, size_t(c.B * c.Tk) * HD),
                 Tensor(c.dt, size_t(c.B * c.Tk * c.R)), Tensor(c.dt, HD * size_t(c.R)),
                 Tensor(c.dt, size_t(c.B * c.Tq) * HD)};
  in.q.fill(rng, 1.5);
  in.k.fill(rng, 1.0);
  in.vc.fill(rng, 1.0);
  in.w_r.fill(rng, 1.0 / std::sqrt(double(c.R)));
  in.dout.fill(rng, 1.0);
  const double scale = 1.0 / std::sqrt(double(c.D));
  Buffer ctx_f(size_t(c.B * c.Tq * c.H * c.R) * 4), lse(size_t(c.B * c.H * c.Tq) * 4);
  train_forward(c, in, scale, ctx_f, lse, res);
  train_backward(c, in, scale, ctx_f, lse, res);
  return res;
}

// ---- the launchers' own limits ---------------------------------------------------------------------
// A device whose shared memory cannot hold one tile: the attention launcher must refuse with
// an error, not launch.
Outcome run_smem_refusal(DType dt, int D) {
  Outcome res;
  emu::DeviceConfig small;
  small.smem_per_block_optin = 16 * 1024;
  device_for(small);
  const DecodeCase c{"refusal", dt, D, 1, 2, 1, 64, 64, 0, {10}, true, true, false, small, 0, 0};
  std::mt19937_64 rng(7);
  DecodeInputs in = make_decode_inputs(c, rng);
  vdproj::cuda::AttnParams p =
      attn_params(dt, D, 1, 1, 2, 64, in.q.buf.get(), in.k_cache.get(), in.vc_cache.get(), in.lay.kc_sb,
                  in.lay.kc_st, in.lay.kc_sh, in.lay.vc_sb, in.lay.vc_st,
                  static_cast<const int32_t*>(in.seqlens.get()), 0, 64, true, 0.125);
  Buffer ctx_f(2 * 64 * 4), lse(2 * 4);
  p.ctx_out = ctx_f.f32();
  p.lse_out = lse.f32();
  expect_smem_refusal([&] { vdproj::cuda::launch_attention(p, nullptr); }, "launch_attention", res);
  return res;
}

// ---- the suite -----------------------------------------------------------------------------------
// A device that fits exactly one attention stage for this shape (no double buffering).
emu::DeviceConfig one_stage_device(DType dt, int D, int H, int Tq, int R, int sms) {
  emu::DeviceConfig d;
  d.sm_count = sms;
  d.smem_per_block_optin =
      int(vdproj::cuda::attn_min_smem_bytes(dt, D, vdproj::cuda::heads_per_tile(H, Tq), R));
  d.smem_per_sm = d.smem_per_block_optin + 1024;
  return d;
}

// Per dtype and head dim: the decode step through every launcher path (splits, stages, strided
// caches, Tnew 0/1/3, a full cache, an empty sequence, NaN tails everywhere past the valid
// lengths), and the training forward + backward.
void add_standard_cases(DType dt, int D, std::vector<Case>& cases) {
  const std::string tag = std::string(dtype_name(dt)) + "/D" + std::to_string(D) + "/";
  auto add = [&](DecodeCase c) {
    c.name = "decode/" + tag + c.name;
    c.dt = dt;
    c.D = D;
    cases.push_back(Case{c.name, [c] { return run_decode(c); }});
  };
  // One new token per sequence, ragged lengths, many splits, double-buffered tiles.
  add(DecodeCase{"tnew1-ragged-splits", dt, D, 2, 4, 1, 64, 160, 1, {37, 130}, true, true, false, big_device(), 2, 2});
  // Three new tokens (speculative decode), causal within the step; one sequence ends exactly at
  // Tmax, one was empty before the step; one split on a one-SM device.
  add(DecodeCase{"tnew3-full-cache-one-split", dt, D, 3, 3, 3, 64, 67, 3, {64, 0, 29}, true, true, false,
                 one_sm(227 * 1024), 1, 2});
  // No new tokens: attention over the cache only, one sequence empty (zeros, lse = -inf),
  // strided caches, no bias, single-buffered tiles and several splits.
  add(DecodeCase{"tnew0-strided-one-stage", dt, D, 3, 2, 1, 64, 100, 0, {0, 100, 45}, true, false, true,
                 one_stage_device(dt, D, 2, 1, 64, 132), 2, 1});
  // Non-causal multi-query decode writing into strided caches; one stage, one split.
  add(DecodeCase{"tq3-noncausal-strided-one-stage-one-split", dt, D, 2, 4, 3, 64, 100, 1, {90, 51}, false, true,
                 true, one_stage_device(dt, D, 4, 3, 64, 1), 1, 1});

  auto add_train = [&](TrainCase t) {
    t.name = "train/" + tag + t.name;
    cases.push_back(Case{t.name, [t] { return run_train(t); }});
  };
  // Several key tiles and query groups; causal with Tq > Tk leaves the first rows empty.
  add_train(TrainCase{"causal-tq40-tk33", dt, D, 2, 2, 40, 33, 64, true, big_device()});
  add_train(TrainCase{"noncausal-tq11-tk70", dt, D, 1, 3, 11, 70, 64, false, big_device()});
}

// Shapes that change the kernels' thread-to-data maps: R not a multiple of 128 (the combine's
// last column block), R > 512 (two r-chunks per thread), many heads (two row groups); and the
// launchers' refusal of a device too small for one tile.
void add_shape_cases(std::vector<Case>& cases) {
  const DecodeCase r136{"decode/f16/D64/r136-h16-splits", DType::kFloat16, 64, 2, 16, 1, 136, 96, 1, {40, 95},
                        true, true, false, big_device(), 2, 0};
  const DecodeCase r520{"decode/f32/D128/r520-two-chunks", DType::kFloat32, 128, 1, 2, 2, 520, 64, 2, {50},
                        true, true, false, big_device(), 0, 0};
  for (const DecodeCase& c : {r136, r520}) cases.push_back(Case{c.name, [c] { return run_decode(c); }});
  // NaN in a read key: among many keys across splits (partials and combine) and in one split
  // (final mode); and as the only key batch 0 has (a tile of NaN and masked scores only).
  const DecodeCase nan_splits{"decode/f32/D64/nan-key-splits", DType::kFloat32, 64, 2, 4, 1, 64, 160, 1,
                              {130, 37}, true, true, false, big_device(), 2, 0};
  const DecodeCase nan_final{"decode/f32/D64/nan-key-one-split", DType::kFloat32, 64, 3, 3, 3, 64, 67, 0,
                             {40, 64, 29}, false, true, false, one_sm(227 * 1024), 1, 0};
  const DecodeCase nan_only{"decode/bf16/D64/nan-only-key-one-split", DType::kBFloat16, 64, 3, 3, 3, 64, 67, 0,
                            {1, 64, 29}, false, true, false, one_sm(227 * 1024), 1, 0};
  for (const DecodeCase& c : {nan_splits, nan_final, nan_only})
    cases.push_back(Case{c.name, [c] { return run_decode_nan_key(c); }});
  const TrainCase t{"train/bf16/D64/r136", DType::kBFloat16, 64, 1, 2, 9, 40, 136, true, big_device()};
  cases.push_back(Case{t.name, [t] { return run_train(t); }});
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    const std::string name = std::string("limits/") + dtype_name(dt) + "/smem-refusal";
    cases.push_back(Case{name, [dt] { return run_smem_refusal(dt, 128); }});
  }
}

// ---- the emulator's own semantics and checks (selftest/selftest.cu) -------------------------------
Outcome selftest_warp_ops() {
  Outcome res;
  const std::vector<unsigned> got = emu_selftest::warp_ops();
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; l += 3) ballot |= 1u << l;
  int bad = 0;
  for (unsigned t = 0; t < 64; ++t) {
    const unsigned lane = t % 32, base = t - lane;
    const unsigned want[8] = {(base + lane / 8 * 8 + 5) * 3,
                              (lane % 16 >= 3 ? t - 3 : t) * 5,
                              (lane % 16 + 2 < 16 ? t + 2 : t) * 7,
                              (base + (lane ^ 9)) * 11,
                              ballot,
                              base == 32 ? 1u : 0u,
                              0u,
                              lane < 16 ? t ^ 1 : t ^ 2};
    for (int k = 0; k < 8; ++k) bad += got[t * 8 + unsigned(k)] != want[k];
  }
  res.expect(bad == 0, std::to_string(bad) + " of 512 warp-operation results differ from the CUDA guide");
  return res;
}

Outcome selftest_atomics() {
  Outcome res;
  const float n = emu_selftest::atomic_count(8);
  res.expect(n == 2048.f, "atomicAdd from 8 blocks of 256 threads gave " + std::to_string(n) + ", not 2048");
  return res;
}

// Lanes are not in lockstep: a warp-synchronous sum without __syncwarp must come out wrong when
// lane 0 runs first (forward order), and right with __syncwarp in every order. (The TSan build
// reports the unsynchronized sum as the data race it is, so it runs only the right one.)
Outcome selftest_lockstep() {
  Outcome res;
#if defined(__SANITIZE_THREAD__)
  const bool unsynced = false;
#else
  const bool unsynced = true;
#endif
  const std::vector<float> sums = emu_selftest::lockstep_sum(unsynced);
  res.expect(sums[1] == 528.f, "the __syncwarp sum gave " + std::to_string(sums[1]) + ", not 528");
  if (unsynced && emu::run_options().order == emu::Order::kForward)
    res.expect(!(sums[0] == 528.f), "a sum that relies on lockstep lanes came out right");
  return res;
}

// The launch must throw an error whose text contains `expected`.
Outcome selftest_fault(void (*launch)(), const char* expected) {
  Outcome res;
  std::string what = "no error";
  try {
    launch();
  } catch (const std::exception& e) {
    what = e.what();
  }
  res.expect(what.find(expected) != std::string::npos,
             std::string("expected a fault mentioning '") + expected + "', got: " + what);
  return res;
}

void add_selftest_cases(std::vector<Case>& cases) {
  cases.push_back(Case{"emu/warp-ops", selftest_warp_ops});
  cases.push_back(Case{"emu/atomics", selftest_atomics});
  cases.push_back(Case{"emu/lockstep", selftest_lockstep});
  const std::pair<const char*, std::pair<void (*)(), const char*>> faults[] = {
      {"barrier-at-two-lines", {emu_selftest::barrier_at_two_lines, "different barriers"}},
      {"barrier-after-exit", {emu_selftest::barrier_after_exit, "ended"}},
      {"shuffle-lane-outside-mask", {emu_selftest::shuffle_lane_outside_mask, "mask 0x7fffffff"}},
      {"shuffle-by-half-a-warp", {emu_selftest::shuffle_by_half_a_warp, "__shfl_xor_sync"}},
      {"cp-async-past-shared-end", {emu_selftest::cp_async_past_shared_end, "too short"}},
      {"cp-async-never-waited", {emu_selftest::cp_async_never_waited, "never waited"}},
#if !defined(__SANITIZE_ADDRESS__)  // ASan reports this write itself (the canary is poisoned)
      {"static-shared-overflow", {emu_selftest::static_shared_overflow, "write past the end"}},
#endif
  };
#if defined(__SANITIZE_THREAD__)
  // A fault abandons the fibers of its block mid-kernel, so TSan cannot order what they did
  // before the next block reuses the memory: the TSan run (one process for all cases) leaves
  // the fault checks to the other runs.
  return;
#endif
  for (const auto& f : faults) {
    const auto launch = f.second.first;
    const char* expected = f.second.second;
    cases.push_back(Case{std::string("emu/fault/") + f.first, [launch, expected] { return selftest_fault(launch, expected); }});
  }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int D : {64, 128}) add_standard_cases(dt, D, cases);
  add_shape_cases(cases);
  add_latent_cases(cases);
  add_quant_cases(cases);
  add_selftest_cases(cases);
  return cases;
}

// ---- runner -----------------------------------------------------------------------------------------
struct Options {
  emu::RunOptions run;
  std::string filter, kernels_file, label = "emu";
  bool fork = true, list = false;
  int timeout_s = 120;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--order") {
      const std::string v = value();
      o.run.order = v == "reverse" ? emu::Order::kReverse : v == "random" ? emu::Order::kRandom : emu::Order::kForward;
    } else if (a == "--copy") {
      o.run.copy_timing = value() == "wait" ? emu::CopyTiming::kAtWait : emu::CopyTiming::kAtIssue;
    } else if (a == "--seed") {
      o.run.seed = unsigned(std::stoul(value()));
    } else if (a == "--workers") {
      o.run.workers = std::stoi(value());
    } else if (a == "--filter") {
      o.filter = value();
    } else if (a == "--kernels") {
      o.kernels_file = value();
    } else if (a == "--timeout") {
      o.timeout_s = std::stoi(value());
    } else if (a == "--label") {
      o.label = value();
    } else if (a == "--no-fork") {
      o.fork = false;
    } else if (a == "--list") {
      o.list = true;
    } else {
      throw std::runtime_error("unknown argument " + a);
    }
  }
  return o;
}

// Runs one case in this process: "" when it passes, else why not. Kernels entered are added to
// `kernels` ('\n'-separated).
std::string run_case(const Case& c, std::string& notes, std::string& kernels) {
  std::string why;
  try {
    const Outcome r = c.run();
    notes = r.notes;
    for (const std::string& f : r.failures) why += (why.empty() ? "" : "; ") + f;
  } catch (const std::exception& e) {
    why = std::string("exception: ") + e.what();
  }
  kernels = emu::kernels_entered();
  return why;
}

// Runs one case in a child process; a crash, a sanitizer report or a timeout fails it.
std::string run_case_forked(const Case& c, int timeout_s, std::string& notes, std::string& kernels) {
  constexpr size_t kShared = 1 << 16;
  char* shared = static_cast<char*>(mmap(nullptr, kShared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED) throw std::runtime_error("mmap failed");
  std::memset(shared, 0, kShared);
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(unsigned(timeout_s));
    std::string n, k;
    const std::string why = run_case(c, n, k);
    const std::string msg = why + '\x1e' + n + '\x1e' + k;
    std::memcpy(shared + 1, msg.data(), std::min(msg.size(), kShared - 2));
    shared[0] = 1;
    std::fflush(stdout);
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  std::string why;
  if (shared[0] == 1) {
    const std::string msg(shared + 1);
    const size_t a = msg.find('\x1e'), b = msg.find('\x1e', a + 1);
    why = msg.substr(0, a);
    notes = msg.substr(a + 1, b - a - 1);
    kernels = msg.substr(b + 1);
  }
  if (WIFSIGNALED(status)) {
    why = WTERMSIG(status) == SIGALRM ? "timed out after " + std::to_string(timeout_s) + " s"
                                      : "crashed with signal " + std::to_string(WTERMSIG(status));
  } else if (WEXITSTATUS(status) != 0) {
    why = "exited with status " + std::to_string(WEXITSTATUS(status)) + " (a sanitizer report above?)";
  }
  munmap(shared, kShared);
  return why;
}

// Kernels of the sources (rewrite.py's kernels.txt) that no case ran.
std::vector<std::string> kernels_never_run(const std::string& file, const std::set<std::string>& seen) {
  std::vector<std::string> missing;
  std::ifstream in(file);
  if (!in) return {"(cannot read " + file + ")"};
  std::string name, src;
  while (in >> name >> src)
    if (!seen.count(name)) missing.push_back(name + " (" + src + ")");
  return missing;
}

// Runs the selected cases; prints one line per case. After two time-outs the remaining cases
// fail at once (a kernel caught in an endless loop would otherwise cost a time-out per case).
void run_suite(const Options& opt, int& passed, int& failed) {
  std::set<std::string> seen;
  int timeouts = 0;
  for (const Case& c : all_cases()) {
    if (!opt.filter.empty() && c.name.find(opt.filter) == std::string::npos) continue;
    if (opt.list) {
      std::printf("%s\n", c.name.c_str());
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::string notes, kernels, why;
    if (timeouts >= 2) {
      why = "not run: two cases timed out before";
    } else if (opt.fork) {
      why = run_case_forked(c, opt.timeout_s, notes, kernels);
    } else {
      alarm(unsigned(opt.timeout_s));  // no child to kill: a hang ends the whole run
      why = run_case(c, notes, kernels);
      alarm(0);
    }
    timeouts += why.rfind("timed out", 0) == 0;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::istringstream ks(kernels);
    for (std::string k; std::getline(ks, k);) seen.insert(k);
    (why.empty() ? passed : failed) += 1;
    std::printf("  %-4s  %-46s %6.2fs  %s\n", why.empty() ? "ok" : "FAIL", c.name.c_str(), secs,
                (why.empty() ? notes : why).c_str());
    std::fflush(stdout);
  }
  if (opt.list || opt.kernels_file.empty() || !opt.filter.empty()) return;
  const std::vector<std::string> missing = kernels_never_run(opt.kernels_file, seen);
  for (const std::string& m : missing) std::printf("  FAIL  coverage: kernel %s is never run by the harness\n", m.c_str());
  (missing.empty() ? passed : failed) += 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 2;
  }
  emu::set_run_options(opt.run);
  int passed = 0, failed = 0;
  run_suite(opt, passed, failed);
  if (opt.list) return 0;
  std::printf("%s: %d passed, %d failed\n", opt.label.c_str(), passed, failed);
  return failed == 0 ? 0 : 1;
}
