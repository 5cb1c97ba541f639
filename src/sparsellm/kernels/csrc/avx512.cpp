// AVX-512 kernels (F, BW, VL, DQ, VBMI2): 16 fp32 lanes, bitmasks decoded with expands in registers
// (vexpandps / vpexpandw / vpexpandb after a plain load; see in_register), 2:4 by gathering x with
// vpermt2ps so only kept weights are multiplied. Decode is bound by memory bandwidth at batch 1, so
// every stream is prefetched ~2 KiB ahead (measured +25-30 % here).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi2,popcnt,fma,f16c,avx2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi2,popcnt,fma,f16c,avx2")
#endif

namespace sparsellm {
namespace {

constexpr int kPrefetchBytes = 2048;

// Prefetch the lines a stream of C values will reach kPrefetchBytes after `at`, as many as one
// step can consume, without branches (a loop over the lines actually consumed mispredicts when
// that count varies, as it does with bitmasks).
template <int C>
inline void prefetch_ahead(const char* at) {
  constexpr int bytes = 64 * (C == kF32 ? 4 : C == kU8 ? 1 : C == kU4 ? 1 : 2) / (C == kU4 ? 2 : 1);
  for (int line = 0; line < (bytes + 63) / 64; ++line) _mm_prefetch(at + kPrefetchBytes + 64 * line, _MM_HINT_T0);
}

inline int64_t popcount(uint64_t bits) { return _mm_popcnt_u64(bits); }

// A loaded vector kept in its register: GCC folds load + vpexpand* into the instruction's memory
// form, the slower one here (2.6 vs 3.1 ns per 64 weights, L1-hot).
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// 16 16-bit words, or 16 bytes, from element i.
inline __m256i words_at(const void* v, int64_t i) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + i));
}
inline __m128i bytes_at(const void* v, int64_t i) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(v) + i));
}

// One codec per stored value type: 16 values at element index i, as fp32 (quantized: the integer).
template <int C>
struct Values;

template <>
struct Values<kF32> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const float*>(v) + i); }
  static __m512 load(const void* v, int64_t i) { return _mm512_loadu_ps(static_cast<const float*>(v) + i); }
  static __m512 expand(const void* v, int64_t i, __mmask16 m) {
    return _mm512_maskz_expand_ps(m, in_register(_mm512_loadu_ps(static_cast<const float*>(v) + i)));
  }
};

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

template <>
struct Values<kBF16> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const uint16_t*>(v) + i); }
  static __m512 load(const void* v, int64_t i) { return widen_bf16(words_at(v, i)); }
  static __m512 expand(const void* v, int64_t i, __mmask16 m) {
    return widen_bf16(_mm256_maskz_expand_epi16(m, in_register(words_at(v, i))));
  }
};

template <>
struct Values<kF16> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const uint16_t*>(v) + i); }
  static __m512 load(const void* v, int64_t i) { return _mm512_cvtph_ps(words_at(v, i)); }
  static __m512 expand(const void* v, int64_t i, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(m, in_register(words_at(v, i))));
  }
};

inline __m512 widen_u8(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

template <>
struct Values<kU8> {
  static constexpr bool quantized = true;
  static const char* at(const void* v, int64_t i) { return static_cast<const char*>(v) + i; }
  static __m512 load(const void* v, int64_t i) { return widen_u8(bytes_at(v, i)); }
  static __m512 expand(const void* v, int64_t i, __mmask16 m) {
    return widen_u8(_mm_maskz_expand_epi8(m, in_register(bytes_at(v, i))));
  }
};

template <>
struct Values<kU4> {
  static constexpr bool quantized = true;
  static const char* at(const void* v, int64_t i) { return static_cast<const char*>(v) + (i >> 1); }
  // 16 nibbles starting at nibble i (low nibble first), one per byte.
  static __m128i nibbles(const void* v, int64_t i) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(v) + (i >> 1)));
    if (i & 1) raw = _mm_or_si128(_mm_srli_epi64(raw, 4), _mm_slli_epi64(_mm_srli_si128(raw, 8), 60));
    const __m128i low = _mm_set1_epi8(0x0f);
    return _mm_unpacklo_epi8(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low));
  }
  static __m512 load(const void* v, int64_t i) { return widen_u8(nibbles(v, i)); }
  static __m512 expand(const void* v, int64_t i, __mmask16 m) { return widen_u8(_mm_maskz_expand_epi8(m, nibbles(v, i))); }
};

// Quantized values: w = q * scale + bias, scale and bias per (row, group of columns); input-major
// matrices have them per (group of rows, column), so they vary across the lanes.
template <int C>
inline void dequantize(const Weights& w, int64_t r, int64_t c, __m512* v, const __mmask16* kept) {
  if constexpr (Values<C>::quantized) {
    for (int q = 0; q < 4; ++q) {
      __m512 scale, bias;
      if (!w.input_major) {
        const int64_t g = r * w.groups + c / w.group;
        scale = _mm512_set1_ps(w.scales[g]);
        bias = _mm512_set1_ps(w.biases[g]);
      } else {
        const int64_t g = (r / w.group) * w.cols + c + 16 * q;
        scale = _mm512_loadu_ps(w.scales + g);
        bias = _mm512_loadu_ps(w.biases + g);
      }
      v[q] = kept ? _mm512_maskz_fmadd_ps(kept[q], v[q], scale, bias) : _mm512_fmadd_ps(v[q], scale, bias);
    }
  }
}

// 64 consecutive weights of one row, decoded in column order into four vectors.
struct Block {
  __m512 w[4];
};

// The GEMV kernels take bfloat16 in "even/odd" lane order: 32 values widen to fp32 with one shift
// (the even ones) and one mask (the odd ones) instead of two cross-lane zero-extensions, which
// keeps the shuffle port free for the bitmask's expand; x (or y, input-major) is permuted to match
// (see even_odd_lanes in kernels.h). The decode to dense matrices keeps the natural order.
template <int C, bool kKernelOrder>
constexpr bool kEvenOdd = kKernelOrder && C == kBF16;

inline void split_even_odd(__m512i words, __m512* out) {
  out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
  out[1] = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(int(0xffff0000u))));
}

template <int C, bool kKernelOrder = false>
inline void decode_dense(const Weights& w, int64_t i, int64_t r, int64_t c, Block& out) {
  if constexpr (kEvenOdd<C, kKernelOrder>) {
    const uint16_t* v = static_cast<const uint16_t*>(w.values) + i;
    split_even_odd(_mm512_loadu_si512(v), out.w);
    split_even_odd(_mm512_loadu_si512(v + 32), out.w + 2);
  } else {
    for (int q = 0; q < 4; ++q) out.w[q] = Values<C>::load(w.values, i + 16 * q);
    dequantize<C>(w, r, c, out.w, nullptr);
  }
}

// Decodes the word's weights starting at value index `off`; returns the index after them.
template <int C, bool kKernelOrder = false>
inline int64_t decode_bitmask(const Weights& w, int64_t off, uint64_t bits, int64_t r, int64_t c, Block& out) {
  if constexpr (kEvenOdd<C, kKernelOrder>) {
    const uint16_t* v = static_cast<const uint16_t*>(w.values);
    const int64_t middle = off + popcount(bits & 0xffffffffULL);
    split_even_odd(_mm512_maskz_expand_epi16(__mmask32(bits), in_register(_mm512_loadu_si512(v + off))), out.w);
    split_even_odd(_mm512_maskz_expand_epi16(__mmask32(bits >> 32), in_register(_mm512_loadu_si512(v + middle))), out.w + 2);
    return middle + popcount(bits >> 32);
  }
  const int64_t o1 = off + popcount(bits & 0xffffULL);
  const int64_t o2 = off + popcount(bits & 0xffffffffULL);
  const int64_t o3 = off + popcount(bits & 0xffffffffffffULL);
  const __mmask16 kept[4] = {__mmask16(bits), __mmask16(bits >> 16), __mmask16(bits >> 32), __mmask16(bits >> 48)};
  out.w[0] = Values<C>::expand(w.values, off, kept[0]);
  out.w[1] = Values<C>::expand(w.values, o1, kept[1]);
  out.w[2] = Values<C>::expand(w.values, o2, kept[2]);
  out.w[3] = Values<C>::expand(w.values, o3, kept[3]);
  dequantize<C>(w, r, c, out.w, kept);
  return off + popcount(bits);
}

// 2:4: the 32 kept values of 64 columns, and for each the lane of x it multiplies within its 32 columns.
struct Gathered {
  __m512 w[2];
  __m512i lane[2];
};

inline __m512i nm24_lanes(uint32_t positions) {
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i group = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i in_group = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(positions), shifts), _mm512_set1_epi32(3));
  return _mm512_add_epi32(in_group, group);
}

template <int C>
inline void decode_nm24(const Weights& w, int64_t i, int64_t r, int64_t c, Gathered& out) {
  out.w[0] = Values<C>::load(w.values, i);
  out.w[1] = Values<C>::load(w.values, i + 16);
  out.lane[0] = nm24_lanes(w.positions[i / 16]);
  out.lane[1] = nm24_lanes(w.positions[i / 16 + 1]);
  if constexpr (Values<C>::quantized) {  // 2:4 is row-major only: one group for all 64 columns
    const int64_t g = r * w.groups + c / w.group;
    const __m512 scale = _mm512_set1_ps(w.scales[g]), bias = _mm512_set1_ps(w.biases[g]);
    out.w[0] = _mm512_fmadd_ps(out.w[0], scale, bias);
    out.w[1] = _mm512_fmadd_ps(out.w[1], scale, bias);
  }
}

// The 64-column bitmask of two 2:4 position words. Each group's two positions are one 4-bit code of
// the words, and its 4 mask bits a function of that code: one table lookup per nibble (pshufb),
// 1.6x faster decoding to bfloat16 than building the mask lane by lane.
inline uint64_t nm24_mask(uint32_t p0, uint32_t p1) {
  // code c = p_first | p_second << 2 -> (1 << p_first) | (1 << p_second)
  const __m128i table = _mm_setr_epi8(1, 3, 5, 9, 3, 2, 6, 10, 5, 6, 4, 12, 9, 10, 12, 8);
  const __m128i codes = _mm_cvtsi64_si128(int64_t(p0 | (uint64_t(p1) << 32)));
  const __m128i nibbles = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(codes, nibbles));
  const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(codes, 4), nibbles));
  return uint64_t(_mm_cvtsi128_si64(_mm_or_si128(low, _mm_slli_epi16(high, 4))));
}

// y[t, r] += W[r, panel p] . x[t, panel p] for NB tokens starting at t0.
template <int C, int NB>
inline void row_panel(const Weights& w, const Batch& b, int64_t p, int64_t r, int64_t t0) {
  const int64_t c0 = p * w.panel, words = w.panel_width(p) / 64;
  // Four sums per token when registers allow: with two, each took two dependent FMAs per 64 weights
  // (8 cycles), which bounded a GEMV whose weights sit in cache.
  constexpr int A = NB <= 4 ? 4 : 2;
  __m512 acc[NB][A];
  for (int t = 0; t < NB; ++t)
    for (int a = 0; a < A; ++a) acc[t][a] = _mm512_setzero_ps();
  const float* x = b.x + t0 * b.x_stride + c0;

  if (w.format == kNM24) {
    int64_t i = w.value_start(p, r);
    for (int64_t k = 0; k < words; ++k, i += 32) {
      prefetch_ahead<C>(Values<C>::at(w.values, i));
      if ((k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(w.positions + i / 16) + kPrefetchBytes / 4, _MM_HINT_T0);
      Gathered g;
      decode_nm24<C>(w, i, r, c0 + 64 * k, g);
      for (int t = 0; t < NB; ++t) {
        const float* xt = x + t * b.x_stride + 64 * k;
        const __m512 x0 = _mm512_permutex2var_ps(_mm512_loadu_ps(xt), g.lane[0], _mm512_loadu_ps(xt + 16));
        const __m512 x1 = _mm512_permutex2var_ps(_mm512_loadu_ps(xt + 32), g.lane[1], _mm512_loadu_ps(xt + 48));
        const int a = A == 4 ? 2 * (k & 1) : 0;
        acc[t][a] = _mm512_fmadd_ps(g.w[0], x0, acc[t][a]);
        acc[t][a + 1] = _mm512_fmadd_ps(g.w[1], x1, acc[t][a + 1]);
      }
    }
  } else {
    const bool bitmask = w.format == kBitmask;
    const uint64_t* mask = bitmask ? w.mask + w.rows * (c0 / 64) + r * words : nullptr;
    int64_t i = w.value_start(p, r);
    for (int64_t k = 0; k < words; ++k) {
      const int64_t first = i;
      Block blk;
      if (bitmask) {
        if ((k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + k) + kPrefetchBytes / 4, _MM_HINT_T0);
        i = decode_bitmask<C, true>(w, i, mask[k], r, c0 + 64 * k, blk);
      } else {
        decode_dense<C, true>(w, i, r, c0 + 64 * k, blk);
        i += 64;
      }
      prefetch_ahead<C>(Values<C>::at(w.values, first));
      for (int t = 0; t < NB; ++t) {
        const float* xt = x + t * b.x_stride + 64 * k;
        acc[t][0] = _mm512_fmadd_ps(blk.w[0], _mm512_loadu_ps(xt), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(blk.w[1], _mm512_loadu_ps(xt + 16), acc[t][1]);
        acc[t][A - 2] = _mm512_fmadd_ps(blk.w[2], _mm512_loadu_ps(xt + 32), acc[t][A - 2]);
        acc[t][A - 1] = _mm512_fmadd_ps(blk.w[3], _mm512_loadu_ps(xt + 48), acc[t][A - 1]);
      }
    }
  }
  for (int t = 0; t < NB; ++t) {
    __m512 sum = _mm512_add_ps(acc[t][0], acc[t][1]);
    if constexpr (A == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[t][2], acc[t][3]));
    b.y[(t0 + t) * b.y_stride + r] += _mm512_reduce_add_ps(sum);
  }
}

template <int C>
void gemv_codec(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end) {
  for (int64_t p = 0; p < w.panels(); ++p) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      int64_t t = 0;
      for (; t + 8 <= b.n; t += 8) row_panel<C, 8>(w, b, p, r, t);
      if (t + 4 <= b.n) { row_panel<C, 4>(w, b, p, r, t); t += 4; }
      if (t + 2 <= b.n) { row_panel<C, 2>(w, b, p, r, t); t += 2; }
      if (t < b.n) row_panel<C, 1>(w, b, p, r, t);
    }
  }
}

template <int C>
void decode_codec(const Weights& w, int64_t p, int64_t row_begin, int64_t row_end, float* out, int64_t ld) {
  const int64_t c0 = p * w.panel, words = w.panel_width(p) / 64;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* o = out + (r - row_begin) * ld;
    const uint64_t* mask = w.format == kBitmask ? w.mask + w.rows * (c0 / 64) + r * words : nullptr;
    int64_t i = w.value_start(p, r);
    for (int64_t k = 0; k < words; ++k) {
      prefetch_ahead<C>(Values<C>::at(w.values, i));
      if (mask && (k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + k) + kPrefetchBytes / 4, _MM_HINT_T0);
      Block blk;
      if (w.format == kDense) {
        decode_dense<C>(w, i, r, c0 + 64 * k, blk);
        i += 64;
      } else if (w.format == kBitmask) {
        i = decode_bitmask<C>(w, i, mask[k], r, c0 + 64 * k, blk);
      } else {
        const uint64_t bits = nm24_mask(w.positions[i / 16], w.positions[i / 16 + 1]);
        decode_bitmask<C>(w, i, bits, r, c0 + 64 * k, blk);
        i += 32;
      }
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(o + 64 * k + 16 * q, blk.w[q]);
    }
  }
}

// An input-major row being read (dense or bitmask layout): input j, the value index reached, and
// the distance from there to the same position in the row of input `next`, which is fetched
// alongside (active rows are not adjacent).
struct InputRow {
  int64_t j, next, at, ahead;
};

inline InputRow input_row(const Weights& w, bool bitmask, int64_t j, int64_t next) {
  const int64_t at = bitmask ? w.offsets[j] : j * w.cols;
  return {j, next, at, (bitmask ? w.offsets[next] : next * w.cols) - at};
}

// The row's next 64 weights (word k) into blk, as fp32 in the kernels' lane order.
template <int C>
inline void next_weights(const Weights& w, bool bitmask, int64_t k, InputRow& row, Block& blk) {
  const int64_t words = w.cols / 64, first = row.at;
  if (bitmask) {
    const uint64_t* mask = w.mask + row.j * words;
    if ((k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + k + (row.next - row.j) * words), _MM_HINT_T0);
    row.at = decode_bitmask<C, true>(w, row.at, mask[k], row.j, 64 * k, blk);
  } else {
    decode_dense<C, true>(w, row.at, row.j, 64 * k, blk);
    row.at += 64;
  }
  prefetch_ahead<C>(Values<C>::at(w.values, first + row.ahead) - kPrefetchBytes);
}

// One token (decoding): kRows active rows per pass, y loaded and stored once per pass instead of
// once per row (the AVX2 kernel's structure, where 4 rows a pass made 50 % weights + 50 % inputs
// 1.32-1.43x faster at batch 1).
template <int C, int kRows>
inline void input_major_rows_one_token(const Weights& w, const Batch& b, const int32_t* inputs,
                                       const int32_t* next_inputs) {
  const bool bitmask = w.format == kBitmask;
  InputRow rows[kRows];
  __m512 scale[kRows];
  for (int r = 0; r < kRows; ++r) {
    rows[r] = input_row(w, bitmask, inputs[r], next_inputs[r]);
    scale[r] = _mm512_set1_ps(b.x[inputs[r]]);
  }
  for (int64_t k = 0; k < w.cols / 64; ++k) {
    float* y = b.y + 64 * k;
    __m512 acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = _mm512_loadu_ps(y + 16 * q);
    for (int r = 0; r < kRows; ++r) {
      Block blk;
      next_weights<C>(w, bitmask, k, rows[r], blk);
      for (int q = 0; q < 4; ++q) acc[q] = _mm512_fmadd_ps(blk.w[q], scale[r], acc[q]);
    }
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(y + 16 * q, acc[q]);
  }
}

// Activation sparsity: accumulate the input-major rows of the active inputs into y.
template <int C>
void input_major_codec(const Weights& w, const Batch& b, const Active& a) {
  const int64_t words = w.cols / 64;
  const bool bitmask = w.format == kBitmask;
  if (b.n == 1) {  // every active input is nonzero for the one token
    constexpr int kRows = 4;
    int64_t n = 0;
    for (; n + kRows <= a.count; n += kRows)  // the last group fetches its own rows again
      input_major_rows_one_token<C, kRows>(w, b, a.inputs + n, a.inputs + (n + 2 * kRows <= a.count ? n + kRows : n));
    for (; n < a.count; ++n) input_major_rows_one_token<C, 1>(w, b, a.inputs + n, a.inputs + (n + 1 < a.count ? n + 1 : n));
    return;
  }
  for (int64_t n = 0; n < a.count; ++n) {
    const int64_t j = a.inputs[n];
    const InputRow start = input_row(w, bitmask, j, a.inputs[n + 1 < a.count ? n + 1 : n]);
    for (int64_t t0 = 0; t0 < b.n; t0 += 8) {  // tokens in groups of 8; a row is re-read from cache
      __m512 scale[8];
      // each token's y, found once: a vector store may alias anything, so b.y and b.y_stride would
      // be loaded again after every store of the loop below (on AVX2 this alone made 50 % weights +
      // 50 % inputs 1.12-1.21x faster at batch 1)
      float* y[8];
      int64_t used = 0;
      for (int64_t t = t0; t < b.n && t < t0 + 8; ++t) {
        const float v = b.x[t * b.x_stride + j];
        if (v != 0.0f) { scale[used] = _mm512_set1_ps(v); y[used++] = b.y + t * b.y_stride; }
      }
      if (used == 0) continue;
      InputRow row = start;
      for (int64_t k = 0; k < words; ++k) {
        Block blk;
        next_weights<C>(w, bitmask, k, row, blk);
        for (int64_t u = 0; u < used; ++u) {
          float* at = y[u] + 64 * k;
          for (int q = 0; q < 4; ++q) _mm512_storeu_ps(at + 16 * q, _mm512_fmadd_ps(blk.w[q], scale[u], _mm512_loadu_ps(at + 16 * q)));
        }
      }
    }
  }
}

template <template <int> class F, typename... A>
void by_codec(int codec, A&&... args) {
  switch (codec) {
    case kF32: F<kF32>::run(args...); break;
    case kBF16: F<kBF16>::run(args...); break;
    case kF16: F<kF16>::run(args...); break;
    case kU8: F<kU8>::run(args...); break;
    case kU4: F<kU4>::run(args...); break;
  }
}

template <int C> struct Gemv { static void run(const Weights& w, const Batch& b, int64_t r0, int64_t r1) { gemv_codec<C>(w, b, r0, r1); } };
template <int C> struct Decode {
  static void run(const Weights& w, int64_t p, int64_t r0, int64_t r1, float* out, int64_t ld) { decode_codec<C>(w, p, r0, r1, out, ld); }
};
template <int C> struct InputMajor { static void run(const Weights& w, const Batch& b, const Active& a) { input_major_codec<C>(w, b, a); } };

}  // namespace

void gemv_avx512(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end) {
  by_codec<Gemv>(w.codec, w, b, row_begin, row_end);
}

void decode_avx512(const Weights& w, int64_t panel, int64_t row_begin, int64_t row_end, float* out, int64_t ld) {
  by_codec<Decode>(w.codec, w, panel, row_begin, row_end, out, ld);
}

void input_major_avx512(const Weights& w, const Batch& b, const Active& a) { by_codec<InputMajor>(w.codec, w, b, a); }

// bfloat16 values decoded as bfloat16 (the GEMM's input on the dense path and the AMX tiles'): the
// expand alone, 32 values at a time, no widening.
void decode_bf16_avx512(const Weights& w, int64_t p, int64_t row_begin, int64_t row_end, uint16_t* out, int64_t ld) {
  const int64_t width = w.panel_width(p), words = width / 64;
  const uint16_t* v = static_cast<const uint16_t*>(w.values);
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint16_t* o = out + (r - row_begin) * ld;
    int64_t i = w.value_start(p, r);
    if (w.format == kDense) {
      std::memcpy(o, v + i, width * sizeof(uint16_t));
      continue;
    }
    const uint64_t* mask = w.format == kBitmask ? w.mask + w.rows * (p * w.panel / 64) + r * words : nullptr;
    // 2:4 keeps 32 values per word: its positions are indexed from k, off the chain of i's popcounts
    const uint32_t* positions = w.format == kNM24 ? w.positions + i / 16 : nullptr;
    for (int64_t k = 0; k < words; ++k) {
      const uint64_t bits = mask ? mask[k] : nm24_mask(positions[2 * k], positions[2 * k + 1]);
      _mm_prefetch(reinterpret_cast<const char*>(v + i) + kPrefetchBytes, _MM_HINT_T0);
      if (mask && (k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + k) + kPrefetchBytes / 4, _MM_HINT_T0);
      for (int half = 0; half < 2; ++half) {
        const __mmask32 kept = __mmask32(bits >> (32 * half));
        const __m512i packed = in_register(_mm512_loadu_si512(v + i));
        _mm512_storeu_si512(o + 64 * k + 32 * half, _mm512_maskz_expand_epi16(kept, packed));
        i += popcount(kept);
      }
    }
  }
}

// -- the checkpoint's bitmask codec, one row at a time (see codec.cpp) ----------------------

namespace {

inline uint64_t prefix_bits(int64_t n) { return n >= 64 ? ~0ULL : (1ULL << n) - 1; }

// Per lane type: V values per vector, their "is not +-0" mask, compress and expand.
template <int Bytes>
struct Lanes;

template <>
struct Lanes<2> {
  static constexpr int V = 32;
  static uint64_t nonzero(const void* at, uint64_t valid) {
    const __m512i v = _mm512_maskz_loadu_epi16(__mmask32(valid), at);
    return _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7fff));
  }
  static void compress(const void* at, uint64_t keep, void* out) {
    const __m512i v = _mm512_maskz_compress_epi16(__mmask32(keep), _mm512_maskz_loadu_epi16(__mmask32(keep), at));
    _mm512_mask_storeu_epi16(out, __mmask32(prefix_bits(popcount(keep))), v);
  }
  static void expand(const void* in, uint64_t keep, uint64_t valid, void* out) {
    // a masked load of the values needed, then an expand in registers: faster than vpexpandw from memory
    const __m512i packed = _mm512_maskz_loadu_epi16(__mmask32(prefix_bits(popcount(keep))), in);
    _mm512_mask_storeu_epi16(out, __mmask32(valid), _mm512_maskz_expand_epi16(__mmask32(keep), packed));
  }
};

template <>
struct Lanes<4> {
  static constexpr int V = 16;
  static uint64_t nonzero(const void* at, uint64_t valid) {
    const __m512i v = _mm512_maskz_loadu_epi32(__mmask16(valid), at);
    return _mm512_test_epi32_mask(v, _mm512_set1_epi32(0x7fffffff));
  }
  static void compress(const void* at, uint64_t keep, void* out) {
    const __m512i v = _mm512_maskz_compress_epi32(__mmask16(keep), _mm512_maskz_loadu_epi32(__mmask16(keep), at));
    _mm512_mask_storeu_epi32(out, __mmask16(prefix_bits(popcount(keep))), v);
  }
  static void expand(const void* in, uint64_t keep, uint64_t valid, void* out) {
    const __m512i packed = _mm512_maskz_loadu_epi32(__mmask16(prefix_bits(popcount(keep))), in);
    _mm512_mask_storeu_epi32(out, __mmask16(valid), _mm512_maskz_expand_epi32(__mmask16(keep), packed));
  }
};

// Whether every 4-bit group of `bits` has at most 2 bits set (per-nibble popcounts, then + 1 <= 3).
inline bool nibbles_at_most_two(uint64_t bits) {
  return ((nibble_popcounts(bits) + 0x1111111111111111ULL) & 0xccccccccccccccccULL) == 0;
}

inline uint64_t load_mask(const uint8_t* mask, int64_t n) {
  uint64_t bits = 0;
  std::memcpy(&bits, mask, (n + 7) / 8);
  return bits;
}

template <int Bytes>
int64_t scan_row(const char* row, int64_t columns, uint8_t* mask, bool* fits24) {
  using L = Lanes<Bytes>;
  int64_t count = 0;
  bool fits = true;
  for (int64_t c = 0; c < columns; c += 64) {
    const int64_t n = std::min<int64_t>(64, columns - c);
    const uint64_t valid = prefix_bits(n);
    uint64_t bits = 0;
    for (int part = 0; part < 64 / L::V; ++part)
      bits |= L::nonzero(row + (c + part * L::V) * Bytes, valid >> (part * L::V)) << (part * L::V);
    std::memcpy(mask + c / 8, &bits, (n + 7) / 8);
    count += popcount(bits);
    fits = fits && nibbles_at_most_two(bits);
  }
  if (!fits) *fits24 = false;
  return count;
}

template <int Bytes>
void gather_row(const char* row, const uint8_t* mask, int64_t columns, char* out) {
  using L = Lanes<Bytes>;
  for (int64_t c = 0; c < columns; c += 64) {
    const uint64_t bits = load_mask(mask + c / 8, std::min<int64_t>(64, columns - c));
    for (int part = 0; part < 64 / L::V; ++part) {
      const uint64_t keep = (bits >> (part * L::V)) & prefix_bits(L::V);
      L::compress(row + (c + part * L::V) * Bytes, keep, out);
      out += popcount(keep) * Bytes;
    }
  }
}

template <int Bytes>
void scatter_row(const char* in, const uint8_t* mask, int64_t columns, char* row) {
  using L = Lanes<Bytes>;
  for (int64_t c = 0; c < columns; c += 64) {
    const int64_t n = std::min<int64_t>(64, columns - c);
    const uint64_t bits = load_mask(mask + c / 8, n), valid = prefix_bits(n);
    for (int part = 0; part < 64 / L::V && part * L::V < n; ++part) {
      const uint64_t keep = (bits >> (part * L::V)) & prefix_bits(L::V);
      L::expand(in, keep, valid >> (part * L::V), row + (c + part * L::V) * Bytes);
      in += popcount(keep) * Bytes;
    }
  }
}

// Floats of 16 words (value_type as codec.cpp's: 0 float32, 1 bfloat16, 2 float16), lanes off k zero.
inline __m512 words_to_float(const void* at, int value_type, __mmask16 k) {
  if (value_type == 0) return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(k, at));
  const __m256i half = _mm256_maskz_loadu_epi16(k, at);
  if (value_type == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  return _mm512_cvtph_ps(half);
}

inline __m512i load_words(const void* at, int value_type, __mmask16 k) {  // zero-extended to 32 bits
  return value_type == 0 ? _mm512_maskz_loadu_epi32(k, at) : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, at));
}

// The words of 16 floats (zero-extended to 32 bits), rounded to nearest even, NaN written as the
// scalar casts of c10 write it (codec.cpp's from_float): the codec's two paths agree bit for bit.
inline __m512i float_to_words(__m512 x, int value_type) {
  const __m512i u = _mm512_castps_si512(x);
  if (value_type == 0) return u;
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  if (value_type == 1) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  }
  const __m512i half = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000));
  return _mm512_mask_mov_epi32(half, nan, _mm512_or_si512(sign, _mm512_set1_epi32(0x7e00)));
}

}  // namespace

void codec_clear_signed_zeros_avx512(void* values, int64_t count, int bytes) {
  char* at = static_cast<char*>(values);
  if (bytes == 2) {
    for (int64_t i = 0; i < count; i += 32) {
      const __mmask32 k = __mmask32(prefix_bits(std::min<int64_t>(32, count - i)));
      const __m512i v = _mm512_maskz_loadu_epi16(k, at + 2 * i);
      _mm512_mask_storeu_epi16(at + 2 * i, k, _mm512_maskz_mov_epi16(_mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7fff)), v));
    }
    return;
  }
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k = __mmask16(prefix_bits(std::min<int64_t>(16, count - i)));
    const __m512i v = _mm512_maskz_loadu_epi32(k, at + 4 * i);
    _mm512_mask_storeu_epi32(at + 4 * i, k, _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(v, _mm512_set1_epi32(0x7fffffff)), v));
  }
}

// codec.cpp's quantize_words, 16 at a time: code = clamp(round(w / s) + z), and w must come back.
bool codec_quantize_avx512(const void* words, int64_t count, int value_type, float scale, float zero, int levels,
                           uint8_t* codes) {
  const int bytes = value_type == 0 ? 4 : 2;
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero), top = _mm512_set1_ps(float(levels - 1));
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k = __mmask16(prefix_bits(std::min<int64_t>(16, count - i)));
    const char* at = static_cast<const char*>(words) + i * bytes;
    const __m512 x = words_to_float(at, value_type, k);
    const __m512 q = _mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    if (_mm512_mask_cmp_ps_mask(k, q, q, _CMP_UNORD_Q)) return false;
    const __m512 code = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), top);
    const __m512i back = float_to_words(_mm512_mul_ps(_mm512_sub_ps(code, z), s), value_type);
    if (_mm512_mask_cmpneq_epi32_mask(k, back, load_words(at, value_type, k))) return false;
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, k, _mm512_cvttps_epi32(code));
  }
  return true;
}

void codec_dequantize_avx512(const uint8_t* codes, int64_t count, int value_type, float scale, float zero,
                             void* words) {
  const int bytes = value_type == 0 ? 4 : 2;
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k = __mmask16(prefix_bits(std::min<int64_t>(16, count - i)));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes + i)));
    const __m512i w = float_to_words(_mm512_mul_ps(_mm512_sub_ps(q, z), s), value_type);
    char* at = static_cast<char*>(words) + i * bytes;
    if (value_type == 0) _mm512_mask_storeu_epi32(at, k, w);
    else _mm256_mask_storeu_epi16(at, k, _mm512_cvtepi32_epi16(w));
  }
}

int64_t codec_scan_row_avx512(const void* row, int64_t columns, int bytes, uint8_t* mask, bool* fits24) {
  return bytes == 2 ? scan_row<2>(static_cast<const char*>(row), columns, mask, fits24)
                    : scan_row<4>(static_cast<const char*>(row), columns, mask, fits24);
}

void codec_gather_row_avx512(const void* row, const uint8_t* mask, int64_t columns, int bytes, void* values) {
  if (bytes == 2) gather_row<2>(static_cast<const char*>(row), mask, columns, static_cast<char*>(values));
  else gather_row<4>(static_cast<const char*>(row), mask, columns, static_cast<char*>(values));
}

int64_t codec_count_row_avx512(const uint8_t* mask, int64_t columns) {
  int64_t count = 0;
  for (int64_t c = 0; c < columns; c += 64) count += popcount(load_mask(mask + c / 8, std::min<int64_t>(64, columns - c)));
  return count;
}

void codec_scatter_row_avx512(const void* values, const uint8_t* mask, int64_t columns, int bytes, void* row) {
  if (bytes == 2) scatter_row<2>(static_cast<const char*>(values), mask, columns, static_cast<char*>(row));
  else scatter_row<4>(static_cast<const char*>(values), mask, columns, static_cast<char*>(row));
}

}  // namespace sparsellm

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
