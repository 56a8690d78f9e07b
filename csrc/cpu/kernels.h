// CPU kernels of vdproj_ext, written once and compiled once per instruction set.
//
// cpu_ops.cpp includes this file several times, each inside a `#pragma GCC target` region,
// with VDPROJ_ISA_NS (namespace) and VDPROJ_VBYTES (vector width in bytes) defined. Vector code
// uses GCC vector extensions, so the same source becomes AVX-512, AVX2+FMA or SSE2 code and
// the package never depends on the build machine's CPU; the op wrappers pick one at run time.
// Everything this file needs is included by prelude.h before the first inclusion
// (a header included inside a target region would be compiled for that target).
//
// No include guard on purpose.

namespace vdproj {
namespace cpu {
namespace VDPROJ_ISA_NS {

namespace {

constexpr int kVBytes = VDPROJ_VBYTES;
constexpr int64_t kKeyBlock = 64;     // keys per block: scores, softmax, then one rank update
constexpr int64_t kTileRows = 64;     // query rows (queries x heads) per attention work item
constexpr int64_t kTileQueryBytes = 32 << 10;  // wide (latent-key) query rows per tile: ~L1
constexpr int64_t kMinSplit = 256;    // fewest keys per flash-decoding split
constexpr int64_t kBwdKeyTile = 64;   // keys owned by one backward work item
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds worth waking a thread for
constexpr int64_t kBatchedRestoreMax = 1 << 20;  // rows x R a call restores at once (4 MB fp32)

template <typename A> struct VecT {
  typedef A type __attribute__((vector_size(VDPROJ_VBYTES)));
  static constexpr int N = kVBytes / static_cast<int>(sizeof(A));
};
template <typename A> using vec_t = typename VecT<A>::type;

template <typename A> inline vec_t<A> vload(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A> inline void vstore(A* p, vec_t<A> v) { std::memcpy(p, &v, sizeof(v)); }

// Horizontal sum by halving, so it becomes a few shuffles rather than per-lane extracts.
template <typename A, int Bytes> struct HSum {
  typedef A v __attribute__((vector_size(Bytes)));
  typedef A h __attribute__((vector_size(Bytes / 2)));
  static inline A run(v x) {
    h lo, hi;
    std::memcpy(&lo, &x, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + Bytes / 2, Bytes / 2);
    return HSum<A, Bytes / 2>::run(lo + hi);
  }
};
template <typename A> struct HSum<A, 16> {
  typedef A v __attribute__((vector_size(16)));
  static inline A run(v x) {
    A s = x[0];
    for (int i = 1; i < 16 / static_cast<int>(sizeof(A)); ++i) s += x[i];
    return s;
  }
};
#if defined(__GNUC__) && __GNUC__ >= 12
// Same halving with register shuffles (memcpy halves can go through the stack).
template <> struct HSum<float, 32> {
  typedef float v __attribute__((vector_size(32)));
  static inline float run(v x) {
    return HSum<float, 16>::run(__builtin_shufflevector(x, x, 0, 1, 2, 3) +
                                __builtin_shufflevector(x, x, 4, 5, 6, 7));
  }
};
template <> struct HSum<float, 64> {
  typedef float v __attribute__((vector_size(64)));
  static inline float run(v x) {
    return HSum<float, 32>::run(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  }
};
template <> struct HSum<double, 32> {
  typedef double v __attribute__((vector_size(32)));
  static inline double run(v x) {
    return HSum<double, 16>::run(__builtin_shufflevector(x, x, 0, 1) +
                                 __builtin_shufflevector(x, x, 2, 3));
  }
};
template <> struct HSum<double, 64> {
  typedef double v __attribute__((vector_size(64)));
  static inline double run(v x) {
    return HSum<double, 32>::run(__builtin_shufflevector(x, x, 0, 1, 2, 3) +
                                 __builtin_shufflevector(x, x, 4, 5, 6, 7));
  }
};
#endif
template <typename A> inline A hsum(vec_t<A> v) { return HSum<A, kVBytes>::run(v); }

// Software prefetch of [p, p + bytes) into L1 (prefetcht0) or L2 (prefetcht2). L2 is only the
// hint: AMD documents it as honoured from Zen 4 on, and on this project's Zen 3 every hint
// filled L1 (bench/prefetch_levels.c: ~4 ticks a load after prefetcht2 as after prefetcht0,
// against ~10 from L2), so there a far prefetch_l2 also takes L1's room. On x86-64 an
// asm volatile: GCC can judge a function made only of __builtin_prefetch calls free of side
// effects and delete its calls, and did so silently (the next-block key prefetches of the V-only
// kernel never ran; adding them back as prefetcht0 made a V-only step ~6% slower).
template <bool kToL2> inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (kToL2)
      asm volatile("prefetcht2 %0" : : "m"(*(c + o)));
    else
      asm volatile("prefetcht0 %0" : : "m"(*(c + o)));
#else
    __builtin_prefetch(c + o, 0, kToL2 ? 1 : 3);
#endif
  }
}
inline void prefetch_l1(const void* p, int64_t bytes) { prefetch_lines<false>(p, bytes); }
inline void prefetch_l2(const void* p, int64_t bytes) { prefetch_lines<true>(p, bytes); }
// One line into L2 (prefetcht2) with its address in a register and no memory operand, for
// loops that keep accumulators in registers. With prefetch_lines' "m" operand, GCC 12 stored
// all twelve of linear_tile's accumulators to the stack on every iteration, as if the asm could
// read them. That made decode_linear 1.1-1.7x slower at 4 and 8 rows (bench/RESULTS.md,
// 2026-12-07). The attention loops keep prefetch_lines: their prefetches sit outside the
// functions that accumulate, and this form measured no faster there.
inline void prefetch_l2_line(const void* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht2 (%0)" : : "r"(p));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

template <typename A> inline A dot(const A* a, const A* b, int64_t n) {
  constexpr int N = VecT<A>::N;
  int64_t i = 0;
  A s = 0;
  if (n >= N) {
    vec_t<A> acc0 = {}, acc1 = {};
    for (; i + 2 * N <= n; i += 2 * N) {
      acc0 += vload(a + i) * vload(b + i);
      acc1 += vload(a + i + N) * vload(b + i + N);
    }
    if (i + N <= n) {
      acc0 += vload(a + i) * vload(b + i);
      i += N;
    }
    s = hsum<A>(acc0 + acc1);
  }
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha * x
template <typename A> inline void axpy(A* y, A alpha, const A* x, int64_t n) {
  constexpr int N = VecT<A>::N;
  int64_t i = 0;
  for (; i + N <= n; i += N) vstore(y + i, vload(y + i) + alpha * vload(x + i));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

template <typename A> inline void scale_row(A* y, A alpha, int64_t n) {
  constexpr int N = VecT<A>::N;
  int64_t i = 0;
  for (; i + N <= n; i += N) vstore(y + i, vload(y + i) * alpha);
  for (; i < n; ++i) y[i] *= alpha;
}

// max(init, s[0], ..., s[n-1]) with std::max's rule (a NaN s[j] is skipped), N lanes at a time
// rather than a chain of dependent scalar maxes (no change above the noise in a decode step).
template <typename A> inline A row_max(const A* s, int64_t n, A init) {
  constexpr int N = VecT<A>::N;
  int64_t j = 0;
  A m = init;
  if (n >= N) {
    vec_t<A> mv = vec_t<A>{} + init;
    for (; j + N <= n; j += N) {
      const vec_t<A> x = vload(s + j);
      mv = mv < x ? x : mv;
    }
    for (int t = 0; t < N; ++t) m = std::max(m, mv[t]);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// exp for float vectors (Cephes expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp).
// Inputs below -87.3 (including -inf) give exactly 0, so masked scores vanish.
inline vec_t<float> vexp(vec_t<float> x) {
  typedef int32_t iv __attribute__((vector_size(VDPROJ_VBYTES)));
  const vec_t<float> zero = {};
  const vec_t<float> lo = zero + -87.33654f, hi = zero + 88.37626f;
  const iv under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec_t<float> magic = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
  vec_t<float> fx = x * 1.44269504088896341f;
  fx = (fx + magic) - magic;
  vec_t<float> r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  vec_t<float> y = zero + 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + r + 1.0f;
  const iv n = __builtin_convertvector(fx, iv);
  const iv bits = (n + 127) << 23;
  vec_t<float> pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  y = y * pow2;
  return under ? zero : y;
}

// Exact (erf) GELU: x * Phi(x) with Phi(x) = erfc(-x / sqrt(2)) / 2. erfc from Numerical
// Recipes' Chebyshev fit (fractional error below 1.2e-7 for every argument), so Phi keeps its
// relative accuracy far into the negative tail, where F.gelu's 1 + erf(x / sqrt(2)) cancels
// (F.gelu(-10.24) is -0.0 in float64, the value -7.0e-24). exp(-z^2) = exp(-x^2 / 2) is taken
// as exp(-ah^2 / 2) * exp(-(|x| - ah)(|x| + ah) / 2), ah being |x| with 12 mantissa bits
// cleared: ah^2 / 2 is exact, where rounding x / sqrt(2) and its square would cost about z^2
// ulps (5e-6 relative at x = -10). NaN stays NaN, +inf gives +inf and -inf NaN, as F.gelu
// does; below float32's normal range the result loses precision, and past x = -13.2 it is 0.
inline float high_half(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  b &= 0xFFFFF000u;
  std::memcpy(&v, &b, sizeof(b));
  return v;
}
inline vec_t<float> high_half(vec_t<float> v) {
  typedef int32_t iv __attribute__((vector_size(VDPROJ_VBYTES)));
  iv b;
  std::memcpy(&b, &v, sizeof(b));
  b &= int32_t(0xFFFFF000u);
  std::memcpy(&v, &b, sizeof(b));
  return v;
}
template <typename V> inline V gelu_of(V x, V zero, V (*exp_fn)(V)) {
  V ax = x < zero ? -x : x;
  ax = ax < 100.0f ? ax : zero + 100.0f;  // Phi(-100) is 0 too, and inf - inf would be NaN
  const V z = ax * 0.70710678118654752f;  // |x| / sqrt(2)
  const V t = 1.0f / (1.0f + 0.5f * z);
  V p = zero + 0.17087277f;
  p = p * t + -0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t + -1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t + -0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t + -1.26551223f;
  const V ah = high_half(ax);
  const V c = 0.5f * t * exp_fn(-0.5f * (ax - ah) * (ax + ah) + p);
  const V tail = exp_fn(-0.5f * ah * ah);  // c * tail = Phi(-|x|)
  // x * c first: Phi's product with x is what may be subnormal, not a factor before it
  return x < zero ? (x * c) * tail : x * (1.0f - c * tail);
}
inline float exp_one(float x) { return std::exp(x); }
inline void gelu_span(float* y, int64_t n) {
  constexpr int64_t N = VecT<float>::N;
  int64_t i = 0;
  for (; i + N <= n; i += N)
    vstore(y + i, gelu_of<vec_t<float>>(vload(y + i), vec_t<float>{}, vexp));
  for (; i < n; ++i) y[i] = gelu_of<float>(y[i], 0.0f, exp_one);
}
inline void gelu_span(double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.5 * y[i] * std::erfc(-y[i] * 0.70710678118654752440);
}

// s[j] = exp(s[j] - shift) for j < n; returns the sum.
inline float exp_row(float* s, int64_t n, float shift) {
  constexpr int N = VecT<float>::N;
  vec_t<float> acc = {};
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const vec_t<float> e = vexp(vload(s + j) - shift);
    vstore(s + j, e);
    acc += e;
  }
  float sum = hsum<float>(acc);
  if (j < n) {  // tail through a padded vector so every element uses the same exp
    float tmp[N];
    for (int t = 0; t < N; ++t) tmp[t] = (j + t < n) ? s[j + t] - shift : -INFINITY;
    const vec_t<float> e = vexp(vload(tmp));
    vstore(tmp, e);
    for (int t = 0; j + t < n; ++t) {
      s[j + t] = tmp[t];
      sum += tmp[t];
    }
  }
  return sum;
}
inline double exp_row(double* s, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// Vectorized upcasts to float32, N values at a time. None may pass a float32 subnormal through
// an arithmetic instruction: with denormals-are-zero set (torch.set_flush_denormal(True)) the
// CPU reads it as zero, and the narrow format's subnormals would silently vanish. So the
// AVX-512 and AVX2 builds widen e4m3 to fp16 bits and convert with vcvtph2ps (F16C, which
// converts fp16 subnormals whatever the denormal mode), and the baseline build (no F16C) takes
// a narrow subnormal's value from an integer conversion of its mantissa bits.
template <typename U, int N> struct WideBits {
  typedef U narrow __attribute__((vector_size(N * sizeof(U))));
  typedef uint32_t wide __attribute__((vector_size(N * 4)));
  static inline wide load(const void* p) {
    narrow x;
    std::memcpy(&x, p, sizeof(x));
    return __builtin_convertvector(x, wide);
  }
};
inline vec_t<float> bits_as_float(typename WideBits<uint8_t, VecT<float>::N>::wide w) {
  vec_t<float> f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// N bytes widened to N 32-bit lanes, zero- or sign-extended. GCC 12 lowers the equivalent
// __builtin_convertvector of byte vectors to scalar code (16 vcvtsi2ss per vector, measured 2x
// slower than a float32 cache), hence the intrinsics.
template <bool kSigned>
inline typename WideBits<uint8_t, VecT<float>::N>::wide widen_bytes(const void* p) {
  typename WideBits<uint8_t, VecT<float>::N>::wide w;
#if VDPROJ_VBYTES == 64
  const __m128i x = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m512i y = kSigned ? _mm512_cvtepi8_epi32(x) : _mm512_cvtepu8_epi32(x);
#elif VDPROJ_VBYTES == 32
  const __m128i x = _mm_loadl_epi64(static_cast<const __m128i*>(p));
  const __m256i y = kSigned ? _mm256_cvtepi8_epi32(x) : _mm256_cvtepu8_epi32(x);
#else
  uint32_t y[4];
  for (int i = 0; i < 4; ++i) {
    const uint8_t b = static_cast<const uint8_t*>(p)[i];
    y[i] = kSigned ? static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(b))) : b;
  }
#endif
  std::memcpy(&w, &y, sizeof(w));
  return w;
}
// N 16-bit values zero-extended to N 32-bit lanes. GCC 12 splits the __builtin_convertvector
// of a 16 x uint16 vector into two 256-bit halves (load, extract, two widenings, insert: six
// operations where one vpmovzxwd does), hence the intrinsics here too.
inline typename WideBits<uint8_t, VecT<float>::N>::wide widen_halves(const void* p) {
#if VDPROJ_VBYTES == 64
  typename WideBits<uint8_t, VecT<float>::N>::wide w;
  const __m512i y = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  std::memcpy(&w, &y, sizeof(w));
  return w;
#elif VDPROJ_VBYTES == 32
  typename WideBits<uint8_t, VecT<float>::N>::wide w;
  const __m256i y = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  std::memcpy(&w, &y, sizeof(w));
  return w;
#else
  return WideBits<uint16_t, VecT<float>::N>::load(p);
#endif
}

// bf16 -> float32: the high half of a float32.
inline vec_t<float> upcast_bf16(const c10::BFloat16* p) {
  return bits_as_float(widen_halves(p) << 16);
}
// fp16 -> float32 (1 sign, 5 exponent, 10 mantissa bits; bias 15). The AVX-512 and AVX2
// variants are compiled with F16C (kernel_variants.h): one vcvtph2ps.
inline vec_t<float> upcast_f16(const c10::Half* p) {
#if VDPROJ_VBYTES == 64
  vec_t<float> f;
  const __m512 y = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&f, &y, sizeof(f));
  return f;
#elif VDPROJ_VBYTES == 32
  vec_t<float> f;
  const __m256 y = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&f, &y, sizeof(f));
  return f;
#else
  // Normals: exponent rebiased (15 -> 127) in the integer domain; subnormals (exponent 0):
  // mantissa * 2^-24; inf / NaN (exponent all ones): exponent all ones in float32 too.
  typedef int32_t lanes __attribute__((vector_size(VDPROJ_VBYTES)));
  const auto w = WideBits<uint16_t, VecT<float>::N>::load(p);
  const auto mag = (w & 0x7FFFu) << 13;
  const auto exponent = w & 0x7C00u;
  lanes mant;
  const auto m = w & 0x3FFu;
  std::memcpy(&mant, &m, sizeof(mant));
  const vec_t<float> sub = __builtin_convertvector(mant, vec_t<float>) * 0x1p-24f;
  typename WideBits<uint8_t, VecT<float>::N>::wide sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  auto ob = exponent == 0x7C00u ? (mag | 0x7F800000u) : mag + (112u << 23);
  ob = exponent == 0u ? sub_bits : ob;
  return bits_as_float(ob | ((w & 0x8000u) << 16));
#endif
}
// float8_e4m3fn -> float32 (1 sign, 4 exponent, 3 mantissa bits; bias 7; no inf, and only
// S.1111.111 is NaN).
// With F16C: e4m3 bits moved to fp16's fields (exponent bias 7 -> 15, so the fp16 value is
// 2^-8 times the e4m3 one, subnormals included), the NaN codes made fp16 NaNs, then vcvtph2ps
// and one multiply by 2^8 of a float32 that is never subnormal.
inline vec_t<float> upcast_e4m3(const uint8_t* p) {
#if VDPROJ_VBYTES == 64 || VDPROJ_VBYTES == 32
#if VDPROJ_VBYTES == 64
  using H = __m256i;  // 16 fp16 lanes
  const H w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#define VDPROJ_E4M3_OP(op) _mm256_##op##_epi16
#define VDPROJ_E4M3_BITS(op) _mm256_##op##_si256
#else
  using H = __m128i;  // 8 fp16 lanes
  const H w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#define VDPROJ_E4M3_OP(op) _mm_##op##_epi16
#define VDPROJ_E4M3_BITS(op) _mm_##op##_si128
#endif
  // w << 7: sign at bit 14, exponent at 13:10, mantissa at 9:7; adding bit 14 to itself moves
  // the sign to bit 15.
  H t = VDPROJ_E4M3_OP(slli)(w, 7);
  t = VDPROJ_E4M3_OP(add)(t, VDPROJ_E4M3_BITS(and)(t, VDPROJ_E4M3_OP(set1)(0x4000)));
  const H nan = VDPROJ_E4M3_OP(cmpeq)(VDPROJ_E4M3_BITS(and)(w, VDPROJ_E4M3_OP(set1)(0x7F)),
                                      VDPROJ_E4M3_OP(set1)(0x7F));
  t = VDPROJ_E4M3_BITS(or)(t, nan);  // all ones: an fp16 NaN
#undef VDPROJ_E4M3_OP
#undef VDPROJ_E4M3_BITS
  vec_t<float> f;
#if VDPROJ_VBYTES == 64
  const __m512 y = _mm512_mul_ps(_mm512_cvtph_ps(t), _mm512_set1_ps(256.0f));
#else
  const __m256 y = _mm256_mul_ps(_mm256_cvtph_ps(t), _mm256_set1_ps(256.0f));
#endif
  std::memcpy(&f, &y, sizeof(f));
  return f;
#else
  // Normals: exponent rebiased (7 -> 127) in the integer domain; subnormals (exponent 0):
  // mantissa * 2^-9; S.1111.111: NaN.
  typedef int32_t lanes __attribute__((vector_size(VDPROJ_VBYTES)));
  const auto w = widen_bytes<false>(p);
  const auto mag7 = w & 0x7Fu;
  lanes m;
  std::memcpy(&m, &mag7, sizeof(m));
  const vec_t<float> sub = __builtin_convertvector(m, vec_t<float>) * 0x1p-9f;
  typename WideBits<uint8_t, VecT<float>::N>::wide sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  auto ob = mag7 < 8u ? sub_bits : (mag7 << 20) + (120u << 23);
  ob = mag7 == 0x7Fu ? 0x7FC00000u : ob;
  return bits_as_float(ob | ((w & 0x80u) << 24));
#endif
}
inline vec_t<float> upcast_i8(const int8_t* p) {
  typedef int32_t lanes __attribute__((vector_size(VDPROJ_VBYTES)));
  const auto w = widen_bytes<true>(p);
  lanes x;
  std::memcpy(&x, &w, sizeof(x));
  return __builtin_convertvector(x, vec_t<float>);
}

// One stored element as float32 (the scalar tails of the loops below).
inline float e4m3_to_float(uint8_t bits) {
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
}

// dst[i] = src[i] (upcast) * scale, float32 destination, vectorized.
template <typename S, typename Up, typename Scalar>
inline void convert_row(float* dst, const S* src, int64_t n, float scale, Up up, Scalar one) {
  constexpr int N = VecT<float>::N;
  int64_t i = 0;
  for (; i + N <= n; i += N) vstore(dst + i, up(src + i) * scale);
  for (; i < n; ++i) dst[i] = one(src[i]) * scale;
}

// Storage <-> accumulation. bf16/fp16 are upcast to float32 here (vectorized); float32 and
// float64 copy.
template <typename A, typename T> inline void load_row(A* dst, const T* src, int64_t n) {
  if constexpr (std::is_same<A, T>::value) {
    std::memcpy(dst, src, n * sizeof(A));
  } else if constexpr (std::is_same<A, float>::value && std::is_same<T, c10::BFloat16>::value) {
    convert_row(dst, src, n, 1.0f, upcast_bf16, [](c10::BFloat16 x) { return float(x); });
  } else if constexpr (std::is_same<A, float>::value && std::is_same<T, c10::Half>::value) {
    convert_row(dst, src, n, 1.0f, upcast_f16, [](c10::Half x) { return float(x); });
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(static_cast<float>(src[i]));
  }
}
template <typename T, typename A> inline void store_row(T* dst, const A* src, int64_t n) {
  if constexpr (std::is_same<A, T>::value) {
    std::memcpy(dst, src, n * sizeof(A));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// A quantized row (SPEC 3c) in accumulation precision: stored.float() * scale.
template <typename A>
inline void dequantize_row(A* dst, const void* src, CacheKind kind, float scale, int64_t n) {
  if constexpr (std::is_same<A, float>::value) {
    if (kind == CacheKind::I8)
      convert_row(dst, static_cast<const int8_t*>(src), n, scale, upcast_i8,
                  [](int8_t x) { return float(x); });
    else
      convert_row(dst, static_cast<const uint8_t*>(src), n, scale, upcast_e4m3, e4m3_to_float);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float x = kind == CacheKind::I8 ? float(static_cast<const int8_t*>(src)[i])
                                            : e4m3_to_float(static_cast<const uint8_t*>(src)[i]);
      dst[i] = static_cast<A>(x * scale);
    }
  }
}

// Symmetric absmax quantization of one row (SPEC 3c), in float32 and in the order of
// vdproj_ext/ops/quant.py (so both write the same bytes): scale = max|x| / qmax (1 for a row of
// zeros), stored = round-half-even(x / scale) for int8, e4m3(x / scale) for float8_e4m3fn.
inline void quantize_row(const float* x, int64_t n, CacheKind kind, void* dst, float* scale_out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  float scale = amax / (kind == CacheKind::I8 ? 127.0f : 448.0f);
  if (amax == 0.0f) scale = 1.0f;
  if (kind == CacheKind::I8) {
    int8_t* d = static_cast<int8_t*>(dst);
    for (int64_t i = 0; i < n; ++i)
      d[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / scale))));
  } else {
    uint8_t* d = static_cast<uint8_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Float8_e4m3fn(x[i] / scale).x;
  }
  *scale_out = scale;
}

// Stored rows read in place, N values at a time in accumulation precision: the upcast or the
// dequantization (without its scale: a row's scale multiplies whatever it feeds) happens in
// registers. kScaled: the rows come with scales (a quantized cache).
template <typename S> struct RowLoader {  // float32 / float64: the values themselves
  using E = S;
  static constexpr bool kScaled = false;
  static constexpr bool kPairs = false;  // vec2 (Bf16PairRows)
  static vec_t<S> vec(const E* p) { return vload(p); }
  static S one(E x) { return x; }
};
template <> struct RowLoader<c10::BFloat16> {
  using E = c10::BFloat16;
  static constexpr bool kScaled = false;
  static constexpr bool kPairs = false;
  static vec_t<float> vec(const E* p) { return upcast_bf16(p); }
  static float one(E x) { return float(x); }
};
template <> struct RowLoader<c10::Half> {
  using E = c10::Half;
  static constexpr bool kScaled = false;
  static constexpr bool kPairs = false;
  static vec_t<float> vec(const E* p) { return upcast_f16(p); }
  static float one(E x) { return float(x); }
};
struct Int8Rows {
  using E = int8_t;
  static constexpr bool kScaled = true;
  static constexpr bool kPairs = false;
  static vec_t<float> vec(const E* p) { return upcast_i8(p); }
  static float one(E x) { return float(x); }
};
struct E4m3Rows {
  using E = uint8_t;
  static constexpr bool kScaled = true;
  static constexpr bool kPairs = false;
  static vec_t<float> vec(const E* p) { return upcast_e4m3(p); }
  static float one(E x) { return e4m3_to_float(x); }
};
// bf16 rows read 2N values at a time as N 32-bit words: the low halves are the even elements,
// the high halves the odd ones, so a shift and an and (in-lane) upcast both, where vec takes a
// widening shuffle and a shift per N. The price is the order: a chunk of 2N values comes out
// as its N even elements, then its N odd ones. The kernels keep the query and the
// accumulators in that order too (pair_order); a shorter rest is read in place by vec.
struct Bf16PairRows {
  using E = c10::BFloat16;
  static constexpr bool kScaled = false;
  static constexpr bool kPairs = true;
  static vec_t<float> vec(const E* p) { return upcast_bf16(p); }
  static void vec2(const E* p, vec_t<float>& even, vec_t<float>& odd) {
    typename WideBits<uint8_t, VecT<float>::N>::wide w;
    std::memcpy(&w, p, sizeof(w));
    even = bits_as_float(w << 16);
    odd = bits_as_float(w & 0xFFFF0000u);
  }
  static float one(E x) { return float(x); }
};

// The bf16 loader of the fused path. Pairs in the AVX2 build, where they measured 5-12% faster
// than reading in order (bf16 decode steps at issue 11's shapes, 2 threads, same-process A/B,
// bench/RESULTS.md); the AVX-512 build keeps the in-order widening, as pairs there measured
// 0.86-1.01x in the same A/B on a Zen 5 EPYC (2026-12-06), though 3-11% faster per position in
// bench/kernel_phases.py --dtypes bfloat16-pairs,bfloat16-inorder.
constexpr bool kBf16Pairs = kVBytes == 32;
using Bf16Rows = std::conditional_t<kBf16Pairs, Bf16PairRows, RowLoader<c10::BFloat16>>;

// n values into the order Bf16PairRows reads them in (to_pairs) or back: each whole chunk of
// 2N as its even elements, then its odd ones; the rest unchanged.
inline void pair_order(float* x, int64_t n, bool to_pairs) {
  constexpr int N = VecT<float>::N;
  float t[2 * N];
  for (int64_t c = 0; c + 2 * N <= n; c += 2 * N) {
    std::memcpy(t, x + c, sizeof(t));
    for (int i = 0; i < N; ++i) {
      if (to_pairs) {
        x[c + i] = t[2 * i];
        x[c + N + i] = t[2 * i + 1];
      } else {
        x[c + 2 * i] = t[i];
        x[c + 2 * i + 1] = t[N + i];
      }
    }
  }
}

// A contiguous (rows, cols) matrix in accumulation precision: the tensor itself, or an
// upcast copy when it is stored as bf16/fp16.
template <typename A, typename T> struct AsAcc {
  std::vector<A> buf;
  const A* ptr = nullptr;
  AsAcc(const void* src, int64_t n) {
    if (src == nullptr) return;
    if constexpr (std::is_same<A, T>::value) {
      ptr = static_cast<const A*>(src);
    } else {
      buf.resize(n);
      const T* s = static_cast<const T*>(src);
      at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) buf[i] = static_cast<A>(static_cast<float>(s[i]));
      });
      ptr = buf.data();
    }
  }
};

// acc[RT rows, CT vectors] += p[RT rows, nk] @ v[nk, CT vectors], the accumulators held in
// registers across the whole key block: each v row chunk is loaded once for RT rows.
template <typename A, int RT, int CT, typename L = RowLoader<A>>
inline void rank_update_tile(A* acc, int64_t lda, const A* p, int64_t ldp,
                             const typename L::E* v, int64_t ldv, int64_t nk) {
  constexpr int N = VecT<A>::N;
  vec_t<A> c[RT][CT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < CT; ++t) c[r][t] = vload(acc + r * lda + t * N);
  for (int64_t j = 0; j < nk; ++j) {
    vec_t<A> x[CT];
    if constexpr (L::kPairs && CT % 2 == 0) {
      for (int t = 0; t < CT; t += 2) L::vec2(v + j * ldv + t * N, x[t], x[t + 1]);
    } else {
      for (int t = 0; t < CT; ++t) x[t] = L::vec(v + j * ldv + t * N);
    }
    for (int r = 0; r < RT; ++r) {
      const A pr = p[r * ldp + j];
      for (int t = 0; t < CT; ++t) c[r][t] += pr * x[t];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < CT; ++t) vstore(acc + r * lda + t * N, c[r][t]);
}

// acc (rows, ncols; row stride lda) += p (rows, nk; row stride ldp) @ v (nk, ncols; ldv), v read
// through the loader L (stored values in place: float32 / float64 by default). With
// Bf16PairRows, acc's columns are in pair_order.
template <typename A, typename L = RowLoader<A>>
void rank_update(A* acc, int64_t lda, const A* p, int64_t ldp, const typename L::E* v,
                 int64_t ldv, int64_t rows, int64_t nk, int64_t ncols) {
  constexpr int N = VecT<A>::N;
  // 16 (AVX-512) or 8 accumulator registers. Rows stored narrower than A are converted once
  // per row tile, so their tiles take 8 rows (a decode step's heads) by fewer columns.
  constexpr bool converting = !std::is_same<typename L::E, A>::value;
  // Pairs: two vectors per load, so column tiles of 2N; with AVX2's 16 registers 4 rows.
  // int8 with AVX2: 4 rows by 3 vectors (12 accumulators), which measured 0-9% faster decode
  // steps than 8 by 1 (same-process A/B, 2 threads, issue 11's shapes and (1, 2048),
  // 2026-12-06); e4m3, whose upcast costs more, was 5-25% slower so and keeps 8 by 1. With
  // AVX-512, 4 by 3, 8 by 3 and 4 by 4 int8 tiles were 0.98-1.03x its 8 by 2 (Zen 5, same day).
  constexpr bool int8_avx2 = std::is_same<L, Int8Rows>::value && kVBytes == 32;
  constexpr int RT = converting && !int8_avx2 && !(L::kPairs && kVBytes < 64) ? 8 : 4;
  constexpr int CT = int8_avx2 ? 3 : L::kPairs ? 2 : (kVBytes >= 64 ? 4 : 2) / (converting ? 2 : 1);
  int64_t c = 0;
  // Column chunks outermost: the block's v columns stay in L1 while all rows use them.
  for (; c + CT * N <= ncols; c += CT * N) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT)
      rank_update_tile<A, RT, CT, L>(acc + r * lda + c, lda, p + r * ldp, ldp, v + c, ldv, nk);
    for (; r < rows; ++r)
      rank_update_tile<A, 1, CT, L>(acc + r * lda + c, lda, p + r * ldp, ldp, v + c, ldv, nk);
  }
  for (; c + N <= ncols; c += N) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT)
      rank_update_tile<A, RT, 1, L>(acc + r * lda + c, lda, p + r * ldp, ldp, v + c, ldv, nk);
    for (; r < rows; ++r)
      rank_update_tile<A, 1, 1, L>(acc + r * lda + c, lda, p + r * ldp, ldp, v + c, ldv, nk);
  }
  if (c < ncols) {
    for (int64_t r = 0; r < rows; ++r) {
      A* a = acc + r * lda;
      for (int64_t j = 0; j < nk; ++j) {
        const A pr = p[r * ldp + j];
        const typename L::E* vr = v + j * ldv;
        for (int64_t cc = c; cc < ncols; ++cc) a[cc] += pr * L::one(vr[cc]);
      }
    }
  }
}

// rank_update for few rows (the absorbed query: one per sequence, or a handful): whole groups
// of four rows through rank_update, and a rest of rows one at a time with up to twelve column
// vectors of accumulators, independent multiply-add chains (rank_update's single-row tiles
// hold two, and wait on them).
template <typename A>
void rank_update_few_rows(A* acc, int64_t lda, const A* p, int64_t ldp, const A* v, int64_t ldv,
                          int64_t rows, int64_t nk, int64_t ncols) {
  constexpr int N = VecT<A>::N;
  const int64_t whole = rows / 4 * 4;
  if (whole > 0) rank_update<A>(acc, lda, p, ldp, v, ldv, whole, nk, ncols);
  for (int64_t r = whole; r < rows; ++r) {
    A* a = acc + r * lda;
    const A* pr = p + r * ldp;
    int64_t c = 0;
    for (; c + 12 * N <= ncols; c += 12 * N)
      rank_update_tile<A, 1, 12>(a + c, lda, pr, ldp, v + c, ldv, nk);
    for (; c + 4 * N <= ncols; c += 4 * N)
      rank_update_tile<A, 1, 4>(a + c, lda, pr, ldp, v + c, ldv, nk);
    for (; c + N <= ncols; c += N) rank_update_tile<A, 1, 1>(a + c, lda, pr, ldp, v + c, ldv, nk);
    for (; c < ncols; ++c) {
      A s = a[c];
      for (int64_t j = 0; j < nk; ++j) s += pr[j] * v[j * ldv + c];
      a[c] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Forward / decode attention in the absorbed form.
//
// A work item owns a tile of query rows (queries x heads) of one sequence and a range of keys.
// Per block of kKeyBlock keys it computes the scores of every row, updates the online softmax
// (running max m, running sum l), and adds P_block @ V_c_block to the R-wide accumulators of
// all rows at once, so each V_c row is read once for all heads. Restore (ctx @ w_r[h].T + b_r)
// runs once per output row at the end.
//
// A key is [per-head segment (Dk) | shared segment (Dl)] (AttnArgs). The V-only ops have no
// shared segment and keep their own score loop (kShared = false); the latent-key ops score a
// key for a group of heads at once, so each shared K_c (or joint latent) vector is loaded once
// for all of them, like multi-query attention.

template <typename A> struct TileState {
  A* m;
  A* l;
  A* acc;  // rows x R
};

// One cache segment of one sequence: row j (head h) at base + (j*st + h*sh) elements, stored in
// the model's dtype T or quantized (kind) with one scale per row at scale[j*sc_st + h*sc_sh].
template <typename T> struct Segment {
  const void* base;
  int64_t st, sh;
  CacheKind kind;
  const float* scale;
  int64_t sc_st, sc_sh;
  const void* row(int64_t j, int64_t h = 0) const {
    const int64_t bytes = kind == CacheKind::Model ? int64_t(sizeof(T)) : 1;
    return static_cast<const char*>(base) + (j * st + h * sh) * bytes;
  }
  // Rows j0 .. j0+nk-1, heads 0 .. heads-1, n values each, into dst (row-major (nk, heads, n))
  // in accumulation precision: upcast, or dequantized with their scales (with_scale false:
  // the stored values alone). One switch per block rather than per row: a decode step loads
  // ten short rows per key.
  template <typename A>
  void load_block(A* dst, int64_t j0, int64_t nk, int64_t heads, int64_t n,
                  bool with_scale = true) const {
    // Rows a block ahead are prefetched into L2 as these are converted: without it a core
    // waits on each new row (measured when int8 caches took this path: the conversion was 35%
    // of a decode step, mostly stalls, and the prefetch made the step 25% faster).
    const int64_t row_bytes = n * (kind == CacheKind::Model ? int64_t(sizeof(T)) : 1);
    auto each = [&](auto&& one) {
      for (int64_t jj = 0; jj < nk; ++jj)
        for (int64_t h = 0; h < heads; ++h) {
          const float sc = with_scale && scale ? scale[(j0 + jj) * sc_st + h * sc_sh] : 1.0f;
          prefetch_l2(row(j0 + jj + kKeyBlock, h), row_bytes);
          one(dst + (jj * heads + h) * n, row(j0 + jj, h), sc);
        }
    };
    switch (kind) {
      case CacheKind::Model:
        each([&](A* d, const void* src, float) { load_row(d, static_cast<const T*>(src), n); });
        break;
      case CacheKind::I8:
        each([&](A* d, const void* src, float sc) {
          dequantize_row(d, src, CacheKind::I8, sc, n);
        });
        break;
      case CacheKind::E4M3:
        each([&](A* d, const void* src, float sc) {
          dequantize_row(d, src, CacheKind::E4M3, sc, n);
        });
        break;
    }
  }
};

// Sequence b's part of a cache (element strides sb, st, sh) and of its scales.
template <typename T>
inline Segment<T> sequence_segment(const void* base, int64_t b, int64_t sb, int64_t st,
                                   int64_t sh, CacheKind kind, RowScales sc) {
  const int64_t bytes = kind == CacheKind::Model ? int64_t(sizeof(T)) : 1;
  return {static_cast<const char*>(base) + b * sb * bytes, st, sh, kind,
          sc.p != nullptr ? sc.p + b * sc.sb : nullptr, sc.st, sc.sh};
}

// The keys and values of one sequence: the per-head key segment, the shared one (unused
// without one) and the values.
template <typename T> struct KeySource {
  Segment<T> k, l, v;
};
template <typename A> struct Scratch {
  float* kscale;  // H per-head key scales of one key (fused path, quantized caches)
  A* s;  // scores, rows x kKeyBlock
  A* k;  // upcast key blocks (bf16 / fp16 storage only)
  A* l;
  A* v;
  A* q;  // the tile's queries in pair_order (Bf16PairRows)
};

// out[r * ldo] = hsum(acc[r]) + tail[r] for RB rows. Eight float rows are reduced together by a
// transpose tree (about 40 shuffles and adds for eight 16-lane vectors instead of about 80 for
// eight separate halvings).
template <typename A, int RB>
inline void hsum_rows(const vec_t<A>* acc, const A* tail, A* out, int64_t ldo) {
#if defined(__GNUC__) && __GNUC__ >= 12
  if constexpr (std::is_same<A, float>::value && RB == 8 && kVBytes >= 32) {
    typedef float v8 __attribute__((vector_size(32)));
    v8 a[8];
    for (int r = 0; r < 8; ++r) {
      if constexpr (kVBytes == 64)
        a[r] = __builtin_shufflevector(acc[r], acc[r], 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(acc[r], acc[r], 8, 9, 10, 11, 12, 13, 14, 15);
      else
        std::memcpy(&a[r], &acc[r], sizeof(v8));
    }
    v8 p[4], q[2];
    for (int i = 0; i < 4; ++i)  // [r0 r1 pairs] -> lanes alternate the two rows
      p[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)  // four rows per 128-bit half
      q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 sums = __builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int r = 0; r < 8; ++r) out[r * ldo] = sums[r] + tail[r];
    return;
  }
#endif
  for (int r = 0; r < RB; ++r) out[r * ldo] = hsum<A>(acc[r]) + tail[r];
}

// Scores of one key for RB consecutive heads of one query: out[r * ldo] = q_r . [k + r*ksh | l],
// with q_r = q + r*ldq = [per-head part (Dk) | shared part (Dl)]. Each shared vector is loaded
// once for the RB heads, and a head's two segments share one accumulator. Measured and not
// kept: two keys at a time (sharing the query loads) is ~9% faster from cache but ~1.6x slower
// streaming from memory, and a separate pass over the block's shared segments ~25% slower.
//
// The key is read through the loader L (stored values in place: float32 / float64 by default;
// bf16, fp16 or a quantized cache upcast in registers). With a quantized cache, head r's
// per-head segment is scaled by kscale[r] and the shared one by lscale: one multiply per loaded
// vector, so the value used is SPEC 3c's float32 stored * scale. With Bf16PairRows each of q's
// two segments is in pair_order.
template <typename A, int RB, typename L = RowLoader<A>>
inline void key_scores_rows(const A* q, int64_t ldq, const typename L::E* k, int64_t ksh,
                            int64_t Dk, const typename L::E* l, int64_t Dl, A* out, int64_t ldo,
                            const float* kscale = nullptr, float lscale = 1.0f) {
  constexpr int N = VecT<A>::N;
  vec_t<A> acc[RB];
  A tail[RB];
  for (int r = 0; r < RB; ++r) {
    acc[r] = vec_t<A>{};
    tail[r] = 0;
  }
  auto scaled = [&](vec_t<A> x, float sc) {
    if constexpr (L::kScaled) x *= sc;
    return x;
  };
  auto scaled_one = [&](A x, float sc) {
    if constexpr (L::kScaled) x *= sc;
    return x;
  };
  static_assert(!(L::kPairs && L::kScaled), "pairs of scaled rows");
  int64_t c = 0;
  if constexpr (L::kPairs)  // q in pair_order
    for (; c + 2 * N <= Dk; c += 2 * N)
      for (int r = 0; r < RB; ++r) {
        vec_t<A> even, odd;
        L::vec2(k + r * ksh + c, even, odd);
        acc[r] += vload(q + r * ldq + c) * even;
        acc[r] += vload(q + r * ldq + c + N) * odd;
      }
  for (; c + N <= Dk; c += N)
    for (int r = 0; r < RB; ++r)
      acc[r] += vload(q + r * ldq + c) *
                scaled(L::vec(k + r * ksh + c), L::kScaled ? kscale[r] : 1.0f);
  for (; c < Dk; ++c)
    for (int r = 0; r < RB; ++r)
      tail[r] += q[r * ldq + c] *
                 scaled_one(L::one(k[r * ksh + c]), L::kScaled ? kscale[r] : 1.0f);
  const A* ql = q + Dk;
  c = 0;
  if constexpr (L::kPairs)
    for (; c + 2 * N <= Dl; c += 2 * N) {
      vec_t<A> even, odd;
      L::vec2(l + c, even, odd);
      for (int r = 0; r < RB; ++r) {
        acc[r] += vload(ql + r * ldq + c) * even;
        acc[r] += vload(ql + r * ldq + c + N) * odd;
      }
    }
  for (; c + N <= Dl; c += N) {
    const vec_t<A> lv = scaled(L::vec(l + c), lscale);
    for (int r = 0; r < RB; ++r) acc[r] += vload(ql + r * ldq + c) * lv;
  }
  for (; c < Dl; ++c)
    for (int r = 0; r < RB; ++r) tail[r] += ql[r * ldq + c] * scaled_one(L::one(l[c]), lscale);
  hsum_rows<A, RB>(acc, tail, out, ldo);
}

// v, loaded into a register once: GCC otherwise folds a load used by two multiply-adds into
// each of them, which doubles the query loads of key_scores_rows_pair (with int8 rows up to 6%
// slower; Zen 4 issues one 64-byte load a cycle).
template <typename V> inline V in_register(V v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#endif
  return v;
}

// One chunk of 2N query values (q, in pair_order) against two keys read by vec2 (even and
// odd elements e0, o0 and e1, o1): acc0 += q . key0, acc1 += q . key1.
template <typename A>
inline void pair_chunk_fma(vec_t<A>& acc0, vec_t<A>& acc1, const A* q, vec_t<A> e0,
                           vec_t<A> o0, vec_t<A> e1, vec_t<A> o1) {
  const vec_t<A> qe = in_register(vload(q)), qo = in_register(vload(q + VecT<A>::N));
  acc0 += qe * e0;
  acc1 += qe * e1;
  acc0 += qo * o0;
  acc1 += qo * o1;
}

// key_scores_rows for two keys at once (k0/l0 and k1/l1, scales ks0/ls0 and ks1/ls1): each
// query vector loaded serves both keys, which halves the query loads of a score. The fused
// path only: its keys come from L2 (prefetched), where this measured faster; the direct
// float32 path streams keys from memory, where it did not (see key_scores_rows).
// kDk >= 0: the per-head segment's length as a constant (key_scores_pair's static switch).
// With Dk known GCC keeps the 16 accumulators in registers across both segments; with Dk at
// run time it spilled them between the two loops, and the scores of a pair took ~30% longer
// (bench/kernel_phases.py, 2026-12-03).
// kLateSharedScale (a quantized cache whose two shared scales are finite): the shared
// segments first, unscaled, and each key's scale then multiplies the RB accumulators once,
// rather than every vector loaded (with four heads a group, AVX2 loads each shared vector
// twice a key). int8 decode steps 1-5% faster at (8, 16384), 3-14% at (8, 2048) and (4, 4096)
// (AVX2, same-process A/B, 2026-12-07, bench/RESULTS.md). A non-finite scale keeps the
// product per element, so that a NaN or an infinity gives what the float math on the
// dequantized row gives.
template <typename A, int RB, typename L, int kDk = -1, bool kLateSharedScale = false>
__attribute__((always_inline)) inline void key_scores_rows_pair(
    const A* q, int64_t ldq, const typename L::E* k0, const typename L::E* k1, int64_t ksh,
    int64_t Dk_arg, const typename L::E* l0, const typename L::E* l1, int64_t Dl, A* out0,
    A* out1, int64_t ldo, const float* ks0, const float* ks1, float ls0, float ls1) {
  constexpr int N = VecT<A>::N;
  static_assert(!(L::kPairs && L::kScaled), "pairs of scaled rows");
  static_assert(!kLateSharedScale || L::kScaled, "a late scale without scales");
  const int64_t Dk = kDk >= 0 ? kDk : Dk_arg;
  vec_t<A> acc0[RB], acc1[RB];
  A tail0[RB], tail1[RB];
  for (int r = 0; r < RB; ++r) {
    acc0[r] = acc1[r] = vec_t<A>{};
    tail0[r] = tail1[r] = 0;
  }
  auto scaled = [&](auto x, float sc) {
    if constexpr (L::kScaled) x *= sc;
    return x;
  };
  auto per_head_segments = [&] {
    int64_t c = 0;
    if constexpr (L::kPairs)  // q in pair_order
      for (; c + 2 * N <= Dk; c += 2 * N)
        for (int r = 0; r < RB; ++r) {
          vec_t<A> e0, o0, e1, o1;
          L::vec2(k0 + r * ksh + c, e0, o0);
          L::vec2(k1 + r * ksh + c, e1, o1);
          pair_chunk_fma(acc0[r], acc1[r], q + r * ldq + c, e0, o0, e1, o1);
        }
    for (; c + N <= Dk; c += N)
      for (int r = 0; r < RB; ++r) {
        const vec_t<A> qv = in_register(vload(q + r * ldq + c));
        acc0[r] += qv * scaled(L::vec(k0 + r * ksh + c), L::kScaled ? ks0[r] : 1.0f);
        acc1[r] += qv * scaled(L::vec(k1 + r * ksh + c), L::kScaled ? ks1[r] : 1.0f);
      }
    for (; c < Dk; ++c)
      for (int r = 0; r < RB; ++r) {
        tail0[r] += q[r * ldq + c] * scaled(A(L::one(k0[r * ksh + c])), L::kScaled ? ks0[r] : 1.f);
        tail1[r] += q[r * ldq + c] * scaled(A(L::one(k1[r * ksh + c])), L::kScaled ? ks1[r] : 1.f);
      }
  };
  // sc0, sc1: the shared rows' scales, or 1 where the caller applies them afterwards.
  auto shared_segments = [&](float sc0, float sc1) {
    const A* ql = q + Dk;
    int64_t c = 0;
    if constexpr (L::kPairs)
      for (; c + 2 * N <= Dl; c += 2 * N) {
        vec_t<A> e0, o0, e1, o1;
        L::vec2(l0 + c, e0, o0);
        L::vec2(l1 + c, e1, o1);
        for (int r = 0; r < RB; ++r)
          pair_chunk_fma(acc0[r], acc1[r], ql + r * ldq + c, e0, o0, e1, o1);
      }
    for (; c + N <= Dl; c += N) {
      vec_t<A> lv0 = L::vec(l0 + c), lv1 = L::vec(l1 + c);
      if constexpr (!kLateSharedScale) {
        lv0 = scaled(lv0, sc0);
        lv1 = scaled(lv1, sc1);
      }
      for (int r = 0; r < RB; ++r) {
        const vec_t<A> qv = in_register(vload(ql + r * ldq + c));
        acc0[r] += qv * lv0;
        acc1[r] += qv * lv1;
      }
    }
    for (; c < Dl; ++c)
      for (int r = 0; r < RB; ++r) {
        tail0[r] += ql[r * ldq + c] * scaled(A(L::one(l0[c])), sc0);
        tail1[r] += ql[r * ldq + c] * scaled(A(L::one(l1[c])), sc1);
      }
  };
  if constexpr (kLateSharedScale) {
    shared_segments(1.0f, 1.0f);
    for (int r = 0; r < RB; ++r) {
      acc0[r] *= ls0;
      acc1[r] *= ls1;
    }
    if (Dl % N != 0)  // the tails hold only the shared segments' rest so far
      for (int r = 0; r < RB; ++r) {
        tail0[r] *= ls0;
        tail1[r] *= ls1;
      }
    per_head_segments();
  } else {
    per_head_segments();
    shared_segments(ls0, ls1);
  }
  hsum_rows<A, RB>(acc0, tail0, out0, ldo);
  hsum_rows<A, RB>(acc1, tail1, out1, ldo);
}

// key_scores_rows for all H heads of one query: groups of 8 heads, then one at a time
// (kscale: H per-head scales with a quantized cache).
template <typename A, typename L = RowLoader<A>>
inline void key_scores(const A* q, int64_t ldq, const typename L::E* k, int64_t ksh, int64_t Dk,
                       const typename L::E* l, int64_t Dl, int64_t H, A* out, int64_t ldo,
                       const float* kscale = nullptr, float lscale = 1.0f) {
  int64_t h = 0;
  for (; h + 8 <= H; h += 8)
    key_scores_rows<A, 8, L>(q + h * ldq, ldq, k + h * ksh, ksh, Dk, l, Dl, out + h * ldo, ldo,
                             kscale ? kscale + h : nullptr, lscale);
  for (; h < H; ++h)
    key_scores_rows<A, 1, L>(q + h * ldq, ldq, k + h * ksh, ksh, Dk, l, Dl, out + h * ldo, ldo,
                             kscale ? kscale + h : nullptr, lscale);
}

// key_scores for two keys (kscale0/1: their H per-head scales with a quantized cache).
template <typename A, typename L>
inline void key_scores_pair(const A* q, int64_t ldq, const typename L::E* k0,
                            const typename L::E* k1, int64_t ksh, int64_t Dk,
                            const typename L::E* l0, const typename L::E* l1, int64_t Dl,
                            int64_t H, A* out0, A* out1, int64_t ldo, const float* kscale0,
                            const float* kscale1, float lscale0, float lscale1) {
  // Two accumulators per head: eight heads at a time fill 16 of AVX-512's 32 registers. With
  // AVX2's 16 they spill, so four heads at a time, which converts each shared vector twice:
  // worth it but for e4m3, whose upcast costs more than the spills (AVX2, one thread, per
  // position from L1 / L3: float32 step 157 -> 122 / 202 -> 176 ns, bf16 180 -> 149 /
  // 191 -> 161, int8 179 -> 170 / 190 -> 170, e4m3 459 -> 534 / 480 -> 549;
  // bench/kernel_phases.py --isa avx2, 2026-12-03). attend_range's AVX2 and AVX-512 builds
  // now score e4m3 one key at a time, faster still; the unmeasured baseline build keeps pairs.
  constexpr int kHeads = kVBytes >= 64 || std::is_same<L, E4m3Rows>::value ? 8 : 4;
  auto heads_as = [&](auto dk, auto late) {
    constexpr int kDk = decltype(dk)::value;
    constexpr bool kLate = decltype(late)::value;
    int64_t h = 0;
    for (; h + kHeads <= H; h += kHeads)
      key_scores_rows_pair<A, kHeads, L, kDk, kLate>(
          q + h * ldq, ldq, k0 + h * ksh, k1 + h * ksh, ksh, Dk, l0, l1, Dl, out0 + h * ldo,
          out1 + h * ldo, ldo, kscale0 + h, kscale1 + h, lscale0, lscale1);
    for (; h < H; ++h)
      key_scores_rows_pair<A, 1, L, kDk, kLate>(
          q + h * ldq, ldq, k0 + h * ksh, k1 + h * ksh, ksh, Dk, l0, l1, Dl, out0 + h * ldo,
          out1 + h * ldo, ldo, kscale0 + h, kscale1 + h, lscale0, lscale1);
  };
  auto heads = [&](auto dk) {
    if constexpr (L::kScaled) {
      if (Dl > 0 && std::isfinite(lscale0) && std::isfinite(lscale1)) {
        heads_as(dk, std::true_type{});
        return;
      }
    }
    heads_as(dk, std::false_type{});
  };
  // Static switch over the usual rotary widths per head (Dr, or Dk = 0 for the shared latent
  // alone); other widths take the general loop.
  switch (Dk) {
    case 0: heads(std::integral_constant<int, 0>{}); break;
    case 16: heads(std::integral_constant<int, 16>{}); break;
    case 32: heads(std::integral_constant<int, 32>{}); break;
    case 64: heads(std::integral_constant<int, 64>{}); break;
    default: heads(std::integral_constant<int, -1>{}); break;
  }
}

// Online softmax of one block of nk keys for `rows` rows: each row of s (row stride lds)
// becomes P, unnormalized and relative to the running max m, and l and acc (R wide) are
// rescaled to the new max. With v_scale, P is then multiplied by each key's V_c scale (a
// quantized row's scale folded into its weights).
template <typename A>
inline void softmax_block(A* sbuf, int64_t lds, int64_t rows, int64_t nk, TileState<A> st,
                          int64_t R, const A* v_scale) {
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    A* s = sbuf + r * lds;
    A bm = row_max(s, nk, ninf);  // skips NaN scores
    if (bm == ninf) {
      bool nan = false;
      for (int64_t jj = 0; jj < nk; ++jj) nan |= s[jj] != s[jj];
      if (!nan) {  // every key of this block is masked for this row
        for (int64_t jj = 0; jj < nk; ++jj) s[jj] = 0;
        continue;
      }
      bm = 0;  // only NaN visible (a NaN input): any finite max lets it reach l, as it must
    }
    const A mold = st.m[r];
    const A mnew = std::max(mold, bm);
    const A sum = exp_row(s, nk, mnew);
    if (mold != mnew && mold != ninf) {
      const A alpha = std::exp(mold - mnew);
      st.l[r] *= alpha;
      scale_row(st.acc + r * R, alpha, R);
    }
    st.l[r] += sum;
    st.m[r] = mnew;
    if (v_scale != nullptr)
      for (int64_t jj = 0; jj < nk; ++jj) s[jj] *= v_scale[jj];
  }
}

// L void: float32 / float64 caches are read in place ("direct"), others are upcast or
// dequantized block by block into the thread's scratch. L a RowLoader: every segment is stored
// as L::E and read in place, converted in registers if narrower (the fused path: latent keys
// in float32, bf16 / fp16 caches of a float32-accumulating model, or caches all quantized
// alike).
template <typename T, typename A, bool kShared, typename L = void>
void attend_range(const int64_t H, const int64_t Dk, const int64_t Dl_in, const int64_t R,
                  const bool kl_is_vc, const A* qs, int64_t nq, const int64_t* lim,
                  const KeySource<T> src, int64_t j0, int64_t j1, TileState<A> st,
                  const Scratch<A> buf) {
  constexpr bool fused = !std::is_void<L>::value;
  using Loaded = std::conditional_t<fused, L, RowLoader<A>>;
  using E = typename Loaded::E;
  constexpr bool scaled = fused && Loaded::kScaled;
  // direct: the caches are read where they are (float32 / float64 storage, not quantized).
  const bool direct = !fused && std::is_same<T, A>::value && src.k.kind == CacheKind::Model &&
                      src.l.kind == CacheKind::Model && src.v.kind == CacheKind::Model;
  const int64_t Dl = kShared ? Dl_in : 0, Dq = Dk + Dl;
  const bool l_is_v = kShared && kl_is_vc;
  const int64_t rows = nq * H;
  // Bf16PairRows: the queries' segments and the accumulators in the order its vec2 reads
  // the rows in (pair_order), the accumulators put back at the end.
  if constexpr (Loaded::kPairs) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(qs + r * Dq, qs + (r + 1) * Dq, buf.q + r * Dq);
      pair_order(buf.q + r * Dq, Dk, true);
      pair_order(buf.q + r * Dq + Dk, Dl, true);
      pair_order(st.acc + r * R, R, true);
    }
    qs = buf.q;
  }
  // A quantized V_c row's scale multiplies its weights in P rather than each of its R values:
  // always on the fused path; on the scratch path for float32 accumulation only (SPEC 3c's
  // value is the float32 product stored * scale, which a float64 accumulation would not
  // round), and not with the joint latent there (its V_c rows, keys too, are dequantized).
  const bool fold_v_scale =
      scaled || (std::is_same<A, float>::value && src.v.kind != CacheKind::Model && !l_is_v);
  A v_scale[kKeyBlock];
  int64_t maxlim = -1;
  for (int64_t i = 0; i < nq; ++i) maxlim = std::max(maxlim, lim[i]);
  j1 = std::min(j1, maxlim + 1);
  const A ninf = -std::numeric_limits<A>::infinity();
  A* sbuf = buf.s;
  // A converted block goes through scratch in L2 (160 KiB of float32 at the pythia-70m-kv
  // shape): blocks of 16 or 32 keys, which fit L1, measured 40% and 20% slower (per-block
  // softmax work; int8, 2026-12-03).
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, j1 - jb);
    const E* kp;
    const E* lp = nullptr;
    const E* vp;
    int64_t ks_t, ks_h, ls = 0, vs;
    if (fused || direct) {
      kp = static_cast<const E*>(src.k.row(jb));
      vp = static_cast<const E*>(src.v.row(jb));
      ks_t = src.k.st;
      ks_h = src.k.sh;
      vs = src.v.st;
      if constexpr (kShared) {
        lp = static_cast<const E*>(src.l.row(jb));
        ls = src.l.st;
      }
    } else if constexpr (!fused) {
      src.k.load_block(buf.k, jb, nk, H, Dk);
      if (kShared && !l_is_v) src.l.load_block(buf.l, jb, nk, 1, Dl);
      // With fold_v_scale, the stored values as they are; their scales go into P below.
      src.v.load_block(buf.v, jb, nk, 1, R, !fold_v_scale);
      kp = buf.k;
      vp = buf.v;
      ks_t = H * Dk;
      ks_h = Dk;
      vs = R;
      lp = l_is_v ? buf.v : buf.l;
      ls = l_is_v ? R : Dl;
    }
    if (fold_v_scale)
      for (int64_t jj = 0; jj < nk; ++jj) v_scale[jj] = src.v.scale[(jb + jj) * src.v.sc_st];
    // Scores: each key row is read once for all query rows of the tile. Meanwhile prefetch
    // this block's V_c rows into L1 (the rank update walks them column chunk by column chunk,
    // which the hardware prefetcher follows poorly; without it a decode step is about 20%
    // slower) and, for latent keys with AVX-512, the next block's shared rows into L2 (2-11%
    // faster). The per-head key rows are left to the hardware prefetcher: prefetching them as
    // well measured 6-12% slower (next block, into L1 or L2), as did V_c into L2 and K_c two
    // blocks ahead (bench/cpu_decode.py shapes, 2026-12-02). On the AVX2-only EPYC, where the
    // AVX2 build reads float32 latent keys on this direct path, the shared rows' prefetch made
    // it 0-9% slower (three same-process A/Bs at issue 10's shapes, 2026-12-03), so the AVX2
    // build leaves them to the hardware prefetcher too. The fused path reads its rows in place
    // and prefetches all of a later key's rows into L2 as well: four keys ahead with AVX2 and
    // AVX-512 (the same key of the next block in the unmeasured baseline build). Against a
    // block ahead that measured up to 27% faster for bf16 / fp16 caches with AVX2 and the same
    // within noise for int8 and e4m3; with AVX-512 (Zen 5), 1.5-20% faster for every storage,
    // the float32 latent keys included (same-process A/Bs, 2 threads, issue 11's shapes and
    // (1, 2048), 2026-12-06; bench/RESULTS.md).
    constexpr bool prefetch_shared_rows = kVBytes >= 64;
    constexpr int64_t kPrefetchAhead = kVBytes >= 32 ? 4 : kKeyBlock;  // keys
    // The AVX2 build's direct path with latent keys does prefetch each key's rotary rows, four
    // keys ahead into L2: 0-13% faster at issue 10's shapes (K_c's rows as well, or V_c's:
    // slower; the V-only layout's per-head keys, 2 KB a key: 5-13% slower; same-process A/Bs,
    // 2026-12-06, bench/RESULTS.md).
    constexpr bool prefetch_rotary_rows = kShared && kVBytes == 32;
    const int64_t nk_next = std::min(kKeyBlock, j1 - jb - nk);
    // The fused path scores two keys at a time (key_scores_pair) where a query sees both, but
    // for e4m3 with AVX2 or AVX-512: there one key for eight heads (key_scores) measured 6-12%
    // (AVX2) and 4-18% (AVX-512) faster at issue 11's shapes and (1, 2048), both layouts
    // (same-process A/Bs, 2 threads, 2026-12-06), as the pairs take twice the upcasts or spill.
    constexpr bool pair_keys = fused && !(kVBytes >= 32 && std::is_same<L, E4m3Rows>::value);
    for (int64_t jj = 0; jj < nk;) {
      const int64_t step = pair_keys && jj + 1 < nk ? 2 : 1;
      const float* kscale[2] = {buf.kscale, buf.kscale + H};  // H per key of the step
      float lscale[2] = {1.0f, 1.0f};
      for (int64_t u = jj; u < jj + step; ++u) {
        if (fused || direct) {
          // The joint latent's V_c rows are this block's keys: the scores read them already.
          // The fused path's rows are already in L2 (prefetched ahead).
          if (!l_is_v && !fused) prefetch_l1(vp + u * vs, R * sizeof(E));
          if (kShared && !fused && prefetch_shared_rows && u < nk_next)
            prefetch_l2(lp + (u + kKeyBlock) * ls, Dl * sizeof(E));
          const int64_t ahead = u + kPrefetchAhead;
          if (jb + ahead < j1) {
            if (fused && kShared) prefetch_l2(lp + ahead * ls, Dl * sizeof(E));
            if (fused || (prefetch_rotary_rows && direct))
              prefetch_l2(kp + ahead * ks_t, ((H - 1) * ks_h + Dk) * sizeof(E));
            if (fused && !l_is_v) prefetch_l2(vp + ahead * vs, R * sizeof(E));
          }
        }
        if constexpr (scaled) {
          const int64_t j = jb + u;
          const float* row_scales = src.k.scale + j * src.k.sc_st;
          if (src.k.sc_sh == 1) {  // the usual contiguous (B, Tmax, H) scales: read in place
            kscale[u - jj] = row_scales;
          } else {
            for (int64_t h = 0; h < H; ++h) buf.kscale[(u - jj) * H + h] = row_scales[h * src.k.sc_sh];
          }
          if (kShared) lscale[u - jj] = l_is_v ? v_scale[u] : src.l.scale[j * src.l.sc_st];
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        A* srow = sbuf + i * H * kKeyBlock + jj;
        if constexpr (pair_keys) {
          if (step == 2 && jb + jj + 1 <= lim[i]) {
            key_scores_pair<A, Loaded>(qs + i * H * Dq, Dq, kp + jj * ks_t,
                                       kp + (jj + 1) * ks_t, ks_h, Dk, lp + jj * ls,
                                       lp + (jj + 1) * ls, Dl, H, srow, srow + 1, kKeyBlock,
                                       kscale[0], kscale[1], lscale[0], lscale[1]);
            continue;
          }
        }
        for (int64_t u = 0; u < step; ++u) {
          const E* krow = kp + (jj + u) * ks_t;
          if (jb + jj + u > lim[i]) {
            for (int64_t h = 0; h < H; ++h) srow[u + h * kKeyBlock] = ninf;
          } else if (kShared || fused) {
            key_scores<A, Loaded>(qs + i * H * Dq, Dq, krow, ks_h, Dk, lp + (jj + u) * ls, Dl,
                                  H, srow + u, kKeyBlock, kscale[u], lscale[u]);
          } else if constexpr (!fused) {
            for (int64_t h = 0; h < H; ++h)
              srow[u + h * kKeyBlock] = dot(qs + (i * H + h) * Dq, krow + h * ks_h, Dk);
          }
        }
      }
      jj += step;
    }
    softmax_block(sbuf, kKeyBlock, rows, nk, st, R, fold_v_scale ? v_scale : nullptr);
    rank_update<A, Loaded>(st.acc, R, sbuf, kKeyBlock, vp, vs, rows, nk, R);
  }
  if constexpr (Loaded::kPairs)
    for (int64_t r = 0; r < rows; ++r) pair_order(st.acc + r * R, R, false);
}

// Normalize, write ctx and lse, restore: out[h] = ctx[h] @ w_r[h].T + b_r[h], for the rows of
// heads [h0, h1) of a tile. A row that saw no key returns zeros (bias included) and lse = -inf;
// one whose scores held a NaN returns NaN, as float math does.
// With several queries per tile the restore is a small matrix product against w_r[h]
// transposed (wrT, (H, R, D)), so each w_r row is loaded once per tile rather than once per
// query; a single query uses dot products (or restore_rows, see batched_restore).
// out_buf null: the restore is left to restore_rows (batched over the call's sequences); the
// normalized rows stay in rows_buf and empty[r] marks the rows that saw no key.
template <typename T, typename A>
void finalize_rows(const AttnArgs& a, int64_t b, int64_t i0, int64_t nq, int64_t h0, int64_t h1,
                   TileState<A> st, const A* wr, const A* wrT, const A* br, A* rows_buf,
                   A* out_buf, unsigned char* empty_rows = nullptr) {
  const int64_t Tq = a.Tq, H = a.H, D = a.D, R = a.R;
  auto in_range = [&](int64_t r) { return r % H >= h0 && r % H < h1; };
  for (int64_t r = 0; r < nq * H; ++r) {
    if (!in_range(r)) continue;
    const int64_t gi = i0 + r / H, h = r % H;
    A* row = rows_buf + r * R;
    // ctx in accumulation precision (check_backward_extras, csrc/common/checks.h)
    A* ctx = a.ctx ? static_cast<A*>(a.ctx) + ((b * Tq + gi) * H + h) * R : nullptr;
    // l >= 1 once a key was seen; NaN (a NaN input) is not empty and propagates
    const bool empty = st.l[r] == A(0);
    if (empty) {
      std::fill(row, row + R, A(0));
    } else {
      const A inv = A(1) / st.l[r];
      const A* accr = st.acc + r * R;
      for (int64_t c = 0; c < R; ++c) row[c] = accr[c] * inv;
    }
    if (ctx) std::copy(row, row + R, ctx);
    if (a.lse)
      a.lse[(b * H + h) * Tq + gi] =
          empty ? -INFINITY : static_cast<float>(st.m[r] + std::log(st.l[r]));
    if (empty_rows) empty_rows[r] = empty;
  }
  if (out_buf == nullptr) return;
  if (wrT != nullptr) {
    std::fill(out_buf, out_buf + nq * H * D, A(0));
    for (int64_t h = h0; h < h1; ++h)
      rank_update(out_buf + h * D, H * D, rows_buf + h * R, H * R, wrT + h * R * D, D, nq, R, D);
  } else {
    for (int64_t r = 0; r < nq * H; ++r) {
      if (!in_range(r)) continue;
      for (int64_t d = 0; d < D; ++d)
        out_buf[r * D + d] = dot(rows_buf + r * R, wr + ((r % H) * D + d) * R, R);
    }
  }
  for (int64_t r = 0; r < nq * H; ++r) {
    if (!in_range(r)) continue;
    const int64_t gi = i0 + r / H, h = r % H;
    T* out = static_cast<T*>(a.out) + ((b * Tq + gi) * H + h) * D;
    const bool empty = st.l[r] == A(0);
    for (int64_t d = 0; d < D; ++d) {
      A o = out_buf[r * D + d];
      if (br) o += br[h * D + d];
      out[d] = empty ? static_cast<T>(0.0f) : static_cast<T>(o);
    }
  }
}

template <typename A>
inline void linear_tile_any(int64_t wr, int64_t xr, const A* x, int64_t xs, const A* w0,
                            int64_t K, const char* pf, A* out, int64_t ldo);  // below

// The restore of every row of a call at once, for the rows [d0, d1) of head h:
// out[m, h, d] = rows[m, h] @ w_r[h, d] + b_r[h, d] for m < B * Tq (rows: (B * Tq, H, R),
// normalized; empty: (B * Tq, H), the rows that saw no key, which return zeros). Three w_r rows
// against four query rows at a time (linear_tile), so each w_r row is read once per call,
// where finalize_rows' dot products read all of w_r once per sequence.
template <typename T, typename A>
void restore_rows(const AttnArgs& a, const A* rows, const unsigned char* empty, const A* wr,
                  const A* br, int64_t h, int64_t d0, int64_t d1) {
  const int64_t M = a.B * a.Tq, H = a.H, D = a.D, R = a.R;
  T* out = static_cast<T*>(a.out);
  A sums[3 * 4];
  for (int64_t d = d0; d < d1; d += 3) {
    const int64_t nw = std::min<int64_t>(3, d1 - d);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t nx = std::min<int64_t>(4, M - m0);
      linear_tile_any<A>(nw, nx, rows + (m0 * H + h) * R, H * R, wr + (h * D + d) * R, R,
                         nullptr, sums, 4);
      for (int64_t w = 0; w < nw; ++w)
        for (int64_t m = 0; m < nx; ++m) {
          const int64_t row = (m0 + m) * H + h;
          const A o = sums[w * 4 + m] + (br ? br[h * D + d + w] : A(0));
          out[row * D + d + w] = empty[row] ? static_cast<T>(0.0f) : static_cast<T>(o);
        }
    }
  }
}

#include "int8_vnni.h"

enum class FusedRead { kNone, kInt8, kE4m3, kStorage };
template <typename L> struct Tag { using type = L; };

template <typename T, typename A, bool kShared>
void attention_run(const AttnArgs& a) {
  const int64_t B = a.B, Tq = a.Tq, H = a.H, D = a.D, R = a.R;
  const int64_t Dk = a.Dk, Dl = kShared ? a.Dl : 0, Dq = Dk + Dl;
  AsAcc<A, T> wr(a.w_r, H * D * R), br(a.b_r, H * D);
  const A* q = static_cast<const A*>(a.q);
  const A scale = static_cast<A>(a.scale);
  const A ninf = -std::numeric_limits<A>::infinity();

  // Latent-key query rows are wide (Dr + Rk): fewer per tile keeps the tile's queries in L1.
  const int64_t tile_rows =
      kShared ? std::max(H, std::min(kTileRows, kTileQueryBytes / (Dq * int64_t(sizeof(A)))))
              : kTileRows;
  const int64_t QT = std::max<int64_t>(1, std::min<int64_t>(Tq, tile_rows / H));
  const int64_t nqt = (Tq + QT - 1) / QT;
  const int64_t tiles = B * nqt;
  int64_t maxlen = 0, keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    maxlen = std::max(maxlen, a.seqlen[b]);
    keys += a.seqlen[b];
  }
  // Waking a second thread costs more than a small call's whole work (and, on a busy
  // machine, up to a scheduler time slice), so small calls run on fewer threads.
  const int64_t work = keys * Tq * H * (Dq + R + 8);
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
  // Flash-decoding: with fewer tiles than threads x 2, split each sequence's keys so every
  // core streams its own part of the cache. Each split leaves a partial (m, l, acc); the
  // thread that finishes a tile's last split combines them and restores the output. Two
  // items a thread balance the load well enough; against four (the rule until 2026-12-07),
  // decode steps at (1, 2048) to (4, 4096), both layouts, float32, bf16 and int8 caches, were
  // 1.03x faster at the median of 45 cells (0.91-1.12x), since each split restarts its
  // streams and adds a partial state to combine (Zen 4, 2 threads, same-process A/Bs,
  // bench/RESULTS.md).
  constexpr int64_t kItemsPerThread = 2;
  int64_t nsplit = 1;
  if (tiles < kItemsPerThread * threads && maxlen > kMinSplit)
    nsplit = std::min((kItemsPerThread * threads + tiles - 1) / tiles,
                      (maxlen + kMinSplit - 1) / kMinSplit);
  // No more threads than work items: a thread with nothing to do still costs its wake-up
  // (one sequence of at most kMinSplit keys: 76 -> 56 us a call at 2 threads, 2026-12-03).
  const int nth = static_cast<int>(std::min<int64_t>(threads, tiles * nsplit));
  const int64_t rows_max = QT * H;
  std::vector<A> wrT;  // (H, R, D) for the tiled restore
  if (QT >= 4) {
    wrT.resize(H * R * D);
    at::parallel_for(0, H * D, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n)
        for (int64_t c = 0; c < R; ++c)
          wrT[((n / D) * R + c) * D + n % D] = wr.ptr[n * R + c];
    });
  }
  const A* wrT_ptr = wrT.empty() ? nullptr : wrT.data();
  // Single-query tiles (decode), 4 rows or more, AVX2: the restore waits until every tile is
  // attended, then reads each w_r row once for all sequences (restore_rows) rather than all of
  // w_r per sequence (655 KB at the pythia-70m-kv shape). On a Zen 3 (same-process A/B, w_r
  // evicted from L3 between calls, bench/RESULTS.md 2026-12-07): bf16 decode steps 1.00-1.11x,
  // float32 0.98-1.03x; at 1 row, where nothing is saved, the 3 x 1 tiles were 5-15% slower
  // than the dot products, hence the 4 rows. Not measured with AVX-512. Bounded, so a call
  // with many single-query tiles does not hold all its rows.
  const bool batched_restore = kVBytes == 32 && wrT_ptr == nullptr && B * Tq >= 4 &&
                               B * Tq * H * R <= kBatchedRestoreMax;
  std::vector<A> call_rows(batched_restore ? B * Tq * H * R : 0);
  std::vector<unsigned char> call_empty(batched_restore ? B * Tq * H : 0);
  const int64_t part_stride = rows_max * (R + 2);
  std::vector<A> part(nsplit > 1 ? tiles * nsplit * part_stride : 0);
  const int64_t items = tiles * nsplit;
  // With fewer tiles than threads, one thread would combine and restore a whole tile (the
  // restore reads all of w_r, 655 KB at the pythia-70m-kv shape, from memory at batch 1) while
  // the others wait: then the tiles are combined and restored head by head, in a second pass.
  const bool restore_by_head = nsplit > 1 && tiles < nth;
  // Otherwise the thread that completes a tile's last split combines it (done counts them).
  const int64_t counted = nsplit > 1 && !restore_by_head ? tiles : 0;
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[counted]);
  for (int64_t t = 0; t < counted; ++t) done[t].store(0);
  // Caches read in place and converted in registers (attend_range's fused path): float32
  // accumulation, and every cache segment stored alike (float32 latent keys, bf16 / fp16,
  // int8 or e4m3).
  auto all_stored_as = [&](CacheKind kind) {
    return a.k_kind == kind && a.v_kind == kind && (!kShared || a.kl_kind == kind);
  };
  FusedRead fused = FusedRead::kNone;
  if constexpr (std::is_same<A, float>::value) {
    if (all_stored_as(CacheKind::I8)) fused = FusedRead::kInt8;
    if (all_stored_as(CacheKind::E4M3)) fused = FusedRead::kE4m3;
    // Stored as the model's dtype: bf16 / fp16 caches, and with AVX-512 float32 latent keys as
    // well (two keys scored at a time, every row of the next block prefetched into L2):
    // 20-23% faster than the direct path at issue 10's decode shapes, at 1 and 2 threads, and
    // 9-12% in the causal training forward; an L1 prefetch of V_c on top measured 4-11%
    // slower, and the V-only layout this way 0-5% slower than direct (same-process A/B,
    // 2026-12-03). On an AVX2-only EPYC the direct path was the faster one for float32 latent
    // keys, by 32% at (4, 4096) and 37% at (8, 16384) (same-process A/B, 2 threads; there the
    // next-block L2 prefetch is still the best for bf16: without it 28-31% slower). Measured
    // again on a Zen 3 after the fused path began prefetching four keys ahead (2026-12-07):
    // faster only for calls that stay in L3; in a model step the direct path is 2-5% faster
    // from batch 4 on (bench/RESULTS.md).
    constexpr bool fused_float32_latent = kVBytes >= 64;
    if ((!std::is_same<T, A>::value || (kShared && fused_float32_latent)) &&
        all_stored_as(CacheKind::Model))
      fused = FusedRead::kStorage;
  }
  // One query over int8 latent keys: the integer dot products of int8_vnni.h where the CPU
  // has AVX-512 VNNI.
#if VDPROJ_VBYTES >= 64 && defined(__x86_64__)
  const bool int8_vnni_path = kShared && fused == FusedRead::kInt8 && cpu_has_int8_vnni() &&
                              int8_vnni::supports(H, Dk, Dl, R, a.kl_is_vc) &&
                              a.k_st == H * Dk && a.k_sh == Dk && a.k_scale.sh == 1;
#endif
  // Scratch only for blocks converted through it (attend_range's scratch path: mixed storage,
  // or float64 with a quantized cache); float32 / float64 caches and the fused path are read
  // in place.
  const bool direct =
      std::is_same<T, A>::value && all_stored_as(CacheKind::Model) && fused == FusedRead::kNone;
  const bool scratch = !direct && fused == FusedRead::kNone;
  const bool own_l = kShared && scratch && !a.kl_is_vc;  // an upcast buffer for the shared rows
  const bool bf16_pairs = kBf16Pairs && std::is_same<T, c10::BFloat16>::value &&
                          fused == FusedRead::kStorage;  // Bf16PairRows' query buffer

#pragma omp parallel num_threads(nth)
  {
    std::vector<A> qs(rows_max * Dq), sbuf(rows_max * kKeyBlock);
    std::vector<A> kbuf(scratch ? kKeyBlock * H * Dk : 0), vbuf(scratch ? kKeyBlock * R : 0);
    std::vector<A> lbuf(own_l ? kKeyBlock * Dl : 0);
    std::vector<A> qpairs(bf16_pairs ? rows_max * Dq : 0);
    std::vector<A> own(nsplit > 1 ? 0 : part_stride), comb(nsplit > 1 ? part_stride : 0);
    std::vector<A> rows_buf(batched_restore ? 0 : rows_max * R);  // else call_rows
    std::vector<A> out_buf(batched_restore ? 0 : rows_max * D);
    std::vector<int64_t> lim(QT);
    std::vector<float> kscale(2 * H);
    const Scratch<A> scratch{kscale.data(), sbuf.data(), kbuf.data(),
                             lbuf.data(),   vbuf.data(), qpairs.data()};
#if VDPROJ_VBYTES >= 64 && defined(__x86_64__)
    std::unique_ptr<int8_vnni::Workspace> vnni_ws;
    if (int8_vnni_path) vnni_ws.reset(new int8_vnni::Workspace(H, Dk, Dl, R));
#endif
    auto state_at = [&](A* base) {
      return TileState<A>{base, base + rows_max, base + 2 * rows_max};
    };
    // The splits' partial states of a tile's rows of heads [h0, h1), combined into out.
    auto combine_splits = [&](int64_t tile, int64_t nq, int64_t h0, int64_t h1,
                              TileState<A> out) {
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t r = i * H + h0; r < i * H + h1; ++r) {
          A mx = ninf;
          for (int64_t s = 0; s < nsplit; ++s)
            mx = std::max(mx, state_at(part.data() + (tile * nsplit + s) * part_stride).m[r]);
          out.m[r] = mx;
          out.l[r] = 0;
          A* accr = out.acc + r * R;
          std::fill(accr, accr + R, A(0));
          if (mx == ninf) continue;
          for (int64_t s = 0; s < nsplit; ++s) {
            TileState<A> ps = state_at(part.data() + (tile * nsplit + s) * part_stride);
            if (ps.m[r] == ninf) continue;
            const A w = std::exp(ps.m[r] - mx);
            out.l[r] += w * ps.l[r];
            axpy(accr, w, ps.acc + r * R, R);
          }
        }
    };
    // Normalize (and, unless batched_restore, restore) the rows of heads [h0, h1) of a tile.
    auto finalize = [&](int64_t b, int64_t i0, int64_t nq, int64_t h0, int64_t h1,
                        TileState<A> st) {
      if (batched_restore) {
        const int64_t first = (b * Tq + i0) * H;  // the tile's first row in the call
        finalize_rows<T, A>(a, b, i0, nq, h0, h1, st, wr.ptr, nullptr, br.ptr,
                            call_rows.data() + first * R, nullptr, call_empty.data() + first);
      } else {
        finalize_rows<T, A>(a, b, i0, nq, h0, h1, st, wr.ptr, wrT_ptr, br.ptr, rows_buf.data(),
                            out_buf.data());
      }
    };
    auto item = [&](int64_t it) {
      const int64_t split = it % nsplit, tile = it / nsplit;
      const int64_t b = tile / nqt, i0 = (tile % nqt) * QT;
      const int64_t nq = std::min(QT, Tq - i0), rows = nq * H;
      const int64_t Tk = a.seqlen[b];
      for (int64_t i = 0; i < nq; ++i)
        lim[i] = a.causal ? std::min(Tk - 1, i0 + i + Tk - Tq) : Tk - 1;
      // Splits of whole key blocks, the nearest multiple to an even share, the last one taking
      // the rest: 257 keys in two splits are 128 + 129 (rounding up had made them 192 + 65).
      int64_t len = (Tk + nsplit - 1) / nsplit;
      len = std::max<int64_t>(kKeyBlock, (len + kKeyBlock / 2) / kKeyBlock * kKeyBlock);
      const int64_t j0 = std::min(Tk, split * len);
      const int64_t j1 = split == nsplit - 1 ? Tk : std::min(Tk, j0 + len);
      TileState<A> st = state_at(nsplit > 1 ? part.data() + it * part_stride : own.data());
      std::fill(st.m, st.m + rows, ninf);
      std::fill(st.l, st.l + rows, A(0));
      std::fill(st.acc, st.acc + rows * R, A(0));
      const A* qsrc = q + (b * Tq + i0) * H * Dq;
      for (int64_t n = 0; n < rows * Dq; ++n) qs[n] = qsrc[n] * scale;
      const KeySource<T> src{
          sequence_segment<T>(a.k, b, a.k_sb, a.k_st, a.k_sh, a.k_kind, a.k_scale),
          kShared ? sequence_segment<T>(a.kl, b, a.kl_sb, a.kl_st, 0, a.kl_kind, a.kl_scale)
                  : Segment<T>{nullptr, 0, 0, CacheKind::Model, nullptr, 0, 0},
          sequence_segment<T>(a.vc, b, a.v_sb, a.v_st, 0, a.v_kind, a.v_scale)};
      auto attend = [&](auto loader) {
        using L = typename decltype(loader)::type;
        attend_range<T, A, kShared, L>(H, Dk, Dl, R, a.kl_is_vc, qs.data(), nq, lim.data(), src,
                                       j0, j1, st, scratch);
      };
      if constexpr (std::is_same<A, float>::value) {
        switch (fused) {
          case FusedRead::kInt8:
#if VDPROJ_VBYTES >= 64 && defined(__x86_64__)
            if (vnni_ws && nq == 1 &&
                int8_vnni::attend_one_query<T>(*vnni_ws, qs.data(), lim[0], src, j0, j1, st))
              break;
#endif
            attend(Tag<Int8Rows>{});
            break;
          case FusedRead::kE4m3: attend(Tag<E4m3Rows>{}); break;
          case FusedRead::kStorage:
            if constexpr (std::is_same<T, c10::BFloat16>::value)
              attend(Tag<Bf16Rows>{});
            else
              attend(Tag<RowLoader<T>>{});
            break;
          default: attend(Tag<void>{}); break;
        }
      } else {
        attend(Tag<void>{});
      }
      if (nsplit == 1) {
        finalize(b, i0, nq, 0, H, st);
        return;
      }
      if (restore_by_head) return;  // combined and restored head by head below
      // The thread that completes a tile's last split combines the partial states and
      // finalizes the tile, so no barrier separates the two steps (a descheduled thread on
      // a busy machine then delays only its own tiles).
      if (done[tile].fetch_add(1, std::memory_order_acq_rel) != nsplit - 1) return;
      TileState<A> out = state_at(comb.data());
      combine_splits(tile, nq, 0, H, out);
      finalize(b, i0, nq, 0, H, out);
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) item(it);
    if (restore_by_head) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < tiles * H; ++it) {
        const int64_t tile = it / H, h = it % H;
        const int64_t b = tile / nqt, i0 = (tile % nqt) * QT, nq = std::min(QT, Tq - i0);
        TileState<A> out = state_at(comb.data());
        combine_splits(tile, nq, h, h + 1, out);
        finalize(b, i0, nq, h, h + 1, out);
      }
    }
    if (batched_restore) {
      // Blocks of w_r rows within a head (a multiple of linear_tile's 3 rows): 24 items at
      // H = 8, D = 64, for the threads to share.
      constexpr int64_t kRows = 24;
      const int64_t blocks = (D + kRows - 1) / kRows;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < H * blocks; ++it) {
        const int64_t h = it / blocks, d0 = (it % blocks) * kRows;
        restore_rows<T, A>(a, call_rows.data(), call_empty.data(), wr.ptr, br.ptr, h, d0,
                           std::min(D, d0 + kRows));
      }
    }
  }
}

template <typename T, typename A>
void attention_impl(const AttnArgs& a) {
  if (a.B == 0 || a.Tq == 0 || a.H == 0) return;
  if (a.Dl > 0)
    attention_run<T, A, true>(a);
  else
    attention_run<T, A, false>(a);
}

// ------------------------------------------------------------------------------------------
// Backward. Race-free: gradients of k (both key segments) and v_c are owned by (sequence, key
// tile) work items; dq gets one private buffer per thread, summed at the end; dW_r and db_r are
// owned by rows. The shared key segment's gradient sums over heads inside its work item.

template <typename T, typename A>
void backward_impl(const BwdArgs& a) {
  const int64_t B = a.B, Tq = a.Tq, Tk = a.Tk, H = a.H, D = a.D, R = a.R, HD = H * D;
  const int64_t Dk = a.Dk, Dl = a.Dl, Dq = Dk + Dl, HDk = H * Dk, HDq = H * Dq;
  const A scale = static_cast<A>(a.scale);
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t nrow = B * Tq * H;  // (b, i, h) attention rows
  AsAcc<A, T> dO(a.dout, nrow * D), kA(a.k, B * Tk * HDk),
      klA(a.kl_is_vc ? nullptr : a.kl, B * Tk * Dl), vA(a.vc, B * Tk * R), wr(a.w_r, HD * R);
  AsAcc<A, A> ctxA(a.ctx, nrow * R);  // saved in accumulation precision
  const A* qA = static_cast<const A*>(a.q);
  const A* kl = a.kl_is_vc ? vA.ptr : klA.ptr;  // shared key rows (B, Tk, Dl)
  // The score of the scaled query row qrow (head h) for key j of sequence b.
  auto score = [&](const A* qrow, int64_t b, int64_t j, int64_t h) {
    const A s = dot(qrow, kA.ptr + ((b * Tk + j) * H + h) * Dk, Dk);
    return Dl > 0 ? s + dot(qrow + Dk, kl + (b * Tk + j) * Dl, Dl) : s;
  };
  A* dq = static_cast<A*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dkl = static_cast<T*>(a.dkl);
  T* dvc = static_cast<T*>(a.dvc);
  T* dwr = static_cast<T*>(a.dwr);
  T* dbr = static_cast<T*>(a.dbr);

  const int64_t BT = B * Tq;
  std::vector<A> lse(nrow), dctx(nrow * R, A(0)), delta(nrow), qs(nrow * Dq);
  // dctx[b, i, h] = dO[b, i, h] @ w_r[h]: per head a (BT x D) @ (D x R) product.
  const int64_t chunk = 64, nchunk = (BT + chunk - 1) / chunk;
  at::parallel_for(0, H * nchunk, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t h = it / nchunk, bi0 = (it % nchunk) * chunk;
      const int64_t nb = std::min(chunk, BT - bi0);
      rank_update(dctx.data() + (bi0 * H + h) * R, H * R, dO.ptr + (bi0 * H + h) * D, HD,
                  wr.ptr + h * D * R, R, nb, D, R);
    }
  });

  // Row statistics in accumulation precision. float32 runs use the saved float32 lse, as
  // FlashAttention does; float64 recomputes it so gradcheck sees float64 accuracy.
  at::parallel_for(0, BT, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> srow(std::is_same<A, double>::value ? Tk : 0);
    for (int64_t bi = lo; bi < hi; ++bi) {
      const int64_t b = bi / Tq, i = bi % Tq;
      const int64_t lim = a.causal ? std::min(Tk - 1, i + Tk - Tq) : Tk - 1;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = bi * H + h;  // index into (B, Tq, H)
        A* qrow = qs.data() + row * Dq;
        for (int64_t d = 0; d < Dq; ++d) qrow[d] = qA[row * Dq + d] * scale;
        A L = static_cast<A>(a.lse[(b * H + h) * Tq + i]);
        if constexpr (std::is_same<A, double>::value) {
          if (lim >= 0) {
            A mx = ninf;
            for (int64_t j = 0; j <= lim; ++j) {
              srow[j] = score(qrow, b, j, h);
              mx = std::max(mx, srow[j]);
            }
            A sum = 0;
            for (int64_t j = 0; j <= lim; ++j) sum += std::exp(srow[j] - mx);
            L = mx + std::log(sum);
          } else {
            L = ninf;
          }
        }
        lse[row] = L;
        delta[row] = (L == ninf) ? A(0) : dot(dctx.data() + row * R, ctxA.ptr + row * R, R);
      }
    }
  });

  // dW_r[h] = dO_h^T @ ctx_h and db_r = column sums of dO, over rows that saw a key
  // (a row without keys outputs zeros whatever b_r is). dO_h^T is gathered per head first.
  std::vector<A> dOT(HD * BT), dW(HD * R, A(0));
  at::parallel_for(0, HD, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t h = n / D, d = n % D;
      A bsum = 0;
      for (int64_t bi = 0; bi < BT; ++bi) {
        const int64_t row = bi * H + h;
        const A g = (lse[row] == ninf) ? A(0) : dO.ptr[row * D + d];
        dOT[n * BT + bi] = g;
        bsum += g;
      }
      dbr[n] = static_cast<T>(bsum);
    }
  });
  const int64_t dchunk = 16, ndc = (D + dchunk - 1) / dchunk;
  at::parallel_for(0, H * ndc, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t h = it / ndc, d0 = (it % ndc) * dchunk, nd = std::min(dchunk, D - d0);
      const int64_t n0 = h * D + d0;
      rank_update(dW.data() + n0 * R, R, dOT.data() + n0 * BT, BT, ctxA.ptr + h * R, H * R, nd,
                  BT, R);
      store_row(dwr + n0 * R, dW.data() + n0 * R, nd * R);
    }
  });

  // Main pass over (b, key tile), per head and chunk of queries, as register-tiled products:
  //   S = qs k^T, P = exp(S - lse), dP = dctx v_c^T, dS = P * (dP - delta),
  //   dq += dS k (per-thread buffer), dk += dS^T qs, dv_c += P^T dctx (owned by the item);
  // each product in two parts for the two key segments.
  const int64_t ntile = (Tk + kBwdKeyTile - 1) / kBwdKeyTile;
  const int64_t items = B * ntile;
  constexpr int64_t KT = kBwdKeyTile, QC = 64;
  const int nth = std::max(1, at::get_num_threads());
  std::vector<A> dq_part(static_cast<size_t>(nth) * nrow * Dq, A(0));
#pragma omp parallel num_threads(nth)
  {
    A* dqt = dq_part.data() + static_cast<int64_t>(omp_get_thread_num()) * nrow * Dq;
    std::vector<A> dk_loc(KT * HDk), dkl_loc(KT * Dl), dv_loc(KT * R), vT(R * KT);
    std::vector<A> P(QC * KT), dS(QC * KT), PT(KT * QC), dST(KT * QC);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / ntile, j0 = (it % ntile) * KT;
      const int64_t nk = std::min(Tk, j0 + KT) - j0;
      std::fill(dk_loc.begin(), dk_loc.end(), A(0));
      std::fill(dkl_loc.begin(), dkl_loc.end(), A(0));
      std::fill(dv_loc.begin(), dv_loc.end(), A(0));
      for (int64_t jj = 0; jj < nk; ++jj)
        for (int64_t c = 0; c < R; ++c) vT[c * KT + jj] = vA.ptr[(b * Tk + j0 + jj) * R + c];
      // Causal: queries before istart see none of these keys.
      const int64_t istart = a.causal ? std::max<int64_t>(0, j0 - (Tk - Tq)) : 0;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i0 = istart; i0 < Tq; i0 += QC) {
          const int64_t nq = std::min(QC, Tq - i0);
          const int64_t row0 = (b * Tq + i0) * H + h;  // row of query i0, head h
          for (int64_t q = 0; q < nq; ++q) {
            const int64_t i = i0 + q, row = row0 + q * H;
            const int64_t lim = a.causal ? std::min(Tk - 1, i + Tk - Tq) : Tk - 1;
            const int64_t n = std::max<int64_t>(0, std::min(nk, lim + 1 - j0));
            A* prow = P.data() + q * KT;
            const A L = lse[row];
            if (L == ninf || n == 0) {
              std::fill(prow, prow + KT, A(0));
              continue;
            }
            const A* qrow = qs.data() + row * Dq;
            for (int64_t jj = 0; jj < n; ++jj) prow[jj] = score(qrow, b, j0 + jj, h);
            exp_row(prow, n, L);
            std::fill(prow + n, prow + KT, A(0));
          }
          std::fill(dS.begin(), dS.begin() + nq * KT, A(0));
          rank_update(dS.data(), KT, dctx.data() + row0 * R, H * R, vT.data(), KT, nq, R, nk);
          for (int64_t q = 0; q < nq; ++q) {
            const A del = delta[row0 + q * H];
            for (int64_t jj = 0; jj < nk; ++jj) {
              const A p = P[q * KT + jj];
              const A g = p * (dS[q * KT + jj] - del);
              dS[q * KT + jj] = g;
              PT[jj * QC + q] = p;
              dST[jj * QC + q] = g;
            }
          }
          rank_update(dqt + row0 * Dq, HDq, dS.data(), KT,
                      kA.ptr + ((b * Tk + j0) * H + h) * Dk, HDk, nq, nk, Dk);
          rank_update(dk_loc.data() + h * Dk, HDk, dST.data(), QC, qs.data() + row0 * Dq, HDq,
                      nk, nq, Dk);
          if (Dl > 0) {
            rank_update(dqt + row0 * Dq + Dk, HDq, dS.data(), KT, kl + (b * Tk + j0) * Dl, Dl,
                        nq, nk, Dl);
            rank_update(dkl_loc.data(), Dl, dST.data(), QC, qs.data() + row0 * Dq + Dk, HDq,
                        nk, nq, Dl);
          }
          rank_update(dv_loc.data(), R, PT.data(), QC, dctx.data() + row0 * R, H * R, nk, nq, R);
        }
      }
      store_row(dk + (b * Tk + j0) * HDk, dk_loc.data(), nk * HDk);
      if (Dl > 0 && a.kl_is_vc)  // the joint latent: V_c is also the keys' latent
        axpy(dv_loc.data(), A(1), dkl_loc.data(), nk * R);
      else if (Dl > 0)
        store_row(dkl + (b * Tk + j0) * Dl, dkl_loc.data(), nk * Dl);
      store_row(dvc + (b * Tk + j0) * R, dv_loc.data(), nk * R);
    }
  }
  at::parallel_for(0, nrow, 64, [&](int64_t lo, int64_t hi) {
    std::vector<A> acc(Dq);
    for (int64_t row = lo; row < hi; ++row) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int t = 0; t < nth; ++t)
        axpy(acc.data(), scale, dq_part.data() + (t * nrow + row) * Dq, Dq);
      store_row(dq + row * Dq, acc.data(), Dq);
    }
  });
}

// ------------------------------------------------------------------------------------------
// Compress-on-write of new tokens into the caches.

template <typename T, typename A>
void append_impl(const AppendArgs& a) {
  const int64_t B = a.B, Tn = a.Tnew, H = a.H, D = a.D, Dk = a.Dk;
  if (B == 0 || Tn == 0) return;
  const T* k = static_cast<const T*>(a.k);
  // The first Dk dims of each head's key, exactly (all of it for V-only, the rotary part for
  // latent keys), or quantized per (token, head) into a quantized cache.
  if (Dk > 0) {
    at::parallel_for(0, B * Tn, 256, [&](int64_t lo, int64_t hi) {
      std::vector<float> row(Dk);
      for (int64_t bt = lo; bt < hi; ++bt) {
        const int64_t b = bt / Tn, pos = a.pos[b] + bt % Tn;
        for (int64_t h = 0; h < H; ++h) {
          const T* src = k + (bt * H + h) * D;
          const int64_t at = b * a.k_sb + pos * a.k_st + h * a.k_sh;
          if (a.k_kind == CacheKind::Model) {
            std::memcpy(static_cast<T*>(a.k_cache) + at, src, Dk * sizeof(T));
          } else {
            for (int64_t d = 0; d < Dk; ++d) row[d] = static_cast<float>(src[d]);
            quantize_row(row.data(), Dk, a.k_kind, static_cast<int8_t*>(a.k_cache) + at,
                         a.k_scale.p + b * a.k_scale.sb + pos * a.k_scale.st + h * a.k_scale.sh);
          }
        }
      }
    });
  } else if (a.k_kind != CacheKind::Model) {  // Dr = 0: empty rows, whose scale is 1
    for (int64_t bt = 0; bt < B * Tn; ++bt)
      for (int64_t h = 0; h < H; ++h)
        a.k_scale.p[(bt / Tn) * a.k_scale.sb + (a.pos[bt / Tn] + bt % Tn) * a.k_scale.st +
                    h * a.k_scale.sh] = 1.0f;
  }
  // The compressed rows of every job, parallel over (job, token, chunk of R) so that a single
  // decode token still uses every core. A quantized row is one item: its scale needs all of it.
  constexpr int64_t rchunk = 64;
  std::vector<std::unique_ptr<AsAcc<A, T>>> w, bias;
  int64_t first[3] = {0, 0, 0}, nrc[2] = {1, 1}, kmax = 1, rmax = 1;
  for (int j = 0; j < a.njobs; ++j) {
    const CompressJob& job = a.jobs[j];
    w.emplace_back(new AsAcc<A, T>(job.w, job.R * job.K));
    bias.emplace_back(new AsAcc<A, T>(job.bias, job.R));
    nrc[j] = job.dst_kind != CacheKind::Model
                 ? 1 : std::max<int64_t>(1, (job.R + rchunk - 1) / rchunk);
    first[j + 1] = first[j] + B * Tn * nrc[j];
    kmax = std::max(kmax, job.K);
    rmax = std::max(rmax, job.R);
  }
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (rchunk * kmax + 1));
  at::parallel_for(0, first[a.njobs], grain, [&](int64_t lo, int64_t hi) {
    std::vector<A> xrow(kmax);
    std::vector<float> qrow(rmax);
    int64_t loaded = -1;
    for (int64_t it = lo; it < hi; ++it) {
      const int j = it < first[1] ? 0 : 1;
      const CompressJob& job = a.jobs[j];
      const int64_t bt = (it - first[j]) / nrc[j], rc = (it - first[j]) % nrc[j];
      const int64_t b = bt / Tn, pos = a.pos[b] + bt % Tn;
      if (loaded != j * B * Tn + bt) {
        load_row(xrow.data(), static_cast<const T*>(job.x) + bt * job.K, job.K);
        loaded = j * B * Tn + bt;
      }
      const A* wj = w[j]->ptr;
      const A* bj = bias[j]->ptr;
      auto value = [&](int64_t r) {
        A x = dot(xrow.data(), wj + r * job.K, job.K);
        return bj ? x + bj[r] : x;
      };
      if (job.dst_kind != CacheKind::Model) {
        for (int64_t r = 0; r < job.R; ++r) qrow[r] = static_cast<float>(value(r));
        const RowScales& sc = job.dst_scale;
        quantize_row(qrow.data(), job.R, job.dst_kind,
                     static_cast<int8_t*>(job.dst) + b * job.sb + pos * job.st,
                     sc.p + b * sc.sb + pos * sc.st);
        continue;
      }
      T* dst = static_cast<T*>(job.dst) + b * job.sb + pos * job.st;
      for (int64_t r = rc * rchunk; r < std::min(job.R, (rc + 1) * rchunk); ++r)
        dst[r] = static_cast<T>(value(r));
    }
  });
}

// Rows given as values, quantized into a cache (QuantWriteArgs): what append_impl does for the
// rows it computes itself, with the same quantize_row.
template <typename T, typename A>
void quantize_into_impl(const QuantWriteArgs& a) {
  const T* v = static_cast<const T*>(a.values);
  at::parallel_for(0, a.B * a.T, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> row(a.n);
    for (int64_t bt = lo; bt < hi; ++bt) {
      const int64_t b = bt / a.T, pos = a.pos[b] + bt % a.T;
      for (int64_t h = 0; h < a.heads; ++h) {
        const T* src = v + (bt * a.heads + h) * a.n;
        load_row(row.data(), src, a.n);
        quantize_row(row.data(), a.n, a.dst_kind,
                     static_cast<int8_t*>(a.dst) + b * a.d_sb + pos * a.d_st + h * a.d_sh,
                     a.scale.p + b * a.scale.sb + pos * a.scale.st + h * a.scale.sh);
      }
    }
  });
}

// q_eff = [q_rope | q_nope @ w_kr[h]] per (row, head), in accumulation precision.
template <typename T, typename A>
void effective_query_impl(const QueryArgs& a) {
  const int64_t H = a.H, D = a.D, Dr = a.Dr, Dn = D - Dr, Rk = a.Rk, Dq = Dr + Rk;
  const int64_t n = a.rows * H;
  if (n == 0) return;
  const int64_t rows = a.rows;
  AsAcc<A, T> w(a.w_kr, H * Dn * Rk);
  const T* q = static_cast<const T*>(a.q);
  A* out = static_cast<A*>(a.q_eff);
  // Head by head, a chunk of rows at a time, so each head's w_kr (Dn x Rk; 295 KB for all heads
  // at the pythia-70m-kv shape, from memory at batch 1) is read once per chunk rather than once
  // per row: a decode step's rows are one chunk, many rows (training) several, which keeps
  // more threads than heads busy. Two cores read w_kr faster than one: the work splits as
  // soon as there are two items, whatever the multiply-adds.
  const int64_t chunk = std::max<int64_t>(4, kMinWorkPerThread / (Dn * Rk + 1)) / 4 * 4;
  const int64_t nchunks = (rows + chunk - 1) / chunk, items = H * nchunks;
  const int64_t grain = std::max<int64_t>(
      1, std::min<int64_t>(kMinWorkPerThread / (std::min(rows, chunk) * Dn * Rk + 1),
                           (items + 1) / 2));
  at::parallel_for(0, items, grain, [&](int64_t lo, int64_t hi) {
    std::vector<A> q_nope(std::min(rows, chunk) * Dn);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t h = it / nchunks, r0 = (it % nchunks) * chunk;
      const int64_t nr = std::min(chunk, rows - r0);
      for (int64_t r = r0; r < r0 + nr; ++r) {
        const T* qr = q + (r * H + h) * D;
        A* o = out + (r * H + h) * Dq;
        load_row(o, qr, Dr);
        std::fill(o + Dr, o + Dq, A(0));
        load_row(q_nope.data() + (r - r0) * Dn, qr + Dr, Dn);
      }
      rank_update_few_rows<A>(out + (r0 * H + h) * Dq + Dr, H * Dq, q_nope.data(), Dn,
                              w.ptr + h * Dn * Rk, Rk, nr, Dn, Rk);
    }
  });
}


// ------------------------------------------------------------------------------------------
// Decode-sized linear layer: y (M, N) = x (M, K) @ w (N, K).T + bias for the few rows of one
// decode step. With M <= 16 this is a stream over w (the LM head alone is 103 MB in float32):
// each w row is read once and multiplied by every x row, which stays in L1. A core alone cannot
// keep enough of that stream in flight while it computes, so the rows about 64 KiB ahead are
// prefetched into L2; that takes the LM head from 35-60% of the machine's read bandwidth
// (BLAS, or this loop without the prefetch) to about 90% (bench/cpu_linear.py).

// MB x rows at once, KU vector accumulators per x row (MB * KU independent FMA chains).
template <typename A, int MB>
inline void linear_row(const A* x, int64_t xs, const A* wrow, int64_t K, const char* pf,
                       A* out) {
  constexpr int N = VecT<A>::N;
  constexpr int KU = MB >= 5 ? 2 : (MB >= 2 ? 4 : 8);
  constexpr int64_t kStepBytes = KU * kVBytes;
  vec_t<A> acc[KU][MB] = {};
  int64_t k = 0;
  for (; k + KU * N <= K; k += KU * N) {
    for (int64_t o = 0; o < kStepBytes; o += 64) __builtin_prefetch(pf + k * sizeof(A) + o, 0, 1);
    for (int u = 0; u < KU; ++u) {
      const vec_t<A> wv = vload(wrow + k + u * N);
      for (int m = 0; m < MB; ++m) acc[u][m] += wv * vload(x + m * xs + k + u * N);
    }
  }
  for (int64_t o = k * sizeof(A); o < K * static_cast<int64_t>(sizeof(A)); o += 64)
    __builtin_prefetch(pf + o, 0, 1);
  for (; k + N <= K; k += N) {
    const vec_t<A> wv = vload(wrow + k);
    for (int m = 0; m < MB; ++m) acc[0][m] += wv * vload(x + m * xs + k);
  }
  for (int m = 0; m < MB; ++m) {
    vec_t<A> t = acc[0][m];
    for (int u = 1; u < KU; ++u) t += acc[u][m];
    A s = hsum<A>(t);
    for (int64_t kk = k; kk < K; ++kk) s += wrow[kk] * x[m * xs + kk];
    out[m] = s;
  }
}


// Two adjacent weight rows against 8 x rows: each x vector loaded serves both rows, which halves
// the x traffic (from L1, or from L2 once 8 x rows outgrow L1: K > 1536 in float32); 5-10%
// faster than one row at a time (bench/RESULTS.md). pf walks the two rows `ahead` further on.
// kXInRegister: each x vector is loaded into a register once for both rows (in_register), where
// GCC would fold the load into both multiply-adds: 10 loads per 16 multiply-adds rather than 18.
// Zen 4 issues one 64-byte load a cycle, so 1.07-1.19x while the x rows stay in L1, but
// 0.82-0.97x once they outgrow it (K = 2048, or two passes of 8 rows per pair, which
// linear_impl no longer makes), where the folded loads stay (bench/RESULTS.md, 2026-12-07,
// Zen 4).
template <typename A, bool kXInRegister>
__attribute__((always_inline)) inline void linear_row_pair8(const A* x, int64_t xs,
                                                            const A* w0, int64_t ws, int64_t K,
                                                            const char* pf, A* out0, A* out1) {
  constexpr int N = VecT<A>::N;
  const A* w1 = w0 + ws;
  vec_t<A> a0[8], a1[8];
  for (int m = 0; m < 8; ++m) a0[m] = a1[m] = vec_t<A>{};
  int64_t k = 0;
  for (; k + N <= K; k += N) {
    for (int64_t o = 0; o < 2 * kVBytes; o += 64)
      __builtin_prefetch(pf + 2 * k * sizeof(A) + o, 0, 1);
    const vec_t<A> v0 = vload(w0 + k), v1 = vload(w1 + k);
    for (int m = 0; m < 8; ++m) {
      vec_t<A> xv = vload(x + m * xs + k);
      if constexpr (kXInRegister) xv = in_register(xv);
      a0[m] += v0 * xv;
      a1[m] += v1 * xv;
    }
  }
  for (int64_t o = 2 * k * sizeof(A); o < 2 * K * static_cast<int64_t>(sizeof(A)); o += 64)
    __builtin_prefetch(pf + o, 0, 1);
  for (int m = 0; m < 8; ++m) {
    A s0 = hsum<A>(a0[m]), s1 = hsum<A>(a1[m]);
    for (int64_t kk = k; kk < K; ++kk) {
      s0 += w0[kk] * x[m * xs + kk];
      s1 += w1[kk] * x[m * xs + kk];
    }
    out0[m] = s0;
    out1[m] = s1;
  }
}

// WR adjacent weight rows against XR x rows, every x vector loaded once into a register for
// the WR rows (in_register: GCC would otherwise fold it into each multiply-add as a memory
// operand). With AVX2's 16 registers, 3 x 4 holds 12 accumulators, 3 weight vectors and one x
// vector, where linear_row_pair8's 16 accumulators spill three of them to the stack every
// iteration. kPrefetch: pf walks the WR rows `ahead` further on.
// How it is written matters to GCC 12 (checked in the disassembly): a run-time branch in the
// loop kept every accumulator on the stack, and a single [WR][XR] array read by the sums'
// loop below had each accumulator stored to the stack every iteration; one array per weight
// row, copied out before the sums, stays in registers, as long as the loop's prefetch has no
// memory operand (prefetch_l2_line).
template <typename A, int WR, int XR, bool kPrefetch>
inline void linear_tile(const A* x, int64_t xs, const A* w0, int64_t K, const char* pf, A* out,
                        int64_t ldo) {
  static_assert(WR >= 1 && WR <= 3, "linear_tile: 1 to 3 weight rows");
  constexpr int N = VecT<A>::N;
  constexpr int64_t kRowStep = WR * kVBytes;  // bytes of the WR rows per k vector
  vec_t<A> a0[XR], a1[XR], a2[XR];
  for (int m = 0; m < XR; ++m) a0[m] = a1[m] = a2[m] = vec_t<A>{};
  const A* w1 = w0 + K;
  const A* w2 = w0 + 2 * K;
  int64_t k = 0;
  for (; k + N <= K; k += N) {
    if constexpr (kPrefetch)
      for (int64_t o = 0; o < kRowStep; o += 64)
        prefetch_l2_line(pf + WR * k * int64_t(sizeof(A)) + o);
    const vec_t<A> v0 = vload(w0 + k);
    vec_t<A> v1{}, v2{};
    if constexpr (WR > 1) v1 = vload(w1 + k);
    if constexpr (WR > 2) v2 = vload(w2 + k);
    for (int m = 0; m < XR; ++m) {
      const vec_t<A> xv = in_register(vload(x + m * xs + k));
      a0[m] += v0 * xv;
      if constexpr (WR > 1) a1[m] += v1 * xv;
      if constexpr (WR > 2) a2[m] += v2 * xv;
    }
  }
  if constexpr (kPrefetch)
    for (int64_t o = WR * k * int64_t(sizeof(A)); o < WR * K * int64_t(sizeof(A)); o += 64)
      prefetch_l2_line(pf + o);
  vec_t<A> sums[WR * XR];
  for (int m = 0; m < XR; ++m) {
    sums[m] = a0[m];
    if constexpr (WR > 1) sums[XR + m] = a1[m];
    if constexpr (WR > 2) sums[2 * XR + m] = a2[m];
  }
  for (int r = 0; r < WR; ++r)
    for (int m = 0; m < XR; ++m) {
      A s = hsum<A>(sums[r * XR + m]);
      for (int64_t kk = k; kk < K; ++kk) s += w0[r * K + kk] * x[m * xs + kk];
      out[r * ldo + m] = s;
    }
}

// linear_tile for wr <= 3 rows and xr <= 4 x rows (static switch).
template <typename A>
inline void linear_tile_any(int64_t wr, int64_t xr, const A* x, int64_t xs, const A* w0,
                            int64_t K, const char* pf, A* out, int64_t ldo) {
  auto rows = [&](auto wr_c) {
    constexpr int WR = decltype(wr_c)::value;
    auto cols = [&](auto xr_c) {
      constexpr int XR = decltype(xr_c)::value;
      if (pf != nullptr)
        linear_tile<A, WR, XR, true>(x, xs, w0, K, pf, out, ldo);
      else
        linear_tile<A, WR, XR, false>(x, xs, w0, K, pf, out, ldo);
    };
    switch (xr) {
      case 1: cols(std::integral_constant<int, 1>{}); break;
      case 2: cols(std::integral_constant<int, 2>{}); break;
      case 3: cols(std::integral_constant<int, 3>{}); break;
      default: cols(std::integral_constant<int, 4>{}); break;
    }
  };
  switch (wr) {
    case 1: rows(std::integral_constant<int, 1>{}); break;
    case 2: rows(std::integral_constant<int, 2>{}); break;
    default: rows(std::integral_constant<int, 3>{}); break;
  }
}

// One weight row against mb <= 8 x rows (mb chooses the template).
template <typename A>
inline void linear_row_any(int64_t mb, const A* x, int64_t xs, const A* wrow, int64_t K,
                           const char* pf, A* out) {
  switch (mb) {
    case 1: linear_row<A, 1>(x, xs, wrow, K, pf, out); break;
    case 2: linear_row<A, 2>(x, xs, wrow, K, pf, out); break;
    case 3: linear_row<A, 3>(x, xs, wrow, K, pf, out); break;
    case 4: linear_row<A, 4>(x, xs, wrow, K, pf, out); break;
    case 5: linear_row<A, 5>(x, xs, wrow, K, pf, out); break;
    case 6: linear_row<A, 6>(x, xs, wrow, K, pf, out); break;
    case 7: linear_row<A, 7>(x, xs, wrow, K, pf, out); break;
    default: linear_row<A, 8>(x, xs, wrow, K, pf, out); break;
  }
}

// One weight row against xr = 5..8 x rows (static switch): AVX2's tile for 5 to 7 x rows whose
// block fits in L1 (linear_impl; 8 rows take linear_pair_rows).
template <typename A>
inline void linear_row_tile(int64_t xr, const A* x, int64_t xs, const A* w0, int64_t K,
                            const char* pf, A* out) {
  switch (xr) {
    case 5: linear_tile<A, 1, 5, true>(x, xs, w0, K, pf, out, 1); break;
    case 6: linear_tile<A, 1, 6, true>(x, xs, w0, K, pf, out, 1); break;
    case 7: linear_tile<A, 1, 7, true>(x, xs, w0, K, pf, out, 1); break;
    default: linear_tile<A, 1, 8, true>(x, xs, w0, K, pf, out, 1); break;
  }
}

// Two adjacent weight rows (one with wr = 1) against xr <= 8 x rows (AVX2, x rows in L1), into
// out[r * 8 + m]. Eight: a 2 x 6 tile (12 accumulators, which fit AVX2's 16 registers with the
// two weight vectors and an x vector) that prefetches (pf not null), then a 2 x 2 tile over the
// same two rows, now in L1: 12 loads per 16 multiply-adds, where one row against all 8 x rows
// (linear_row_tile) takes 18, and two 3 x 4 tiles read each weight row twice. Fewer: tiles of
// up to 4 x rows.
template <typename A>
inline void linear_pair_rows(int64_t wr, int64_t xr, const A* x, int64_t xs, const A* w0,
                             int64_t K, const char* pf, A* out) {
  if (wr == 2 && xr == 8) {
    if (pf != nullptr)
      linear_tile<A, 2, 6, true>(x, xs, w0, K, pf, out, 8);
    else
      linear_tile<A, 2, 6, false>(x, xs, w0, K, pf, out, 8);
    linear_tile<A, 2, 2, false>(x + 6 * xs, xs, w0, K, nullptr, out + 6, 8);
    return;
  }
  for (int64_t m0 = 0; m0 < xr; m0 += 4, pf = nullptr)
    linear_tile_any<A>(wr, std::min<int64_t>(4, xr - m0), x + m0 * xs, xs, w0, K, pf,
                       out + m0, 8);
}

// Weight rows and x rows per pass of linear_impl. AVX2 (16 registers): linear_tile's 3 x 4,
// which measured 1.01-1.17x the pairs of rows against 8 x rows at 8 rows, 1.17-1.37x at 16 and
// 1.22-1.44x at 4 (bench/RESULTS.md, 2026-12-07). AVX-512 keeps the pairs, whose 16
// accumulators fit its 32 registers; the baseline build, not measured, too.
constexpr int64_t kLinearWeightRows = kVBytes == 32 ? 3 : 2;
constexpr int64_t kLinearXRows = kVBytes == 32 ? 4 : 8;

// wr <= kLinearWeightRows weight rows from w0 against xr <= kLinearXRows x rows, into
// out[r * kLinearXRows + m]. pf null: the rows are already in L1, nothing to prefetch.
template <typename A>
inline void linear_block(int64_t wr, int64_t xr, const A* x, int64_t xs, const A* w0,
                         int64_t ws, int64_t K, const char* pf, A* out, bool x_in_l1) {
  constexpr int64_t XR = kLinearXRows;
  if constexpr (kVBytes == 32) {
    linear_tile_any<A>(wr, xr, x, xs, w0, K, pf, out, XR);  // rows of K: ws == K
  } else {
    const char* p = pf != nullptr ? pf : reinterpret_cast<const char*>(w0);
    if (wr == 2 && xr == XR) {
      if (x_in_l1)
        linear_row_pair8<A, true>(x, xs, w0, ws, K, p, out, out + XR);
      else
        linear_row_pair8<A, false>(x, xs, w0, ws, K, p, out, out + XR);
    } else {
      linear_row_any<A>(xr, x, xs, w0, K, p, out);
      if (wr == 2) linear_row_any<A>(xr, x, xs, w0 + ws, K, p + K * sizeof(A), out + XR);
    }
  }
}

template <typename A>
void linear_impl(const LinearArgs& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
  if (M == 0 || N == 0) return;
  const A* x = static_cast<const A*>(a.x);
  const A* w = static_cast<const A*>(a.w);
  const A* bias = static_cast<const A*>(a.bias);
  A* y = static_cast<A*>(a.y);
  const int64_t row_bytes = std::max<int64_t>(1, K * static_cast<int64_t>(sizeof(A)));
  const int64_t ahead = std::max<int64_t>(1, (int64_t{64} << 10) / row_bytes);
  // Contiguous row ranges, one per thread, so each core streams its own part of w; a small
  // layer stays on one thread (waking the other costs more than it saves). The cost is the
  // stream over w more than the multiply-adds, hence weight elements, not M * N * K.
  const int64_t work = 2 * N * K;
  const int64_t nth = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
  const int64_t grain = (N + nth - 1) / nth;
  constexpr int64_t WR = kLinearWeightRows, XR = kLinearXRows;
  // AVX2 with 5 to 7 x rows of at most 16 KiB (K <= 512 in float32): one pass, one weight row
  // against all of them, rather than two passes of 3 x 4 tiles, the second re-reading the rows
  // (1.15-1.22x at 5-7 rows on a Zen 3, but 0.67x at K = 2048 and 8 rows, where the x rows
  // outgrow L1 and each multiply-add's x vector comes from L2; bench/RESULTS.md, 2026-12-07).
  // rows x rows of `len` elements in 16 KiB: what stays in L1 beside the weight rows
  const auto in_l1 = [](int64_t rows, int64_t len) {
    return rows * len * int64_t(sizeof(A)) <= (16 << 10);
  };
  const bool one_pass = kVBytes == 32 && M > XR && M < 8 && in_l1(M, K);
  // AVX2 with 8 to 16 x rows whose blocks of 8 fit 16 KiB: pairs of weight rows against each
  // block of 8 (linear_pair_rows), in passes over 128 KiB blocks of weight rows, so each pass
  // keeps its 8 x rows in L1. Against one row at a time, 8 rows: 1.02-1.70x in six runs
  // (weights cold, 2 threads and 1), a pythia-70m-kv decode step at batch 8 1.02-1.11x (the
  // uncompressed model) and 1.08-1.11x (kv+fold, with and without int8); against 3 x 4 tiles,
  // 16 rows: 1.10-1.16x, 12 rows 1.02-1.08x, 10 rows 0.96-1.05x (Zen 3, bench/RESULTS.md,
  // 2026-12-08).
  const bool pairs_of_rows = kVBytes == 32 && M >= 8 && M <= 16 && in_l1(8, K);
  // AVX-512 with 4 to 7 x rows that outgrow 16 KiB (K = 2048: the 4h_to_h layer at batch
  // 4-7): K in chunks whose x rows fit it, each chunk a pass over the block of weight rows
  // (linear_row folds each x load into its multiply-add, so x rows in L2 slow every one).
  // 1.29-1.38x at 4-7 rows and K = 2048, weights cold, 2 threads; at 3 rows 0.78x and at 8 and
  // 16 (two weight rows a load, already at the stream's speed) 0.93x, so not there (Zen 4,
  // bench/RESULTS.md, 2026-12-07).
  constexpr int64_t NV = VecT<A>::N;
  const int64_t k_chunk =
      kVBytes == 64 && M >= 4 && M < XR && !in_l1(M, K)
          ? std::max<int64_t>(NV, (16 << 10) / (M * int64_t(sizeof(A))) / NV * NV)
          : K;
  // AVX-512 with more x rows than a pass takes (9 to 32), or with K chunks: the passes go over
  // blocks of weight rows (128 KiB, which stay in L2), not over each pair of rows, so each pass
  // keeps its own 8 x rows in L1 (16 KiB at K = 512) where alternating passes had all 16
  // (32 KiB) compete for it. With the weights cold, 2 threads: 1.22-1.35x at 16 rows and
  // 1.07-1.13x at 10 and 12 for the K = 512 layers (LM head, QKV, h_to_4h, dense), 0.97-1.04x
  // at K = 2048; 64 and 256 KiB blocks measured alike (Zen 4, bench/RESULTS.md, 2026-12-07).
  // A pass's tile: tile_w weight rows by up to tile_x x rows, into out[r * tile_x + m].
  const int64_t tile_w = pairs_of_rows ? 2 : WR, tile_x = pairs_of_rows ? 8 : XR;
  constexpr int64_t kTileOut = WR * XR > 2 * 8 ? WR * XR : 2 * 8;
  const int64_t block_rows =
      (kVBytes == 64 && (M > XR || k_chunk < K)) || pairs_of_rows
          ? std::max<int64_t>(tile_w, (int64_t{128} << 10) / row_bytes / tile_w * tile_w)
          : tile_w;
  // GELU on a thread's columns [n0, n1) once they are final, while they are in its cache.
  const auto activate = [&](int64_t n0, int64_t n1) {
    if (a.gelu)
      for (int64_t m = 0; m < M; ++m) gelu_span(y + m * N + n0, n1 - n0);
  };
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    A out[kTileOut];
    if (one_pass) {
      A row_out[8];
      for (int64_t n = n0; n < n1; ++n) {
        const char* pf = reinterpret_cast<const char*>(w + std::min(n + ahead, n1 - 1) * K);
        linear_row_tile<A>(M, x, K, w + n * K, K, pf, row_out);
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = row_out[m] + (bias ? bias[n] : A(0));
      }
      activate(n0, n1);
      return;
    }
    // tile_w rows at a time against every block of (up to) tile_x x rows, in passes over
    // blocks of block_rows weight rows (and K chunks). Only the first pass prefetches: the rows
    // `ahead` further on, or with K chunks the next block, a slice a call; later passes find
    // the block's rows in L1 (one tile a block) or L2.
    for (int64_t nb = n0; nb < n1; nb += block_rows) {
      const int64_t nb1 = std::min(n1, nb + block_rows);
      const int64_t next_bytes = (std::min(n1, nb1 + block_rows) - nb1) * row_bytes;
      int64_t slice = 0;
      for (int64_t k0 = 0; k0 < K; k0 += k_chunk) {
        const int64_t kl = std::min(k_chunk, K - k0);
        for (int64_t m0 = 0; m0 < M; m0 += tile_x) {
          const int64_t xr = std::min(tile_x, M - m0);
          const bool x_in_l1 = in_l1(xr, kl);
          for (int64_t n = nb; n < nb1; n += tile_w) {
            const int64_t wr = std::min(tile_w, nb1 - n);
            const A* w0 = w + n * K;
            const char* pf = nullptr;
            if (m0 == 0 && k_chunk == K) {
              pf = reinterpret_cast<const char*>(w + std::min(n + ahead, n1 - wr) * K);
            } else if (m0 == 0) {
              const int64_t offset = slice++ * 2 * kl * int64_t(sizeof(A));  // a pair's chunk
              if (offset < next_bytes) pf = reinterpret_cast<const char*>(w + nb1 * K) + offset;
            }
            if (pairs_of_rows)  // rows of K, no K chunks
              linear_pair_rows<A>(wr, xr, x + m0 * K, K, w0, K, pf, out);
            else
              linear_block<A>(wr, xr, x + m0 * K + k0, K, w0 + k0, K, kl, pf, out, x_in_l1);
            for (int64_t r = 0; r < wr; ++r)
              for (int64_t m = 0; m < xr; ++m) {
                A& yv = y[(m0 + m) * N + n + r];
                const A partial = out[r * tile_x + m];
                yv = k0 == 0 ? partial + (bias ? bias[n + r] : A(0)) : yv + partial;
              }
          }
        }
      }
    }
    activate(n0, n1);
  });
}

}  // namespace

#define VDPROJ_DISPATCH(kind, FN, args)                                   \
  switch (kind) {                                                         \
    case Kind::F32: FN<float, float>(args); break;                        \
    case Kind::F64: FN<double, double>(args); break;                      \
    case Kind::BF16: FN<c10::BFloat16, float>(args); break;               \
    case Kind::F16: FN<c10::Half, float>(args); break;                    \
  }

void attention(Kind kind, const AttnArgs& a) { VDPROJ_DISPATCH(kind, attention_impl, a) }
void attention_backward(Kind kind, const BwdArgs& a) { VDPROJ_DISPATCH(kind, backward_impl, a) }
void append(Kind kind, const AppendArgs& a) { VDPROJ_DISPATCH(kind, append_impl, a) }
void effective_query(Kind kind, const QueryArgs& a) {
  VDPROJ_DISPATCH(kind, effective_query_impl, a)
}
void quantize_into(Kind kind, const QuantWriteArgs& a) {
  VDPROJ_DISPATCH(kind, quantize_into_impl, a)
}
void linear(Kind kind, const LinearArgs& a) {
  if (kind == Kind::F64)
    linear_impl<double>(a);
  else
    linear_impl<float>(a);  // the op wrapper admits float32 and float64 only
}

#undef VDPROJ_DISPATCH

}  // namespace VDPROJ_ISA_NS
}  // namespace cpu
}  // namespace vdproj
