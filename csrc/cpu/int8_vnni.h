// Latent-key decode over an int8 cache with AVX-512 VNNI: the dot products in exact integer
// arithmetic, four int8 multiply-adds per 32-bit lane per instruction instead of one float32
// FMA. Included by kernels.h; compiled in the AVX-512 variant only, and used where the CPU has
// VNNI (cpu_has_int8_vnni, dispatch.h). No include guard on purpose (one copy per variant).
//
// The float32 side of each product (the query for the scores, the softmax weights times the
// V_c row scales for the values) is split into three signed 8-bit digits of one shared scale:
// x = rint(v * 127*2^16 / max|v|) = d0*2^16 + d1*2^8 + d2, each digit in [-128, 127]. The
// int8 side is the stored cache itself, offset by 128 to the unsigned operand vpdpbusd needs
// (the offset's contribution, 128 * sum(d), is subtracted afterwards). Every product and sum
// is exact in int32; the digits carry 24 bits of the float side relative to its largest
// element, so the result is within float32 rounding of the float math on the dequantized
// cache (measured 1.2e-7 relative for the scores and 9e-8 for the values, where the float32
// path has 8e-8 and 2.8e-7: bench/RESULTS.md). Three digits cost three instructions per four
// multiply-adds per lane, 25% fewer than float32 FMAs, and the int8 rows need no conversion.
//
// Keys are scored 16 at a time, one per lane: 16 rows are transposed by 32-bit words so that
// each vector holds the same four bytes of 16 keys, and a query's digits are broadcast. The
// values take four keys per lane-quad (the rows interleaved bytewise), accumulate integer
// partial sums over a block of kBlock keys and fold them into the float32 accumulators once
// per block. Anything the integer form would not reproduce exactly (a non-finite query, scale
// or score; a weight too small for its digits) falls back to the float32 code for that block,
// group or row.

#if VDPROJ_VBYTES >= 64 && defined(__x86_64__)

namespace int8_vnni {

constexpr int64_t kBlock = 256;  // keys per softmax block (the fold amortized over 64 key quads)
constexpr int64_t kGroup = 16;   // keys scored together, one per lane
constexpr int32_t kFull = 127 * 65536;  // largest |x| of the three-digit split

// In place through asm: with the intrinsic, GCC 12 copied and spilled the 24 accumulators on
// every iteration (1.8x slower). asm also needs no target attribute: callers check the CPU.
#define VDPROJ_DPBUSD(acc, u8, s8) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8))

// The shapes this path takes (anything else goes to the float32 path).
inline bool supports(int64_t H, int64_t Dk, int64_t Dl, int64_t R, bool kl_is_vc) {
  // Dl, Dk <= 512: (d0 - c0) * 2^8 stays within int32 (combine_digits)
  return H % 4 == 0 && Dk % 4 == 0 && Dk <= 512 && (H * Dk) % 64 == 0 && Dl % 64 == 0 &&
         Dl > 0 && Dl <= 512 && R % 64 == 0 && R > 0 && !kl_is_vc;
}

// Splits n floats into digit planes (planes + d*ld_plane, d = 0, 1, 2) and returns the scale
// max|v| / kFull (0 for all zeros); csum[d] = 128 * sum of plane d. Not finite, or too small
// for kFull / max to be finite: returns a negative value.
inline float split_digits(const float* v, int64_t n, int8_t* planes, int64_t ld_plane,
                          int32_t* csum) {
  __m512 mx = _mm512_setzero_ps(), nonfinite = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, v + j);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
    nonfinite = _mm512_add_ps(nonfinite, _mm512_mul_ps(x, _mm512_setzero_ps()));  // NaN, inf: NaN
  }
  const float vmax = _mm512_reduce_max_ps(mx);
  if (!(_mm512_reduce_add_ps(nonfinite) == 0.0f) || !(vmax <= 1e30f)) return -1.0f;
  if (vmax != 0.0f && !(vmax >= 1e-30f)) return -1.0f;
  const __m512 f = _mm512_set1_ps(vmax > 0.0f ? float(kFull) / vmax : 0.0f);
  const __m512i c128 = _mm512_set1_epi32(128), m255 = _mm512_set1_epi32(255);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    // min(): v * f can round a hair above kFull for the largest element
    const __m512i x = _mm512_max_epi32(
        _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + j), f)),
                         _mm512_set1_epi32(kFull)),
        _mm512_set1_epi32(-kFull));
    const __m512i d2 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(x, c128), m255), c128);
    const __m512i y = _mm512_srai_epi32(_mm512_sub_epi32(x, d2), 8);
    const __m512i d1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(y, c128), m255), c128);
    const __m512i d0 = _mm512_srai_epi32(_mm512_sub_epi32(y, d1), 8);
    s0 = _mm512_add_epi32(s0, d0);
    s1 = _mm512_add_epi32(s1, d1);
    s2 = _mm512_add_epi32(s2, d2);
    _mm_mask_storeu_epi8(planes + j, m, _mm512_cvtepi32_epi8(d0));
    _mm_mask_storeu_epi8(planes + ld_plane + j, m, _mm512_cvtepi32_epi8(d1));
    _mm_mask_storeu_epi8(planes + 2 * ld_plane + j, m, _mm512_cvtepi32_epi8(d2));
  }
  csum[0] = 128 * _mm512_reduce_add_epi32(s0);
  csum[1] = 128 * _mm512_reduce_add_epi32(s1);
  csum[2] = 128 * _mm512_reduce_add_epi32(s2);
  return vmax / float(kFull);
}

inline __m512i broadcast4(const int32_t* p) { return _mm512_set1_epi32(*p); }
inline __m512i broadcast_bytes4(const int8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm512_set1_epi32(w);
}

// All 16 lanes finite (x * 0 is 0 for finite x, NaN otherwise)
inline bool all_lanes_finite(__m512 x) {
  return _mm512_cmp_ps_mask(_mm512_mul_ps(x, _mm512_setzero_ps()), _mm512_setzero_ps(),
                            _CMP_EQ_OQ) == 0xFFFF;
}

// (d0 - c0) * 2^16 + (d1 - c1) * 2^8 + (d2 - c2) as float32; the first two combined in int32
// (|d0 - c0| <= 512 * 127 * 128, so the shift cannot overflow).
inline __m512 combine_digits(const __m512i* a, const int32_t* c) {
  const __m512i hi =
      _mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(a[0], _mm512_set1_epi32(c[0])), 8),
                       _mm512_sub_epi32(a[1], _mm512_set1_epi32(c[1])));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(256.0f),
                         _mm512_cvtepi32_ps(_mm512_sub_epi32(a[2], _mm512_set1_epi32(c[2]))));
}

// 16 rows of 64 bytes (row i at p + i * ld), offset by 128 and transposed by 32-bit words:
// out[g] lane i = bytes 4g .. 4g+3 of row i.
inline void transpose_rows16(const int8_t* p, int64_t ld, __m512i* out) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_xor_si512(_mm512_loadu_si512(p + i * ld), flip);
  for (int k = 0; k < 4; ++k) {
    const __m512i a = r[4 * k], b = r[4 * k + 1], c = r[4 * k + 2], d = r[4 * k + 3];
    const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
    const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
    t[4 * k + 0] = _mm512_unpacklo_epi64(t0, t2);
    t[4 * k + 1] = _mm512_unpackhi_epi64(t0, t2);
    t[4 * k + 2] = _mm512_unpacklo_epi64(t1, t3);
    t[4 * k + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  // t[4k + m], 128-bit lane L: rows 4k .. 4k+3 at word 4L + m; a 4 x 4 transpose of 128-bit
  // lanes finishes it.
  for (int m = 0; m < 4; ++m) {
    const __m512i o0 = t[m], o1 = t[4 + m], o2 = t[8 + m], o3 = t[12 + m];
    const __m512i s0 = _mm512_shuffle_i32x4(o0, o1, 0x44), s1 = _mm512_shuffle_i32x4(o0, o1, 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(o2, o3, 0x44), s3 = _mm512_shuffle_i32x4(o2, o3, 0xEE);
    _mm512_store_si512(out + 0 + m, _mm512_shuffle_i32x4(s0, s2, 0x88));
    _mm512_store_si512(out + 4 + m, _mm512_shuffle_i32x4(s0, s2, 0xDD));
    _mm512_store_si512(out + 8 + m, _mm512_shuffle_i32x4(s1, s3, 0x88));
    _mm512_store_si512(out + 12 + m, _mm512_shuffle_i32x4(s1, s3, 0xDD));
  }
}

struct AlignedVectors {  // 64-byte aligned vectors (std::vector<__m512i> is not aligned)
  __m512i* p = nullptr;
  explicit AlignedVectors(int64_t n) {
    p = static_cast<__m512i*>(std::aligned_alloc(64, std::max<int64_t>(1, n) * 64));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~AlignedVectors() { std::free(p); }
  AlignedVectors(const AlignedVectors&) = delete;
  AlignedVectors& operator=(const AlignedVectors&) = delete;
};

// The next block's cache rows, prefetched into L2 one line at a time from inside the scoring
// and rank-update loops, so that the lines stream in evenly over a block: issued in bursts
// (a group's share at once) the prefetches stalled the core on its line-fill buffers, as
// perf showed, and a decode step from memory was up to 24% slower.
struct RowLines {
  const char* row = nullptr;
  int64_t ld = 0, lines = 0, rows = 0, line = 0;
  void set(const void* first, int64_t stride, int64_t bytes, int64_t n) {
    row = static_cast<const char*>(first);
    ld = stride;
    lines = (bytes + 63) / 64;
    rows = lines > 0 ? n : 0;
    line = 0;
  }
  bool issue_one() {
    if (rows <= 0) return false;
    asm volatile("prefetcht1 %0" : : "m"(*(row + line * 64)));
    if (++line == lines) {
      line = 0;
      row += ld;
      --rows;
    }
    return true;
  }
};
struct NextBlock {  // its per-head keys, shared keys and values, in that order
  RowLines part[3];
  void issue_one() {
    for (RowLines& p : part)
      if (p.issue_one()) return;
  }
  void issue_all() {
    for (RowLines& p : part)
      while (p.issue_one()) {
      }
  }
};

// One thread's buffers for a (H, Dk, Dl, R) shape.
struct Workspace {
  int64_t H, Dk, Dl, R;
  // Digits as 32-bit words (four bytes of one digit plane), ordered [group][row][digit] so
  // that a step's 12 broadcasts read one run of memory from one base pointer (with a pointer
  // per row and digit GCC ran out of registers and spilled the accumulators).
  std::vector<int32_t> q_lat, q_rope;  // Dl/4 x H x 3, Dk/4 x H x 3
  std::vector<int8_t> planes;          // split_digits' output before reordering
  std::vector<float> s_lat, s_rope;   // H digit scales each
  std::vector<int32_t> c_lat, c_rope; // H x 3 offset corrections each
  AlignedVectors keys_t;          // a group's transposed key rows: Dl/4 + H*Dk/4 vectors
  AlignedVectors values_i;        // a block's interleaved V_c rows: kBlock/4 x R/64 x 4
  std::vector<int8_t> w_digits;       // H x 3 planes of kBlock bytes (a constant stride)
  std::vector<float> w_scale, scores; // H; H x kBlock
  std::vector<int32_t> w_corr;        // H x 3
  std::vector<float> kscale_t;        // a group's key scales, H x 16
  Workspace(int64_t H_, int64_t Dk_, int64_t Dl_, int64_t R_)
      : H(H_), Dk(Dk_), Dl(Dl_), R(R_), q_lat(H_ * 3 * Dl_ / 4), q_rope(H_ * 3 * Dk_ / 4),
        planes(3 * std::max<int64_t>({Dl_, Dk_, kBlock})), s_lat(H_),
        s_rope(H_), c_lat(3 * H_), c_rope(3 * H_), keys_t(Dl_ / 4 + H_ * Dk_ / 4),
        values_i(kBlock / 4 * R_ / 64 * 4), w_digits(H_ * 3 * kBlock), w_scale(H_),
        scores(H_ * kBlock), w_corr(3 * H_), kscale_t(H_ * kGroup) {}
};

// Row `row` of `rows` digits (n values, n % 4 == 0): split_digits into ws.planes, then
// reordered into dst[(g * rows + row) * 3 + d]. Returns split_digits' scale.
inline float split_into(const float* v, int64_t n, std::vector<int8_t>& planes, int64_t row,
                        int64_t rows, int32_t* dst, int32_t* csum) {
  const float sc = split_digits(v, n, planes.data(), n, csum);
  if (sc < 0.0f) return sc;
  for (int64_t g = 0; g < n / 4; ++g)
    for (int d = 0; d < 3; ++d)
      std::memcpy(dst + (g * rows + row) * 3 + d, planes.data() + d * n + 4 * g, 4);
  return sc;
}

// The query's digits (q: H rows of [Dk | Dl], already scaled). False if not representable.
inline bool split_query(const float* q, Workspace& ws) {
  const int64_t Dq = ws.Dk + ws.Dl;
  for (int64_t h = 0; h < ws.H; ++h) {
    ws.s_lat[h] = split_into(q + h * Dq + ws.Dk, ws.Dl, ws.planes, h, ws.H, ws.q_lat.data(),
                             ws.c_lat.data() + 3 * h);
    if (ws.s_lat[h] < 0.0f) return false;
    if (ws.Dk > 0) {
      ws.s_rope[h] = split_into(q + h * Dq, ws.Dk, ws.planes, h, ws.H, ws.q_rope.data(),
                                ws.c_rope.data() + 3 * h);
      if (ws.s_rope[h] < 0.0f) return false;
    }
  }
  return true;
}

// Scores of the 16 keys at krow / lrow (row strides ks_t, ls bytes) for every head:
// out[h * ldo + i]; kscale: H per key (key stride ksc), lscale: one per key (stride lsc).
// False if a scale or a score is not finite: then the float32 code must score these keys (its
// NaN and inf follow the float math). One line of the next block per step of the latent loop.
// Not inlined: inlined into its caller, GCC kept the 24 accumulators on the stack (1.3x
// slower).
__attribute__((noinline)) bool score_group(Workspace& ws, const int8_t* krow, int64_t ks_t,
                                           const int8_t* lrow, int64_t ls, const float* kscale,
                                           int64_t ksc, const float* lscale, int64_t lsc,
                                           float* out, int64_t ldo, NextBlock& next) {
  const int64_t H = ws.H, Dk = ws.Dk, Dl = ws.Dl, gl = Dl / 4, gk = Dk / 4;
  // The scales first: the gathers' latency then hides behind the transposes.
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lsv = _mm512_i32gather_ps(_mm512_mullo_epi32(lane, _mm512_set1_epi32(int(lsc))),
                                         lscale, 4);
  bool exact = all_lanes_finite(lsv);
  if (gk > 0) {
    const __m512i kidx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(int(ksc)));
    for (int64_t h = 0; h < H; ++h) {
      const __m512 ksv = _mm512_i32gather_ps(kidx, kscale + h, 4);
      exact &= all_lanes_finite(ksv);
      _mm512_storeu_ps(ws.kscale_t.data() + h * kGroup, ksv);
    }
  }
  __m512i* tr = ws.keys_t.p;
  for (int64_t c = 0; c < Dl / 64; ++c) transpose_rows16(lrow + c * 64, ls, tr + c * 16);
  for (int64_t c = 0; c < H * Dk / 64; ++c)
    transpose_rows16(krow + c * 64, ks_t, tr + gl + c * 16);
  for (int64_t hb = 0; hb < H; hb += 4) {
    __m512i la[4][3], ro[4][3];
    for (int h = 0; h < 4; ++h)
      for (int d = 0; d < 3; ++d) la[h][d] = ro[h][d] = _mm512_setzero_si512();
    const int32_t* qd = ws.q_lat.data() + hb * 3;
    for (int64_t g = 0; g < gl; ++g, qd += H * 3) {
      next.issue_one();
      const __m512i x = _mm512_load_si512(tr + g);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h)
#pragma GCC unroll 3
        for (int d = 0; d < 3; ++d) VDPROJ_DPBUSD(la[h][d], x, broadcast4(qd + h * 3 + d));
    }
    if (gk > 0) {
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const int32_t* qr = ws.q_rope.data() + (hb + h) * 3;
        for (int64_t g = 0; g < gk; ++g, qr += H * 3) {
          const __m512i x = _mm512_load_si512(tr + gl + (hb + h) * gk + g);
#pragma GCC unroll 3
          for (int d = 0; d < 3; ++d) VDPROJ_DPBUSD(ro[h][d], x, broadcast4(qr + d));
        }
      }
    }
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const int64_t hh = hb + h;
      __m512 s = _mm512_mul_ps(combine_digits(la[h], ws.c_lat.data() + 3 * hh),
                               _mm512_mul_ps(lsv, _mm512_set1_ps(ws.s_lat[hh])));
      if (gk > 0) {
        const __m512 ksv = _mm512_loadu_ps(ws.kscale_t.data() + hh * kGroup);
        s = _mm512_fmadd_ps(combine_digits(ro[h], ws.c_rope.data() + 3 * hh),
                            _mm512_mul_ps(ksv, _mm512_set1_ps(ws.s_rope[hh])), s);
      }
      exact &= all_lanes_finite(s);
      _mm512_storeu_ps(out + hh * ldo, s);
    }
  }
  return exact;
}

// Rows 4g .. 4g+3 (stride ld bytes) of nch 64-byte column chunks, offset by 128 and
// interleaved bytewise: out[(g * nch + c) * 4 + k], 32-bit lane 4L + i holding column
// 64c + 16L + 4k + i of the four rows.
inline void interleave_quads(const int8_t* v, int64_t ld, int64_t nq4, int64_t nch,
                             __m512i* out) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t g = 0; g < nq4; ++g) {
    const int8_t* v0 = v + 4 * g * ld;
    for (int64_t c = 0; c < nch; ++c) {
      const __m512i a = _mm512_xor_si512(_mm512_loadu_si512(v0 + c * 64), flip);
      const __m512i b = _mm512_xor_si512(_mm512_loadu_si512(v0 + ld + c * 64), flip);
      const __m512i e = _mm512_xor_si512(_mm512_loadu_si512(v0 + 2 * ld + c * 64), flip);
      const __m512i f = _mm512_xor_si512(_mm512_loadu_si512(v0 + 3 * ld + c * 64), flip);
      const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
      const __m512i ef0 = _mm512_unpacklo_epi8(e, f), ef1 = _mm512_unpackhi_epi8(e, f);
      __m512i* o = out + (g * nch + c) * 4;
      _mm512_store_si512(o + 0, _mm512_unpacklo_epi16(ab0, ef0));
      _mm512_store_si512(o + 1, _mm512_unpackhi_epi16(ab0, ef0));
      _mm512_store_si512(o + 2, _mm512_unpacklo_epi16(ab1, ef1));
      _mm512_store_si512(o + 3, _mm512_unpackhi_epi16(ab1, ef1));
    }
  }
}

// acc (H rows, R; row stride R) += w (H rows, nk; stride ldw) @ V_c (int8 rows of stride ldv).
// w >= 0 (softmax weights times the V_c scales). A row whose weights the digits cannot carry
// (non-finite, or too small) takes the float32 rank update.
// One line of the next block per step of the integer loop. Not inlined (see score_group).
__attribute__((noinline)) void rank_update_vnni(Workspace& ws, float* acc, const float* w,
                                                int64_t ldw, const int8_t* v, int64_t ldv,
                                                int64_t nk, NextBlock& next) {
  const int64_t H = ws.H, R = ws.R, nq4 = nk / 4, nk4 = nq4 * 4, nch = R / 64;
  int8_t* dig = ws.w_digits.data();
  for (int64_t r = 0; r < H; ++r) {
    float sc = nk4 > 0 ? split_digits(w + r * ldw, nk4, dig + r * 3 * kBlock, kBlock,
                                      ws.w_corr.data() + 3 * r)
                       : 0.0f;
    if (sc < 0.0f) {  // this row by the float32 code; zero digits here
      rank_update<float, Int8Rows>(acc + r * R, R, w + r * ldw, ldw, v, ldv, 1, nk4, R);
      std::memset(dig + r * 3 * kBlock, 0, 3 * kBlock);
      for (int d = 0; d < 3; ++d) ws.w_corr[3 * r + d] = 0;
      sc = 0.0f;
    }
    ws.w_scale[r] = sc;
  }
  if (nk4 < nk)  // the last nk % 4 keys
    rank_update<float, Int8Rows>(acc, R, w + nk4, ldw, v + nk4 * ldv, ldv, H, nk - nk4, R);
  if (nq4 == 0) return;
  interleave_quads(v, ldv, nq4, nch, ws.values_i.p);
  const __m512i* vi = ws.values_i.p;
  constexpr int RT = 4, SV = 2;  // 4 rows x 2 vectors x 3 digits: 24 accumulators
  for (int64_t c = 0; c < nch; ++c) {
    for (int64_t r0 = 0; r0 < H; r0 += RT) {
      __m512 folded[RT][4];
      for (int half = 0; half < 2; ++half) {
        __m512i a[RT][3][SV];
        for (int r = 0; r < RT; ++r)
          for (int d = 0; d < 3; ++d)
            for (int s = 0; s < SV; ++s) a[r][d][s] = _mm512_setzero_si512();
        const __m512i* base = vi + c * 4 + half * SV;
        // the planes of rows r0 .. r0+3 at constant offsets from one pointer
        const int8_t* dg = dig + r0 * 3 * kBlock;
        for (int64_t g = 0; g < nq4; ++g, base += nch * 4, dg += 4) {
          next.issue_one();
          __m512i x[SV];
          for (int s = 0; s < SV; ++s) x[s] = _mm512_load_si512(base + s);
#pragma GCC unroll 4
          for (int r = 0; r < RT; ++r)
#pragma GCC unroll 3
            for (int d = 0; d < 3; ++d) {
              const __m512i b = broadcast_bytes4(dg + (r * 3 + d) * kBlock);
#pragma GCC unroll 2
              for (int s = 0; s < SV; ++s) VDPROJ_DPBUSD(a[r][d][s], x[s], b);
            }
        }
        for (int r = 0; r < RT; ++r)
          for (int s = 0; s < SV; ++s) {
            const __m512i t[3] = {a[r][0][s], a[r][1][s], a[r][2][s]};
            folded[r][half * SV + s] =
                _mm512_mul_ps(combine_digits(t, ws.w_corr.data() + 3 * (r0 + r)),
                              _mm512_set1_ps(ws.w_scale[r0 + r]));
          }
      }
      // folded[r][k], lane 4L + i = column 16L + 4k + i of this chunk: a 4 x 4 transpose of
      // 128-bit lanes puts the columns in order.
      for (int r = 0; r < RT; ++r) {
        const __m512 o0 = folded[r][0], o1 = folded[r][1], o2 = folded[r][2], o3 = folded[r][3];
        const __m512 t0 = _mm512_shuffle_f32x4(o0, o1, 0x44), t1 = _mm512_shuffle_f32x4(o0, o1, 0xEE);
        const __m512 t2 = _mm512_shuffle_f32x4(o2, o3, 0x44), t3 = _mm512_shuffle_f32x4(o2, o3, 0xEE);
        const __m512 n[4] = {_mm512_shuffle_f32x4(t0, t2, 0x88), _mm512_shuffle_f32x4(t0, t2, 0xDD),
                             _mm512_shuffle_f32x4(t1, t3, 0x88), _mm512_shuffle_f32x4(t1, t3, 0xDD)};
        float* dst = acc + (r0 + r) * R + c * 64;
        for (int k = 0; k < 4; ++k)
          _mm512_storeu_ps(dst + 16 * k, _mm512_add_ps(_mm512_loadu_ps(dst + 16 * k), n[k]));
      }
    }
  }
}

// attend_range for one query of a latent-key int8 cache (separate K_c and V_c): keys
// [j0, min(j1, lim + 1)), blocks of kBlock. False, with nothing done, if the query cannot be
// split into digits (then the caller takes the float32 path).
template <typename T>
bool attend_one_query(Workspace& ws, const float* q, int64_t lim, const KeySource<T>& src,
                      int64_t j0, int64_t j1, TileState<float> st) {
  if (!split_query(q, ws)) return false;
  const int64_t H = ws.H, Dk = ws.Dk, Dl = ws.Dl, R = ws.R;
  j1 = std::min(j1, lim + 1);
  float* sbuf = ws.scores.data();
  const int64_t ks_t = src.k.st, ls = src.l.st, vs = src.v.st;
  const int64_t ksc = src.k.sc_st, lsc = src.l.sc_st, vsc = src.v.sc_st;
  float v_scale[kBlock];
  NextBlock next;
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t nk = std::min(kBlock, j1 - jb);
    const int64_t jn = jb + nk, n_next = std::min(kBlock, j1 - jn);
    if (n_next > 0) {
      next.part[0].set(src.k.row(jn), ks_t, H * Dk, n_next);
      next.part[1].set(src.l.row(jn), ls, Dl, n_next);
      next.part[2].set(src.v.row(jn), vs, R, n_next);
    }
    const int8_t* kp = static_cast<const int8_t*>(src.k.row(jb));
    const int8_t* lp = static_cast<const int8_t*>(src.l.row(jb));
    const int8_t* vp = static_cast<const int8_t*>(src.v.row(jb));
    for (int64_t jj = 0; jj < nk; ++jj) v_scale[jj] = src.v.scale[(jb + jj) * vsc];
    // Keys [u0, u1) of the block by the float32 code, one at a time.
    auto score_in_float = [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u)
        key_scores<float, Int8Rows>(q, Dk + Dl, kp + u * ks_t, Dk, Dk, lp + u * ls, Dl, H,
                                    sbuf + u, kBlock, src.k.scale + (jb + u) * ksc,
                                    src.l.scale[(jb + u) * lsc]);
    };
    int64_t jj = 0;
    for (; jj + kGroup <= nk; jj += kGroup)
      if (!score_group(ws, kp + jj * ks_t, ks_t, lp + jj * ls, ls, src.k.scale + (jb + jj) * ksc,
                       ksc, src.l.scale + (jb + jj) * lsc, lsc, sbuf + jj, kBlock, next))
        score_in_float(jj, jj + kGroup);
    score_in_float(jj, nk);  // the block's last keys, fewer than a group
    softmax_block(sbuf, kBlock, H, nk, st, R, v_scale);
    rank_update_vnni(ws, st.acc, sbuf, kBlock, vp, vs, nk, next);
    next.issue_all();
  }
  return true;
}

}  // namespace int8_vnni

#undef VDPROJ_DPBUSD
#endif
