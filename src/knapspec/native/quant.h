// knapspec's native quantized products: weights in GGUF block types as they are, repacked into
// tiles of 16 rows (knapspec/formats.py), times activations quantized per block of 32 to int8.
//
// y[m, n] = sum over blocks b of  scale(n, b) * dx(m, b) * isum(m, n, b)  (+ the block type's
// offset or minimum term), where isum is the exact integer dot product of the block's quantized
// weights and the row's quantized activations. Each row of activations is quantized on its own
// (32-blocks: dx = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|)), so nothing about a
// row depends on the other rows of the call.
//
// One SIMD lane per output row: a 64-byte row of a tile holds 4 consecutive bytes of each of the
// tile's 16 rows, so one vpdpbusd (unsigned weight bytes x signed activation bytes, 4 at a time)
// adds 4 products to each of 16 outputs, with the activations broadcast; there are no horizontal
// sums. Signed weights take an offset: Q8_0 is stored as q + 128 and the kernel starts its sum at
// -128 * sum(x); Q4_0 / Q5_0 / Q6_K start at -8 / -16 / -32 * sum(x) (the offsets of their
// unsigned codes). Each output's float sum runs over the blocks in order, with the same
// operations whatever the number of rows in the call: a row's result is bit-identical alone or in
// a batch (what speculative decoding needs to stay exact).
//
// A tile streams from memory once per call: up to 8 rows are taken per pass (4 for the K-quants and
// on AVX2; QKernel::rows), and with more rows the passes run over runs of blocks small enough to
// stay in L1. The threads split the tiles (16-row granularity keeps 2 threads balanced on 576-row
// matrices).
//
// Two instruction sets, chosen at run time (set_isa): AVX-512 VNNI, and AVX2 (vpmaddubsw +
// vpmaddwd, two 8-lane halves per tile; Q8_0 with the sign trick, since q + 128 could saturate
// vpmaddubsw). Both compute the same integers and the same float operations in the same order,
// so they give the same bits.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dense.h"   // act_f32

#define KS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define KS_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace ks {

// weight formats of a product (the codes are GGML's type ids; 0: the float tiles of dense.h)
enum Fmt : int64_t { kDense = 0, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };
enum Isa : int { kIsaAvx512 = 0, kIsaAvx2 = 1 };
inline int g_isa = kIsaAvx512;

constexpr int64_t kQLanes = 16;     // rows per tile
constexpr int kQRows = 8;           // activation rows per pass over a tile, at most (QKernel::rows)
constexpr int64_t kQRunBytes = 12288;   // bytes of a tile per run of blocks when rows take several passes
// Each block's bytes are prefetched this far ahead in the thread's stream of tiles (consecutive
// tiles are contiguous). Measured over the embedded model's weights, one thread, one row (medians
// of 30 interleaved sweeps): layers 7.8 ms without, 4.1-4.3 ms at 2-4 KB ahead; lm_head 1.39 against
// 1.18 ms.
constexpr int64_t kQPrefetchAhead = 4096;

inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kQPrefetchAhead + l), _MM_HINT_T0);
}

struct FmtInfo {
  int64_t block, head, body;        // weights per block, tile bytes per block (head, body)
};

inline FmtInfo fmt_info(int64_t f) {
  switch (f) {
    case kQ4_0: return {32, 32, 256};
    case kQ4_1: return {32, 64, 256};
    case kQ5_0: return {32, 32, 320};
    case kQ8_0: return {32, 32, 512};
    case kQ4_K: return {256, 64, 2304};
    case kQ6_K: return {256, 32, 3328};
    default: return {0, 0, 0};
  }
}
inline int64_t head_bytes(const FmtInfo& fi, int64_t K) { return (K / fi.block * fi.head + 63) / 64 * 64; }
inline int64_t tile_bytes(const FmtInfo& fi, int64_t K) { return head_bytes(fi, K) + K / fi.block * fi.body; }

// ---- activations --------------------------------------------------------------------------------

// M rows of K activations (K a multiple of 32) quantized per 32-block.
struct QAct {
  int64_t K = 0, nb = 0;
  int8_t* q = nullptr;        // [M][K]
  float* d = nullptr;         // [M][nb]  scale
  float* s = nullptr;         // [M][nb]  d * sum(q)
  int32_t* sum = nullptr;     // [M][nb]  sum(q)
  int32_t* sum16 = nullptr;   // [M][2 nb] sums of each half
  std::vector<int64_t> buf;
  void alloc(int64_t M, int64_t K_) {
    K = K_;
    nb = K / 32;
    const int64_t qbytes = (M * K + 63) / 64 * 64, bytes = qbytes + 20 * M * nb;
    if (static_cast<int64_t>(buf.size()) * 8 < bytes) buf.resize(bytes / 8 + 1);
    char* p = reinterpret_cast<char*>(buf.data());
    q = reinterpret_cast<int8_t*>(p);
    d = reinterpret_cast<float*>(p + qbytes);
    s = d + M * nb;
    sum = reinterpret_cast<int32_t*>(s + M * nb);
    sum16 = sum + M * nb;
  }
};

// A block whose largest magnitude is below this quantizes to zeros (127 / amax would overflow).
constexpr float kQTiny = 1e-30f;

template <typename T>
KS_VNNI void quantize_rows_512(const T* x, int64_t M, QAct& a) {
  const int64_t K = a.K, nb = a.nb;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const T* xb = x + m * K + 32 * b;
      __m512 v0, v1;
      if constexpr (std::is_same_v<T, float>) {
        v0 = _mm512_loadu_ps(xb);
        v1 = _mm512_loadu_ps(xb + 16);
      } else {
        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))), 16));
        v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))), 16));
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const int64_t i = m * nb + b;
      int8_t* q = a.q + m * K + 32 * b;
      if (!(amax >= kQTiny)) {
        std::memset(q, 0, 32);
        a.d[i] = a.s[i] = 0.0f;
        a.sum[i] = a.sum16[2 * i] = a.sum16[2 * i + 1] = 0;
        continue;
      }
      const float id = 127.0f / amax, dd = amax / 127.0f;
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(i1));
      const int32_t s0 = _mm512_reduce_add_epi32(i0), s1 = _mm512_reduce_add_epi32(i1);
      a.d[i] = dd;
      a.sum[i] = s0 + s1;
      a.sum16[2 * i] = s0;
      a.sum16[2 * i + 1] = s1;
      a.s[i] = dd * static_cast<float>(s0 + s1);
    }
}

// The same numbers without AVX-512 (the maximum and the integer sums are exact in any order;
// nearbyint rounds to nearest even like cvtps2dq).
template <typename T>
KS_AVX2 void quantize_rows_generic(const T* x, int64_t M, QAct& a) {
  const int64_t K = a.K, nb = a.nb;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const T* xb = x + m * K + 32 * b;
      float v[32];
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) {
        v[j] = act_f32(xb[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const int64_t i = m * nb + b;
      int8_t* q = a.q + m * K + 32 * b;
      if (!(amax >= kQTiny)) {
        std::memset(q, 0, 32);
        a.d[i] = a.s[i] = 0.0f;
        a.sum[i] = a.sum16[2 * i] = a.sum16[2 * i + 1] = 0;
        continue;
      }
      const float id = 127.0f / amax, dd = amax / 127.0f;
      int32_t s0 = 0, s1 = 0;
      for (int j = 0; j < 32; ++j) {
        const float p = v[j] * id;
        const int32_t r = static_cast<int32_t>(std::nearbyint(p));
        q[j] = static_cast<int8_t>(r);
        (j < 16 ? s0 : s1) += r;
      }
      a.d[i] = dd;
      a.sum[i] = s0 + s1;
      a.sum16[2 * i] = s0;
      a.sum16[2 * i + 1] = s1;
      a.s[i] = dd * static_cast<float>(s0 + s1);
    }
}

// ---- AVX-512 VNNI tiles -------------------------------------------------------------------------
// Each kernel: C rows (m0 ..) over the blocks [u0, u1) of one tile; the 16 sums of each row in
// accm (float [C][16], read unless `first`, written back).

#define KS_Q_SIG const uint8_t *tile, int64_t nb, const QAct &a, int64_t m0, int64_t u0, int64_t u1, \
                 float *accm, bool first

template <int C>
KS_VNNI inline void acc_load_512(__m512 (&acc)[C], const float* accm, bool first) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accm + 16 * c);
}
template <int C>
KS_VNNI inline void acc_store_512(const __m512 (&acc)[C], float* accm) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(accm + 16 * c, acc[c]);
}
// A block's integer sum per row: one chain of vpdpbusd when a pass has 5-8 rows (enough chains in
// flight to hide its latency), two (added at the end) for fewer rows. Integer sums: the same either way.
template <int C>
constexpr bool kOneChain = C > 4;

KS_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
KS_VNNI inline __m512 half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
KS_VNNI inline __m512i ld512(const uint8_t* p) { return _mm512_loadu_si512(p); }
KS_VNNI inline __m512 u8x16(const uint8_t* p) {      // 16 unsigned bytes -> float
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q4_0, Q4_1, Q5_0: 4 rows of 64 bytes per block; low nibbles of row i = weights 4i..4i+3, high
// nibbles = 16+4i..16+4i+3. Q5_0's fifth bits: one 64-byte row, bit v of each byte for vector v
// (v = 2i low, 2i + 1 high).
template <int64_t F, int C>
KS_VNNI void q4_tile_512(KS_Q_SIG) {
  constexpr int64_t head = F == kQ4_1 ? 64 : 32, body = F == kQ5_0 ? 320 : 256;
  constexpr int32_t offset = F == kQ4_0 ? 8 : (F == kQ5_0 ? 16 : 0);
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * head + 63) / 64 * 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[C];
  acc_load_512<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512 dw = half16(hp + u * head);
    const uint8_t* q = bp + u * body;
    prefetch_ahead(q, body);
    __m512i hb = _mm512_setzero_si512();
    if constexpr (F == kQ5_0) {
      hb = ld512(q);
      q += 64;
    }
    __m512i sl[C], sh[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      sl[c] = _mm512_set1_epi32(-offset * a.sum[(m0 + c) * nb + u]);
      if constexpr (!kOneChain<C>) sh[c] = _mm512_setzero_si512();
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512i v = ld512(q + 64 * i);
      __m512i l = _mm512_and_si512(v, low);
      __m512i h = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      if constexpr (F == kQ5_0) {
        const __m512i bit = _mm512_set1_epi8(0x10);
        // bit 2i -> bit 4, bit 2i+1 -> bit 4 (16-bit shifts; the mask keeps each byte's own bit)
        const __m512i bl = 2 * i <= 4 ? _mm512_slli_epi16(hb, 4 - 2 * i) : _mm512_srli_epi16(hb, 2 * i - 4);
        const __m512i bh = 2 * i + 1 <= 4 ? _mm512_slli_epi16(hb, 3 - 2 * i) : _mm512_srli_epi16(hb, 2 * i - 3);
        l = _mm512_or_si512(l, _mm512_and_si512(bl, bit));
        h = _mm512_or_si512(h, _mm512_and_si512(bh, bit));
      }
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const int8_t* xq = a.q + (m0 + c) * a.K + 32 * u;
        sl[c] = _mm512_dpbusd_epi32(sl[c], l, bcast4(xq + 4 * i));
        if constexpr (kOneChain<C>) sl[c] = _mm512_dpbusd_epi32(sl[c], h, bcast4(xq + 16 + 4 * i));
        else sh[c] = _mm512_dpbusd_epi32(sh[c], h, bcast4(xq + 16 + 4 * i));
      }
    }
    __m512 mw = _mm512_setzero_ps();
    if constexpr (F == kQ4_1) mw = half16(hp + u * head + 32);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const int64_t ai = (m0 + c) * nb + u;
      const __m512 f = _mm512_cvtepi32_ps(kOneChain<C> ? sl[c] : _mm512_add_epi32(sl[c], sh[c]));
      acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a.d[ai])), f, acc[c]);
      if constexpr (F == kQ4_1) acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[ai]), acc[c]);
    }
  }
  acc_store_512<C>(acc, accm);
}

// Q8_0: 8 rows of 64 bytes per block (q + 128), row i = weights 4i..4i+3.
template <int C>
KS_VNNI void q8_0_tile_512(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 32 + 63) / 64 * 64;
  __m512 acc[C];
  acc_load_512<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512 dw = half16(hp + u * 32);
    const uint8_t* q = bp + u * 512;
    prefetch_ahead(q, 512);
    __m512i s0[C], s1[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      s0[c] = _mm512_set1_epi32(-128 * a.sum[(m0 + c) * nb + u]);
      if constexpr (!kOneChain<C>) s1[c] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; i += 2) {
      const __m512i v0 = ld512(q + 64 * i), v1 = ld512(q + 64 * i + 64);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const int8_t* xq = a.q + (m0 + c) * a.K + 32 * u;
        s0[c] = _mm512_dpbusd_epi32(s0[c], v0, bcast4(xq + 4 * i));
        if constexpr (kOneChain<C>) s0[c] = _mm512_dpbusd_epi32(s0[c], v1, bcast4(xq + 4 * i + 4));
        else s1[c] = _mm512_dpbusd_epi32(s1[c], v1, bcast4(xq + 4 * i + 4));
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const int64_t ai = (m0 + c) * nb + u;
      const __m512 f = _mm512_cvtepi32_ps(kOneChain<C> ? s0[c] : _mm512_add_epi32(s0[c], s1[c]));
      acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a.d[ai])), f, acc[c]);
    }
  }
  acc_store_512<C>(acc, accm);
}

// Q4_K: per 256-weight block a head (d, dmin: 16 lanes each) and a body: 8 scales and 8 minimums
// (one byte per lane each), then 32 rows of 64 bytes: rows 8j..8j+7 hold weights 64j..64j+63 (low
// nibbles of row 8j+i = 64j+4i.., sub-block 2j; high nibbles = 64j+32+4i.., sub-block 2j+1).
template <int C>
KS_VNNI void q4_k_tile_512(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 64 + 63) / 64 * 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[C];
  acc_load_512<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512 d = half16(hp + u * 64), dmin = half16(hp + u * 64 + 32);
    const uint8_t* sm = bp + u * 2304;
    const uint8_t* q = sm + 256;
    prefetch_ahead(sm, 2304);
    for (int j = 0; j < 4; ++j) {
      __m512i sl[C], sh[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) sl[c] = sh[c] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512i v = ld512(q + (8 * j + i) * 64);
        const __m512i l = _mm512_and_si512(v, low);
        const __m512i h = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const int8_t* xq = a.q + (m0 + c) * a.K + 256 * u + 64 * j;
          sl[c] = _mm512_dpbusd_epi32(sl[c], l, bcast4(xq + 4 * i));
          sh[c] = _mm512_dpbusd_epi32(sh[c], h, bcast4(xq + 32 + 4 * i));
        }
      }
      const __m512 sc0 = _mm512_mul_ps(d, u8x16(sm + 16 * (2 * j))), sc1 = _mm512_mul_ps(d, u8x16(sm + 16 * (2 * j + 1)));
      const __m512 mn0 = _mm512_mul_ps(dmin, u8x16(sm + 16 * (8 + 2 * j)));
      const __m512 mn1 = _mm512_mul_ps(dmin, u8x16(sm + 16 * (9 + 2 * j)));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const int64_t ai = (m0 + c) * a.nb + 8 * u + 2 * j;
        acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(sc0, _mm512_set1_ps(a.d[ai])), _mm512_cvtepi32_ps(sl[c]), acc[c]);
        acc[c] = _mm512_fnmadd_ps(mn0, _mm512_set1_ps(a.s[ai]), acc[c]);
        acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(sc1, _mm512_set1_ps(a.d[ai + 1])), _mm512_cvtepi32_ps(sh[c]), acc[c]);
        acc[c] = _mm512_fnmadd_ps(mn1, _mm512_set1_ps(a.s[ai + 1]), acc[c]);
      }
    }
  }
  acc_store_512<C>(acc, accm);
}

// Q6_K: per 256-weight block a head (d) and a body: 16 sub-block scales (int8, one byte per lane
// each), the low nibbles (32 rows of 64 bytes) and the high bit pairs (16 rows). Half n of the
// block (weights 128n..): for i < 8, low rows a = 16n+i and b = 16n+8+i and high row 8n+i give
// weights 128n + 32g + 4i.. for g = 0..3: (a & 15 | h0-1), (b & 15 | h2-3), (a >> 4 | h4-5),
// (b >> 4 | h6-7); sub-block scale 8n + 2g + i/4.
template <int C>
KS_VNNI void q6_k_tile_512(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 32 + 63) / 64 * 64;
  const __m512i low = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30);
  __m512 acc[C];
  acc_load_512<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512 d = half16(hp + u * 32);
    const uint8_t* sc = bp + u * 3328;
    const uint8_t* ql = sc + 256;
    const uint8_t* qh = ql + 2048;
    prefetch_ahead(sc, 3328);
    for (int n = 0; n < 2; ++n)
      for (int half = 0; half < 2; ++half) {
        __m512i s[4][C];
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c)
            s[g][c] = _mm512_set1_epi32(-32 * a.sum16[2 * ((m0 + c) * a.nb + 8 * u + 4 * n + g) + half]);
#pragma GCC unroll 4
        for (int ii = 0; ii < 4; ++ii) {
          const int i = 4 * half + ii;
          const __m512i qa = ld512(ql + (16 * n + i) * 64), qb = ld512(ql + (16 * n + 8 + i) * 64);
          const __m512i h = ld512(qh + (8 * n + i) * 64);
          const __m512i v[4] = {
              _mm512_or_si512(_mm512_and_si512(qa, low), _mm512_and_si512(_mm512_slli_epi16(h, 4), two)),
              _mm512_or_si512(_mm512_and_si512(qb, low), _mm512_and_si512(_mm512_slli_epi16(h, 2), two)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(qa, 4), low), _mm512_and_si512(h, two)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(qb, 4), low),
                              _mm512_and_si512(_mm512_srli_epi16(h, 2), two))};
#pragma GCC unroll 4
          for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
              const int8_t* xq = a.q + (m0 + c) * a.K + 256 * u + 128 * n + 32 * g;
              s[g][c] = _mm512_dpbusd_epi32(s[g][c], v[g], bcast4(xq + 4 * i));
            }
        }
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          const __m512 dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 16 * (8 * n + 2 * g + half))))));
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) {
            const int64_t ai = (m0 + c) * a.nb + 8 * u + 4 * n + g;
            acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dsc, _mm512_set1_ps(a.d[ai])), _mm512_cvtepi32_ps(s[g][c]), acc[c]);
          }
        }
      }
  }
  acc_store_512<C>(acc, accm);
}

// ---- AVX2 tiles: the same sums, each tile as two halves of 8 lanes --------------------------------

KS_AVX2 inline __m256i bcast4_256(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
KS_AVX2 inline __m256 half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KS_AVX2 inline __m256i ld256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
KS_AVX2 inline __m256 u8x8(const uint8_t* p) {        // 8 unsigned bytes -> float
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// 4 products of unsigned w and signed x bytes summed per 32-bit lane (no saturation for w < 128)
KS_AVX2 inline __m256i dot4u(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
// the same for signed w (sign trick: |w| x sign(w) x)
KS_AVX2 inline __m256i dot4s(__m256i w, __m256i x) {
  return dot4u(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

template <int C>
KS_AVX2 inline void acc_load_256(__m256 (&acc)[C][2], const float* accm, bool first) {
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c)
    for (int hh = 0; hh < 2; ++hh)
      acc[c][hh] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(accm + 16 * c + 8 * hh);
}
template <int C>
KS_AVX2 inline void acc_store_256(const __m256 (&acc)[C][2], float* accm) {
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c)
    for (int hh = 0; hh < 2; ++hh) _mm256_storeu_ps(accm + 16 * c + 8 * hh, acc[c][hh]);
}

template <int64_t F, int C>
KS_AVX2 void q4_tile_256(KS_Q_SIG) {
  constexpr int64_t head = F == kQ4_1 ? 64 : 32, body = F == kQ5_0 ? 320 : 256;
  constexpr int32_t offset = F == kQ4_0 ? 8 : (F == kQ5_0 ? 16 : 0);
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * head + 63) / 64 * 64;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[C][2];
  acc_load_256<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    prefetch_ahead(bp + u * body, body);
    for (int hh = 0; hh < 2; ++hh) {
      const __m256 dw = half8(hp + u * head + 16 * hh);
      const uint8_t* q = bp + u * body + 32 * hh;
      __m256i hb = _mm256_setzero_si256();
      if constexpr (F == kQ5_0) {
        hb = ld256(q);
        q += 64;
      }
      __m256i s[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) s[c] = _mm256_set1_epi32(-offset * a.sum[(m0 + c) * nb + u]);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m256i v = ld256(q + 64 * i);
        __m256i l = _mm256_and_si256(v, low);
        __m256i h = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if constexpr (F == kQ5_0) {
          const __m256i bit = _mm256_set1_epi8(0x10);
          const __m256i bl = 2 * i <= 4 ? _mm256_slli_epi16(hb, 4 - 2 * i) : _mm256_srli_epi16(hb, 2 * i - 4);
          const __m256i bh = 2 * i + 1 <= 4 ? _mm256_slli_epi16(hb, 3 - 2 * i) : _mm256_srli_epi16(hb, 2 * i - 3);
          l = _mm256_or_si256(l, _mm256_and_si256(bl, bit));
          h = _mm256_or_si256(h, _mm256_and_si256(bh, bit));
        }
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const int8_t* xq = a.q + (m0 + c) * a.K + 32 * u;
          s[c] = _mm256_add_epi32(s[c], _mm256_add_epi32(dot4u(l, bcast4_256(xq + 4 * i)),
                                                         dot4u(h, bcast4_256(xq + 16 + 4 * i))));
        }
      }
      __m256 mw = _mm256_setzero_ps();
      if constexpr (F == kQ4_1) mw = half8(hp + u * head + 32 + 16 * hh);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const int64_t ai = (m0 + c) * nb + u;
        acc[c][hh] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(a.d[ai])), _mm256_cvtepi32_ps(s[c]), acc[c][hh]);
        if constexpr (F == kQ4_1) acc[c][hh] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[ai]), acc[c][hh]);
      }
    }
  }
  acc_store_256<C>(acc, accm);
}

template <int C>
KS_AVX2 void q8_0_tile_256(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 32 + 63) / 64 * 64;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[C][2];
  acc_load_256<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    prefetch_ahead(bp + u * 512, 512);
    for (int hh = 0; hh < 2; ++hh) {
      const __m256 dw = half8(hp + u * 32 + 16 * hh);
      const uint8_t* q = bp + u * 512 + 32 * hh;
      __m256i s[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) s[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256i v = _mm256_xor_si256(ld256(q + 64 * i), flip);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c)
          s[c] = _mm256_add_epi32(s[c], dot4s(v, bcast4_256(a.q + (m0 + c) * a.K + 32 * u + 4 * i)));
      }
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const int64_t ai = (m0 + c) * nb + u;
        acc[c][hh] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(a.d[ai])), _mm256_cvtepi32_ps(s[c]), acc[c][hh]);
      }
    }
  }
  acc_store_256<C>(acc, accm);
}

template <int C>
KS_AVX2 void q4_k_tile_256(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 64 + 63) / 64 * 64;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[C][2];
  acc_load_256<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t* sm = bp + u * 2304;
    const uint8_t* q = sm + 256;
    prefetch_ahead(sm, 2304);
    for (int j = 0; j < 4; ++j)
      for (int hh = 0; hh < 2; ++hh) {
        const __m256 d = half8(hp + u * 64 + 16 * hh), dmin = half8(hp + u * 64 + 32 + 16 * hh);
        __m256i sl[C], sh[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) sl[c] = sh[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m256i v = ld256(q + (8 * j + i) * 64 + 32 * hh);
          const __m256i l = _mm256_and_si256(v, low);
          const __m256i h = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) {
            const int8_t* xq = a.q + (m0 + c) * a.K + 256 * u + 64 * j;
            sl[c] = _mm256_add_epi32(sl[c], dot4u(l, bcast4_256(xq + 4 * i)));
            sh[c] = _mm256_add_epi32(sh[c], dot4u(h, bcast4_256(xq + 32 + 4 * i)));
          }
        }
        const uint8_t* sh8 = sm + 8 * hh;
        const __m256 sc0 = _mm256_mul_ps(d, u8x8(sh8 + 16 * (2 * j))), sc1 = _mm256_mul_ps(d, u8x8(sh8 + 16 * (2 * j + 1)));
        const __m256 mn0 = _mm256_mul_ps(dmin, u8x8(sh8 + 16 * (8 + 2 * j)));
        const __m256 mn1 = _mm256_mul_ps(dmin, u8x8(sh8 + 16 * (9 + 2 * j)));
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          const int64_t ai = (m0 + c) * a.nb + 8 * u + 2 * j;
          __m256& r = acc[c][hh];
          r = _mm256_fmadd_ps(_mm256_mul_ps(sc0, _mm256_set1_ps(a.d[ai])), _mm256_cvtepi32_ps(sl[c]), r);
          r = _mm256_fnmadd_ps(mn0, _mm256_set1_ps(a.s[ai]), r);
          r = _mm256_fmadd_ps(_mm256_mul_ps(sc1, _mm256_set1_ps(a.d[ai + 1])), _mm256_cvtepi32_ps(sh[c]), r);
          r = _mm256_fnmadd_ps(mn1, _mm256_set1_ps(a.s[ai + 1]), r);
        }
      }
  }
  acc_store_256<C>(acc, accm);
}

template <int C>
KS_AVX2 void q6_k_tile_256(KS_Q_SIG) {
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + (nb * 32 + 63) / 64 * 64;
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30);
  __m256 acc[C][2];
  acc_load_256<C>(acc, accm, first);
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t* sc = bp + u * 3328;
    const uint8_t* ql = sc + 256;
    const uint8_t* qh = ql + 2048;
    prefetch_ahead(sc, 3328);
    for (int n = 0; n < 2; ++n)
      for (int half = 0; half < 2; ++half)
        for (int hh = 0; hh < 2; ++hh) {
          const __m256 d = half8(hp + u * 32 + 16 * hh);
          __m256i s[4][C];
#pragma GCC unroll 4
          for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c)
              s[g][c] = _mm256_set1_epi32(-32 * a.sum16[2 * ((m0 + c) * a.nb + 8 * u + 4 * n + g) + half]);
#pragma GCC unroll 4
          for (int ii = 0; ii < 4; ++ii) {
            const int i = 4 * half + ii;
            const __m256i qa = ld256(ql + (16 * n + i) * 64 + 32 * hh);
            const __m256i qb = ld256(ql + (16 * n + 8 + i) * 64 + 32 * hh);
            const __m256i h = ld256(qh + (8 * n + i) * 64 + 32 * hh);
            const __m256i v[4] = {
                _mm256_or_si256(_mm256_and_si256(qa, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), two)),
                _mm256_or_si256(_mm256_and_si256(qb, low), _mm256_and_si256(_mm256_slli_epi16(h, 2), two)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), low), _mm256_and_si256(h, two)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), low),
                                _mm256_and_si256(_mm256_srli_epi16(h, 2), two))};
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
              for (int c = 0; c < C; ++c) {
                const int8_t* xq = a.q + (m0 + c) * a.K + 256 * u + 128 * n + 32 * g;
                s[g][c] = _mm256_add_epi32(s[g][c], dot4u(v[g], bcast4_256(xq + 4 * i)));
              }
          }
#pragma GCC unroll 4
          for (int g = 0; g < 4; ++g) {
            const __m256 dsc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                reinterpret_cast<const __m128i*>(sc + 16 * (8 * n + 2 * g + half) + 8 * hh)))));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c) {
              const int64_t ai = (m0 + c) * a.nb + 8 * u + 4 * n + g;
              acc[c][hh] = _mm256_fmadd_ps(_mm256_mul_ps(dsc, _mm256_set1_ps(a.d[ai])),
                                           _mm256_cvtepi32_ps(s[g][c]), acc[c][hh]);
            }
          }
        }
  }
  acc_store_256<C>(acc, accm);
}

#undef KS_Q_SIG

// ---- the product --------------------------------------------------------------------------------

using QTileFn = void (*)(const uint8_t*, int64_t, const QAct&, int64_t, int64_t, int64_t, float*, bool);

// f[c - 1] takes c rows; `rows` per pass at most: 8 for the AVX-512 kernels of 32-weight blocks,
// whose 8-row pass keeps 16 independent integer sums in flight (4 rows leave the vpdpbusd chains'
// latency exposed), and 4 for the others (their sums of 8 rows would not fit in the registers).
struct QKernel {
  QTileFn f[kQRows];
  int rows;
};

template <template <int> class K, int R>
QKernel qkernel() {
  if constexpr (R == 8) return {{K<1>::fn, K<2>::fn, K<3>::fn, K<4>::fn, K<5>::fn, K<6>::fn, K<7>::fn, K<8>::fn}, 8};
  else return {{K<1>::fn, K<2>::fn, K<3>::fn, K<4>::fn}, 4};
}
#define KS_QK(name, expr) template <int C> struct name { static constexpr QTileFn fn = expr; };
KS_QK(K40_512, (q4_tile_512<kQ4_0, C>))
KS_QK(K41_512, (q4_tile_512<kQ4_1, C>))
KS_QK(K50_512, (q4_tile_512<kQ5_0, C>))
KS_QK(K80_512, q8_0_tile_512<C>)
KS_QK(K4K_512, q4_k_tile_512<C>)
KS_QK(K6K_512, q6_k_tile_512<C>)
KS_QK(K40_256, (q4_tile_256<kQ4_0, C>))
KS_QK(K41_256, (q4_tile_256<kQ4_1, C>))
KS_QK(K50_256, (q4_tile_256<kQ5_0, C>))
KS_QK(K80_256, q8_0_tile_256<C>)
KS_QK(K4K_256, q4_k_tile_256<C>)
KS_QK(K6K_256, q6_k_tile_256<C>)
#undef KS_QK

inline const QKernel* pick_qkernel(int64_t f, int isa) {
  static const QKernel k512[] = {qkernel<K40_512, 8>(), qkernel<K41_512, 8>(), qkernel<K50_512, 8>(),
                                 qkernel<K80_512, 8>(), qkernel<K4K_512, 4>(), qkernel<K6K_512, 4>()};
  static const QKernel k256[] = {qkernel<K40_256, 4>(), qkernel<K41_256, 4>(), qkernel<K50_256, 4>(),
                                 qkernel<K80_256, 4>(), qkernel<K4K_256, 4>(), qkernel<K6K_256, 4>()};
  int i;
  switch (f) {
    case kQ4_0: i = 0; break;
    case kQ4_1: i = 1; break;
    case kQ5_0: i = 2; break;
    case kQ8_0: i = 3; break;
    case kQ4_K: i = 4; break;
    case kQ6_K: i = 5; break;
    default: return nullptr;
  }
  return isa == kIsaAvx2 ? &k256[i] : &k512[i];
}

inline void quantize_rows(const float* x, int64_t M, QAct& a) {
  if (g_isa == kIsaAvx2) quantize_rows_generic(x, M, a);
  else quantize_rows_512(x, M, a);
}
inline void quantize_rows(const uint16_t* x, int64_t M, QAct& a) {
  if (g_isa == kIsaAvx2) quantize_rows_generic(x, M, a);
  else quantize_rows_512(x, M, a);
}

inline void put_out(float* y, float v) { *y = v; }
inline void put_out(uint16_t* y, float v) {    // to bfloat16, nearest even
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  *y = static_cast<uint16_t>(u >> 16);
}

// One weight of a product: row segments, each in its own format (a weight descriptor, int64:
// [segments, then per segment: format, tiles pointer, rows]); the rows of all segments make the
// product's N outputs in order.
constexpr int64_t kMaxSegments = 8;
struct QSeg {
  const QKernel* k;
  const uint8_t* tiles;
  int64_t n, tile_bytes, nb, col0, tile0;
};

// y [M][N] (row stride N) = x (quantized in `a`) times the quantized segments of `desc`
// (+ bias [N]); TO: float or bfloat16 (uint16_t).
template <typename TO>
void qproduct(const QAct& a, int64_t M, const int64_t* desc, int64_t N, const float* bias, TO* y) {
  const int64_t nseg = desc[0];
  QSeg segs[kMaxSegments];
  int64_t col = 0, tiles = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t f = desc[1 + 3 * s];
    const FmtInfo fi = fmt_info(f);
    QSeg& g = segs[s];
    g.k = pick_qkernel(f, g_isa);
    g.tiles = reinterpret_cast<const uint8_t*>(desc[2 + 3 * s]);
    g.n = desc[3 + 3 * s];
    g.tile_bytes = tile_bytes(fi, a.K);
    g.nb = a.K / fi.block;
    g.col0 = col;
    g.tile0 = tiles;
    col += g.n;
    tiles += (g.n + kQLanes - 1) / kQLanes;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> accs(M * kQLanes);    // row m's sums at m * kQLanes
    int64_t s = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (s + 1 < nseg && t >= segs[s + 1].tile0) ++s;
      const QSeg& g = segs[s];
      const int64_t tt = t - g.tile0;
      const uint8_t* tile = g.tiles + tt * g.tile_bytes;
      const int64_t R = g.k->rows, groups = (M + R - 1) / R;
      const int64_t run = groups == 1 ? g.nb : std::max<int64_t>(1, kQRunBytes * g.nb / g.tile_bytes);
      for (int64_t u0 = 0; u0 < g.nb; u0 += run) {
        const int64_t u1 = std::min(g.nb, u0 + run);
        for (int64_t gi = 0; gi < groups; ++gi) {
          const int64_t m0 = gi * R, c = std::min<int64_t>(R, M - m0);
          g.k->f[c - 1](tile, g.nb, a, m0, u0, u1, accs.data() + m0 * kQLanes, u0 == 0);
        }
      }
      const int64_t c0 = g.col0 + tt * kQLanes, n = std::min<int64_t>(kQLanes, g.n - tt * kQLanes);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < n; ++j)
          put_out(y + m * N + c0 + j, accs[m * kQLanes + j] + (bias ? bias[c0 + j] : 0.0f));
    }
  });
}

inline int64_t desc_rows(const int64_t* desc) {
  int64_t n = 0;
  for (int64_t s = 0; s < desc[0]; ++s) n += desc[3 + 3 * s];
  return n;
}

// ---- dequantising rows (the embedding lookup; scalar) ---------------------------------------------

inline float f16_to_f32(const uint8_t* p) {     // exact, without F16C
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t u;
  if (e == 0) {
    const float f = std::ldexp(static_cast<float>(man), -24);      // zero or subnormal
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((e + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Row r of a weight in format f (tiles of K columns) -> out [K] float32, the reference's values.
inline void dequant_row(int64_t f, const uint8_t* tiles, int64_t K, int64_t r, float* out) {
  const FmtInfo fi = fmt_info(f);
  const uint8_t* tile = tiles + (r / kQLanes) * tile_bytes(fi, K);
  const int64_t lane = r % kQLanes, nb = K / fi.block;
  const uint8_t* hp = tile;
  const uint8_t* bp = tile + head_bytes(fi, K);
  auto byte_at = [&](const uint8_t* rows, int64_t row, int64_t c) { return rows[row * 64 + 4 * lane + c]; };
  for (int64_t u = 0; u < nb; ++u) {
    const uint8_t* body = bp + u * fi.body;
    float* o = out + u * fi.block;
    if (f == kQ4_0 || f == kQ4_1 || f == kQ5_0) {
      const float d = f16_to_f32(hp + u * fi.head + 2 * lane);
      const uint8_t* q = f == kQ5_0 ? body + 64 : body;
      for (int kk = 0; kk < 32; ++kk) {
        const int i = (kk % 16) / 4, c = kk % 4, hi = kk / 16;
        int v = (byte_at(q, i, c) >> (4 * hi)) & 15;
        if (f == kQ5_0) v |= ((byte_at(body, 0, c) >> (2 * i + hi)) & 1) << 4;
        if (f == kQ4_1) {
          const float mn = f16_to_f32(hp + u * fi.head + 32 + 2 * lane);
          o[kk] = d * static_cast<float>(v) + mn;
        } else {
          o[kk] = d * static_cast<float>(v - (f == kQ4_0 ? 8 : 16));
        }
      }
    } else if (f == kQ8_0) {
      const float d = f16_to_f32(hp + u * 32 + 2 * lane);
      for (int kk = 0; kk < 32; ++kk)
        o[kk] = d * static_cast<float>(static_cast<int>(byte_at(body, kk / 4, kk % 4)) - 128);
    } else if (f == kQ4_K) {
      const float d = f16_to_f32(hp + u * 64 + 2 * lane), dmin = f16_to_f32(hp + u * 64 + 32 + 2 * lane);
      const uint8_t* q = body + 256;
      for (int kk = 0; kk < 256; ++kk) {
        const int j = kk / 64, rr = kk % 64, hi = rr / 32, i = (rr % 32) / 4, c = rr % 4, s = 2 * j + hi;
        const int v = (byte_at(q, 8 * j + i, c) >> (4 * hi)) & 15;
        const float dsc = d * static_cast<float>(body[16 * s + lane]);
        const float dm = dmin * static_cast<float>(body[16 * (8 + s) + lane]);
        o[kk] = dsc * static_cast<float>(v) - dm;
      }
    } else if (f == kQ6_K) {
      const float d = f16_to_f32(hp + u * 32 + 2 * lane);
      const uint8_t* ql = body + 256;
      const uint8_t* qh = ql + 2048;
      for (int kk = 0; kk < 256; ++kk) {
        const int n = kk / 128, g = (kk % 128) / 32, l = kk % 32, i = l / 4, c = l % 4;
        const uint8_t qa = byte_at(ql, 16 * n + i, c), qb = byte_at(ql, 16 * n + 8 + i, c);
        const uint8_t h = byte_at(qh, 8 * n + i, c);
        const int lo = g == 0 ? (qa & 15) : g == 1 ? (qb & 15) : g == 2 ? (qa >> 4) : (qb >> 4);
        const int v = lo | (((h >> (2 * g)) & 3) << 4);
        const float dsc = d * static_cast<float>(static_cast<int8_t>(body[16 * (8 * n + 2 * g + l / 16) + lane]));
        o[kk] = dsc * static_cast<float>(v - 32);
      }
    }
  }
}

// ---- repacking (the same bytes as knapspec/formats.py's numpy packing, which is the reference) -----

// One part of a block's repacked bytes: kScale2: fp16 scales (count of them) lane by lane in the
// head; kRun4: 4-byte runs (count) of the 16 rows side by side; kByte1: single bytes (count) of the
// 16 rows side by side; kQ5Bits: Q5_0's fifth bits regrouped (one 4-byte run); kK4Scales: Q4_K's
// 6-bit scales and minimums, one byte each (16 bytes).
enum PartKind { kScale2, kRun4, kByte1, kQ5Bits, kK4Scales };
struct Part {
  PartKind kind;
  int src, count;     // byte offset in the file's block, number of items
  bool flip;          // Q8_0: values stored as q + 128
};

inline int parts_of(int64_t f, Part* p) {
  switch (f) {
    case kQ4_0: p[0] = {kScale2, 0, 1, false}; p[1] = {kRun4, 2, 4, false}; return 2;
    case kQ4_1: p[0] = {kScale2, 0, 2, false}; p[1] = {kRun4, 4, 4, false}; return 2;
    case kQ5_0: p[0] = {kScale2, 0, 1, false}; p[1] = {kQ5Bits, 2, 1, false}; p[2] = {kRun4, 6, 4, false}; return 3;
    case kQ8_0: p[0] = {kScale2, 0, 1, false}; p[1] = {kRun4, 2, 8, true}; return 2;
    case kQ4_K: p[0] = {kScale2, 0, 2, false}; p[1] = {kK4Scales, 4, 16, false}; p[2] = {kRun4, 16, 32, false}; return 3;
    case kQ6_K:
      p[0] = {kScale2, 208, 1, false}; p[1] = {kByte1, 192, 16, false}; p[2] = {kRun4, 0, 32, false};
      p[3] = {kRun4, 128, 16, false};
      return 4;
    default: return 0;
  }
}

// rows [0, n) of raw (row_bytes each) -> tiles (ceil(n/16) of them; rows past n are zero)
inline void repack_rows(int64_t f, const uint8_t* raw, int64_t n, int64_t K, uint8_t* out) {
  const FmtInfo fi = fmt_info(f);
  const int64_t nb = K / fi.block, tb = tile_bytes(fi, K), hb = head_bytes(fi, K);
  int64_t nbytes = 0;
  switch (f) {
    case kQ4_0: nbytes = 18; break;
    case kQ4_1: nbytes = 20; break;
    case kQ5_0: nbytes = 22; break;
    case kQ8_0: nbytes = 34; break;
    case kQ4_K: nbytes = 144; break;
    default: nbytes = 210; break;
  }
  const int64_t row_bytes = nb * nbytes;
  Part parts[4];
  const int np = parts_of(f, parts);
  static const uint8_t zero_row[4096] = {};
  const int64_t tiles = (n + kQLanes - 1) / kQLanes;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> zero(row_bytes, 0);
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* tile = out + t * tb;
      std::memset(tile + nb * fi.head, 0, hb - nb * fi.head);      // the head's padding
      const uint8_t* rows[kQLanes];
      for (int64_t j = 0; j < kQLanes; ++j) {
        const int64_t r = t * kQLanes + j;
        rows[j] = r < n ? raw + r * row_bytes : (row_bytes <= 4096 ? zero_row : zero.data());
      }
      for (int64_t u = 0; u < nb; ++u) {
        uint8_t* head = tile + u * fi.head;
        uint8_t* body = tile + hb + u * fi.body;
        for (int pi = 0; pi < np; ++pi) {
          const Part& p = parts[pi];
          switch (p.kind) {
            case kScale2:
              for (int c = 0; c < p.count; ++c)
                for (int64_t j = 0; j < kQLanes; ++j)
                  std::memcpy(head + (c * kQLanes + j) * 2, rows[j] + u * nbytes + p.src + 2 * c, 2);
              break;
            case kRun4:
              for (int c = 0; c < p.count; ++c)
                for (int64_t j = 0; j < kQLanes; ++j) {
                  uint32_t w;
                  std::memcpy(&w, rows[j] + u * nbytes + p.src + 4 * c, 4);
                  if (p.flip) w ^= 0x80808080u;
                  std::memcpy(body + (c * kQLanes + j) * 4, &w, 4);
                }
              body += p.count * kQLanes * 4;
              break;
            case kByte1:
              for (int c = 0; c < p.count; ++c)
                for (int64_t j = 0; j < kQLanes; ++j) body[c * kQLanes + j] = rows[j][u * nbytes + p.src + c];
              body += p.count * kQLanes;
              break;
            case kQ5Bits:         // bit v of byte c <- the file's bit 16 (v & 1) + 4 (v >> 1) + c
              for (int64_t j = 0; j < kQLanes; ++j) {
                uint32_t qh;
                std::memcpy(&qh, rows[j] + u * nbytes + p.src, 4);
                for (int c = 0; c < 4; ++c) {
                  uint8_t b = 0;
                  for (int v = 0; v < 8; ++v) b |= static_cast<uint8_t>(((qh >> (16 * (v & 1) + 4 * (v >> 1) + c)) & 1u) << v);
                  body[4 * j + c] = b;
                }
              }
              body += kQLanes * 4;
              break;
            case kK4Scales:       // 8 scales then 8 minimums, 6 bits each
              for (int64_t j = 0; j < kQLanes; ++j) {
                const uint8_t* q = rows[j] + u * nbytes + p.src;
                for (int i = 0; i < 8; ++i) {
                  uint8_t sc, mn;
                  if (i < 4) {
                    sc = q[i] & 63;
                    mn = q[i + 4] & 63;
                  } else {
                    sc = static_cast<uint8_t>((q[i + 4] & 15) | ((q[i - 4] >> 6) << 4));
                    mn = static_cast<uint8_t>((q[i + 4] >> 4) | ((q[i] >> 6) << 4));
                  }
                  body[i * kQLanes + j] = sc;
                  body[(8 + i) * kQLanes + j] = mn;
                }
              }
              body += 16 * kQLanes;
              break;
          }
        }
      }
    }
  });
}

// ---- entry points (pointers as integers; knapspec/native/__init__.py checks shapes) ---------------

inline void repack(int64_t f, int64_t raw, int64_t n, int64_t K, int64_t out) {
  repack_rows(f, reinterpret_cast<const uint8_t*>(raw), n, K, reinterpret_cast<uint8_t*>(out));
}

inline void set_isa(int64_t isa) { g_isa = static_cast<int>(isa); }

// y [M][N] = x [M][K] @ W.T (+ bias): x float32 or bfloat16 (x_bf16), y float32 or bfloat16
inline void quant_linear(int64_t x, bool x_bf16, int64_t M, int64_t K, int64_t desc, int64_t bias, int64_t y,
                         bool y_bf16) {
  thread_local QAct a;
  a.alloc(M, K);
  if (x_bf16) quantize_rows(reinterpret_cast<const uint16_t*>(x), M, a);
  else quantize_rows(reinterpret_cast<const float*>(x), M, a);
  const int64_t* d = reinterpret_cast<const int64_t*>(desc);
  const int64_t N = desc_rows(d);
  if (y_bf16) qproduct(a, M, d, N, reinterpret_cast<const float*>(bias), reinterpret_cast<uint16_t*>(y));
  else qproduct(a, M, d, N, reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y));
}

// out [R][K] (float32, or bfloat16 when out_bf16) = rows idx [R] (int64) of one quantized weight
// Rows idx[0..R) of a weight of N rows; an index outside [0, N) throws std::out_of_range (Python's
// IndexError) before anything is written.
inline void dequant_rows(int64_t fmt, int64_t tiles, int64_t N, int64_t K, int64_t idx, int64_t R, int64_t out,
                         bool out_bf16) {
  const int64_t* rows = reinterpret_cast<const int64_t*>(idx);
  for (int64_t i = 0; i < R; ++i)
    if (rows[i] < 0 || rows[i] >= N)
      throw std::out_of_range("row index " + std::to_string(rows[i]) + " out of range for a weight of " +
                              std::to_string(N) + " rows");
  std::vector<float> tmp(K);
  for (int64_t i = 0; i < R; ++i) {
    float* dst = out_bf16 ? tmp.data() : reinterpret_cast<float*>(out) + i * K;
    dequant_row(fmt, reinterpret_cast<const uint8_t*>(tiles), K, rows[i], dst);
    if (out_bf16)
      for (int64_t j = 0; j < K; ++j) put_out(reinterpret_cast<uint16_t*>(out) + i * K + j, tmp[j]);
  }
}

}  // namespace ks
