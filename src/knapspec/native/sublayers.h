// knapspec's fused sublayers (AVX-512; bfloat16 needs AVX512_BF16): whole attention and MLP
// sublayers, and the whole stack of them, in one call each. Their products take a weight
// descriptor (quant.h), so float tiles and quantized blocks run through the same sublayers.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dense.h"
#include "quant.h"

namespace ks {

// Everything below computes each token's row the same way whatever the number of tokens in the
// call: per-row element-wise work, the row-invariant products above, and attention whose sums run
// over keys in blocks aligned to absolute positions (16-key blocks inside 256-key chunks), so a
// key's contribution to a query is computed identically whether the query comes alone or in a
// verification pass.

KS_TARGET inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
KS_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
KS_TARGET inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
KS_TARGET inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// rounded to the storage type (nearest even) and back to float32
KS_TARGET inline __m512 rnd(__m512 v, uint16_t) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
KS_TARGET inline __m512 rnd(__m512 v, float) { return v; }

// exp for float32 lanes: 2^n * p(r), r = x - n ln2, degree-6 polynomial (|rel. error| < 2e-7)
KS_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// RMSNorm as the model's torch path computes it: normalised in float32, rounded to the storage
// type, then scaled by the weight and rounded again. n is a multiple of 16.
template <typename T>
KS_TARGET void rms_norm_row(const T* x, const T* w, int64_t n, float eps, T* y) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 v = load16(x + j);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 h = rnd(_mm512_mul_ps(load16(x + j), rv), T());
    store16(y + j, _mm512_mul_ps(h, load16(w + j)));
  }
}

// y [M][N] = x [M][K] @ W.T (+ bias) for a weight descriptor (quant.h's QSeg list): float tiles
// (dense.h, one segment of format kDense, in the activations' type) or quantized segments.
template <typename T>
void linear_t(const T* x, int64_t M, int64_t K, const int64_t* w, int64_t N, const float* bias, T* y) {
  if (w[1] == kDense) {
    const T* W = reinterpret_cast<const T*>(w[2]);
    if constexpr (std::is_same_v<T, uint16_t>)
      run<uint16_t>(x, M, K, W, N, bias, true, reinterpret_cast<char*>(y), tile_bf16<1>, tile_bf16<2>,
                    tile_bf16<3>, tile_bf16<4>);
    else
      run<float>(x, M, K, W, N, bias, false, reinterpret_cast<char*>(y), tile_f32<1>, tile_f32<2>,
                 tile_f32<3>, tile_f32<4>);
    return;
  }
  thread_local QAct a;
  a.alloc(M, K);
  quantize_rows(x, M, a);
  qproduct(a, M, w, N, bias, y);
}

// --- Gemma 3: the gate's activation, and a norm on a sublayer's output before the residual add
enum Act { kSilu = 0, kGeluTanh = 1 };

// act(v): silu v / (1 + e^-v), or GELU's tanh form 0.5 v (1 + tanh(u)) = v / (1 + e^-2u) with
// u = sqrt(2/pi) (v + 0.044715 v^3)
KS_TARGET inline __m512 act16(__m512 v, int act) {
  __m512 z = v;
  if (act == kGeluTanh) {
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    z = _mm512_mul_ps(_mm512_set1_ps(1.5957691216057308f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
  }
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

// out[t] = x[t] + (post_norm ? rms_norm(y[t], post_norm) : y[t]), rows of H
template <typename T>
KS_TARGET void residual_t(const T* x, T* y, const T* post_norm, float eps, int64_t rows, int64_t H, T* out) {
  for (int64_t t = 0; t < rows; ++t) {
    T* yr = y + t * H;
    if (post_norm != nullptr) rms_norm_row(yr, post_norm, H, eps, yr);
    for (int64_t j = 0; j < H; j += 16)
      store16(out + t * H + j, _mm512_add_ps(load16(x + t * H + j), load16(yr + j)));
  }
}
// --- end Gemma 3

// out = x + post_norm(down(act(gate) * up)), gate/up = gate_up(rms_norm(x)); act silu (SwiGLU) or
// GELU tanh (GeGLU), post_norm none (nullptr) or Gemma 3's; rows independent.
template <typename T>
KS_TARGET void mlp_t(const T* x, T* out, int64_t rows, int64_t H, const T* norm_w, float eps,
                     const int64_t* w_gate_up, int64_t I, const int64_t* w_down, int act = kSilu,
                     const T* post_norm = nullptr) {
  std::vector<T> h(rows * H), gu(rows * 2 * I), a(rows * I), d(rows * H);
  for (int64_t t = 0; t < rows; ++t) rms_norm_row(x + t * H, norm_w, H, eps, h.data() + t * H);
  linear_t<T>(h.data(), rows, H, w_gate_up, 2 * I, nullptr, gu.data());
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = gu.data() + t * 2 * I;
    const T* u = g + I;
    for (int64_t j = 0; j < I; j += 16)
      store16(a.data() + t * I + j, _mm512_mul_ps(act16(load16(g + j), act), load16(u + j)));
  }
  linear_t<T>(a.data(), rows, I, w_down, H, nullptr, d.data());
  residual_t<T>(x, d.data(), post_norm, eps, rows, H, out);
}

constexpr int64_t kChunk = 256;   // keys per work item of the attention
constexpr int64_t kSerialKeys = 1536;   // (keys x KV heads x tokens) below which one thread attends
constexpr int64_t kBlk = 16;      // keys per block of the blocked key cache

// The attention reads its own copies of the cache, laid out for products with one key (scores) or
// one output dimension (values) per SIMD lane, so that no sum runs across lanes:
//   keys, bfloat16:   [Hkv][capacity/16][D/2][16][2] - 16 keys x one pair of dimensions per 64 bytes
//   keys, float32:    [Hkv][capacity/16][D][16]
//   values, bfloat16: [Hkv][capacity/2][D][2]        - 16 dimensions x a pair of keys per 64 bytes
//   values, float32:  the cache itself, [Hkv][capacity][D]
// (knapspec/cache.py keeps them; the torch path writes them through KVCache.write.)

// Scores of G query rows (one token's heads: q, rows D apart) against NB 16-key blocks (kb: the
// first block), times `scale`, into s (rows kChunk apart). Lane j of a block sums its key's products
// over the dimensions in order, whatever the number of rows or blocks in the call.
// (Named registers, not arrays: with arrays GCC reloaded every key vector for every row.)
#define KS_4(X) X(0) X(1) X(2) X(3)
template <typename T, int G, int NB>
KS_TARGET inline void scores(const T* q, int64_t D, const T* kb, float scale, float* s) {
#define KS_SDECL(r) __m512 s##r##0 = _mm512_setzero_ps(), s##r##1 = s##r##0, s##r##2 = s##r##0, s##r##3 = s##r##0;
  KS_4(KS_SDECL)
#undef KS_SDECL
  const int64_t bstride = D * kBlk;                 // elements per block
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  using KV = std::conditional_t<bf16, __m512bh, __m512>;
  const int64_t steps = bf16 ? D / 2 : D;
  for (int64_t dp = 0; dp < steps; ++dp) {
    const T* kp = kb + dp * (bf16 ? 2 : 1) * kBlk;
    KV k0, k1, k2, k3;
    if constexpr (bf16) {
      k0 = (__m512bh)_mm512_loadu_si512(kp);
      if constexpr (NB > 1) k1 = (__m512bh)_mm512_loadu_si512(kp + bstride);
      if constexpr (NB > 2) k2 = (__m512bh)_mm512_loadu_si512(kp + 2 * bstride);
      if constexpr (NB > 3) k3 = (__m512bh)_mm512_loadu_si512(kp + 3 * bstride);
    } else {
      k0 = _mm512_loadu_ps(kp);
      if constexpr (NB > 1) k1 = _mm512_loadu_ps(kp + bstride);
      if constexpr (NB > 2) k2 = _mm512_loadu_ps(kp + 2 * bstride);
      if constexpr (NB > 3) k3 = _mm512_loadu_ps(kp + 3 * bstride);
    }
#define KS_SROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      if constexpr (bf16) {                                                            \
        int32_t pair;                                                                  \
        std::memcpy(&pair, q + r * D + 2 * dp, 4);                                     \
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);                         \
        s##r##0 = _mm512_dpbf16_ps(s##r##0, k0, qb);                                   \
        if constexpr (NB > 1) s##r##1 = _mm512_dpbf16_ps(s##r##1, k1, qb);             \
        if constexpr (NB > 2) s##r##2 = _mm512_dpbf16_ps(s##r##2, k2, qb);             \
        if constexpr (NB > 3) s##r##3 = _mm512_dpbf16_ps(s##r##3, k3, qb);             \
      } else {                                                                         \
        const __m512 qb = _mm512_set1_ps(q[r * D + dp]);                               \
        s##r##0 = _mm512_fmadd_ps(k0, qb, s##r##0);                                    \
        if constexpr (NB > 1) s##r##1 = _mm512_fmadd_ps(k1, qb, s##r##1);              \
        if constexpr (NB > 2) s##r##2 = _mm512_fmadd_ps(k2, qb, s##r##2);              \
        if constexpr (NB > 3) s##r##3 = _mm512_fmadd_ps(k3, qb, s##r##3);              \
      }                                                                                \
    }
    KS_4(KS_SROW)
#undef KS_SROW
  }
  const __m512 sc = _mm512_set1_ps(scale);
#define KS_SSTORE(r)                                                                               \
  if constexpr (G > r) {                                                                           \
    _mm512_storeu_ps(s + r * kChunk, _mm512_mul_ps(s##r##0, sc));                                  \
    if constexpr (NB > 1) _mm512_storeu_ps(s + r * kChunk + kBlk, _mm512_mul_ps(s##r##1, sc));     \
    if constexpr (NB > 2) _mm512_storeu_ps(s + r * kChunk + 2 * kBlk, _mm512_mul_ps(s##r##2, sc)); \
    if constexpr (NB > 3) _mm512_storeu_ps(s + r * kChunk + 3 * kBlk, _mm512_mul_ps(s##r##3, sc)); \
  }
  KS_4(KS_SSTORE)
#undef KS_SSTORE
}

template <typename T, int G>
KS_TARGET inline void scores_nb(const T* q, int64_t D, const T* kb, float scale, float* s, int64_t nb) {
  switch (nb) {
    case 1: scores<T, G, 1>(q, D, kb, scale, s); break;
    case 2: scores<T, G, 2>(q, D, kb, scale, s); break;
    case 3: scores<T, G, 3>(q, D, kb, scale, s); break;
    default: scores<T, G, 4>(q, D, kb, scale, s); break;
  }
}

// Probabilities times values for G rows (one token's heads) over the keys [j0, j1) of the chunk
// (j0 even in bfloat16): o[r] (float32, D) = sum_j p[r][j] v[j], one output dimension per lane, the
// keys in order (bfloat16: two at a time, probabilities already rounded to bfloat16 in pb).
// NV: 16-dimension groups in this call (at most 8: a head of D > 128 dimensions runs in passes,
// vt and o offset to the pass's first dimension); D: the head's dimensions (the rows' stride).
template <int G, int NV>
KS_TARGET inline void values_bf16(const uint16_t* pb, const uint16_t* vt, int64_t j0, int64_t j1, float* o,
                                  int64_t D) {
#define KS_8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define KS_VDECL(r) __m512 o##r##0 = _mm512_setzero_ps(), o##r##1 = o##r##0, o##r##2 = o##r##0, o##r##3 = o##r##0, \
                           o##r##4 = o##r##0, o##r##5 = o##r##0, o##r##6 = o##r##0, o##r##7 = o##r##0;
  KS_4(KS_VDECL)
#undef KS_VDECL
  for (int64_t j = j0; j < j1; j += 2) {
    const uint16_t* w = vt + j * D;                  // pair j/2: [D][2]
#define KS_VLOAD(i) __m512bh x##i; if constexpr (NV > i) x##i = (__m512bh)_mm512_loadu_si512(w + i * 32);
    KS_8(KS_VLOAD)
#undef KS_VLOAD
#define KS_VACC(r, i) if constexpr (NV > i) o##r##i = _mm512_dpbf16_ps(o##r##i, pv, x##i);
#define KS_VROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      int32_t pair;                                                                    \
      std::memcpy(&pair, pb + r * kChunk + j, 4);                                      \
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(pair);                           \
      KS_VACC(r, 0) KS_VACC(r, 1) KS_VACC(r, 2) KS_VACC(r, 3)                          \
      KS_VACC(r, 4) KS_VACC(r, 5) KS_VACC(r, 6) KS_VACC(r, 7)                          \
    }
    KS_4(KS_VROW)
#undef KS_VROW
#undef KS_VACC
  }
#define KS_VST(r, i) if constexpr (NV > i) _mm512_storeu_ps(o + r * D + i * 16, o##r##i);
#define KS_VSTORE(r)                                                                   \
  if constexpr (G > r) {                                                               \
    KS_VST(r, 0) KS_VST(r, 1) KS_VST(r, 2) KS_VST(r, 3)                                \
    KS_VST(r, 4) KS_VST(r, 5) KS_VST(r, 6) KS_VST(r, 7)                                \
  }
  KS_4(KS_VSTORE)
#undef KS_VSTORE
#undef KS_VST
}

template <int G, int NV>
KS_TARGET inline void values_f32(const float* pf, const float* V, int64_t j0, int64_t j1, float* o, int64_t D) {
  __m512 acc[G][NV];
#pragma GCC unroll 8
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_ps(V + j * D + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r) {
      const __m512 pv = _mm512_set1_ps(pf[r * kChunk + j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(pv, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + r * D + v * 16, acc[r][v]);
}

// the rows in groups of up to 4 (heads of up to 64 dimensions) or 2 (larger heads), so that the
// sums stay in registers
template <typename T, int NV>
KS_TARGET void values_rows(const void* p, const T* vsrc, int64_t j0, int64_t j1, float* o, int64_t g, int64_t D) {
  constexpr int GM = NV <= 4 ? 4 : 2;
  for (int64_t r0 = 0; r0 < g; r0 += GM) {
    const int64_t n = std::min<int64_t>(GM, g - r0);
    float* orow = o + r0 * D;
    if constexpr (std::is_same_v<T, uint16_t>) {
      const uint16_t* pb = static_cast<const uint16_t*>(p) + r0 * kChunk;
      switch (n) {
        case 1: values_bf16<1, NV>(pb, vsrc, j0, j1, orow, D); break;
        case 2: values_bf16<2, NV>(pb, vsrc, j0, j1, orow, D); break;
        case 3: if constexpr (GM >= 3) values_bf16<3, NV>(pb, vsrc, j0, j1, orow, D); break;
        default: if constexpr (GM >= 4) values_bf16<GM, NV>(pb, vsrc, j0, j1, orow, D); break;
      }
    } else {
      const float* pf = static_cast<const float*>(p) + r0 * kChunk;
      switch (n) {
        case 1: values_f32<1, NV>(pf, vsrc, j0, j1, orow, D); break;
        case 2: values_f32<2, NV>(pf, vsrc, j0, j1, orow, D); break;
        case 3: if constexpr (GM >= 3) values_f32<3, NV>(pf, vsrc, j0, j1, orow, D); break;
        default: if constexpr (GM >= 4) values_f32<GM, NV>(pf, vsrc, j0, j1, orow, D); break;
      }
    }
  }
}

// lanes of 16-key block bi inside [a, b) (chunk-relative)
inline __mmask16 block_mask(int64_t bi, int64_t a, int64_t b) {
  const int64_t j0 = bi * kBlk;
  const int64_t lo_i = std::max<int64_t>(0, a - j0), hi_i = std::min<int64_t>(16, b - j0);
  return static_cast<__mmask16>(((1u << hi_i) - 1) & ~((1u << lo_i) - 1));
}

// One (KV head, 256-key chunk) work item for the g query heads of one token at position `pos`,
// over the keys k0 <= j < k1 with lo <= j <= pos: each row's partial softmax, max m, sum l and
// unnormalised output o[D] (float32). q: the token's g query rows (storage type, D apart). kt: this
// KV head's blocked keys; vsrc: its values (bfloat16: the pair layout; float32: [cap][D]).
// Computed the same way for a token alone or in a pass: the rows of one token share their key
// range, and nothing here depends on the other tokens.
template <typename T>
KS_TARGET void attend_token(const T* q, int64_t g, int64_t pos, int64_t lo, const T* kt, const T* vsrc,
                            int64_t D, int64_t k0, int64_t k1, float scale, float* s, void* pbuf,
                            float* m_out, float* l_out, float* o_out) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t a = std::max(k0, lo), b = std::min(k1, pos + 1);
  if (a >= b) {
    for (int64_t r = 0; r < g; ++r) {
      m_out[r] = -INFINITY;
      l_out[r] = 0.0f;
      for (int64_t dd = 0; dd < D; ++dd) o_out[r * D + dd] = 0.0f;
    }
    return;
  }
  // scores of the whole 16-key blocks that meet [a, b) (blocks aligned to absolute positions;
  // lanes outside are masked below), 4 heads x 4 blocks at a time
  const int64_t blk0 = (a - k0) / kBlk, blk1 = (b - k0 + kBlk - 1) / kBlk;
  for (int64_t r0 = 0; r0 < g; r0 += 4) {
    const int64_t n = std::min<int64_t>(4, g - r0);
    for (int64_t bi = blk0; bi < blk1; bi += 4) {
      const int64_t nb = std::min<int64_t>(4, blk1 - bi);
      const T* kb = kt + (k0 / kBlk + bi) * D * kBlk;
      float* srow = s + r0 * kChunk + bi * kBlk;
      const T* qr = q + r0 * D;
      switch (n) {
        case 1: scores_nb<T, 1>(qr, D, kb, scale, srow, nb); break;
        case 2: scores_nb<T, 2>(qr, D, kb, scale, srow, nb); break;
        case 3: scores_nb<T, 3>(qr, D, kb, scale, srow, nb); break;
        default: scores_nb<T, 4>(qr, D, kb, scale, srow, nb); break;
      }
    }
  }
  // p = exp(s - max) over [a, b), lanes outside masked to 0. bfloat16: p rounded to bfloat16 for
  // the products with the values, and the sum l over the rounded p.
  for (int64_t r = 0; r < g; ++r) {
    const float* sr = s + r * kChunk;
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    for (int64_t bi = blk0; bi < blk1; ++bi)
      mxv = _mm512_mask_max_ps(mxv, block_mask(bi, a - k0, b - k0), mxv, _mm512_loadu_ps(sr + bi * kBlk));
    const float mx = _mm512_reduce_max_ps(mxv);
    __m512 lv = _mm512_setzero_ps();
    for (int64_t bi = blk0; bi < blk1; ++bi) {
      const int64_t j0 = bi * kBlk;
      const __mmask16 mk = block_mask(bi, a - k0, b - k0);
      __m512 p = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j0), _mm512_set1_ps(mx))));
      if constexpr (bf16) {
        const __m256i pr = (__m256i)_mm512_cvtneps_pbh(p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(pbuf) + r * kChunk + j0), pr);
        p = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pr), 16));
      } else {
        _mm512_storeu_ps(static_cast<float*>(pbuf) + r * kChunk + j0, p);
      }
      lv = _mm512_add_ps(lv, p);
    }
    m_out[r] = mx;
    l_out[r] = _mm512_reduce_add_ps(lv);
  }
  // bfloat16: key pairs aligned to even positions (a key's partner is fixed; outside [a, b) its
  // probability is 0)
  const int64_t j0 = bf16 ? (a - k0) / 2 * 2 : a - k0, j1 = b - k0;
  const T* vs = vsrc + k0 * D;      // key k0 (bfloat16: pair k0/2) starts at k0*D in both layouts
  // passes of up to 128 dimensions (each output dimension's sum is the same in any pass)
  for (int64_t d0 = 0; d0 < D; d0 += 128) {
    const T* vd = vs + d0 * (bf16 ? 2 : 1);
    switch (std::min<int64_t>(D - d0, 128) / 16) {
      case 2: values_rows<T, 2>(pbuf, vd, j0, j1, o_out + d0, g, D); break;
      case 4: values_rows<T, 4>(pbuf, vd, j0, j1, o_out + d0, g, D); break;
      case 6: values_rows<T, 6>(pbuf, vd, j0, j1, o_out + d0, g, D); break;
      default: values_rows<T, 8>(pbuf, vd, j0, j1, o_out + d0, g, D); break;
    }
  }
}

// out = x + o_proj(attention(rope(q), rope(k), v)), qkv = qkv_proj(rms_norm(x)) (+ bias), with
// the new keys and values written into the cache at positions start .. start+T-1: kc/vc, this
// layer's cache [Hkv][cap][D], and kt/vt, the attention's own layouts (above).
// cos/sin: float32 tables [positions][D/2], row `start` first. window <= 0: no sliding window.
// draft_window > 0 (drafts only): each token also sees only its last draft_window keys, plus the
// first `sink` positions ("attention sink"; knapspec/plan.py).
// scale: the scores' scale (0: 1/sqrt(D)); post_norm: Gemma 3's norm of the output (nullptr: none).
template <typename T>
KS_TARGET void attention_t(const T* x, T* out, int64_t Tn, int64_t H, const T* norm_w, float eps,
                           const int64_t* w_qkv, const float* b_qkv, const T* q_norm, const T* k_norm,
                           const float* cosp, const float* sinp, T* kc, T* vc, T* kt, T* vt,
                           int64_t cap, int64_t start, int64_t hq, int64_t hkv, int64_t D,
                           int64_t window, const int64_t* w_o, int64_t draft_window = 0, int64_t sink = 0,
                           float scale_ = 0.0f, const T* post_norm = nullptr) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t nq = hq * D, nk = hkv * D, nqkv = nq + 2 * nk, g = hq / hkv, half = D / 2;
  const int64_t nblk = (cap + kBlk - 1) / kBlk, npair = (cap + 1) / 2;
  std::vector<T> h(Tn * H), qkv(Tn * nqkv), q(Tn * nq), o(Tn * nq), y(Tn * H);
  for (int64_t t = 0; t < Tn; ++t) rms_norm_row(x + t * H, norm_w, H, eps, h.data() + t * H);
  linear_t<T>(h.data(), Tn, H, w_qkv, nqkv, b_qkv, qkv.data());
  // per token: (q/k norm), rotary embedding, keys and values into the cache
  std::vector<T> tmp(D);
  for (int64_t t = 0; t < Tn; ++t) {
    const float* c = cosp + t * half;
    const float* sn = sinp + t * half;
    const int64_t p = start + t;
    for (int64_t head = 0; head < hq + hkv; ++head) {
      const T* src = qkv.data() + t * nqkv + head * D;
      const bool is_q = head < hq;
      const T* nw = is_q ? q_norm : k_norm;
      if (nw != nullptr) {
        rms_norm_row(src, nw, D, eps, tmp.data());
        src = tmp.data();
      }
      T* dst = is_q ? q.data() + t * nq + head * D : kc + ((head - hq) * cap + p) * D;
      for (int64_t i = 0; i < half; i += 16) {
        const __m512 x1 = load16(src + i), x2 = load16(src + half + i);
        const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(sn + i);
        store16(dst + i, _mm512_fmsub_ps(x1, cv, _mm512_mul_ps(x2, sv)));
        store16(dst + half + i, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)));
      }
      if (!is_q) {                  // the key into its 16-key block: lane p % 16
        const int64_t kvh = head - hq;
        T* blk = kt + (kvh * nblk + p / kBlk) * D * kBlk;
        if constexpr (bf16) {
          for (int64_t dp = 0; dp < half; ++dp)
            std::memcpy(blk + (dp * kBlk + p % kBlk) * 2, dst + 2 * dp, 4);
        } else {
          for (int64_t d = 0; d < D; ++d) blk[d * kBlk + p % kBlk] = dst[d];
        }
      }
    }
    for (int64_t head = 0; head < hkv; ++head) {
      const T* vsrc = qkv.data() + t * nqkv + nq + nk + head * D;
      std::memcpy(vc + (head * cap + p) * D, vsrc, D * sizeof(T));
      if constexpr (bf16) {         // the value into its key pair: slot p % 2
        T* pr = vt + ((head * npair + p / 2) * D) * 2 + p % 2;
        for (int64_t d = 0; d < D; ++d) pr[2 * d] = vsrc[d];
      }
    }
  }
  // attention: work items (KV head, 256-key chunk), each over every token of the call
  const int64_t R = Tn * g, end = start + Tn;
  // --- draft windows: the keys a token sees start at lo(p) (the nearer of the two windows); with
  // a draft window, one more work item per KV head covers the sink keys before lo(p)
  auto lo_of = [&](int64_t p) {
    int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    if (draft_window > 0) lo = std::max<int64_t>(lo, p - draft_window + 1);
    return lo;
  };
  const bool sinks = draft_window > 0 && sink > 0;
  // --- end draft windows
  const int64_t c_first = lo_of(start) / kChunk;
  const int64_t c_last = (end - 1) / kChunk;
  const int64_t nc = c_last - c_first + 1 + (sinks ? 1 : 0);
  std::vector<float> pm(hkv * nc * R), pl(hkv * nc * R), po(hkv * nc * R * D);
  const float scale = scale_ > 0.0f ? scale_ : 1.0f / std::sqrt(static_cast<float>(D));
  // Small attention (a few hundred keys in all) runs on this thread: splitting a few microseconds
  // of work costs a fork and a join of the thread team, ~30 of them per token. Each work item is
  // computed the same way either way.
  const int64_t keys = (end - c_first * kChunk) * hkv * Tn;
  at::parallel_for(0, hkv * nc, keys < kSerialKeys ? hkv * nc : 1, [&](int64_t ia, int64_t ib) {
    std::vector<float> sbuf(g * kChunk), pbuf(g * kChunk);
    for (int64_t it = ia; it < ib; ++it) {
      const int64_t kvh = it / nc, ci = it % nc;
      const bool sink_item = sinks && ci == nc - 1;      // draft windows: keys [0, sink) before lo(p)
      const int64_t k0 = sink_item ? 0 : (c_first + ci) * kChunk, k1 = std::min(end, k0 + kChunk);
      const T* ktk = kt + kvh * nblk * D * kBlk;
      const T* vsk = bf16 ? vt + kvh * npair * D * 2 : vc + kvh * cap * D;
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t p = start + t;
        const int64_t lo = lo_of(p);
        const int64_t r = it * R + t * g;
        if (sink_item)
          attend_token<T>(q.data() + t * nq + kvh * g * D, g, std::min(p, std::min(sink, lo) - 1),
                          window > 0 ? std::max<int64_t>(0, p - window + 1) : 0, ktk, vsk, D, 0, k1, scale,
                          sbuf.data(), pbuf.data(), pm.data() + r, pl.data() + r, po.data() + r * D);
        else
          attend_token<T>(q.data() + t * nq + kvh * g * D, g, p, lo, ktk, vsk, D, k0, k1, scale,
                          sbuf.data(), pbuf.data(), pm.data() + r, pl.data() + r, po.data() + r * D);
      }
    }
  });
  // combine the chunks of each row in order
  for (int64_t kvh = 0; kvh < hkv; ++kvh)
    for (int64_t r = 0; r < R; ++r) {
      float mx = -INFINITY;
      for (int64_t ci = 0; ci < nc; ++ci) mx = std::max(mx, pm[(kvh * nc + ci) * R + r]);
      float l = 0.0f;
      __m512 acc[16];
      for (int64_t v = 0; v < D / 16; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t ci = 0; ci < nc; ++ci) {
        const int64_t idx = (kvh * nc + ci) * R + r;
        if (pl[idx] == 0.0f) continue;
        const float f = std::exp(pm[idx] - mx);
        l += pl[idx] * f;
        const __m512 fv = _mm512_set1_ps(f);
        for (int64_t v = 0; v < D / 16; ++v)
          acc[v] = _mm512_fmadd_ps(fv, _mm512_loadu_ps(po.data() + idx * D + v * 16), acc[v]);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / l);
      const int64_t t = r / g, i = r % g;
      T* dst = o.data() + t * nq + (kvh * g + i) * D;
      for (int64_t v = 0; v < D / 16; ++v) store16(dst + v * 16, _mm512_mul_ps(acc[v], inv));
    }
  linear_t<T>(o.data(), Tn, nq, w_o, H, nullptr, y.data());
  residual_t<T>(x, y.data(), post_norm, eps, Tn, H, out);
}

template <typename T>
const T* P(int64_t v) { return reinterpret_cast<const T*>(v); }

void mlp(bool bf16, int64_t x, int64_t out, int64_t rows, int64_t H, int64_t norm_w, double eps,
         int64_t w_gate_up, int64_t I, int64_t w_down, int64_t act, int64_t post_norm) {
  if (bf16)
    mlp_t<uint16_t>(P<uint16_t>(x), reinterpret_cast<uint16_t*>(out), rows, H, P<uint16_t>(norm_w),
                    static_cast<float>(eps), P<int64_t>(w_gate_up), I, P<int64_t>(w_down), static_cast<int>(act),
                    P<uint16_t>(post_norm));
  else
    mlp_t<float>(P<float>(x), reinterpret_cast<float*>(out), rows, H, P<float>(norm_w),
                 static_cast<float>(eps), P<int64_t>(w_gate_up), I, P<int64_t>(w_down), static_cast<int>(act),
                 P<float>(post_norm));
}

void attention(bool bf16, int64_t x, int64_t out, int64_t Tn, int64_t H, int64_t norm_w, double eps,
               int64_t w_qkv, int64_t b_qkv, int64_t q_norm, int64_t k_norm, int64_t cosp,
               int64_t sinp, int64_t kc, int64_t vc, int64_t kt, int64_t vt, int64_t cap,
               int64_t start, int64_t hq, int64_t hkv, int64_t D, int64_t window, int64_t w_o,
               int64_t draft_window, int64_t sink, double scale, int64_t post_norm) {
  if (bf16)
    attention_t<uint16_t>(P<uint16_t>(x), reinterpret_cast<uint16_t*>(out), Tn, H, P<uint16_t>(norm_w),
                          static_cast<float>(eps), P<int64_t>(w_qkv), P<float>(b_qkv),
                          P<uint16_t>(q_norm), P<uint16_t>(k_norm), P<float>(cosp), P<float>(sinp),
                          reinterpret_cast<uint16_t*>(kc), reinterpret_cast<uint16_t*>(vc),
                          reinterpret_cast<uint16_t*>(kt), reinterpret_cast<uint16_t*>(vt), cap, start,
                          hq, hkv, D, window, P<int64_t>(w_o), draft_window, sink, static_cast<float>(scale),
                          P<uint16_t>(post_norm));
  else
    attention_t<float>(P<float>(x), reinterpret_cast<float*>(out), Tn, H, P<float>(norm_w),
                       static_cast<float>(eps), P<int64_t>(w_qkv), P<float>(b_qkv), P<float>(q_norm),
                       P<float>(k_norm), P<float>(cosp), P<float>(sinp), reinterpret_cast<float*>(kc),
                       reinterpret_cast<float*>(vc), reinterpret_cast<float*>(kt), nullptr, cap, start,
                       hq, hkv, D, window, P<int64_t>(w_o), draft_window, sink, static_cast<float>(scale),
                       P<float>(post_norm));
}


// The stack of 2L sublayers in one call (what a forward runs between the embedding and the head),
// without a trip through Python per sublayer. run: 2L flags (sublayer 2i: layer i's attention,
// 2i+1: its MLP), 0 = skipped. layers: int64 [L][kFields] of pointers (the four products' weight
// descriptors, the norms, bias and cache tensors) and the window:
// Gemma 3 adds per layer its two post-norms (0: none) and which rotary table (0: cos/sin, 1:
// cos_local/sin_local), and per model the gate's activation (Act) and the scores' scale (0: 1/sqrt(D)).
enum Field { kAttnNorm, kQkv, kBqkv, kQNorm, kKNorm, kO, kMlpNorm, kGateUp, kDown, kKc, kVc, kKt, kVt,
             kWindow, kPostAttnNorm, kPostMlpNorm, kLocalRope, kFields };

// dwin (may be null): per layer, a draft window for its attention (0: none), with `sink` positions.
template <typename T>
void stack_t(const T* x, T* out, int64_t Tn, int64_t H, int64_t start, const uint8_t* run, int64_t L,
             const int64_t* layers, float eps, const float* cosp, const float* sinp, int64_t cap,
             int64_t hq, int64_t hkv, int64_t D, int64_t I, const int64_t* dwin = nullptr, int64_t sink = 0,
             const float* cos_local = nullptr, const float* sin_local = nullptr, int act = kSilu,
             float scale = 0.0f) {
  std::vector<T> a(x, x + Tn * H), b(Tn * H);
  for (int64_t s = 0; s < 2 * L; ++s) {
    if (!run[s]) continue;
    const int64_t* f = layers + (s / 2) * kFields;
    const bool local = f[kLocalRope] != 0;
    if (s % 2 == 0)
      attention_t<T>(a.data(), b.data(), Tn, H, P<T>(f[kAttnNorm]), eps, P<int64_t>(f[kQkv]), P<float>(f[kBqkv]),
                     P<T>(f[kQNorm]), P<T>(f[kKNorm]), local ? cos_local : cosp, local ? sin_local : sinp,
                     reinterpret_cast<T*>(f[kKc]),
                     reinterpret_cast<T*>(f[kVc]), reinterpret_cast<T*>(f[kKt]), reinterpret_cast<T*>(f[kVt]),
                     cap, start, hq, hkv, D, f[kWindow], P<int64_t>(f[kO]), dwin ? dwin[s / 2] : 0, sink,
                     scale, P<T>(f[kPostAttnNorm]));
    else
      mlp_t<T>(a.data(), b.data(), Tn, H, P<T>(f[kMlpNorm]), eps, P<int64_t>(f[kGateUp]), I, P<int64_t>(f[kDown]),
               act, P<T>(f[kPostMlpNorm]));
    a.swap(b);
  }
  std::memcpy(out, a.data(), Tn * H * sizeof(T));
}

void stack(bool bf16, int64_t x, int64_t out, int64_t Tn, int64_t H, int64_t start, int64_t run,
           int64_t L, int64_t layers, double eps, int64_t cosp, int64_t sinp, int64_t cap, int64_t hq,
           int64_t hkv, int64_t D, int64_t I, int64_t dwin, int64_t sink, int64_t cos_local, int64_t sin_local,
           int64_t act, double scale) {
  if (bf16)
    stack_t<uint16_t>(P<uint16_t>(x), reinterpret_cast<uint16_t*>(out), Tn, H, start, P<uint8_t>(run), L,
                      P<int64_t>(layers), static_cast<float>(eps), P<float>(cosp), P<float>(sinp), cap,
                      hq, hkv, D, I, P<int64_t>(dwin), sink, P<float>(cos_local), P<float>(sin_local),
                      static_cast<int>(act), static_cast<float>(scale));
  else
    stack_t<float>(P<float>(x), reinterpret_cast<float*>(out), Tn, H, start, P<uint8_t>(run), L,
                   P<int64_t>(layers), static_cast<float>(eps), P<float>(cosp), P<float>(sinp), cap, hq,
                   hkv, D, I, P<int64_t>(dwin), sink, P<float>(cos_local), P<float>(sin_local),
                   static_cast<int>(act), static_cast<float>(scale));
}

}  // namespace ks
