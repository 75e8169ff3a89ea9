// knapspec's native CPU matrix products (AVX-512; bfloat16 needs AVX512_BF16).
//
// y[m, :] = x[m, :] @ W.T (+ bias) for a weight W [N, K] packed once into tiles of 64 output
// columns (see knapspec/native.py, `pack`):
//   bfloat16: [N/64][K/2][64][2]  - each 64-byte row of a tile holds 16 outputs x one pair of inputs
//   float32:  [N/64][K][64]       - each 64-byte row of a tile holds 16 outputs x one input
// A tile is read front to back exactly once per 4 rows of x, so the weights stream from memory
// in order (the hardware prefetchers' best case), and every output is accumulated in one SIMD
// lane over k in order: there are no horizontal reductions, and a row's result does not depend
// on how many rows come with it or on how the tiles are split across threads. That row
// invariance is what exact mode needs (a verification pass gives the one-token step's bits).
//
// Threads: ATen's parallel_for, i.e. torch's own OpenMP pool (torch's wheel ships the
// libgomp this library links to), so the products share torch's threads instead of competing.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define KS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

constexpr int64_t kTile = 64;   // output columns per tile
constexpr int kRows = 4;        // rows of x per pass over a tile

template <int C>
KS_TARGET inline void tile_bf16(const uint16_t* W, int64_t K, const uint16_t* x, float* out) {
  __m512 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < 4; ++r) acc[c][r] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* w = W + p * 2 * kTile;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, x + c * K + 2 * p, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[c][0] = _mm512_dpbf16_ps(acc[c][0], w0, xb);
      acc[c][1] = _mm512_dpbf16_ps(acc[c][1], w1, xb);
      acc[c][2] = _mm512_dpbf16_ps(acc[c][2], w2, xb);
      acc[c][3] = _mm512_dpbf16_ps(acc[c][3], w3, xb);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(out + c * kTile + r * 16, acc[c][r]);
}

template <int C>
KS_TARGET inline void tile_f32(const float* W, int64_t K, const float* x, float* out) {
  __m512 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < 4; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = W + k * kTile;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    for (int c = 0; c < C; ++c) {
      const __m512 xb = _mm512_set1_ps(x[c * K + k]);
      acc[c][0] = _mm512_fmadd_ps(w0, xb, acc[c][0]);
      acc[c][1] = _mm512_fmadd_ps(w1, xb, acc[c][1]);
      acc[c][2] = _mm512_fmadd_ps(w2, xb, acc[c][2]);
      acc[c][3] = _mm512_fmadd_ps(w3, xb, acc[c][3]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(out + c * kTile + r * 16, acc[c][r]);
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
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t b) {
    alignas(64) float buf[kRows * kTile];
    for (int64_t t = a; t < b; ++t) {
      const T* Wt = W + t * kTile * K;
      const int64_t n0 = t * kTile, n = std::min<int64_t>(kTile, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t c = std::min<int64_t>(kRows, M - m0);
        const T* xm = x + m0 * K;
        switch (c) {
          case 1: t1(Wt, K, xm, buf); break;
          case 2: t2(Wt, K, xm, buf); break;
          case 3: t3(Wt, K, xm, buf); break;
          default: t4(Wt, K, xm, buf); break;
        }
        for (int64_t i = 0; i < c; ++i)
          store(buf + i * kTile, n, bias == nullptr ? nullptr : bias + n0, out_bf16,
                y + ((m0 + i) * N + n0) * ysize);
      }
    }
  });
}

// Pointers are passed as integers (tensor.data_ptr()): the caller checks shapes, dtypes and
// contiguity (knapspec/native.py), which keeps this file free of torch's tensor headers.
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_f32", &linear_f32);
}
