// Harness cases of the quantized caches (SPEC 3c) in the decode chains of both kvcache ops,
// driven as csrc/cuda/cuda_api.cpp drives them, against float64 references:
//   V-only (kvcache_attention): compress-on-write -> split-K attention -> combine -> restore;
//   latent (ckv_kvcache_attention): latent compress-on-write -> absorbed query -> split-K latent
//     attention -> combine -> restore.
// Every cache tensor is int8 or float8_e4m3fn with a float32 scale per row, read and written
// through arbitrary strides. The cached prefixes hold random rows quantized by the CPU model
// below; slots past the valid lengths hold 0xFF bytes (NaN for e4m3) and NaN scales. The new
// tokens' inputs are small dyadic numbers, so every compressed value is exact in float32 in any
// summation order: the written bytes and scales must equal the model's exactly. The outputs are
// compared with a float64 reference on the dequantized values.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "harness_util.h"
#include "device_utils.h"  // the kernels' element loads (to_float, load2, load16_as_float)
#include "reference.h"

namespace {

using namespace emu_harness;
using vdproj::cuda::CacheType;
using vdproj::cuda::DType;
using emu_ref::Vec;

// ---- the CPU model of the quantization (csrc/cpu/kernels.h quantize_row) ---------------------------
// The value of an e4m3fn code (0x7F / 0xFF are NaN): 4 exponent bits (bias 7), 3 mantissa bits.
double e4m3_value(uint8_t code) {
  const int e = (code >> 3) & 0xF, m = code & 7;
  if ((code & 0x7F) == 0x7F) return std::nan("");
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (code & 0x80) ? -mag : mag;
}
// Round to nearest, ties to the even code (the even mantissa), by search over the codes.
uint8_t e4m3_encode(float v) {
  const double a = std::fabs(double(v));
  uint8_t best = 0;
  for (int c = 1; c < 0x7F; ++c) {
    const double d = std::fabs(e4m3_value(uint8_t(c)) - a), db = std::fabs(e4m3_value(best) - a);
    if (d < db || (d == db && (c & 1) == 0)) best = uint8_t(c);
  }
  return std::signbit(v) ? uint8_t(best | 0x80) : best;
}
double dequant(CacheType ct, uint8_t byte) {
  return ct == CacheType::kInt8 ? double(int8_t(byte)) : e4m3_value(byte);
}
// In float32: scale = max|x| / 127 (int8) or / 448 (e4m3), 1 for an all-zero row;
// stored = x / scale rounded half to even (int8, clamped to +-127) or to e4m3.
float model_quantize(CacheType ct, const float* x, int64_t n, uint8_t* out) {
  float amax = 0.f;
  for (int64_t e = 0; e < n; ++e) amax = std::max(amax, std::fabs(x[e]));
  const float scale = amax > 0.f ? amax / (ct == CacheType::kInt8 ? 127.f : 448.f) : 1.f;
  for (int64_t e = 0; e < n; ++e) {
    const float v = x[e] / scale;
    out[e] = ct == CacheType::kInt8 ? uint8_t(int8_t(std::fmin(std::fmax(std::nearbyint(v), -127.f), 127.f)))
                                    : e4m3_encode(v);
  }
  return scale;
}
const char* cache_name(CacheType ct) { return ct == CacheType::kInt8 ? "int8" : "e4m3"; }

// ---- a quantized cache tensor and its scales --------------------------------------------------------
// (B, Tmax, H, W) per head or (B, Tmax, W) per token, 1-byte elements; scales (B, Tmax[, H]).
// strided: the cache as a view of a padded buffer, the scales as a transposed (per head) or
// every-other-element (per token) view.
struct QCache {
  int64_t B, Tmax, H, W;  // H = 1 for a per-token cache
  bool per_head;
  int64_t sb, st, sh, ss_b, ss_t, ss_h;
  Buffer data, scale;
  Vec vals;  // dequantized, dense (B, Tmax, H, W); zeros past the valid lengths
  QCache(int64_t B_, int64_t Tmax_, int64_t H_, int64_t W_, bool per_head_, bool strided)
      : B(B_), Tmax(Tmax_), H(per_head_ ? H_ : 1), W(W_), per_head(per_head_) {
    if (per_head) {
      const HeadCacheStrides s = head_cache_strides(Tmax, H, W, strided);
      sb = s.sb; st = s.st; sh = s.sh;
      ss_h = strided ? Tmax + 1 : 1;
      ss_t = strided ? 1 : H;
      ss_b = strided ? H * (Tmax + 1) : Tmax * H;
    } else {
      st = strided ? W + 16 : W;  // the padding keeps rows 16-byte aligned
      sb = (strided ? Tmax + 1 : Tmax) * st;
      sh = 0;
      // Different scale steps for different row widths (V_c 64 wide vs K_c 48 wide in the
      // latent cases), so a scale written with the other tensor's stride shows.
      ss_t = strided ? (W == 64 ? 3 : 2) : 1;
      ss_b = strided ? ss_t * Tmax + 3 : Tmax;
      ss_h = 0;
    }
    data = Buffer(size_t(B * sb));       // 0xFF: -1 (int8), NaN (e4m3)
    scale = Buffer(size_t(B * ss_b) * 4);  // 0xFF: NaN
    vals.assign(size_t(B * Tmax * H * W), 0.0);
  }
  uint8_t* row(int64_t b, int64_t t, int64_t h) const {
    return static_cast<uint8_t*>(data.get()) + b * sb + t * st + h * sh;
  }
  float* scale_at(int64_t b, int64_t t, int64_t h) const {
    return scale.f32() + b * ss_b + t * ss_t + h * ss_h;
  }
  // Quantizes x (W floats) into row (b, t, h) with the model and keeps its dequantized values.
  void store_row(CacheType ct, int64_t b, int64_t t, int64_t h, const float* x) {
    const float s = model_quantize(ct, x, W, row(b, t, h));
    *scale_at(b, t, h) = s;
    for (int64_t e = 0; e < W; ++e) vals[size_t(((b * Tmax + t) * H + h) * W + e)] = dequant(ct, row(b, t, h)[e]) * s;
  }
  double value(int64_t b, int64_t t, int64_t h, int64_t e) const {
    return vals[size_t(((b * Tmax + t) * H + h) * W + e)];
  }
};

// Random rows at positions [0, seqlens[b]) of every sequence.
void fill_prefix(CacheType ct, QCache& c, const std::vector<int>& seqlens, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(size_t(c.W));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < seqlens[size_t(b)]; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        for (float& v : x) v = nd(rng);
        c.store_row(ct, b, t, h, x.data());
      }
}

// Small dyadic values (k / 8, |k| <= 16): products and sums of them are exact in float32.
void fill_exact(Tensor& t, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> ud(-16, 16);
  for (size_t i = 0; i < t.values.size(); ++i) t.values[i] = store(t.dt, t.buf.get(), i, ud(rng) / 8.0);
}

// The new rows at seqlens[b] + t: bytes and scales must equal the model's (`want`, a copy of
// the cache with the model's rows stored); every other byte and scale keeps its bits.
void check_written(const char* name, const QCache& got, const QCache& want, const QCache& before,
                   const std::vector<int>& seqlens, int64_t Tnew, Outcome& res) {
  std::vector<char> written(got.data.bytes(), 0), scale_written(got.scale.bytes() / 4, 0);
  size_t bad_bytes = 0, bad_scales = 0;
  for (int64_t b = 0; b < got.B; ++b)
    for (int64_t t = seqlens[size_t(b)]; t < seqlens[size_t(b)] + Tnew; ++t)
      for (int64_t h = 0; h < got.H; ++h) {
        const size_t s = size_t(got.scale_at(b, t, h) - got.scale.f32());
        scale_written[s] = 1;
        bad_scales += std::memcmp(got.scale_at(b, t, h), want.scale_at(b, t, h), 4) != 0;
        for (int64_t e = 0; e < got.W; ++e) {
          const size_t i = size_t(got.row(b, t, h) + e - static_cast<uint8_t*>(got.data.get()));
          written[i] = 1;
          bad_bytes += got.row(b, t, h)[e] != want.row(b, t, h)[e];
        }
      }
  size_t changed = 0;
  for (size_t i = 0; i < written.size(); ++i)
    changed += !written[i] && static_cast<uint8_t*>(got.data.get())[i] != static_cast<uint8_t*>(before.data.get())[i];
  for (size_t i = 0; i < scale_written.size(); ++i)
    changed += !scale_written[i] && std::memcmp(got.scale.f32() + i, before.scale.f32() + i, 4) != 0;
  const std::string n(name);
  res.expect(bad_bytes == 0, n + ": " + std::to_string(bad_bytes) + " new bytes differ from the CPU model's");
  res.expect(bad_scales == 0, n + ": " + std::to_string(bad_scales) + " new scales differ from the CPU model's");
  res.expect(changed == 0, n + ": " + std::to_string(changed) + " bytes or scales outside the new rows changed");
}

QCache clone(const QCache& c) {
  QCache out(c.B, c.Tmax, c.per_head ? c.H : 1, c.W, c.per_head, false);
  out.sb = c.sb; out.st = c.st; out.sh = c.sh;
  out.ss_b = c.ss_b; out.ss_t = c.ss_t; out.ss_h = c.ss_h;
  out.data = copy_of(c.data);
  out.scale = copy_of(c.scale);
  out.vals = c.vals;
  return out;
}

// ---- the cases ---------------------------------------------------------------------------------------
struct QuantCase {
  std::string name;
  CacheType ct = CacheType::kInt8;
  DType dt = DType::kFloat32;
  bool latent = false, joint = false;
  int D = 64, B = 1, H = 1, Tq = 1, Dr = 0, Rk = 0, R = 64, Tmax = 64, Tnew = 0;
  std::vector<int> seqlens;
  bool causal = true, bias = true, strided = false;
  bool zero_token = false;  // the first new token of sequence 0 is all zeros (scale-1 rows; needs !bias)
  emu::DeviceConfig dev;
  int want_splits = 0, want_stages = 0;
  int key_rank() const { return joint ? R : Rk; }
};

// What both chains share: the new tokens' inputs and the restore's weights.
struct NewTokens {
  Tensor q, k, v, w_r, b_r;
  NewTokens(const QuantCase& c)
      : q(c.dt, size_t(c.B) * c.Tq * c.H * c.D), k(c.dt, size_t(c.B) * c.Tnew * c.H * c.D),
        v(c.dt, size_t(c.B) * c.Tnew * c.H * c.D), w_r(c.dt, size_t(c.H) * c.D * c.R), b_r(c.dt, size_t(c.H) * c.D) {}
};
void fill_new_tokens(const QuantCase& c, NewTokens& n, std::mt19937_64& rng) {
  n.q.fill(rng, 1.5);
  fill_exact(n.k, rng);
  fill_exact(n.v, rng);
  n.w_r.fill(rng, 1.0 / std::sqrt(double(c.R)));
  n.b_r.fill(rng, 0.1);
  // float32 keys: the first new k row (amax 1) holds values whose x / scale lies within an ulp
  // of a rounding boundary, where x * (1 / scale) rounds the other way.
  if (c.dt == DType::kFloat32 && c.Tnew > 0) {
    const float scale = 1.f / (c.ct == CacheType::kInt8 ? 127.f : 448.f), inv = 1.f / scale;
    auto code = [&](float v) {
      return c.ct == CacheType::kInt8 ? double(std::nearbyint(v)) : e4m3_value(e4m3_encode(v));
    };
    std::vector<float> ties;  // around each boundary between two codes below kMax
    for (int k = 0; k < 126; ++k) {
      const double edge = c.ct == CacheType::kInt8 ? k + 0.5 : (e4m3_value(uint8_t(k)) + e4m3_value(uint8_t(k + 1))) / 2;
      float x = float(edge * scale);
      for (int u = 0; u < 4; ++u) x = std::nextafter(x, 0.f);
      for (int u = 0; u < 9; ++u, x = std::nextafter(x, 2.f))
        if (code(x / scale) != code(x * inv)) { ties.push_back(x); break; }
    }
    n.k.values[0] = store(c.dt, n.k.buf.get(), 0, 1.0);
    for (size_t e = 1; e < size_t(c.D); ++e)
      n.k.values[e] = store(c.dt, n.k.buf.get(), e, ties.empty() ? 0.0 : double(ties[(e - 1) % ties.size()]));
  }
  if (c.zero_token && c.Tnew > 0) {
    const size_t HD = size_t(c.H) * c.D;
    for (size_t e = 0; e < HD; ++e) {
      n.k.values[e] = store(c.dt, n.k.buf.get(), e, 0.0);
      n.v.values[e] = store(c.dt, n.v.buf.get(), e, 0.0);
    }
  }
}

// out (B, Tq, H, D) from ctx (Tq, H, R) and lse (H, Tq) of sequence b, as the restore makes it.
void restore_rows(const QuantCase& c, const NewTokens& n, int64_t b, const Vec& ctx, const Vec& lse, Vec& out) {
  for (int64_t i = 0; i < c.Tq; ++i)
    for (int64_t h = 0; h < c.H; ++h) {
      if (std::isinf(lse[size_t(h * c.Tq + i)])) continue;  // a row that sees no key: zeros
      for (int64_t d = 0; d < c.D; ++d) {
        double o = c.bias ? n.b_r.values[size_t(h * c.D + d)] : 0.0;
        for (int64_t r = 0; r < c.R; ++r)
          o += n.w_r.values[size_t((h * c.D + d) * c.R + r)] * ctx[size_t((i * c.H + h) * c.R + r)];
        out[size_t(((b * c.Tq + i) * c.H + h) * c.D + d)] = o;
      }
    }
}

// rows (M, N) = x (M, K) @ w.T + bias, in float64 (exact here: dyadic inputs).
std::vector<float> linear_exact(const Vec& x, const Vec& w, const Vec* bias, int64_t M, int64_t K, int64_t N) {
  std::vector<float> y(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < N; ++o) {
      double a = bias != nullptr ? (*bias)[size_t(o)] : 0.0;
      for (int64_t e = 0; e < K; ++e) a += x[size_t(m * K + e)] * w[size_t(o * K + e)];
      y[size_t(m * N + o)] = float(a);
    }
  return y;
}

Vec read_out(const QuantCase& c, const Buffer& out) {
  Vec got(size_t(c.B) * c.Tq * c.H * c.D);
  for (size_t i = 0; i < got.size(); ++i) got[i] = load(c.dt, out.get(), i);
  return got;
}

// ---- V-only: kvcache_attention ----------------------------------------------------------------------
Outcome run_vonly(const QuantCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  const int64_t H = c.H, D = c.D, R = c.R, HD = H * D, M = int64_t(c.B) * c.Tnew;
  QCache kc(c.B, c.Tmax, H, D, true, c.strided), vc(c.B, c.Tmax, 1, R, false, c.strided);
  fill_prefix(c.ct, kc, c.seqlens, rng);
  fill_prefix(c.ct, vc, c.seqlens, rng);
  NewTokens n(c);
  Tensor w_c(c.dt, size_t(R) * HD), b_c(c.dt, size_t(R));
  Buffer seqlens(size_t(c.B) * 4, 0);
  for (int b = 0; b < c.B; ++b) static_cast<int32_t*>(seqlens.get())[b] = c.seqlens[size_t(b)];
  fill_new_tokens(c, n, rng);
  fill_exact(w_c, rng);
  fill_exact(b_c, rng);

  // The model's new rows: k as is, V_c exact in float32.
  const QCache kc_before = clone(kc), vc_before = clone(vc);
  QCache kc_want = clone(kc), vc_want = clone(vc);
  const std::vector<float> vnew = linear_exact(n.v.values, w_c.values, c.bias ? &b_c.values : nullptr, M, HD, R);
  std::vector<float> krow(static_cast<size_t>(D));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.Tnew; ++t) {
      const int64_t pos = c.seqlens[size_t(b)] + t, m = b * c.Tnew + t;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) krow[size_t(d)] = float(n.k.values[size_t(m * HD + h * D + d)]);
        kc_want.store_row(c.ct, b, pos, h, krow.data());
      }
      vc_want.store_row(c.ct, b, pos, 0, &vnew[size_t(m * R)]);
    }

  vdproj::cuda::CompressParams w{};
  w.k = n.k.buf.get(); w.v = n.v.buf.get(); w.w_c = w_c.buf.get(); w.b_c = c.bias ? b_c.buf.get() : nullptr;
  w.k_cache = kc.data.get(); w.vc_cache = vc.data.get();
  w.kc_sb = kc.sb; w.kc_st = kc.st; w.kc_sh = kc.sh;
  w.vcc_sb = vc.sb; w.vcc_st = vc.st;
  w.seqlens = static_cast<const int32_t*>(seqlens.get());
  w.B = c.B; w.Tnew = c.Tnew; w.H = H; w.R = R; w.len_max = c.Tmax;
  w.dtype = c.dt; w.head_dim = c.D;
  w.cache = c.ct;
  w.k_scale = kc.scale.f32(); w.ks_sb = kc.ss_b; w.ks_st = kc.ss_t; w.ks_sh = kc.ss_h;
  w.vc_scale = vc.scale.f32(); w.vs_sb = vc.ss_b; w.vs_st = vc.ss_t;
  if (c.Tnew > 0) vdproj::cuda::launch_compress_write(w, nullptr);
  check_written("k_cache", kc, kc_want, kc_before, c.seqlens, c.Tnew, res);
  check_written("vc_cache", vc, vc_want, vc_before, c.seqlens, c.Tnew, res);

  // attend_cache of cuda_api.cpp.
  vdproj::cuda::AttnParams p{};
  p.q = n.q.buf.get(); p.k = kc.data.get(); p.vc = vc.data.get();
  p.q_sb = int64_t(c.Tq) * HD; p.q_st = HD; p.q_sh = D;
  p.k_sb = kc.sb; p.k_st = kc.st; p.k_sh = kc.sh;
  p.vc_sb = vc.sb; p.vc_st = vc.st;
  const double scale = 1.0 / std::sqrt(double(D));
  vdproj::cuda::set_attn_common(p, static_cast<const int32_t*>(seqlens.get()), c.Tnew, c.Tmax, c.B, c.Tq, H, c.D,
                                c.dt, c.causal, scale);
  p.R = R;
  p.heads_per_tile = vdproj::cuda::heads_per_tile(H, c.Tq);
  p.cache = c.ct;
  p.k_scale = kc.scale.f32(); p.ks_sb = kc.ss_b; p.ks_st = kc.ss_t; p.ks_sh = kc.ss_h;
  p.vc_scale = vc.scale.f32(); p.vs_sb = vc.ss_b; p.vs_st = vc.ss_t;
  p.final_mode = false;
  p.nsplit = vdproj::cuda::attn_num_splits(p, c.Tmax);
  const size_t min_bytes = vdproj::cuda::attn_min_smem_bytes(c.dt, c.D, p.heads_per_tile, R, c.ct);
  const RestoreArgs restore{n.w_r.buf.get(), c.bias ? n.b_r.buf.get() : nullptr, c.D, c.dt};
  const Buffer out = attend_combine_restore(p, &vdproj::cuda::launch_attention, min_bytes, restore, c.want_splits,
                                            c.want_stages, res);

  // float64 reference on the model's dequantized rows.
  Vec want(size_t(c.B) * c.Tq * HD, 0.0), keys, prob;
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t L = c.seqlens[size_t(b)] + c.Tnew;
    Vec ctx(size_t(c.Tq * H * R), 0.0), lse(size_t(H * c.Tq));
    for (int64_t h = 0; h < H; ++h) {
      keys.assign(size_t(L * D), 0.0);
      for (int64_t j = 0; j < L; ++j)
        for (int64_t d = 0; d < D; ++d) keys[size_t(j * D + d)] = kc_want.value(b, j, h, d);
      for (int64_t i = 0; i < c.Tq; ++i) {
        const double* qr = &n.q.values[size_t(((b * c.Tq + i) * H + h) * D)];
        lse[size_t(h * c.Tq + i)] = emu_ref::softmax_row(qr, keys, L, D, scale, c.causal, i, c.Tq, prob);
        for (int64_t j = 0; j < L; ++j)
          for (int64_t r = 0; r < R; ++r) ctx[size_t((i * H + h) * R + r)] += prob[size_t(j)] * vc_want.value(b, j, 0, r);
      }
    }
    restore_rows(c, n, b, ctx, lse, want);
  }
  res.expect_close("out", read_out(c, out), want, tolerance(c.dt));
  return res;
}

// ---- latent keys: ckv_kvcache_attention -------------------------------------------------------------
Outcome run_latent(const QuantCase& c) {
  Outcome res;
  device_for(c.dev);
  std::mt19937_64 rng(seed_of(c.name));
  const int64_t H = c.H, D = c.D, Dr = c.Dr, Dn = D - Dr, HD = H * D, HDn = H * Dn, Rv = c.R, Rk = c.key_rank();
  const int64_t M = int64_t(c.B) * c.Tnew;
  QCache kr(c.B, c.Tmax, H, Dr, true, c.strided), kl(c.B, c.Tmax, 1, c.joint ? 0 : Rk, false, c.strided),
      vc(c.B, c.Tmax, 1, Rv, false, c.strided);
  fill_prefix(c.ct, kr, c.seqlens, rng);
  if (!c.joint) fill_prefix(c.ct, kl, c.seqlens, rng);
  fill_prefix(c.ct, vc, c.seqlens, rng);
  NewTokens n(c);
  Tensor w_kc(c.dt, c.joint ? 0 : size_t(Rk * HDn)), b_kc(c.dt, c.joint ? 0 : size_t(Rk)),
      w_c(c.dt, size_t(Rv) * (c.joint ? HDn + HD : HD)), b_c(c.dt, size_t(Rv)), w_kr(c.dt, size_t(HDn * Rk));
  Buffer seqlens(size_t(c.B) * 4, 0);
  for (int b = 0; b < c.B; ++b) static_cast<int32_t*>(seqlens.get())[b] = c.seqlens[size_t(b)];
  fill_new_tokens(c, n, rng);
  fill_exact(w_kc, rng);
  fill_exact(b_kc, rng);
  fill_exact(w_c, rng);
  fill_exact(b_c, rng);
  w_kr.fill(rng, 1.0 / std::sqrt(double(Rk)));

  // The model's new rows: the rotary dims as they are, the latents exact in float32.
  Vec x(size_t(M * (HDn + HD))), kn(size_t(M * HDn));  // [k_nope | v], k_nope
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t e = 0; e < HDn; ++e)
      x[size_t(m * (HDn + HD) + e)] = kn[size_t(m * HDn + e)] = n.k.values[size_t(m * HD + (e / Dn) * D + Dr + e % Dn)];
    for (int64_t e = 0; e < HD; ++e) x[size_t(m * (HDn + HD) + HDn + e)] = n.v.values[size_t(m * HD + e)];
  }
  const Vec* bc = c.bias ? &b_c.values : nullptr;
  std::vector<float> vnew, knew;
  if (c.joint) {
    vnew = linear_exact(x, w_c.values, bc, M, HDn + HD, Rv);
  } else {
    Vec vv(size_t(M * HD));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t e = 0; e < HD; ++e) vv[size_t(m * HD + e)] = n.v.values[size_t(m * HD + e)];
    vnew = linear_exact(vv, w_c.values, bc, M, HD, Rv);
    knew = linear_exact(kn, w_kc.values, c.bias ? &b_kc.values : nullptr, M, HDn, Rk);
  }
  const QCache kr_before = clone(kr), kl_before = clone(kl), vc_before = clone(vc);
  QCache kr_want = clone(kr), kl_want = clone(kl), vc_want = clone(vc);
  std::vector<float> rrow(static_cast<size_t>(Dr));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.Tnew; ++t) {
      const int64_t pos = c.seqlens[size_t(b)] + t, m = b * c.Tnew + t;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < Dr; ++d) rrow[size_t(d)] = float(n.k.values[size_t(m * HD + h * D + d)]);
        kr_want.store_row(c.ct, b, pos, h, rrow.data());  // Dr = 0: scale 1
      }
      if (!c.joint) kl_want.store_row(c.ct, b, pos, 0, &knew[size_t(m * Rk)]);
      vc_want.store_row(c.ct, b, pos, 0, &vnew[size_t(m * Rv)]);
    }

  vdproj::cuda::LatentCompressParams w{};
  w.k = n.k.buf.get(); w.v = n.v.buf.get();
  w.w_kc = c.joint ? nullptr : w_kc.buf.get();
  w.b_kc = c.joint || !c.bias ? nullptr : b_kc.buf.get();
  w.w_c = w_c.buf.get(); w.b_c = c.bias ? b_c.buf.get() : nullptr;
  w.krope_cache = kr.data.get(); w.kc_cache = c.joint ? nullptr : kl.data.get(); w.vc_cache = vc.data.get();
  w.kr_sb = kr.sb; w.kr_st = kr.st; w.kr_sh = kr.sh;
  w.kc_sb = kl.sb; w.kc_st = kl.st;
  w.vc_sb = vc.sb; w.vc_st = vc.st;
  w.seqlens = static_cast<const int32_t*>(seqlens.get());
  w.B = c.B; w.Tnew = c.Tnew; w.H = H; w.Dr = Dr; w.Rk = Rk; w.Rv = Rv; w.len_max = c.Tmax;
  w.joint = c.joint; w.dtype = c.dt; w.head_dim = c.D;
  w.cache = c.ct;
  w.kr_scale = kr.scale.f32(); w.krs_sb = kr.ss_b; w.krs_st = kr.ss_t; w.krs_sh = kr.ss_h;
  w.kc_scale = c.joint ? nullptr : kl.scale.f32(); w.kcs_sb = kl.ss_b; w.kcs_st = kl.ss_t;
  w.vc_scale = vc.scale.f32(); w.vs_sb = vc.ss_b; w.vs_st = vc.ss_t;
  if (c.Tnew > 0) vdproj::cuda::launch_latent_compress_write(w, nullptr);
  check_written("krope_cache", kr, kr_want, kr_before, c.seqlens, c.Tnew, res);
  if (!c.joint) check_written("kc_cache", kl, kl_want, kl_before, c.seqlens, c.Tnew, res);
  check_written(c.joint ? "vc_cache (joint)" : "vc_cache", vc, vc_want, vc_before, c.seqlens, c.Tnew, res);

  // absorbed_query, then attend_combine_restore with the latent attention (cuda_api.cpp).
  const int64_t Dq = Dr + Rk;
  Buffer q_eff(size_t(c.B * c.Tq * H * Dq) * 4);
  vdproj::cuda::LatentQueryParams qp{};
  qp.q = n.q.buf.get(); qp.w_kr = w_kr.buf.get(); qp.q_eff = q_eff.f32();
  qp.M = int64_t(c.B) * c.Tq; qp.H = H; qp.Dr = Dr; qp.Rk = Rk; qp.dtype = c.dt; qp.head_dim = c.D;
  vdproj::cuda::launch_latent_query(qp, nullptr);
  const QCache& lat = c.joint ? vc : kl;
  vdproj::cuda::LatentAttnParams p{};
  p.q_eff = q_eff.f32();
  p.krope = kr.data.get(); p.klat = lat.data.get(); p.vc = vc.data.get();
  p.kr_sb = kr.sb; p.kr_st = kr.st; p.kr_sh = kr.sh;
  p.kl_sb = lat.sb; p.kl_st = lat.st;
  p.vc_sb = vc.sb; p.vc_st = vc.st;
  const double scale = 1.0 / std::sqrt(double(D));
  vdproj::cuda::set_attn_common(p, static_cast<const int32_t*>(seqlens.get()), c.Tnew, c.Tmax, c.B, c.Tq, H, c.D,
                                c.dt, c.causal, scale);
  p.Dr = Dr; p.Rk = Rk; p.Rv = Rv; p.joint = c.joint;
  p.cache = c.ct;
  p.kr_scale = kr.scale.f32(); p.krs_sb = kr.ss_b; p.krs_st = kr.ss_t; p.krs_sh = kr.ss_h;
  p.kl_scale = lat.scale.f32(); p.kls_sb = lat.ss_b; p.kls_st = lat.ss_t;
  p.vc_scale = vc.scale.f32(); p.vs_sb = vc.ss_b; p.vs_st = vc.ss_t;
  p.final_mode = false;
  p.nsplit = vdproj::cuda::latent_num_splits(p, c.Tmax);
  const size_t min_bytes =
      vdproj::cuda::latent_attn_min_smem_bytes(c.dt, H, c.Tq, Dr, Rk, Rv, c.joint, c.ct);
  res.notes += "rows/block " + std::to_string(vdproj::cuda::latent_rows_per_block(p.nrows)) + ", ";
  const RestoreArgs restore{n.w_r.buf.get(), c.bias ? n.b_r.buf.get() : nullptr, c.D, c.dt};
  const Buffer out = attend_combine_restore(p, &vdproj::cuda::launch_latent_attention, min_bytes, restore,
                                            c.want_splits, c.want_stages, res);

  // float64 reference in the restored form, on the model's dequantized rows.
  const QCache& lat_want = c.joint ? vc_want : kl_want;
  Vec want(size_t(c.B) * c.Tq * HD, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t L = c.seqlens[size_t(b)] + c.Tnew;
    Vec rope(size_t(L * H * Dr)), latv(size_t(L * Rk)), vals(size_t(L * Rv));
    for (int64_t j = 0; j < L; ++j) {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < Dr; ++d) rope[size_t((j * H + h) * Dr + d)] = kr_want.value(b, j, h, d);
      for (int64_t r = 0; r < Rk; ++r) latv[size_t(j * Rk + r)] = lat_want.value(b, j, 0, r);
      for (int64_t r = 0; r < Rv; ++r) vals[size_t(j * Rv + r)] = vc_want.value(b, j, 0, r);
    }
    Vec ctx(size_t(c.Tq * H * Rv)), lse(size_t(H * c.Tq));
    emu_ref::latent_attention_seq(&n.q.values[size_t(b * c.Tq * HD)], rope.data(), latv.data(), vals.data(),
                                  w_kr.values, c.Tq, L, H, D, Dr, Rk, Rv, scale, c.causal, ctx.data(), lse.data());
    restore_rows(c, n, b, ctx, lse, want);
  }
  res.expect_close("out", read_out(c, out), want, tolerance(c.dt));
  const Vec q_eff_ref = emu_ref::absorbed_query(n.q.values, w_kr.values, int64_t(c.B) * c.Tq, H, D, Dr, Rk);
  res.expect_close("q_eff", read_f32(q_eff, q_eff_ref.size()), q_eff_ref, tolerance(c.dt));
  return res;
}

// A device that fits exactly one attention stage of the case (no double buffering).
emu::DeviceConfig one_stage(const QuantCase& c, int sms) {
  emu::DeviceConfig d;
  d.sm_count = sms;
  d.smem_per_block_optin =
      c.latent ? int(vdproj::cuda::latent_attn_min_smem_bytes(c.dt, c.H, c.Tq, c.Dr, c.key_rank(), c.R, c.joint, c.ct))
               : int(vdproj::cuda::attn_min_smem_bytes(c.dt, c.D, vdproj::cuda::heads_per_tile(c.H, c.Tq), c.R, c.ct));
  d.smem_per_sm = d.smem_per_block_optin + 1024;
  return d;
}

QuantCase make(const char* name, DType dt, bool latent, int D, int B, int H, int Tq, int R, int Tmax, int Tnew,
               std::vector<int> seqlens) {
  QuantCase c;
  c.name = name;
  c.dt = dt;
  c.latent = latent;
  c.D = D; c.B = B; c.H = H; c.Tq = Tq; c.R = R; c.Tmax = Tmax; c.Tnew = Tnew;
  c.seqlens = std::move(seqlens);
  return c;
}

// Per cache type: both chains through split and unsplit, one and two stages, ragged lengths,
// strided caches and scales, an empty sequence and a full cache, all-zero rows (scale 1), the
// separate and the joint latent, Dr 0 and 16, 8 and 16 rows per latent block.
void add_cache_type_cases(CacheType ct, std::vector<Case>& cases) {
  const std::string tag = std::string("quant/") + cache_name(ct) + "/";
  auto add = [&](QuantCase c, int one_stage_sms = 0) {
    c.ct = ct;
    c.name = tag + (c.latent ? "latent/" : "vonly/") + dtype_name(c.dt) + "/" + c.name;
    if (one_stage_sms > 0) c.dev = one_stage(c, one_stage_sms);
    cases.push_back(Case{c.name, [c] { return c.latent ? run_latent(c) : run_vonly(c); }});
  };
  // V-only: one new token, ragged lengths, strided caches and scales, several splits, two stages.
  QuantCase a = make("D64-tnew1-ragged-strided-splits", DType::kFloat32, false, 64, 2, 16, 1, 64, 160, 1, {37, 130});
  a.strided = true;
  a.want_splits = 2;
  a.want_stages = 2;
  add(a);
  // V-only: three new tokens (one all zeros), a full cache and an empty sequence, D = 128,
  // R = 80, one stage and one split.
  QuantCase b = make("D128-tnew3-zero-row-full-cache-one-stage", DType::kBFloat16, false, 128, 3, 4, 3, 80, 67, 3,
                     {29, 0, 64});  // the full sequence last: a read past Tmax leaves the buffer
  b.bias = false;
  b.zero_token = true;
  b.want_splits = 1;
  b.want_stages = 1;
  add(b, 1);
  // Latent, separate latents, Dr = 16: ragged lengths, strided, several splits, two stages.
  QuantCase l = make("sep-dr16-tnew1-ragged-strided-splits", DType::kFloat32, true, 64, 2, 4, 1, 64, 160, 1, {37, 130});
  l.Dr = 16;
  l.Rk = 48;
  l.strided = true;
  l.want_splits = 2;
  l.want_stages = 2;
  add(l);
  // Latent, joint latent, Dr = 0 (scale-1 rotary rows), three new tokens (one all zeros), an
  // empty sequence and a full cache, 9 rows (two per warp), one stage.
  QuantCase j = make("joint-dr0-tnew3-zero-row-one-stage", DType::kFloat16, true, 64, 3, 3, 3, 64, 67, 3, {64, 0, 29});
  j.joint = true;
  j.bias = false;
  j.zero_token = true;
  j.want_stages = 1;
  add(j, 132);
  // Latent, joint latent, Dr = 16, 16 heads of head_dim 128 (two rows per warp), non-causal.
  QuantCase h = make("joint-dr16-d128-h16-noncausal", DType::kFloat32, true, 128, 2, 16, 1, 96, 90, 1, {40, 89});
  h.joint = true;
  h.Dr = 16;
  h.causal = false;
  add(h);
}

// Every int8 and e4m3 code through the kernels' loads (to_float, load2, load16_as_float) must
// give the model's value exactly (NaN for NaN): subnormal codes are too small to move any output.
Outcome run_decode_table() {
  Outcome res;
  for (CacheType ct : {CacheType::kInt8, CacheType::kE4M3}) {
    alignas(16) uint8_t codes[256];
    for (int c = 0; c < 256; ++c) codes[c] = uint8_t(c);
    size_t bad = 0;
    auto same = [](double got, double want) { return std::isnan(want) ? std::isnan(got) : got == want; };
    for (int c = 0; c < 256; c += 16) {
      float v16[16], v2[16], v1[16];
      if (ct == CacheType::kInt8) {
        const int8_t* p = reinterpret_cast<const int8_t*>(codes + c);
        vdproj::cuda::load16_as_float(p, v16);
        for (int e = 0; e < 16; e += 2) { const float2 f = vdproj::cuda::load2(p + e); v2[e] = f.x; v2[e + 1] = f.y; }
        for (int e = 0; e < 16; ++e) v1[e] = vdproj::cuda::to_float(p[e]);
      } else {
        const __nv_fp8_e4m3* p = reinterpret_cast<const __nv_fp8_e4m3*>(codes + c);
        vdproj::cuda::load16_as_float(p, v16);
        for (int e = 0; e < 16; e += 2) { const float2 f = vdproj::cuda::load2(p + e); v2[e] = f.x; v2[e + 1] = f.y; }
        for (int e = 0; e < 16; ++e) v1[e] = vdproj::cuda::to_float(p[e]);
      }
      for (int e = 0; e < 16; ++e) {
        const double want = dequant(ct, codes[c + e]);
        bad += !same(v16[e], want) + !same(v2[e], want) + !same(v1[e], want);
      }
    }
    res.expect(bad == 0, std::string(cache_name(ct)) + ": " + std::to_string(bad) + " loads differ from the model's code values");
  }
  return res;
}

}  // namespace

void add_quant_cases(std::vector<emu_harness::Case>& cases) {
  cases.push_back(emu_harness::Case{"quant/decode-table", run_decode_table});
  for (CacheType ct : {CacheType::kInt8, CacheType::kE4M3}) add_cache_type_cases(ct, cases);
}
