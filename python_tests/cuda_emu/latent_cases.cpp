// Harness cases of the latent-key kernels (SPEC 3b; csrc/cuda/latent_*.cu), driven through the
// chains csrc/cuda/cuda_api.cpp runs, against the float64 references of reference.h:
//   decode (ckv_kvcache_attention): latent compress-on-write -> absorbed query -> split-K latent
//     attention -> combine (when split) -> restore; checked: the output, the absorbed query, the
//     new krope slots (bit for bit), the new K_c / V_c (or joint latent) slots, and every other
//     cache element unchanged (NaN tails too);
//   training (ckv_forward / ckv_backward): absorbed query -> latent attention in final mode
//     (ctx, lse) -> latent backward with dctx and delta made as the ATen part makes them;
//     checked: q_eff, ctx, lse, dq_eff, dk_rope, dK_c, dV_c.
#include <string>
#include <vector>

#include "harness_util.h"
#include "reference.h"

namespace {

using namespace emu_harness;
using vdproj::cuda::DType;
using emu_ref::Vec;

// ---- decode ----------------------------------------------------------------------------------------
struct LatentDecodeCase {
  std::string name;
  DType dt = DType::kFloat32;
  int D = 64, B = 1, H = 1, Tq = 1, Dr = 0, Rk = 0, Rv = 64, Tmax = 64, Tnew = 0;
  std::vector<int> seqlens;
  bool joint = false, causal = true, bias = true;
  bool strided = false;  // caches as views with non-contiguous strides and padding
  emu::DeviceConfig dev;
  int want_splits = 0;  // 0: any, 1: one split (final mode), 2: several (partials + combine)
  int want_stages = 0;  // 0: any, 1 or 2 cp.async stages
  int key_rank() const { return joint ? Rv : Rk; }  // width of the key latent (q_lat, w_kr)
};

// Cache strides (elements) of krope_cache (B, Tmax, H, Dr), kc_cache (B, Tmax, Rk) (absent with
// the joint latent) and vc_cache (B, Tmax, Rv), as torch views.
struct LatentCacheLayout {
  int64_t kr_sb, kr_st, kr_sh, kr_elems;
  int64_t kc_sb, kc_st, kc_elems;
  int64_t vc_sb, vc_st, vc_elems;
};
LatentCacheLayout latent_cache_layout(const LatentDecodeCase& c) {
  LatentCacheLayout L{};
  const int64_t Rk = c.joint ? 0 : c.Rk;
  const HeadCacheStrides kr = head_cache_strides(c.Tmax, c.H, c.Dr, c.strided);
  const RowCacheStrides kc = row_cache_strides(c.Tmax, Rk, c.strided), vc = row_cache_strides(c.Tmax, c.Rv, c.strided);
  L.kr_sb = kr.sb; L.kr_st = kr.st; L.kr_sh = kr.sh;
  L.kc_sb = kc.sb; L.kc_st = kc.st;
  L.vc_sb = vc.sb; L.vc_st = vc.st;
  L.kr_elems = c.B * L.kr_sb;
  L.kc_elems = c.joint ? 0 : c.B * L.kc_sb;
  L.vc_elems = c.B * L.vc_sb;
  return L;
}

struct LatentDecodeInputs {
  LatentCacheLayout lay;
  Buffer krope, kc, vc, seqlens;
  Tensor q, k, v, w_kc, b_kc, w_c, b_c, w_kr, w_r, b_r;
  Vec rope_vals, kc_vals, vc_vals;  // float64 copies of the valid cache prefixes, dense
  explicit LatentDecodeInputs(const LatentDecodeCase& c)
      : lay(latent_cache_layout(c)),
        krope(size_t(lay.kr_elems) * dtype_size(c.dt)),  // NaN everywhere
        kc(size_t(lay.kc_elems) * dtype_size(c.dt)),
        vc(size_t(lay.vc_elems) * dtype_size(c.dt)),
        seqlens(size_t(c.B) * 4, 0),
        q(c.dt, size_t(c.B) * c.Tq * c.H * c.D),
        k(c.dt, size_t(c.B) * c.Tnew * c.H * c.D),
        v(c.dt, size_t(c.B) * c.Tnew * c.H * c.D),
        w_kc(c.dt, c.joint ? 0 : size_t(c.Rk) * c.H * (c.D - c.Dr)),
        b_kc(c.dt, c.joint ? 0 : size_t(c.Rk)),
        w_c(c.dt, size_t(c.Rv) * c.H * (c.joint ? 2 * c.D - c.Dr : c.D)),
        b_c(c.dt, size_t(c.Rv)),
        w_kr(c.dt, size_t(c.H) * (c.D - c.Dr) * c.key_rank()),
        w_r(c.dt, size_t(c.H) * c.D * c.Rv),
        b_r(c.dt, size_t(c.H) * c.D),
        rope_vals(size_t(c.B) * c.Tmax * c.H * c.Dr, 0.0),
        kc_vals(size_t(c.B) * c.Tmax * (c.joint ? 0 : c.Rk), 0.0),
        vc_vals(size_t(c.B) * c.Tmax * c.Rv, 0.0) {}
};

void fill_latent_inputs(const LatentDecodeCase& c, LatentDecodeInputs& in, std::mt19937_64& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  const LatentCacheLayout& L = in.lay;
  const int Rk = c.joint ? 0 : c.Rk;
  for (int b = 0; b < c.B; ++b) {
    static_cast<int32_t*>(in.seqlens.get())[b] = c.seqlens[size_t(b)];
    for (int64_t t = 0; t < c.seqlens[size_t(b)]; ++t) {
      const int64_t bt = int64_t(b) * c.Tmax + t;
      for (int64_t e = 0; e < int64_t(c.H) * c.Dr; ++e)
        in.rope_vals[size_t(bt * c.H * c.Dr + e)] = store(
            c.dt, in.krope.get(), size_t(b * L.kr_sb + t * L.kr_st + (e / c.Dr) * L.kr_sh + e % c.Dr), nd(rng));
      for (int r = 0; r < Rk; ++r)
        in.kc_vals[size_t(bt * Rk + r)] = store(c.dt, in.kc.get(), size_t(b * L.kc_sb + t * L.kc_st + r), nd(rng));
      for (int r = 0; r < c.Rv; ++r)
        in.vc_vals[size_t(bt * c.Rv + r)] = store(c.dt, in.vc.get(), size_t(b * L.vc_sb + t * L.vc_st + r), nd(rng));
    }
  }
  const int64_t HD = int64_t(c.H) * c.D, HDn = int64_t(c.H) * (c.D - c.Dr);
  in.q.fill(rng, 1.5);
  in.k.fill(rng, 1.0);
  in.v.fill(rng, 1.0);
  in.w_kc.fill(rng, 1.0 / std::sqrt(double(HDn)));
  in.b_kc.fill(rng, 0.1);
  in.w_c.fill(rng, 1.0 / std::sqrt(double(c.joint ? HDn + HD : HD)));
  in.b_c.fill(rng, 0.1);
  in.w_kr.fill(rng, 1.0 / std::sqrt(double(c.key_rank())));
  in.w_r.fill(rng, 1.0 / std::sqrt(double(c.Rv)));
  in.b_r.fill(rng, 0.1);
}

// rows (M, N) = x (M, K) @ w.T (N, K) + bias.
Vec linear(const Vec& x, const Vec& w, const Vec* bias, int64_t M, int64_t K, int64_t N) {
  Vec y(static_cast<size_t>(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double a = bias != nullptr ? (*bias)[size_t(n)] : 0.0;
      for (int64_t e = 0; e < K; ++e) a += x[size_t(m * K + e)] * w[size_t(n * K + e)];
      y[size_t(m * N + n)] = a;
    }
  return y;
}

// The float64 decode step: the latent rows compress-on-write must store, the absorbed query
// and the output.
struct LatentDecodeRef {
  Vec kc_new, vc_new;  // (B*Tnew, Rk), (B*Tnew, Rv)
  Vec q_eff;           // (B, Tq, H, Dr + Rk)
  Vec out;             // (B, Tq, H, D)
};

LatentDecodeRef latent_decode_reference(const LatentDecodeCase& c, const LatentDecodeInputs& in, double scale) {
  const int64_t H = c.H, D = c.D, Dr = c.Dr, Dn = D - Dr, HD = H * D, HDn = H * Dn, Rv = c.Rv;
  const int64_t Rk = c.key_rank(), M = int64_t(c.B) * c.Tnew;
  LatentDecodeRef ref;
  Vec x(static_cast<size_t>(M * (HDn + HD)));  // [k_nope | v] of every new token
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t e = 0; e < HDn; ++e) x[size_t(m * (HDn + HD) + e)] = in.k.values[size_t(m * HD + (e / Dn) * D + Dr + e % Dn)];
    for (int64_t e = 0; e < HD; ++e) x[size_t(m * (HDn + HD) + HDn + e)] = in.v.values[size_t(m * HD + e)];
  }
  const Vec* b_c = c.bias ? &in.b_c.values : nullptr;
  if (c.joint) {
    ref.vc_new = linear(x, in.w_c.values, b_c, M, HDn + HD, Rv);
  } else {
    Vec kn(static_cast<size_t>(M * HDn)), vv(static_cast<size_t>(M * HD));
    for (int64_t m = 0; m < M; ++m) {
      std::copy(x.begin() + m * (HDn + HD), x.begin() + m * (HDn + HD) + HDn, kn.begin() + m * HDn);
      std::copy(x.begin() + m * (HDn + HD) + HDn, x.begin() + (m + 1) * (HDn + HD), vv.begin() + m * HD);
    }
    ref.kc_new = linear(kn, in.w_kc.values, c.bias ? &in.b_kc.values : nullptr, M, HDn, Rk);
    ref.vc_new = linear(vv, in.w_c.values, b_c, M, HD, Rv);
  }
  ref.q_eff = emu_ref::absorbed_query(in.q.values, in.w_kr.values, int64_t(c.B) * c.Tq, H, D, Dr, Rk);

  ref.out.assign(size_t(c.B) * c.Tq * HD, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t s0 = c.seqlens[size_t(b)], L = s0 + c.Tnew;
    Vec rope(static_cast<size_t>(L * H * Dr)), lat(static_cast<size_t>(L * Rk)), vals(static_cast<size_t>(L * Rv));
    for (int64_t j = 0; j < L; ++j) {
      const bool cached = j < s0;
      const int64_t nj = b * c.Tnew + j - s0;  // the new token's row
      for (int64_t e = 0; e < H * Dr; ++e)
        rope[size_t(j * H * Dr + e)] = cached ? in.rope_vals[size_t((b * c.Tmax + j) * H * Dr + e)]
                                              : in.k.values[size_t(nj * HD + (e / Dr) * D + e % Dr)];
      for (int64_t r = 0; r < Rv; ++r)
        vals[size_t(j * Rv + r)] = cached ? in.vc_vals[size_t((b * c.Tmax + j) * Rv + r)] : ref.vc_new[size_t(nj * Rv + r)];
      for (int64_t r = 0; r < Rk; ++r)
        lat[size_t(j * Rk + r)] = c.joint ? vals[size_t(j * Rv + r)]
                                          : cached ? in.kc_vals[size_t((b * c.Tmax + j) * Rk + r)]
                                                   : ref.kc_new[size_t(nj * Rk + r)];
    }
    Vec ctx(static_cast<size_t>(c.Tq * H * Rv)), lse(static_cast<size_t>(H * c.Tq));
    emu_ref::latent_attention_seq(&in.q.values[size_t(b * c.Tq * HD)], rope.data(), lat.data(), vals.data(),
                                  in.w_kr.values, c.Tq, L, H, D, Dr, Rk, Rv, scale, c.causal, ctx.data(), lse.data());
    for (int64_t i = 0; i < c.Tq; ++i)
      for (int64_t h = 0; h < H; ++h) {
        if (std::isinf(lse[size_t(h * c.Tq + i)])) continue;  // a row that sees no key: zeros
        for (int64_t d = 0; d < D; ++d) {
          double o = c.bias ? in.b_r.values[size_t(h * D + d)] : 0.0;
          for (int64_t r = 0; r < Rv; ++r)
            o += in.w_r.values[size_t((h * D + d) * Rv + r)] * ctx[size_t((i * H + h) * Rv + r)];
          ref.out[size_t(((b * c.Tq + i) * H + h) * D + d)] = o;
        }
      }
  }
  return ref;
}

// compress_latent_tokens of cuda_api.cpp.
void run_latent_compress(const LatentDecodeCase& c, LatentDecodeInputs& in) {
  vdproj::cuda::LatentCompressParams p{};
  p.k = in.k.buf.get();
  p.v = in.v.buf.get();
  p.w_kc = c.joint ? nullptr : in.w_kc.buf.get();
  p.b_kc = c.joint || !c.bias ? nullptr : in.b_kc.buf.get();
  p.w_c = in.w_c.buf.get();
  p.b_c = c.bias ? in.b_c.buf.get() : nullptr;
  p.krope_cache = in.krope.get();
  p.kc_cache = c.joint ? nullptr : in.kc.get();
  p.vc_cache = in.vc.get();
  p.kr_sb = in.lay.kr_sb; p.kr_st = in.lay.kr_st; p.kr_sh = in.lay.kr_sh;
  p.kc_sb = in.lay.kc_sb; p.kc_st = in.lay.kc_st;
  p.vc_sb = in.lay.vc_sb; p.vc_st = in.lay.vc_st;
  p.seqlens = static_cast<const int32_t*>(in.seqlens.get());
  p.B = c.B; p.Tnew = c.Tnew; p.H = c.H; p.Dr = c.Dr; p.Rk = c.key_rank(); p.Rv = c.Rv;
  p.len_max = c.Tmax;
  p.joint = c.joint;
  p.dtype = c.dt;
  p.head_dim = c.D;
  vdproj::cuda::launch_latent_compress_write(p, nullptr);
}

// absorbed_query of cuda_api.cpp: q_eff (M, H, Dr + Rk) float32.
Buffer run_latent_query(DType dt, const Tensor& q, const Tensor& w_kr, int64_t M, int H, int D, int Dr, int Rk) {
  Buffer q_eff(size_t(M * H * (Dr + Rk)) * 4);
  vdproj::cuda::LatentQueryParams p{};
  p.q = q.buf.get();
  p.w_kr = w_kr.buf.get();
  p.q_eff = q_eff.f32();
  p.M = M; p.H = H; p.Dr = Dr; p.Rk = Rk;
  p.dtype = dt;
  p.head_dim = D;
  vdproj::cuda::launch_latent_query(p, nullptr);
  return q_eff;
}

// latent_attn_params of cuda_api.cpp (final mode, one split), from sizes and strides.
struct LatentSources {
  const void *krope, *klat, *vc;
  int64_t kr_sb, kr_st, kr_sh, kl_sb, kl_st, vc_sb, vc_st;
};
vdproj::cuda::LatentAttnParams latent_params(DType dt, int D, int B, int Tq, int H, int Dr, int Rk, int Rv,
                                             bool joint, const Buffer& q_eff, const LatentSources& s,
                                             const int32_t* seqlens, int64_t len_add, int64_t len_max,
                                             bool causal, double scale) {
  vdproj::cuda::LatentAttnParams p{};
  p.q_eff = q_eff.f32();
  p.krope = s.krope; p.klat = s.klat; p.vc = s.vc;
  p.kr_sb = s.kr_sb; p.kr_st = s.kr_st; p.kr_sh = s.kr_sh;
  p.kl_sb = s.kl_sb; p.kl_st = s.kl_st;
  p.vc_sb = s.vc_sb; p.vc_st = s.vc_st;
  vdproj::cuda::set_attn_common(p, seqlens, len_add, len_max, B, Tq, H, D, dt, causal, scale);
  p.Dr = Dr; p.Rk = Rk; p.Rv = Rv;
  p.joint = joint;
  return p;
}

// attend_combine_restore of cuda_api.cpp with the latent attention.
Buffer run_latent_attend(const LatentDecodeCase& c, LatentDecodeInputs& in, const Buffer& q_eff, double scale,
                         Outcome& res) {
  const LatentCacheLayout& L = in.lay;
  const LatentSources src{in.krope.get(), c.joint ? in.vc.get() : in.kc.get(), in.vc.get(),
                          L.kr_sb, L.kr_st, L.kr_sh, c.joint ? L.vc_sb : L.kc_sb, c.joint ? L.vc_st : L.kc_st,
                          L.vc_sb, L.vc_st};
  vdproj::cuda::LatentAttnParams p =
      latent_params(c.dt, c.D, c.B, c.Tq, c.H, c.Dr, c.key_rank(), c.Rv, c.joint, q_eff, src,
                    static_cast<const int32_t*>(in.seqlens.get()), c.Tnew, c.Tmax, c.causal, scale);
  p.final_mode = false;
  p.nsplit = vdproj::cuda::latent_num_splits(p, c.Tmax);
  const size_t min_bytes =
      vdproj::cuda::latent_attn_min_smem_bytes(c.dt, c.H, c.Tq, c.Dr, c.key_rank(), c.Rv, c.joint);
  res.notes += "rows/block " + std::to_string(vdproj::cuda::latent_rows_per_block(p.nrows)) + ", ";
  const RestoreArgs restore{in.w_r.buf.get(), c.bias ? in.b_r.buf.get() : nullptr, c.D, c.dt};
  return attend_combine_restore(p, &vdproj::cuda::launch_latent_attention, min_bytes, restore, c.want_splits,
                                c.want_stages, res);
}

// Elements of `now` that differ from `before` outside the slots marked written.
size_t changed_outside(const Buffer& now, const Buffer& before, const std::vector<char>& written, size_t es) {
  size_t n = 0;
  for (size_t i = 0; i < written.size(); ++i)
    n += !written[i] && std::memcmp(static_cast<const char*>(now.get()) + i * es,
                                    static_cast<const char*>(before.get()) + i * es, es) != 0;
  return n;
}

// The new slots hold k's rotary dims exactly and the compressed latents; every other cache
// element keeps its bytes (NaN tails included).
void check_latent_caches(const LatentDecodeCase& c, const LatentDecodeInputs& in, const Buffer (&before)[3],
                         const LatentDecodeRef& ref, Outcome& res) {
  const size_t es = dtype_size(c.dt);
  const LatentCacheLayout& L = in.lay;
  const int64_t HD = int64_t(c.H) * c.D, Rk = c.joint ? 0 : c.Rk;
  std::vector<char> kr_w(size_t(L.kr_elems), 0), kc_w(size_t(L.kc_elems), 0), vc_w(size_t(L.vc_elems), 0);
  Vec kc_got, kc_want, vc_got, vc_want;
  bool rope_exact = true;
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t t = 0; t < c.Tnew; ++t) {
      const int64_t pos = c.seqlens[size_t(b)] + t, m = b * c.Tnew + t;
      for (int64_t e = 0; e < int64_t(c.H) * c.Dr; ++e) {
        const int64_t h = e / c.Dr, d = e % c.Dr;
        const size_t i = size_t(b * L.kr_sb + pos * L.kr_st + h * L.kr_sh + d);
        kr_w[i] = 1;
        rope_exact = rope_exact && std::memcmp(static_cast<const char*>(in.krope.get()) + i * es,
                                               static_cast<const char*>(in.k.buf.get()) + size_t(m * HD + h * c.D + d) * es,
                                               es) == 0;
      }
      for (int64_t r = 0; r < Rk; ++r) {
        const size_t i = size_t(b * L.kc_sb + pos * L.kc_st + r);
        kc_w[i] = 1;
        kc_got.push_back(load(c.dt, in.kc.get(), i));
        kc_want.push_back(ref.kc_new[size_t(m * Rk + r)]);
      }
      for (int64_t r = 0; r < c.Rv; ++r) {
        const size_t i = size_t(b * L.vc_sb + pos * L.vc_st + r);
        vc_w[i] = 1;
        vc_got.push_back(load(c.dt, in.vc.get(), i));
        vc_want.push_back(ref.vc_new[size_t(m * c.Rv + r)]);
      }
    }
  }
  res.expect(rope_exact, "krope_cache: the new rotary keys are not stored bit for bit at cache_seqlens[b] + t");
  if (!kc_got.empty()) res.expect_close("kc_cache", kc_got, kc_want, tolerance(c.dt));
  if (!vc_got.empty()) res.expect_close(c.joint ? "joint latent" : "vc_cache", vc_got, vc_want, tolerance(c.dt));
  const std::pair<const char*, size_t> changed[] = {
      {"krope_cache", changed_outside(in.krope, before[0], kr_w, es)},
      {"kc_cache", changed_outside(in.kc, before[1], kc_w, es)},
      {"vc_cache", changed_outside(in.vc, before[2], vc_w, es)}};
  for (const auto& [name, n] : changed)
    res.expect(n == 0, std::to_string(n) + " " + name + " elements outside the new tokens changed");
}

Outcome run_latent_decode(const LatentDecodeCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  LatentDecodeInputs in(c);
  fill_latent_inputs(c, in, rng);
  const double scale = 1.0 / std::sqrt(double(c.D));
  const LatentDecodeRef ref = latent_decode_reference(c, in, scale);
  const Buffer before[3] = {copy_of(in.krope), copy_of(in.kc), copy_of(in.vc)};
  if (c.Tnew > 0) run_latent_compress(c, in);
  const Buffer q_eff = run_latent_query(c.dt, in.q, in.w_kr, int64_t(c.B) * c.Tq, c.H, c.D, c.Dr, c.key_rank());
  const Buffer out = run_latent_attend(c, in, q_eff, scale, res);
  res.expect_close("q_eff", read_f32(q_eff, ref.q_eff.size()), ref.q_eff, tolerance(c.dt));
  Vec got(ref.out.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = load(c.dt, out.get(), i);
  res.expect_close("out", got, ref.out, tolerance(c.dt));
  check_latent_caches(c, in, before, ref, res);
  return res;
}

// ---- training ----------------------------------------------------------------------------------------
struct LatentTrainCase {
  std::string name;
  DType dt = DType::kFloat32;
  int D = 64, B = 1, H = 1, Tq = 1, Tk = 1, Dr = 0, Rk = 0, Rv = 64;
  bool joint = false, causal = true;
  emu::DeviceConfig dev;
  int key_rank() const { return joint ? Rv : Rk; }
};

struct LatentTrainInputs {
  Tensor q, k_rope, k_c, vc, w_kr, w_r, dout;
  explicit LatentTrainInputs(const LatentTrainCase& c)
      : q(c.dt, size_t(c.B) * c.Tq * c.H * c.D),
        k_rope(c.dt, size_t(c.B) * c.Tk * c.H * c.Dr),
        k_c(c.dt, c.joint ? 0 : size_t(c.B) * c.Tk * c.Rk),
        vc(c.dt, size_t(c.B) * c.Tk * c.Rv),
        w_kr(c.dt, size_t(c.H) * (c.D - c.Dr) * c.key_rank()),
        w_r(c.dt, size_t(c.H) * c.D * c.Rv),
        dout(c.dt, size_t(c.B) * c.Tq * c.H * c.D) {}
};

// ckv_forward's kernel part: final mode, one split, every sequence of length Tk.
void latent_train_forward(const LatentTrainCase& c, const LatentTrainInputs& in, const Buffer& q_eff, double scale,
                          Buffer& ctx_f, Buffer& lse, Outcome& res) {
  const int64_t H = c.H, Tk = c.Tk, Dr = c.Dr, Rk = c.key_rank(), Rv = c.Rv;
  const LatentSources src{in.k_rope.buf.get(), c.joint ? in.vc.buf.get() : in.k_c.buf.get(), in.vc.buf.get(),
                          Tk * H * Dr, H * Dr, Dr, Tk * Rk, Rk, Tk * Rv, Rv};
  vdproj::cuda::LatentAttnParams p = latent_params(c.dt, c.D, c.B, c.Tq, c.H, c.Dr, int(Rk), c.Rv, c.joint, q_eff,
                                                   src, nullptr, Tk, Tk, c.causal, scale);
  p.ctx_out = ctx_f.f32();
  p.lse_out = lse.f32();
  vdproj::cuda::launch_latent_attention(p, nullptr);

  Vec ctx(static_cast<size_t>(c.B * c.Tq * H * Rv)), lse_ref(static_cast<size_t>(c.B * H * c.Tq));
  const Vec& lat = c.joint ? in.vc.values : in.k_c.values;
  for (int64_t b = 0; b < c.B; ++b)
    emu_ref::latent_attention_seq(&in.q.values[size_t(b * c.Tq * H * c.D)], in.k_rope.values.data() + b * Tk * H * Dr,
                                  lat.data() + b * Tk * Rk, in.vc.values.data() + b * Tk * Rv, in.w_kr.values, c.Tq,
                                  Tk, H, c.D, Dr, Rk, Rv, scale, c.causal, &ctx[size_t(b * c.Tq * H * Rv)],
                                  &lse_ref[size_t(b * H * c.Tq)]);
  res.expect_close("ctx", read_f32(ctx_f, ctx.size()), ctx, tolerance(c.dt));
  res.expect_close("lse", read_f32(lse, lse_ref.size()), lse_ref, tolerance(c.dt));
}

// ckv_backward's kernel part: dq_eff (zeroed, accumulated atomically across key tiles), dk_rope,
// dK_c (separate latents) and dV_c (with the joint latent's key gradient).
void latent_train_backward(const LatentTrainCase& c, const LatentTrainInputs& in, const Buffer& q_eff,
                           double scale, const Buffer& ctx_f, const Buffer& lse, Outcome& res) {
  const int64_t B = c.B, Tq = c.Tq, Tk = c.Tk, H = c.H, Dr = c.Dr, Rk = c.key_rank(), Rv = c.Rv, Dq = Dr + Rk;
  Buffer dctx(size_t(B * Tq * H * Rv) * 4), delta(size_t(B * H * Tq) * 4);
  backward_inputs(c.dt, B, Tq, H, c.D, Rv, in.dout.values, in.w_r.values, ctx_f, lse, dctx, delta);
  Buffer dq(size_t(B * Tq * H * Dq) * 4, 0), dkr(size_t(B * Tk * H * Dr) * 4, 0),
      dkl(size_t(c.joint ? 0 : B * Tk * Rk) * 4, 0), dvc(size_t(B * Tk * Rv) * 4, 0);
  vdproj::cuda::LatentBwdParams g{};
  g.q_eff = q_eff.f32();
  g.krope = in.k_rope.buf.get();
  g.klat = c.joint ? nullptr : in.k_c.buf.get();
  g.vc = in.vc.buf.get();
  set_backward_common(g, dctx, lse, delta, B, Tq, Tk, H, scale, c.causal, c.dt);
  g.dq_eff = dq.f32();
  g.dkrope = dkr.f32();
  g.dklat = dkl.f32();
  g.dvc = dvc.f32();
  g.Dr = Dr; g.Rk = Rk; g.Rv = Rv;
  g.joint = c.joint;
  vdproj::cuda::launch_latent_attention_bwd(g, nullptr);

  const Vec q_eff_ref = emu_ref::absorbed_query(in.q.values, in.w_kr.values, B * Tq, H, c.D, Dr, Rk);
  const Vec dctx_ref = emu_ref::restore_grad(in.dout.values, in.w_r.values, B * Tq, H, c.D, Rv);
  const emu_ref::LatentGradRef want =
      emu_ref::latent_backward(q_eff_ref, in.k_rope.values, c.joint ? in.vc.values : in.k_c.values, in.vc.values,
                               dctx_ref, B, Tq, Tk, H, Dr, Rk, Rv, c.joint, scale, c.causal);
  res.expect_close("dq_eff", read_f32(dq, want.dq_eff.size()), want.dq_eff, tolerance(c.dt));
  if (Dr > 0) res.expect_close("dk_rope", read_f32(dkr, want.dk_rope.size()), want.dk_rope, tolerance(c.dt));
  if (!c.joint) res.expect_close("dk_c", read_f32(dkl, want.dk_lat.size()), want.dk_lat, tolerance(c.dt));
  res.expect_close("dv_c", read_f32(dvc, want.dvc.size()), want.dvc, tolerance(c.dt));
}

Outcome run_latent_train(const LatentTrainCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  LatentTrainInputs in(c);
  in.q.fill(rng, 1.5);
  in.k_rope.fill(rng, 1.0);
  in.k_c.fill(rng, 1.0);
  in.vc.fill(rng, 1.0);
  in.w_kr.fill(rng, 1.0 / std::sqrt(double(c.key_rank())));
  in.w_r.fill(rng, 1.0 / std::sqrt(double(c.Rv)));
  in.dout.fill(rng, 1.0);
  const double scale = 1.0 / std::sqrt(double(c.D));
  const Buffer q_eff = run_latent_query(c.dt, in.q, in.w_kr, int64_t(c.B) * c.Tq, c.H, c.D, c.Dr, c.key_rank());
  const Vec q_eff_ref = emu_ref::absorbed_query(in.q.values, in.w_kr.values, int64_t(c.B) * c.Tq, c.H, c.D, c.Dr,
                                                c.key_rank());
  res.expect_close("q_eff", read_f32(q_eff, q_eff_ref.size()), q_eff_ref, tolerance(c.dt));
  Buffer ctx_f(size_t(c.B * c.Tq * c.H * c.Rv) * 4), lse(size_t(c.B * c.H * c.Tq) * 4);
  latent_train_forward(c, in, q_eff, scale, ctx_f, lse, res);
  latent_train_backward(c, in, q_eff, scale, ctx_f, lse, res);
  return res;
}

// A device too small for one tile of the latent attention: the launcher refuses, launches nothing.
Outcome run_latent_smem_refusal() {
  Outcome res;
  emu::DeviceConfig small;
  small.smem_per_block_optin = 16 * 1024;
  device_for(small);
  LatentTrainCase c;
  c.name = "refusal";
  c.dt = DType::kBFloat16;
  c.H = 2; c.Tq = 1; c.Tk = 8; c.Dr = 16; c.Rk = 256; c.Rv = 512;
  LatentTrainInputs in(c);
  Buffer q_eff(size_t(c.H * (c.Dr + c.Rk)) * 4, 0), ctx_f(size_t(c.H * c.Rv) * 4), lse(size_t(c.H) * 4);
  const LatentSources src{in.k_rope.buf.get(), in.k_c.buf.get(), in.vc.buf.get(), 0, c.H * c.Dr, c.Dr, 0, c.Rk, 0, c.Rv};
  vdproj::cuda::LatentAttnParams p = latent_params(c.dt, c.D, 1, 1, c.H, c.Dr, c.Rk, c.Rv, false, q_eff, src,
                                                   nullptr, c.Tk, c.Tk, true, 0.125);
  p.ctx_out = ctx_f.f32();
  p.lse_out = lse.f32();
  expect_smem_refusal([&] { vdproj::cuda::launch_latent_attention(p, nullptr); }, "launch_latent_attention", res);
  return res;
}

// ---- the cases -----------------------------------------------------------------------------------------
// A device that fits exactly one latent attention stage for this shape (no double buffering).
emu::DeviceConfig latent_one_stage_device(const LatentDecodeCase& c, int sms) {
  emu::DeviceConfig d;
  d.sm_count = sms;
  d.smem_per_block_optin = int(vdproj::cuda::latent_attn_min_smem_bytes(c.dt, c.H, c.Tq, c.Dr, c.key_rank(), c.Rv,
                                                                         c.joint));
  d.smem_per_sm = d.smem_per_block_optin + 1024;
  return d;
}

LatentDecodeCase decode_case(const char* name, int D, int B, int H, int Tq, int Dr, int Rk, int Rv, int Tmax,
                             int Tnew, std::vector<int> seqlens, bool joint) {
  LatentDecodeCase c;
  c.name = name;
  c.D = D; c.B = B; c.H = H; c.Tq = Tq; c.Dr = Dr; c.Rk = Rk; c.Rv = Rv; c.Tmax = Tmax; c.Tnew = Tnew;
  c.seqlens = std::move(seqlens);
  c.joint = joint;
  return c;
}

// Per dtype: the decode step through every launcher path (one split and several, one and two
// stages, 8 and 16 rows per block, strided caches, Tnew 0/1/3, a full cache, an empty
// sequence, Dr 0/8/16, separate and joint latents), and the training forward + backward.
void add_latent_dtype_cases(DType dt, std::vector<Case>& cases) {
  const std::string tag = std::string("latent/") + dtype_name(dt) + "/";
  auto add = [&](LatentDecodeCase c) {
    c.name = tag + "decode/" + c.name;
    c.dt = dt;
    if (c.dev.smem_per_block_optin == 0) c.dev = latent_one_stage_device(c, c.dev.sm_count);
    cases.push_back(Case{c.name, [c] { return run_latent_decode(c); }});
  };
  // One new token per sequence, ragged lengths, many splits, double-buffered tiles.
  LatentDecodeCase a = decode_case("sep-dr16-tnew1-ragged-splits", 64, 2, 4, 1, 16, 48, 64, 160, 1, {37, 130}, false);
  a.want_splits = 2;
  a.want_stages = 2;
  add(a);
  // Three new tokens, causal within the step; one sequence ends exactly at Tmax, one was empty;
  // 9 rows (two per warp); one split on a one-SM device.
  LatentDecodeCase b = decode_case("joint-dr8-tnew3-full-cache-one-split", 64, 3, 3, 3, 8, 0, 64, 67, 3, {64, 0, 29}, true);
  b.dev = one_sm(227 * 1024);
  b.dev.max_blocks_per_sm = 1;  // one block slot in all: splitting only adds waves
  b.want_splits = 1;
  b.want_stages = 2;
  add(b);
  // No new tokens, fully latent keys (Dr = 0), an empty sequence (zeros), strided caches, no
  // bias, single-buffered tiles and several splits.
  LatentDecodeCase c = decode_case("sep-dr0-tnew0-strided-one-stage", 64, 3, 2, 1, 0, 32, 64, 100, 0, {0, 100, 45}, false);
  c.bias = false;
  c.strided = true;
  c.dev.smem_per_block_optin = 0;  // latent_one_stage_device, 132 SMs
  c.want_splits = 2;
  c.want_stages = 1;
  add(c);
  // 16 heads of head_dim 128 (two rows per warp, one row group), Rv = 136 (the combine's last
  // column block), joint latent, non-causal, strided caches.
  LatentDecodeCase d = decode_case("joint-dr16-d128-h16-noncausal-strided", 128, 2, 16, 1, 16, 0, 136, 90, 1, {40, 89}, true);
  d.causal = false;
  d.strided = true;
  add(d);
  // Several queries per sequence, non-causal, one stage and one split.
  LatentDecodeCase e = decode_case("sep-dr8-tq3-one-stage-one-split", 64, 2, 4, 3, 8, 40, 72, 100, 1, {90, 51}, false);
  e.causal = false;
  e.strided = true;
  e.dev.sm_count = 1;
  e.dev.smem_per_block_optin = 0;  // latent_one_stage_device, one SM
  e.want_splits = 1;
  e.want_stages = 1;
  add(e);

  auto add_train = [&](LatentTrainCase t) {
    t.name = tag + "train/" + t.name;
    t.dt = dt;
    cases.push_back(Case{t.name, [t] { return run_latent_train(t); }});
  };
  auto train = [](const char* name, int D, int B, int H, int Tq, int Tk, int Dr, int Rk, int Rv, bool joint,
                  bool causal) {
    LatentTrainCase t;
    t.name = name;
    t.D = D; t.B = B; t.H = H; t.Tq = Tq; t.Tk = Tk; t.Dr = Dr; t.Rk = Rk; t.Rv = Rv;
    t.joint = joint;
    t.causal = causal;
    return t;
  };
  // Several key tiles and query groups; causal with Tq > Tk leaves the first rows empty.
  add_train(train("sep-dr16-causal-tq40-tk33", 64, 2, 2, 40, 33, 16, 48, 64, false, true));
  // Joint latent, fully latent keys, 33 rows (two per warp in the forward).
  add_train(train("joint-dr0-noncausal-tq11-tk70", 64, 1, 3, 11, 70, 0, 0, 64, true, false));
  // head_dim 128, Dr = 8, Rv = 136.
  add_train(train("sep-dr8-d128-r136", 128, 1, 2, 9, 40, 8, 72, 136, false, true));
}

}  // namespace

void add_latent_cases(std::vector<emu_harness::Case>& cases) {
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) add_latent_dtype_cases(dt, cases);
  cases.push_back(emu_harness::Case{"latent/limits/bf16/smem-refusal", run_latent_smem_refusal});
}
