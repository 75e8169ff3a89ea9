// knapspec's fused sublayers (AVX-512; bfloat16 needs AVX512_BF16): whole attention and MLP
// sublayers, and the whole stack of them, in one call each. Their products take a weight
// descriptor (quant.h), so float tiles and quantized blocks run through the same sublayers.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
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

// 2^t for float32 lanes with t <= 0 (the softmax's arguments): 2^n * p(f), n = round(t), f = t - n
// exactly, p a degree-5 Taylor polynomial of 2^f on [-1/2, 1/2] (|rel. error| < 3e-6, ample ahead of
// a rounding to bfloat16); t below -150 gives 0.
KS_TARGET inline __m512 exp2_16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
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
// The attention's partial results (per work item and query row: maximum, sum, D value sums) are
// kept under this many bytes by taking a call's tokens in batches: a 512-token prompt chunk at 8k
// tokens of context would need ~38 MB at once. (set_partial_bytes: tests force small batches.)
inline int64_t g_partial_bytes = int64_t{8} << 20;
inline void set_partial_bytes(int64_t bytes) { g_partial_bytes = bytes > 0 ? bytes : int64_t{8} << 20; }
constexpr int64_t kSerialKeys = 1536;   // (keys x KV heads x tokens) below which one thread attends
constexpr int64_t kBlk = 16;      // keys per block of the blocked key cache

// The attention reads its own copies of the cache, laid out for products with one key (scores) or
// one output dimension (values) per SIMD lane, so that no sum runs across lanes:
//   keys, bfloat16:   [Hkv][capacity/16][D/2][16][2] - 16 keys x one pair of dimensions per 64 bytes
//   keys, float32:    [Hkv][capacity/16][D][16]
//   values, bfloat16: [Hkv][capacity/2][D][2]        - 16 dimensions x a pair of keys per 64 bytes
//   values, float32:  the cache itself, [Hkv][capacity][D]
// (knapspec/cache.py keeps them; the torch path writes them through KVCache.write.)

// The keys and values are products' inputs in float32, split from their bfloat16 pairs with
// even_bf16 / odd_bf16 (dense.h), then fused multiply-adds.
// Scores of G query rows (q: float32, rows D apart) against NB 16-key blocks (kb: the first
// block), times `scale`, into s (rows kChunk apart). Lane j of a block sums its key's products over
// the dimensions in order, whatever the rows or blocks in the call.
// (Named registers, not arrays: with arrays GCC reloaded every key vector for every row.)
#define KS_4(X) X(0) X(1) X(2) X(3)
template <typename T, int G, int NB>
KS_TARGET inline void scores(const float* q, int64_t D, const T* kb, float scale, float* s, Prefetch& pf) {
#define KS_SDECL(r) __m512 s##r##0 = _mm512_setzero_ps(), s##r##1 = s##r##0, s##r##2 = s##r##0, s##r##3 = s##r##0;
  KS_4(KS_SDECL)
#undef KS_SDECL
  const int64_t bstride = D * kBlk;                 // elements per block
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t steps = bf16 ? D / 2 : D;
  for (int64_t dp = 0; dp < steps; ++dp) {
    pf.step(NB);
    const T* kp = kb + dp * (bf16 ? 2 : 1) * kBlk;
    __m512 e0, e1, e2, e3, o0, o1, o2, o3;          // bfloat16: dimensions 2dp (e), 2dp+1 (o)
#define KS_KLOAD(b)                                                                    \
    if constexpr (NB > b) {                                                            \
      if constexpr (bf16) {                                                            \
        const __m512i raw = _mm512_loadu_si512(kp + b * bstride);                      \
        e##b = even_bf16(raw);                                                         \
        o##b = odd_bf16(raw);                                                          \
      } else {                                                                         \
        e##b = _mm512_loadu_ps(kp + b * bstride);                                      \
      }                                                                                \
    }
    KS_4(KS_KLOAD)
#undef KS_KLOAD
#define KS_SROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      const float* qr = q + r * D + dp * (bf16 ? 2 : 1);                               \
      const __m512 qe = _mm512_set1_ps(qr[0]);                                         \
      s##r##0 = _mm512_fmadd_ps(e0, qe, s##r##0);                                      \
      if constexpr (NB > 1) s##r##1 = _mm512_fmadd_ps(e1, qe, s##r##1);                \
      if constexpr (NB > 2) s##r##2 = _mm512_fmadd_ps(e2, qe, s##r##2);                \
      if constexpr (NB > 3) s##r##3 = _mm512_fmadd_ps(e3, qe, s##r##3);                \
      if constexpr (bf16) {                                                            \
        const __m512 qo = _mm512_set1_ps(qr[1]);                                       \
        s##r##0 = _mm512_fmadd_ps(o0, qo, s##r##0);                                    \
        if constexpr (NB > 1) s##r##1 = _mm512_fmadd_ps(o1, qo, s##r##1);              \
        if constexpr (NB > 2) s##r##2 = _mm512_fmadd_ps(o2, qo, s##r##2);              \
        if constexpr (NB > 3) s##r##3 = _mm512_fmadd_ps(o3, qo, s##r##3);              \
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
KS_TARGET inline void scores_nb(const float* q, int64_t D, const T* kb, float scale, float* s, int64_t nb,
                               Prefetch& pf) {
  switch (nb) {
    case 1: scores<T, G, 1>(q, D, kb, scale, s, pf); break;
    case 2: scores<T, G, 2>(q, D, kb, scale, s, pf); break;
    case 3: scores<T, G, 3>(q, D, kb, scale, s, pf); break;
    default: scores<T, G, 4>(q, D, kb, scale, s, pf); break;
  }
}

// Probabilities times values for G rows over the keys [j0, j1) of the chunk (j0 even in bfloat16):
// o[r] (float32) = sum_j p[r][j] v[j] for NV groups of 16 output dimensions, one dimension per
// lane, the keys in order (bfloat16: key pairs, the even key first). p: float32, rows kChunk
// apart, 0 outside each row's keys. vt: the first dimension of this pass; D: the rows' stride of o
// and (float32) of the values.
template <typename T, int G, int NV>
KS_TARGET inline void values(const float* p, const T* vt, int64_t j0, int64_t j1, float* o, int64_t D,
                             Prefetch& pf) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
#define KS_VDECL(r) __m512 o##r##0 = _mm512_setzero_ps(), o##r##1 = o##r##0, o##r##2 = o##r##0, o##r##3 = o##r##0;
  KS_4(KS_VDECL)
#undef KS_VDECL
  for (int64_t j = j0; j < j1; j += bf16 ? 2 : 1) {
    pf.step(NV);
    const T* w = vt + j * D;                  // bfloat16: pair j/2 as [D][2]; float32: key j as [D]
    __m512 e0, e1, e2, e3, x0, x1, x2, x3;    // bfloat16: key j (e), key j+1 (x); float32: key j (e)
#define KS_VLOAD(i)                                                                    \
    if constexpr (NV > i) {                                                            \
      if constexpr (bf16) {                                                            \
        const __m512i raw = _mm512_loadu_si512(w + i * 32);                            \
        e##i = even_bf16(raw);                                                         \
        x##i = odd_bf16(raw);                                                          \
      } else {                                                                         \
        e##i = _mm512_loadu_ps(w + i * 16);                                            \
      }                                                                                \
    }
    KS_4(KS_VLOAD)
#undef KS_VLOAD
#define KS_VROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      const __m512 pe = _mm512_set1_ps(p[r * kChunk + j]);                             \
      o##r##0 = _mm512_fmadd_ps(pe, e0, o##r##0);                                      \
      if constexpr (NV > 1) o##r##1 = _mm512_fmadd_ps(pe, e1, o##r##1);                \
      if constexpr (NV > 2) o##r##2 = _mm512_fmadd_ps(pe, e2, o##r##2);                \
      if constexpr (NV > 3) o##r##3 = _mm512_fmadd_ps(pe, e3, o##r##3);                \
      if constexpr (bf16) {                                                            \
        const __m512 px = _mm512_set1_ps(p[r * kChunk + j + 1]);                       \
        o##r##0 = _mm512_fmadd_ps(px, x0, o##r##0);                                    \
        if constexpr (NV > 1) o##r##1 = _mm512_fmadd_ps(px, x1, o##r##1);              \
        if constexpr (NV > 2) o##r##2 = _mm512_fmadd_ps(px, x2, o##r##2);              \
        if constexpr (NV > 3) o##r##3 = _mm512_fmadd_ps(px, x3, o##r##3);              \
      }                                                                                \
    }
    KS_4(KS_VROW)
#undef KS_VROW
  }
#define KS_VSTORE(r)                                                                   \
  if constexpr (G > r) {                                                               \
    _mm512_storeu_ps(o + r * D, o##r##0);                                              \
    if constexpr (NV > 1) _mm512_storeu_ps(o + r * D + 16, o##r##1);                   \
    if constexpr (NV > 2) _mm512_storeu_ps(o + r * D + 32, o##r##2);                   \
    if constexpr (NV > 3) _mm512_storeu_ps(o + r * D + 48, o##r##3);                   \
  }
  KS_4(KS_VSTORE)
#undef KS_VSTORE
}

template <typename T, int G>
KS_TARGET inline void values_nv(const float* p, const T* vt, int64_t j0, int64_t j1, float* o, int64_t D, int64_t nv,
                               Prefetch& pf) {
  switch (nv) {
    case 1: values<T, G, 1>(p, vt, j0, j1, o, D, pf); break;
    case 2: values<T, G, 2>(p, vt, j0, j1, o, D, pf); break;
    case 3: values<T, G, 3>(p, vt, j0, j1, o, D, pf); break;
    default: values<T, G, 4>(p, vt, j0, j1, o, D, pf); break;
  }
}

// The keys [A, B) of the work item [k0, k1) that rows r0 .. r0+n-1 need (the union of their
// ranges); false, with those rows' partial results set to "no keys", when there are none.
inline bool group_keys(const int64_t* ra, const int64_t* rb, int64_t r0, int64_t n, int64_t k0, int64_t k1,
                       int64_t D, int64_t& A, int64_t& B, float* m_out, float* l_out, float* o_out) {
  A = k1, B = k0;
  for (int64_t r = r0; r < r0 + n; ++r) {
    const int64_t a = std::max(k0, ra[r]), b = std::min(k1, rb[r]);
    if (a < b) A = std::min(A, a), B = std::max(B, b);
  }
  if (A < B) return true;
  for (int64_t r = r0; r < r0 + n; ++r) {
    m_out[r] = -INFINITY;
    l_out[r] = 0.0f;
    std::fill(o_out + r * D, o_out + (r + 1) * D, 0.0f);
  }
  return false;
}

// lanes of 16-key block bi inside [a, b) (chunk-relative)
inline __mmask16 block_mask(int64_t bi, int64_t a, int64_t b) {
  const int64_t j0 = bi * kBlk;
  const int64_t lo_i = std::max<int64_t>(0, a - j0), hi_i = std::min<int64_t>(16, b - j0);
  if (hi_i <= lo_i) return 0;
  return static_cast<__mmask16>(((1u << hi_i) - 1) & ~((1u << lo_i) - 1));
}

// One (KV head, 256-key chunk) work item for R query rows: row r (q: float32, D apart) attends to
// the keys k0 <= j < k1 with ra[r] <= j < rb[r]; out: each row's partial softmax, maximum m, sum l
// and unnormalised output o[D] (float32). kt: this KV head's blocked keys; vsrc: its values
// (bfloat16: the pair layout; float32: [cap][D]). s, p: buffers of 4 x kChunk floats.
// The rows go 4 at a time over each 16-key block of the keys (and each pair of values) the group
// needs, so the keys are read once per group of rows, not once per token. A row's sums are the same
// whatever rows share its group: each runs in its own lanes over the keys in order, and the keys a
// group covers beyond a row's own have probability 0 for it (0 times a finite value; the cache is
// zero-initialised), which adds nothing to its sums.
template <typename T>
KS_TARGET void attend_rows(const float* q, int64_t R, const int64_t* ra, const int64_t* rb, const T* kt,
                           const T* vsrc, int64_t D, int64_t k0, int64_t k1, float scale, float* s, float* p,
                           float* m_out, float* l_out, float* o_out, Prefetch& pf_first, Prefetch& pf_rest) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    Prefetch& pf_v = r0 == 0 ? pf_first : pf_rest;
    Prefetch& pf_k = pf_rest;
    const int64_t n = std::min<int64_t>(4, R - r0);
    int64_t A, B;
    if (!group_keys(ra, rb, r0, n, k0, k1, D, A, B, m_out, l_out, o_out)) continue;
    // scores of the whole 16-key blocks that meet [A, B) (blocks aligned to absolute positions),
    // 4 blocks at a time
    const int64_t blk0 = (A - k0) / kBlk, blk1 = (B - k0 + kBlk - 1) / kBlk;
    const float* qg = q + r0 * D;
    for (int64_t bi = blk0; bi < blk1; bi += 4) {
      const int64_t nb = std::min<int64_t>(4, blk1 - bi);
      const T* kb = kt + (k0 / kBlk + bi) * D * kBlk;
      float* sb = s + bi * kBlk;
      switch (n) {
        case 1: scores_nb<T, 1>(qg, D, kb, scale, sb, nb, pf_v); break;
        case 2: scores_nb<T, 2>(qg, D, kb, scale, sb, nb, pf_v); break;
        case 3: scores_nb<T, 3>(qg, D, kb, scale, sb, nb, pf_v); break;
        default: scores_nb<T, 4>(qg, D, kb, scale, sb, nb, pf_v); break;
      }
    }
    // p = exp(s - max) over each row's own keys, 0 elsewhere in the group's blocks
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const int64_t a = std::max(k0, ra[r]) - k0, b = std::min(k1, rb[r]) - k0;
      const float* sr = s + i * kChunk;
      float* pr = p + i * kChunk;
      if (a >= b) {
        std::fill(pr + blk0 * kBlk, pr + blk1 * kBlk, 0.0f);
        m_out[r] = -INFINITY;
        l_out[r] = 0.0f;
        continue;
      }
      __m512 mxv = _mm512_set1_ps(-INFINITY);
      for (int64_t bi = blk0; bi < blk1; ++bi)
        mxv = _mm512_mask_max_ps(mxv, block_mask(bi, a, b), mxv, _mm512_loadu_ps(sr + bi * kBlk));
      const float mx = _mm512_reduce_max_ps(mxv);
      const __m512 mxs = _mm512_set1_ps(mx);
      __m512 lv = _mm512_setzero_ps();
      for (int64_t bi = blk0; bi < blk1; ++bi) {
        const __mmask16 mk = block_mask(bi, a, b);
        const __m512 e = mk ? _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + bi * kBlk), mxs)))
                            : _mm512_setzero_ps();
        _mm512_storeu_ps(pr + bi * kBlk, e);
        lv = _mm512_add_ps(lv, e);
      }
      m_out[r] = mx;
      l_out[r] = _mm512_reduce_add_ps(lv);
    }
    // values over the group's keys (bfloat16: key pairs aligned to even positions), in passes of
    // up to 64 output dimensions (each dimension's sum is the same in any pass)
    const int64_t j0 = bf16 ? (A - k0) / 2 * 2 : A - k0, j1 = B - k0;
    const T* vs = vsrc + k0 * D;      // key k0 (bfloat16: pair k0/2) starts at k0*D in both layouts
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const T* vd = vs + d0 * (bf16 ? 2 : 1);
      const int64_t nv = std::min<int64_t>(D - d0, 64) / 16;
      float* og = o_out + r0 * D + d0;
      switch (n) {
        case 1: values_nv<T, 1>(p, vd, j0, j1, og, D, nv, pf_k); break;
        case 2: values_nv<T, 2>(p, vd, j0, j1, og, D, nv, pf_k); break;
        case 3: values_nv<T, 3>(p, vd, j0, j1, og, D, nv, pf_k); break;
        default: values_nv<T, 4>(p, vd, j0, j1, og, D, nv, pf_k); break;
      }
    }
  }
}

// ---- AVX512_BF16 dot products for the bfloat16 attention ---------------------------------------
// VDPBF16PS multiplies a pair of bfloat16 elements by a pair and adds both products to a float32
// lane: one instruction for the two multiply-adds that the path above spends two FMAs and two
// conversions on. Where it issues as fast as an FMA (the AMD EPYC measured: 3.6 G instructions/s a
// core for both), that halves the attention's arithmetic, which is what a multi-token pass at long
// context spends its time on; where it issues at a quarter of the FMA rate (the Xeon measured,
// dense.h), it would double it. Python times both once per process (dot_rate) and picks.
// The keys' layout is already the instruction's pair layout (lane j: key j's dimensions 2dp,
// 2dp+1), and so is the values' (lane d: dimension d of keys 2i, 2i+1). The queries enter in
// bfloat16 (they are stored in it), the probabilities rounded to bfloat16 as on AMX tiles and in
// GPU flash attention kernels, their sum l in float32. Each lane's sum runs over the dimension pairs
// (scores) or key pairs aligned to even positions (values) in order, whatever rows share its group,
// so a row's result is the same alone or in a pass. A process takes one path for every call
// (set_dot).
inline int g_dot = 0;    // 1: the bfloat16 attention runs on VDPBF16PS (without AMX)
inline int64_t set_dot(int64_t on) {
  g_dot = on ? 1 : 0;
  return g_dot;
}

KS_TARGET inline __m512bh pair_bf16(const uint16_t* p) {       // p[0], p[1] into every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

// Unscaled scores of G query rows (qb: bfloat16, rows D apart) against NB 16-key blocks (kb: the
// first), into s (rows kChunk apart).
template <int G, int NB>
KS_TARGET inline void scores_dot(const uint16_t* qb, int64_t D, const uint16_t* kb, float* s, Prefetch& pf) {
#define KS_SDECL(r) __m512 s##r##0 = _mm512_setzero_ps(), s##r##1 = s##r##0, s##r##2 = s##r##0, s##r##3 = s##r##0;
  KS_4(KS_SDECL)
#undef KS_SDECL
  const int64_t bstride = D * kBlk;
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    pf.step(NB);
    const uint16_t* kp = kb + dp * 2 * kBlk;
    __m512bh k0_, k1_, k2_, k3_;
#define KS_KLOAD(b) \
    if constexpr (NB > b) k##b##_ = (__m512bh)_mm512_loadu_si512(kp + b * bstride);
    KS_4(KS_KLOAD)
#undef KS_KLOAD
#define KS_SROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      const __m512bh qv = pair_bf16(qb + r * D + 2 * dp);                              \
      s##r##0 = _mm512_dpbf16_ps(s##r##0, k0_, qv);                                    \
      if constexpr (NB > 1) s##r##1 = _mm512_dpbf16_ps(s##r##1, k1_, qv);              \
      if constexpr (NB > 2) s##r##2 = _mm512_dpbf16_ps(s##r##2, k2_, qv);              \
      if constexpr (NB > 3) s##r##3 = _mm512_dpbf16_ps(s##r##3, k3_, qv);              \
    }
    KS_4(KS_SROW)
#undef KS_SROW
  }
#define KS_SSTORE(r)                                                                   \
  if constexpr (G > r) {                                                               \
    _mm512_storeu_ps(s + r * kChunk, s##r##0);                                         \
    if constexpr (NB > 1) _mm512_storeu_ps(s + r * kChunk + kBlk, s##r##1);            \
    if constexpr (NB > 2) _mm512_storeu_ps(s + r * kChunk + 2 * kBlk, s##r##2);        \
    if constexpr (NB > 3) _mm512_storeu_ps(s + r * kChunk + 3 * kBlk, s##r##3);        \
  }
  KS_4(KS_SSTORE)
#undef KS_SSTORE
}

template <int G>
KS_TARGET inline void scores_dot_nb(const uint16_t* qb, int64_t D, const uint16_t* kb, float* s, int64_t nb,
                                    Prefetch& pf) {
  switch (nb) {
    case 1: scores_dot<G, 1>(qb, D, kb, s, pf); break;
    case 2: scores_dot<G, 2>(qb, D, kb, s, pf); break;
    case 3: scores_dot<G, 3>(qb, D, kb, s, pf); break;
    default: scores_dot<G, 4>(qb, D, kb, s, pf); break;
  }
}

// o[r] (float32) = sum over the key pairs [j0, j1) (j0 even) of the chunk of p[r] (bfloat16, rows
// kChunk apart, 0 outside each row's keys) times the values, NV groups of 16 dimensions from vt
// (this pass's first dimension in the pair layout); o's rows D apart.
template <int G, int NV>
KS_TARGET inline void values_dot(const uint16_t* p, const uint16_t* vt, int64_t j0, int64_t j1, float* o,
                                 int64_t D, Prefetch& pf) {
#define KS_VDECL(r) __m512 o##r##0 = _mm512_setzero_ps(), o##r##1 = o##r##0, o##r##2 = o##r##0, o##r##3 = o##r##0;
  KS_4(KS_VDECL)
#undef KS_VDECL
  for (int64_t j = j0; j < j1; j += 2) {
    pf.step(NV);
    const uint16_t* w = vt + j * D;
    __m512bh v0_, v1_, v2_, v3_;
#define KS_VLOAD(i) \
    if constexpr (NV > i) v##i##_ = (__m512bh)_mm512_loadu_si512(w + i * 32);
    KS_4(KS_VLOAD)
#undef KS_VLOAD
#define KS_VROW(r)                                                                     \
    if constexpr (G > r) {                                                             \
      const __m512bh pv = pair_bf16(p + r * kChunk + j);                               \
      o##r##0 = _mm512_dpbf16_ps(o##r##0, v0_, pv);                                    \
      if constexpr (NV > 1) o##r##1 = _mm512_dpbf16_ps(o##r##1, v1_, pv);              \
      if constexpr (NV > 2) o##r##2 = _mm512_dpbf16_ps(o##r##2, v2_, pv);              \
      if constexpr (NV > 3) o##r##3 = _mm512_dpbf16_ps(o##r##3, v3_, pv);              \
    }
    KS_4(KS_VROW)
#undef KS_VROW
  }
#define KS_VSTORE(r)                                                                   \
  if constexpr (G > r) {                                                               \
    _mm512_storeu_ps(o + r * D, o##r##0);                                              \
    if constexpr (NV > 1) _mm512_storeu_ps(o + r * D + 16, o##r##1);                   \
    if constexpr (NV > 2) _mm512_storeu_ps(o + r * D + 32, o##r##2);                   \
    if constexpr (NV > 3) _mm512_storeu_ps(o + r * D + 48, o##r##3);                   \
  }
  KS_4(KS_VSTORE)
#undef KS_VSTORE
}

template <int G>
KS_TARGET inline void values_dot_nv(const uint16_t* p, const uint16_t* vt, int64_t j0, int64_t j1, float* o,
                                    int64_t D, int64_t nv, Prefetch& pf) {
  switch (nv) {
    case 1: values_dot<G, 1>(p, vt, j0, j1, o, D, pf); break;
    case 2: values_dot<G, 2>(p, vt, j0, j1, o, D, pf); break;
    case 3: values_dot<G, 3>(p, vt, j0, j1, o, D, pf); break;
    default: values_dot<G, 4>(p, vt, j0, j1, o, D, pf); break;
  }
}

// One row's partial softmax in bfloat16 over its keys [a, b) of the chunk (a < b), in the 16-key
// blocks [blk0, blk1) (0 outside [a, b)): the maximum of the unscaled scores sr (scale > 0;
// rounding is monotonic, so max(s) * scale is the maximum of the scaled ones), then
// 2^(s * scale * log2(e) - max * scale * log2(e)) with one rounding of the argument (exp2_16: the
// probabilities are rounded to bfloat16 next) into pr; m = max * scale, l = the float32 sum of the
// unrounded probabilities. Shared by the VDPBF16PS path and AMX tiles.
KS_TARGET inline void probs_bf16(const float* sr, uint16_t* pr, int64_t a, int64_t b, int64_t blk0, int64_t blk1,
                                 float scale, float& m, float& l) {
  const float scale2 = scale * 1.44269504088896341f;     // and log2(e)
  const __m512 sc2 = _mm512_set1_ps(scale2);
  __m512 mxv = _mm512_set1_ps(-INFINITY);
  for (int64_t bi = blk0; bi < blk1; ++bi)
    mxv = _mm512_mask_max_ps(mxv, block_mask(bi, a, b), mxv, _mm512_loadu_ps(sr + bi * kBlk));
  const float smax = _mm512_reduce_max_ps(mxv);
  const __m512 mxs = _mm512_set1_ps(smax * scale2);
  __m512 lv = _mm512_setzero_ps();
  for (int64_t bi = blk0; bi < blk1; ++bi) {
    const __mmask16 mk = block_mask(bi, a, b);
    const __m512 e = mk ? _mm512_maskz_mov_ps(mk, exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + bi * kBlk), sc2, mxs)))
                        : _mm512_setzero_ps();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + bi * kBlk), (__m256i)_mm512_cvtneps_pbh(e));
    lv = _mm512_add_ps(lv, e);
  }
  m = smax * scale;
  l = _mm512_reduce_add_ps(lv);
}

// attend_rows (above) on VDPBF16PS for a bfloat16 cache: qb, the rows' queries in bfloat16 (D
// apart); s: 4 x kChunk floats, pb: 4 x kChunk bfloat16. The softmax as on AMX tiles (probs_bf16).
KS_TARGET void attend_rows_dot(const uint16_t* qb, int64_t R, const int64_t* ra, const int64_t* rb,
                               const uint16_t* kt, const uint16_t* vt, int64_t D, int64_t k0, int64_t k1,
                               float scale, float* s, uint16_t* pb, float* m_out, float* l_out, float* o_out,
                               Prefetch& pf_first, Prefetch& pf_rest) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    Prefetch& pf_v = r0 == 0 ? pf_first : pf_rest;
    Prefetch& pf_k = pf_rest;
    const int64_t n = std::min<int64_t>(4, R - r0);
    int64_t A, B;
    if (!group_keys(ra, rb, r0, n, k0, k1, D, A, B, m_out, l_out, o_out)) continue;
    const int64_t blk0 = (A - k0) / kBlk, blk1 = (B - k0 + kBlk - 1) / kBlk;
    const uint16_t* qg = qb + r0 * D;
    for (int64_t bi = blk0; bi < blk1; bi += 4) {
      const int64_t nb = std::min<int64_t>(4, blk1 - bi);
      const uint16_t* kb = kt + (k0 / kBlk + bi) * D * kBlk;
      float* sb = s + bi * kBlk;
      switch (n) {
        case 1: scores_dot_nb<1>(qg, D, kb, sb, nb, pf_v); break;
        case 2: scores_dot_nb<2>(qg, D, kb, sb, nb, pf_v); break;
        case 3: scores_dot_nb<3>(qg, D, kb, sb, nb, pf_v); break;
        default: scores_dot_nb<4>(qg, D, kb, sb, nb, pf_v); break;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const int64_t a = std::max(k0, ra[r]) - k0, b = std::min(k1, rb[r]) - k0;
      const float* sr = s + i * kChunk;
      uint16_t* pr = pb + i * kChunk;
      if (a >= b) {
        std::fill(pr + blk0 * kBlk, pr + blk1 * kBlk, uint16_t{0});
        m_out[r] = -INFINITY;
        l_out[r] = 0.0f;
        continue;
      }
      probs_bf16(sr, pr, a, b, blk0, blk1, scale, m_out[r], l_out[r]);
    }
    const int64_t j0 = (A - k0) / 2 * 2, j1 = B - k0;
    const uint16_t* vs = vt + k0 * D;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const uint16_t* vd = vs + d0 * 2;
      const int64_t nv = std::min<int64_t>(D - d0, 64) / 16;
      float* og = o_out + r0 * D + d0;
      switch (n) {
        case 1: values_dot_nv<1>(pb, vd, j0, j1, og, D, nv, pf_k); break;
        case 2: values_dot_nv<2>(pb, vd, j0, j1, og, D, nv, pf_k); break;
        case 3: values_dot_nv<3>(pb, vd, j0, j1, og, D, nv, pf_k); break;
        default: values_dot_nv<4>(pb, vd, j0, j1, og, D, nv, pf_k); break;
      }
    }
  }
}

// Instructions a second, in G/s, of VDPBF16PS (dot) or float32 FMAs, 512 bits wide, 12 independent
// sums, on this thread, over about `ms` milliseconds.
#define KS_12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
template <bool Dot>
KS_TARGET double issue_rate(double ms) {
  const auto t0 = std::chrono::steady_clock::now();
  int64_t n = 0;
  const __m512 b = _mm512_set1_ps(1.0001f), c = _mm512_set1_ps(0.9999f);
  const __m512bh bb = (__m512bh)_mm512_set1_epi16(0x3f80), cb = (__m512bh)_mm512_set1_epi16(0x3f00);
#define KS_RDECL(i) __m512 a##i = _mm512_set1_ps(static_cast<float>(i));
  KS_12(KS_RDECL)
#undef KS_RDECL
  double el = 0.0;
  do {
    for (int k = 0; k < 4096; ++k) {
      if constexpr (Dot) {
#define KS_RDOT(i) a##i = _mm512_dpbf16_ps(a##i, bb, cb);
        KS_12(KS_RDOT)
#undef KS_RDOT
      } else {
#define KS_RFMA(i) a##i = _mm512_fmadd_ps(a##i, b, c);
        KS_12(KS_RFMA)
#undef KS_RFMA
      }
      __asm__ volatile("");
    }
    n += 4096 * 12;
    el = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  } while (el < ms);
  __m512 sum = _mm512_setzero_ps();
#define KS_RSUM(i) sum = _mm512_add_ps(sum, a##i);
  KS_12(KS_RSUM)
#undef KS_RSUM
  volatile float keep = _mm512_reduce_add_ps(sum);
  (void)keep;
  return static_cast<double>(n) / el * 1e-6;
}
#undef KS_12

// (VDPBF16PS, FMA) issue rates in G instructions/s, each timed over `ms` milliseconds.
inline std::pair<double, double> dot_rate(double ms) { return {issue_rate<true>(ms), issue_rate<false>(ms)}; }

// ---- AMX (Advanced Matrix Extensions) for the bfloat16 attention ------------------------------
// With AMX, each (row, key) score and each (row, output dimension) sum over a bfloat16 cache is a
// tile product: TDPBF16PS sums 32 bfloat16 products per element, each element from its own row of
// A and its own column of B. The keys' and values' layouts above are already B operands (16 keys x
// a dimension pair per 64 bytes; 16 dimensions x a key pair per 64 bytes), so a 16-key block is
// read once for 16 query rows at the cost of a few instructions, where the AVX-512 path spends a
// fused multiply-add per row, key and dimension. Each element's sum runs over fixed 32-element
// stretches aligned to absolute positions (keys) or dimensions (scores), so a row's result is the
// same alone or in any group, as on the AVX-512 path. The two paths round differently (TDPBF16PS
// matches no sequence of float32 operations; checked), so a process uses one of them for every
// call (set_amx). The probabilities enter the value product rounded to bfloat16, as GPU flash
// attention kernels do; their sum l is taken in float32, as on the AVX-512 path.
// Measured (docs/benchmarks.md): prompts of 2k-8k tokens prefill 1.3-1.6x faster (on by default
// for prompts, the per-call `amx` of stack); 8-token passes at 4k-8k tokens of context ~20%
// cheaper but one-token steps 1-3% dearer (each call's first tile product waits for the tile unit),
// so decoding and verification take AMX only with KNAPSPEC_AMX=1 (g_amx).
#define KS_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

inline int g_amx = 0;    // 1: the bfloat16 attention runs on AMX tiles

// AMX on (when Linux grants this process the tile state; the caller checks the CPU's flags) or
// off; returns whether it is on.
// Whether Linux grants this process the AMX tile state (asked once; the caller checks the CPU).
inline bool amx_granted() {
  static const bool granted = [] {
    unsigned long bitmap = 0;        // ARCH_REQ_XCOMP_PERM, ARCH_GET_XCOMP_PERM; XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;
    if (syscall(SYS_arch_prctl, 0x1022, &bitmap) != 0) return false;
    return (bitmap & (1ul << 18)) != 0;
  }();
  return granted;
}

inline int64_t set_amx(int64_t on) {
  g_amx = on && amx_granted() ? 1 : 0;
  return g_amx;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: sums (float32), 4-5: A (queries / probabilities), all `rows` rows (the query rows
// of a group, 1-16) x 64 bytes; 6-7: B (keys / values), 16 x 64 bytes. Each thread loads a
// configuration before its products (rows = its first group's) and releases the tiles after
// (another library's tile products may run on the same threads in between).
// (The whole 64 bytes as the asm's operand: GCC 12's _tile_loadconfig names only its first 8
// bytes, and a local configuration's other fields were dropped as dead stores.)
KS_AMX_TARGET inline void amx_config(int rows) {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.rows[i] = static_cast<uint8_t>(i < 6 ? rows : 16), c.colsb[i] = 64;
  __asm__ volatile("ldtilecfg %0" : : "m"(c) : "memory");
}
KS_AMX_TARGET inline void amx_end() { _tile_release(); }

// Buffers of one thread's AMX work items.
struct AmxBuffers {
  int rows = 0;                                 // rows of the loaded tile configuration (0: none)
  std::vector<float> s = std::vector<float>(16 * kChunk);          // scores, rows kChunk apart
  std::vector<uint16_t> p = std::vector<uint16_t>(16 * kChunk);    // probabilities in bfloat16
  std::vector<float> o = std::vector<float>(16 * 64);              // one pass's sums, rows 64 apart
  std::vector<uint16_t> vtail = std::vector<uint16_t>(16 * 64 * 2); // the last key pairs of a cache
};

// AMX steps of a work item over n keys and R rows (for spreading a prefetch over them)
inline int64_t amx_steps(int64_t n, int64_t R, int64_t D) {
  const int64_t groups = (R + 15) / 16, blocks = (n + kBlk - 1) / kBlk, spans = (n + 31) / 32;
  return groups * (blocks + (D + 63) / 64 * spans);
}

// attend_rows (above) on AMX tiles for a bfloat16 cache: the rows go 16 at a time. qb: the rows'
// queries in bfloat16, D apart, at least a multiple of 16 rows (padding: any finite values).
// npair: the cache's key pairs (the value layout's extent).
KS_AMX_TARGET void attend_rows_amx(const uint16_t* qb, int64_t R, const int64_t* ra, const int64_t* rb,
                                   const uint16_t* kt, const uint16_t* vt, int64_t D, int64_t npair,
                                   int64_t k0, int64_t k1, float scale, AmxBuffers& buf, float* m_out,
                                   float* l_out, float* o_out, Prefetch& pf_first, Prefetch& pf_rest) {
  float* s = buf.s.data();
  uint16_t* p = buf.p.data();
  // groups of 16 rows and a last one of R % 16: last group first when the tiles are configured
  // for its size (the previous work item ended with it), so that a pass reconfigures once per item
  const int64_t ng = (R + 15) / 16;
  const bool back = ng > 1 && buf.rows == R - (ng - 1) * 16;
  for (int64_t gi = 0; gi < ng; ++gi) {
    const int64_t r0 = (back ? ng - 1 - gi : gi) * 16;
    Prefetch& pf_v = gi == 0 ? pf_first : pf_rest;
    Prefetch& pf_k = pf_rest;
    const int64_t n = std::min<int64_t>(16, R - r0);
    int64_t A, B;
    if (!group_keys(ra, rb, r0, n, k0, k1, D, A, B, m_out, l_out, o_out)) continue;
    if (buf.rows != n) {                        // tiles of this group's rows
      amx_config(static_cast<int>(n));
      buf.rows = static_cast<int>(n);
    }
    const int64_t blk0 = (A - k0) / kBlk, blk1 = (B - k0 + kBlk - 1) / kBlk;
    const int64_t js0 = (A - k0) / 32 * 32, js1 = (B - k0 + 31) / 32 * 32;   // 32-key spans
    // scores: 16 rows x one 16-key block per tile, summed over the dimensions 32 at a time
    const uint16_t* qg = qb + r0 * D;
    const int64_t qstride = D * 2;
    for (int64_t bi = blk0; bi < blk1; ++bi) {
      pf_v.step(static_cast<int>(D / 2));
      const uint16_t* kb = kt + (k0 / kBlk + bi) * D * kBlk;
      if (bi % 2 == 0) {
        _tile_zero(0);
        for (int64_t c = 0; c < D / 32; ++c) {
          _tile_loadd(4, qg + c * 32, qstride);
          _tile_loadd(6, kb + c * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, s + bi * kBlk, kChunk * 4);
      } else {
        _tile_zero(1);
        for (int64_t c = 0; c < D / 32; ++c) {
          _tile_loadd(5, qg + c * 32, qstride);
          _tile_loadd(7, kb + c * 512, 64);
          _tile_dpbf16ps(1, 5, 7);
        }
        _tile_stored(1, s + bi * kBlk, kChunk * 4);
      }
    }
    // probabilities over each row's own keys (0 elsewhere in the group's spans)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const int64_t a = std::max(k0, ra[r]) - k0, b = std::min(k1, rb[r]) - k0;
      const float* sr = s + i * kChunk;
      uint16_t* pr = p + i * kChunk;
      for (int64_t bi = js0 / kBlk; bi < js1 / kBlk; ++bi)
        if (bi < blk0 || bi >= blk1 || a >= b)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + bi * kBlk), _mm256_setzero_si256());
      if (a >= b) {
        m_out[r] = -INFINITY;
        l_out[r] = 0.0f;
        continue;
      }
      probs_bf16(sr, pr, a, b, blk0, blk1, scale, m_out[r], l_out[r]);
    }
    // values: 16 rows x 16 output dimensions per tile, summed over 32-key spans, in passes of up
    // to 64 dimensions
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t nv = std::min<int64_t>(D - d0, 64) / 16;
      _tile_zero(0);
      if (nv > 1) _tile_zero(1);
      if (nv > 2) _tile_zero(2);
      if (nv > 3) _tile_zero(3);
      for (int64_t js = js0; js < js1; js += 32) {
        pf_k.step(static_cast<int>(16 * nv));
        const int64_t pair0 = (k0 + js) / 2;
        const uint16_t* vb = vt + (pair0 * D + d0) * 2;
        int64_t vstride = D * 4;
        if (pair0 + 16 > npair) {              // the cache ends inside this span: its pairs, then 0
          uint16_t* tail = buf.vtail.data();
          std::fill(buf.vtail.begin(), buf.vtail.end(), uint16_t{0});
          for (int64_t kp = 0; kp < npair - pair0; ++kp)
            std::memcpy(tail + kp * 128, vb + kp * D * 2, nv * 16 * 2 * sizeof(uint16_t));
          vb = tail;
          vstride = 256;
        }
        _tile_loadd(4, p + js, kChunk * 2);
        _tile_loadd(6, vb, vstride);
        _tile_dpbf16ps(0, 4, 6);
        if (nv > 1) {
          _tile_loadd(7, vb + 32, vstride);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (nv > 2) {
          _tile_loadd(6, vb + 64, vstride);
          _tile_dpbf16ps(2, 4, 6);
        }
        if (nv > 3) {
          _tile_loadd(7, vb + 96, vstride);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
      float* ob = buf.o.data();
      _tile_stored(0, ob, 256);
      if (nv > 1) _tile_stored(1, ob + 16, 256);
      if (nv > 2) _tile_stored(2, ob + 32, 256);
      if (nv > 3) _tile_stored(3, ob + 48, 256);
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(o_out + (r0 + i) * D + d0, ob + i * 64, nv * 16 * sizeof(float));
    }
  }
}

// out = x + o_proj(attention(rope(q), rope(k), v)), qkv = qkv_proj(rms_norm(x)) (+ bias), with
// the new keys and values written into the cache at positions start .. start+T-1: kt/vt, the
// attention's own layouts (above), and kc/vc, torch's layout of this layer's cache [Hkv][cap][D],
// each only where given (nullptr: that layout is not held; float32 reads its values from vc).
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
                           float scale_ = 0.0f, const T* post_norm = nullptr, int amx_call = -1) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const int64_t nq = hq * D, nk = hkv * D, nqkv = nq + 2 * nk, g = hq / hkv, half = D / 2;
  const int64_t nblk = (cap + kBlk - 1) / kBlk, npair = (cap + 1) / 2;
  std::vector<T> h(Tn * H), qkv(Tn * nqkv), q(Tn * nq), o(Tn * nq), y(Tn * H);
  for (int64_t t = 0; t < Tn; ++t) rms_norm_row(x + t * H, norm_w, H, eps, h.data() + t * H);
  linear_t<T>(h.data(), Tn, H, w_qkv, nqkv, b_qkv, qkv.data());
  // per token: (q/k norm), rotary embedding, keys and values into the cache
  std::vector<T> tmp(D), key(D);
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
      T* dst = is_q ? q.data() + t * nq + head * D
                    : kc != nullptr ? kc + ((head - hq) * cap + p) * D : key.data();
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
      if (vc != nullptr) std::memcpy(vc + (head * cap + p) * D, vsrc, D * sizeof(T));
      if constexpr (bf16) {         // the value into its key pair: slot p % 2
        T* pr = vt + ((head * npair + p / 2) * D) * 2 + p % 2;
        for (int64_t d = 0; d < D; ++d) pr[2 * d] = vsrc[d];
      }
    }
  }
  // attention: work items (KV head, 256-key chunk), each over every token of a batch of the call's
  // tokens (all of them unless their partial results would outgrow g_partial_bytes)
  // --- draft windows: the keys a token sees start at lo(p) (the nearer of the two windows); with
  // a draft window, one more work item per KV head covers the sink keys before lo(p)
  auto lo_of = [&](int64_t p) {
    int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    if (draft_window > 0) lo = std::max<int64_t>(lo, p - draft_window + 1);
    return lo;
  };
  const bool sinks = draft_window > 0 && sink > 0;
  // --- end draft windows
  const float scale = scale_ > 0.0f ? scale_ : 1.0f / std::sqrt(static_cast<float>(D));
  const bool amx = bf16 && (amx_call < 0 ? g_amx != 0 : amx_call != 0 && amx_granted());
  const bool dot = bf16 && !amx && g_dot != 0;        // VDPBF16PS (above)
  const bool qb16 = amx || dot;                        // the queries in bfloat16
  // Tokens per batch: each row is computed the same way whatever the batch (the rows of a work
  // item never mix), so batching bounds the memory only, not the bits.
  const int64_t nc_all = (start + Tn - 1) / kChunk - lo_of(start) / kChunk + 1 + (sinks ? 1 : 0);
  const int64_t per_token = hkv * nc_all * g * (D + 2) * static_cast<int64_t>(sizeof(float));
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(Tn, g_partial_bytes / per_token));
  thread_local std::vector<float> partials;    // kept between calls: no heap growing with the context
  for (int64_t t0 = 0; t0 < Tn; t0 += batch) {
    const int64_t tn = std::min(batch, Tn - t0), first = start + t0;
    const int64_t R = tn * g, end = first + tn;
    const int64_t c_first = lo_of(first) / kChunk;
    const int64_t c_last = (end - 1) / kChunk;
    const int64_t nc = c_last - c_first + 1 + (sinks ? 1 : 0);
    // each (work item, row)'s partial softmax: written by attend_rows for every row, so the
    // buffer is not zeroed (zeroing ~38 MB for a 512-token prompt chunk at 8k tokens of context
    // was ~3% of a prefill)
    const int64_t nparts = hkv * nc * R;
    if (static_cast<int64_t>(partials.size()) < nparts * (D + 2)) partials.resize(nparts * (D + 2));
    float* const pm = partials.data();
    float* const pl = pm + nparts;
    float* const po = pl + nparts;
    // Small attention (a few hundred keys in all) runs on this thread: splitting a few microseconds
    // of work costs a fork and a join of the thread team, ~30 of them per token. Each work item is
    // computed the same way either way.
    const int64_t keys = (end - c_first * kChunk) * hkv * tn;
    // each KV head's query rows (token t's heads kvh*g .. kvh*g+g-1 are rows t*g ..) in float32,
    // and each row's keys: [lo(p), p] for the chunks, [lo', min(sink, lo(p))) for the sink keys
    // (AMX: in bfloat16, each KV head's rows padded to a multiple of 16)
    const int64_t Rpad = amx ? (R + 15) / 16 * 16 : R;
    std::vector<float> qf(qb16 ? 0 : hkv * R * D);
    std::vector<uint16_t> qb(qb16 ? hkv * Rpad * D : 0);
    for (int64_t kvh = 0; kvh < hkv; ++kvh)
      for (int64_t t = 0; t < tn; ++t)
        for (int64_t i = 0; i < g; ++i) {
          const T* src = q.data() + (t0 + t) * nq + (kvh * g + i) * D;
          if (qb16) {
            std::memcpy(qb.data() + (kvh * Rpad + t * g + i) * D, src, D * sizeof(uint16_t));
            continue;
          }
          float* dst = qf.data() + (kvh * R + t * g + i) * D;
          for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
        }
    std::vector<int64_t> ra(R), rb(R), sa(R), sb(R);
    for (int64_t t = 0; t < tn; ++t) {
      const int64_t p = first + t, lo = lo_of(p);
      for (int64_t i = 0; i < g; ++i) {
        ra[t * g + i] = lo;
        rb[t * g + i] = p + 1;
        sa[t * g + i] = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        sb[t * g + i] = std::min(p + 1, std::min(sink, lo));
      }
    }
    at::parallel_for(0, hkv * nc, keys < kSerialKeys ? hkv * nc : 1, [&](int64_t ia, int64_t ib) {
      std::vector<float> sbuf(amx ? 0 : 4 * kChunk), pbuf(amx || dot ? 0 : 4 * kChunk);
      std::vector<uint16_t> pbuf16(dot ? 4 * kChunk : 0);
      AmxBuffers* abuf = nullptr;
      if (amx) {
        thread_local AmxBuffers tbuf;       // per thread, kept between calls (no allocation per call)
        abuf = &tbuf;
        abuf->rows = 0;                     // configured by the first group
      }
      // the keys [k0, k1) of work item `it`, and its KV head's key and value layouts
      auto item = [&](int64_t it, int64_t& k0, int64_t& k1, const T*& ktk, const T*& vsk) {
        const int64_t kvh = it / nc, ci = it % nc;
        const bool sink_item = sinks && ci == nc - 1;      // draft windows: keys [0, sink) before lo(p)
        k0 = sink_item ? 0 : (c_first + ci) * kChunk;
        k1 = std::min(end, k0 + kChunk);
        ktk = kt + kvh * nblk * D * kBlk;
        vsk = bf16 ? vt + kvh * npair * D * 2 : vc + kvh * cap * D;
        return sink_item;
      };
      for (int64_t it = ia; it < ib; ++it) {
        int64_t k0, k1;
        const T *ktk, *vsk;
        const bool sink_item = item(it, k0, k1, ktk, vsk);
        const int64_t kvh = it / nc;
        // While the first rows' scores run, this item's values come into L2; while their values
        // run, the next item's keys. With more than one group of rows (a pass over several tokens)
        // the next item's keys and values are spread over all the rest of this item's products, so
        // that reading them overlaps arithmetic instead of stalling one group.
        Prefetch pf_v, pf_k;
        if (keys >= kSerialKeys) {
          pf_v.p = reinterpret_cast<const char*>(vsk + k0 * D);
          pf_v.end = reinterpret_cast<const char*>(vsk + k1 * D);
          if (it + 1 < ib) {
            int64_t n0, n1;
            const T *nk, *nv;
            item(it + 1, n0, n1, nk, nv);
            pf_k.p = reinterpret_cast<const char*>(nk + n0 * D);
            pf_k.end = reinterpret_cast<const char*>(nk + n1 * D);
            const int64_t groups = (R + (amx ? 15 : 3)) / (amx ? 16 : 4);
            if (groups > 1) {
              pf_k.p2 = reinterpret_cast<const char*>(nv + n0 * D);
              pf_k.end2 = reinterpret_cast<const char*>(nv + n1 * D);
              const int64_t n = k1 - k0, blocks = (n + kBlk - 1) / kBlk;
              const int64_t s_steps = (blocks + 3) / 4 * (bf16 ? D / 2 : D);
              const int64_t v_steps = (D + 63) / 64 * (bf16 ? (n + 1) / 2 : n);
              const int64_t steps = amx ? amx_steps(n, R, D) : v_steps + (groups - 1) * (s_steps + v_steps);
              const int64_t lines = 2 * (n1 - n0) * D * static_cast<int64_t>(sizeof(T)) / 64;
              pf_k.rate = static_cast<uint32_t>(std::min<int64_t>((lines << 16) / std::max<int64_t>(steps, 1) + 1,
                                                                  int64_t{8} << 16));
            }
          }
        }
        const int64_t r = it * R;
        if constexpr (bf16) {
          if (amx) {
            attend_rows_amx(qb.data() + kvh * Rpad * D, R, sink_item ? sa.data() : ra.data(),
                            sink_item ? sb.data() : rb.data(), ktk, vsk, D, npair, k0, k1, scale, *abuf,
                            pm + r, pl + r, po + r * D, pf_v, pf_k);
            continue;
          }
          if (dot) {
            attend_rows_dot(qb.data() + kvh * R * D, R, sink_item ? sa.data() : ra.data(),
                            sink_item ? sb.data() : rb.data(), ktk, vsk, D, k0, k1, scale, sbuf.data(),
                            pbuf16.data(), pm + r, pl + r, po + r * D, pf_v, pf_k);
            continue;
          }
        }
        attend_rows<T>(qf.data() + kvh * R * D, R, sink_item ? sa.data() : ra.data(), sink_item ? sb.data() : rb.data(),
                       ktk, vsk, D, k0, k1, scale, sbuf.data(), pbuf.data(), pm + r, pl + r,
                       po + r * D, pf_v, pf_k);
      }
      if (amx && abuf->rows != 0) amx_end();
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
            acc[v] = _mm512_fmadd_ps(fv, _mm512_loadu_ps(po + idx * D + v * 16), acc[v]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / l);
        const int64_t t = t0 + r / g, i = r % g;
        T* dst = o.data() + t * nq + (kvh * g + i) * D;
        for (int64_t v = 0; v < D / 16; ++v) store16(dst + v * 16, _mm512_mul_ps(acc[v], inv));
      }
  }
  linear_t<T>(o.data(), Tn, nq, w_o, H, nullptr, y.data());
  residual_t<T>(x, y.data(), post_norm, eps, Tn, H, out);
}

template <typename T>
const T* P(int64_t v) { return reinterpret_cast<const T*>(v); }

// The final norm (Model.head): `rows` rows of n, each as rms_norm_row (a row's bits never depend on
// the others).
void rms_norm(bool bf16, int64_t x, int64_t rows, int64_t n, int64_t w, double eps, int64_t y) {
  for (int64_t r = 0; r < rows; ++r) {
    if (bf16)
      rms_norm_row(P<uint16_t>(x) + r * n, P<uint16_t>(w), n, static_cast<float>(eps),
                   reinterpret_cast<uint16_t*>(y) + r * n);
    else
      rms_norm_row(P<float>(x) + r * n, P<float>(w), n, static_cast<float>(eps), reinterpret_cast<float*>(y) + r * n);
  }
}

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
             float scale = 0.0f, int amx = -1) {
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
                     scale, P<T>(f[kPostAttnNorm]), amx);
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
           int64_t act, double scale, int64_t amx) {
  if (bf16)
    stack_t<uint16_t>(P<uint16_t>(x), reinterpret_cast<uint16_t*>(out), Tn, H, start, P<uint8_t>(run), L,
                      P<int64_t>(layers), static_cast<float>(eps), P<float>(cosp), P<float>(sinp), cap,
                      hq, hkv, D, I, P<int64_t>(dwin), sink, P<float>(cos_local), P<float>(sin_local),
                      static_cast<int>(act), static_cast<float>(scale), static_cast<int>(amx));
  else
    stack_t<float>(P<float>(x), reinterpret_cast<float*>(out), Tn, H, start, P<uint8_t>(run), L,
                   P<int64_t>(layers), static_cast<float>(eps), P<float>(cosp), P<float>(sinp), cap, hq,
                   hkv, D, I, P<int64_t>(dwin), sink, P<float>(cos_local), P<float>(sin_local),
                   static_cast<int>(act), static_cast<float>(scale));
}

}  // namespace ks
