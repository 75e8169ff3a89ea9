// knapspec's native float products (AVX-512; bfloat16 needs AVX512_BF16).
//
// Products: y[m, :] = x[m, :] @ W.T (+ bias) for a weight W [N, K] packed once into tiles of 64
// output columns (see knapspec/native/__init__.py, `Packed`):
//   bfloat16: [N/64][K/2][64][2]  - each 64-byte row of a tile holds 16 outputs x one pair of inputs
//   float32:  [N/64][K][64]       - each 64-byte row of a tile holds 16 outputs x one input
// A tile is read front to back from memory once for all the rows of x (4 rows at a time over
// 8 KB blocks that stay in L1), so the weights stream in order (the hardware prefetchers' best
// case) and more rows cost arithmetic, not bandwidth. Every output is accumulated in one SIMD
// lane over k in order: there are no horizontal reductions, and a row's result does not depend
// on how many rows come with it or on how the tiles are split across threads. That row
// invariance is what exact mode needs (a verification pass gives the one-token step's bits).
//
// Threads: ATen's parallel_for, i.e. torch's own OpenMP pool (torch's wheel ships the
// libgomp this library links to), so the products share torch's threads instead of competing.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define KS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace ks {

constexpr int64_t kTile = 64;   // output columns per tile
constexpr int kRows = 4;        // rows of x per pass over a tile
// Several groups of rows: blocks of 32 steps of a tile (8 KB) stay in L1 while each group passes
// over them, and the passes prefetch into L2 the block 8 KB further along the thread's weight
// stream. Measured over the embedded model's layer weights, bfloat16, 8 rows against 1: 1.04-1.10x
// with this, 1.13-1.50x with 16-step blocks and no prefetch or prefetch into L1; other distances
// (4-32 KB) and block sizes (16-64 steps) were no better.
constexpr int64_t kBlockSteps = 32;
constexpr int64_t kPrefetchAhead = 8192;

// A cursor over memory to bring into L2 a few lines at a time while the products run, so that
// reading memory overlaps the arithmetic: the float products' next weight bytes (below) and the
// attention's next stretches of the KV cache (sublayers.h). Two stretches, one after the other;
// `rate` (lines per step in 1/65536; 0: the count each step is given) spreads them over the steps
// of a long work item.
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  const char* p2 = nullptr;
  const char* end2 = nullptr;
  uint32_t rate = 0;
  uint32_t frac = 0;
  KS_TARGET inline void step(int lines) {
    if (rate != 0) {
      frac += rate;
      lines = static_cast<int>(frac >> 16);
      frac &= 0xFFFFu;
    }
    for (int i = 0; i < lines; ++i) {
      if (p >= end) {
        if (p2 == nullptr) return;
        p = p2, end = end2, p2 = nullptr;
        if (p >= end) return;
      }
      _mm_prefetch(p, _MM_HINT_T1);
      p += 64;
    }
  }
};

// One pass of C rows (C <= 4) over the input steps [p0, p1) of a tile (a step: one pair of inputs
// in bfloat16, one input in float32). The C x 64 sums live in named registers during the pass (an
// array of vectors made GCC store every sum to the stack at every step) and in `accm` between
// passes (zero-initialised when `first`): rows are taken 4 at a time over a block of the tile small
// enough to stay in L1, so the tile streams from memory once for all the rows, and each sum still
// runs over k in order in its own lane. `pf` (may be null): lines to prefetch into L2 during this
// pass, pf_lines per step.
#define KS_ROWS(X) X(0) X(1) X(2) X(3)
#define KS_DECL(c) __m512 a##c##0, a##c##1, a##c##2, a##c##3;
#define KS_INIT(c)                                                                     \
  if constexpr (C > c) {                                                               \
    a##c##0 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accm + c * kTile);         \
    a##c##1 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accm + c * kTile + 16);    \
    a##c##2 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accm + c * kTile + 32);    \
    a##c##3 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accm + c * kTile + 48);    \
  }
#define KS_STORE(c)                                                                    \
  if constexpr (C > c) {                                                               \
    _mm512_storeu_ps(accm + c * kTile, a##c##0);                                       \
    _mm512_storeu_ps(accm + c * kTile + 16, a##c##1);                                  \
    _mm512_storeu_ps(accm + c * kTile + 32, a##c##2);                                  \
    _mm512_storeu_ps(accm + c * kTile + 48, a##c##3);                                  \
  }
// An activation as float32 (a bfloat16 is the high half of its float32, exactly).
inline float act_f32(float v) { return v; }
inline float act_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A 64-byte line of bfloat16 pairs as float32: the even elements (a shift) and the odd ones (a
// mask), exactly. Products with them are float32 FMAs. VDPBF16PS, the one-instruction bfloat16 pair
// product, issues at a quarter of the FMA rate on the Xeon measured (1.87 G against 7.5 G
// instructions/s a core), i.e. half the multiply-adds a second, and at the FMA rate on the AMD EPYC
// measured: the products here read their weights from memory at one or a few rows and do not use
// it; the attention does where it is fast (sublayers.h, set_dot).
KS_TARGET inline __m512 even_bf16(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
KS_TARGET inline __m512 odd_bf16(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int C>
KS_TARGET inline void tile_bf16(const uint16_t* W, int64_t K, const float* x, float* accm,
                                int64_t p0, int64_t p1, bool first, Prefetch* pf, int pf_lines) {
  // x: the rows in float32 (converted once per call by `run`); each weight pair split into its
  // even and odd input
  KS_ROWS(KS_DECL)
  KS_ROWS(KS_INIT)
  for (int64_t p = p0; p < p1; ++p) {
    if (pf != nullptr) pf->step(pf_lines);
    const uint16_t* w = W + p * 2 * kTile;
    __m512 e0, e1, e2, e3, o0, o1, o2, o3;
#define KS_SPLIT(i)                                                                    \
    {                                                                                  \
      const __m512i raw = _mm512_loadu_si512(w + i * 32);                              \
      e##i = even_bf16(raw);                                                           \
      o##i = odd_bf16(raw);                                                            \
    }
    KS_SPLIT(0) KS_SPLIT(1) KS_SPLIT(2) KS_SPLIT(3)
#undef KS_SPLIT
#define KS_STEP(c)                                                                     \
    if constexpr (C > c) {                                                             \
      const __m512 xe = _mm512_set1_ps(x[c * K + 2 * p]);                              \
      const __m512 xo = _mm512_set1_ps(x[c * K + 2 * p + 1]);                          \
      a##c##0 = _mm512_fmadd_ps(e0, xe, a##c##0);                                      \
      a##c##1 = _mm512_fmadd_ps(e1, xe, a##c##1);                                      \
      a##c##2 = _mm512_fmadd_ps(e2, xe, a##c##2);                                      \
      a##c##3 = _mm512_fmadd_ps(e3, xe, a##c##3);                                      \
      a##c##0 = _mm512_fmadd_ps(o0, xo, a##c##0);                                      \
      a##c##1 = _mm512_fmadd_ps(o1, xo, a##c##1);                                      \
      a##c##2 = _mm512_fmadd_ps(o2, xo, a##c##2);                                      \
      a##c##3 = _mm512_fmadd_ps(o3, xo, a##c##3);                                      \
    }
    KS_ROWS(KS_STEP)
#undef KS_STEP
  }
  KS_ROWS(KS_STORE)
}

template <int C>
KS_TARGET inline void tile_f32(const float* W, int64_t K, const float* x, float* accm, int64_t p0,
                               int64_t p1, bool first, Prefetch* pf, int pf_lines) {
  KS_ROWS(KS_DECL)
  KS_ROWS(KS_INIT)
  for (int64_t p = p0; p < p1; ++p) {
    if (pf != nullptr) pf->step(pf_lines);
    const float* w = W + p * kTile;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
#define KS_STEP(c)                                                                     \
    if constexpr (C > c) {                                                             \
      const __m512 xb = _mm512_set1_ps(x[c * K + p]);                                  \
      a##c##0 = _mm512_fmadd_ps(w0, xb, a##c##0);                                      \
      a##c##1 = _mm512_fmadd_ps(w1, xb, a##c##1);                                      \
      a##c##2 = _mm512_fmadd_ps(w2, xb, a##c##2);                                      \
      a##c##3 = _mm512_fmadd_ps(w3, xb, a##c##3);                                      \
    }
    KS_ROWS(KS_STEP)
#undef KS_STEP
  }
  KS_ROWS(KS_STORE)
}

// out_bf16: round the float32 sums (plus bias) to bfloat16, to nearest even; else store float32.
KS_TARGET void store(const float* acc, int64_t n, const float* bias, bool out_bf16, void* y) {
  alignas(64) float tmp[kTile];
  const float* src = acc;
  if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) tmp[j] = acc[j] + bias[j];
    src = tmp;
  }
  if (!out_bf16) {
    std::memcpy(y, src, n * sizeof(float));
    return;
  }
  uint16_t* yb = static_cast<uint16_t*>(y);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(yb + j), (__m256i)v);
  }
  for (; j < n; ++j) {          // n is a multiple of 16 for every model this serves; kept general
    uint32_t u;
    std::memcpy(&u, src + j, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    yb[j] = static_cast<uint16_t>(u >> 16);
  }
}


template <typename T, typename Tile1, typename Tile2, typename Tile3, typename Tile4>
void run(const T* x, int64_t M, int64_t K, const T* W, int64_t N, const float* bias, bool out_bf16,
         char* y, Tile1 t1, Tile2 t2, Tile3 t3, Tile4 t4) {
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t ysize = out_bf16 ? 2 : 4;
  constexpr int64_t per_step = std::is_same_v<T, uint16_t> ? 2 : 1;   // inputs per tile row
  const int64_t steps = K / per_step;
  const int64_t groups = (M + kRows - 1) / kRows;
  const int64_t step_bytes = per_step * kTile * static_cast<int64_t>(sizeof(T));
  // bfloat16 rows in float32 once for all the tiles (exact), so that the tiles broadcast floats
  std::vector<float> xf;
  const float* xs;
  if constexpr (std::is_same_v<T, uint16_t>) {
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = act_f32(x[i]);
    xs = xf.data();
  } else {
    xs = x;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t b) {
    std::vector<float> accs(groups * kRows * kTile);
    const char* stream_end = reinterpret_cast<const char*>(W + b * kTile * K);
    for (int64_t t = a; t < b; ++t) {
      const T* Wt = W + t * kTile * K;
      const int64_t n0 = t * kTile, n = std::min<int64_t>(kTile, N - n0);
      const int64_t block = groups == 1 ? steps : kBlockSteps;
      for (int64_t p0 = 0; p0 < steps; p0 += block) {
        const int64_t p1 = std::min(steps, p0 + block);
        for (int64_t gi = 0; gi < groups; ++gi) {
          const int64_t m0 = gi * kRows, c = std::min<int64_t>(kRows, M - m0);
          const float* xm = xs + m0 * K;
          float* acc = accs.data() + gi * kRows * kTile;
          // each group's pass prefetches its share of the block kPrefetchAhead bytes further
          // along this thread's weight stream (its tiles are contiguous)
          Prefetch ahead;
          Prefetch* pf = nullptr;
          int pf_lines = 0;
          if (groups >= 2) {
            const int64_t bbytes = (p1 - p0) * step_bytes;
            const char* base = reinterpret_cast<const char*>(Wt + p0 * per_step * kTile) + kPrefetchAhead;
            const int64_t share = (bbytes / 64 + groups - 1) / groups * 64;
            ahead.p = base + gi * share;
            ahead.end = std::min({base + bbytes, ahead.p + share, stream_end});
            pf = &ahead;
            pf_lines = static_cast<int>((share / 64 + (p1 - p0) - 1) / (p1 - p0));
          }
          switch (c) {
            case 1: t1(Wt, K, xm, acc, p0, p1, p0 == 0, pf, pf_lines); break;
            case 2: t2(Wt, K, xm, acc, p0, p1, p0 == 0, pf, pf_lines); break;
            case 3: t3(Wt, K, xm, acc, p0, p1, p0 == 0, pf, pf_lines); break;
            default: t4(Wt, K, xm, acc, p0, p1, p0 == 0, pf, pf_lines); break;
          }
        }
      }
      for (int64_t m = 0; m < M; ++m)
        store(accs.data() + m * kTile, n, bias == nullptr ? nullptr : bias + n0, out_bf16,
              y + (m * N + n0) * ysize);
    }
  });
}

// Pointers are passed as integers (tensor.data_ptr()): the caller checks shapes, dtypes and
// contiguity (knapspec/native/__init__.py), which keeps this file free of torch's tensor headers.
void linear_bf16(int64_t x, int64_t M, int64_t K, int64_t w, int64_t N, int64_t bias, int64_t y,
                 bool out_bf16) {
  run<uint16_t>(reinterpret_cast<const uint16_t*>(x), M, K, reinterpret_cast<const uint16_t*>(w), N,
                reinterpret_cast<const float*>(bias), out_bf16, reinterpret_cast<char*>(y),
                tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>);
}

void linear_f32(int64_t x, int64_t M, int64_t K, int64_t w, int64_t N, int64_t bias, int64_t y) {
  run<float>(reinterpret_cast<const float*>(x), M, K, reinterpret_cast<const float*>(w), N,
             reinterpret_cast<const float*>(bias), false, reinterpret_cast<char*>(y),
             tile_f32<1>, tile_f32<2>, tile_f32<3>, tile_f32<4>);
}

}  // namespace ks
