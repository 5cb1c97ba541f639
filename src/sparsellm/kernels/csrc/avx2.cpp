// AVX2 + FMA kernels for CPUs without AVX-512 (VBMI2): 8 fp32 lanes. AVX2 has no expand
// instruction, so a bitmask byte selects a shuffle from a 256-entry table: 16-bit and 8-bit values
// are spread into their lanes with pshufb (whose 0x80 control zeroes the pruned lanes), fp32 values
// with vpermps and a lane mask. 2:4 positions are turned into such a byte through another table.
// bfloat16 values go straight to fp32 lanes: 16 bytes of values broadcast to both halves of a ymm,
// and one 256-bit pshufb puts each kept value in the high half of its lane (no widening step).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#endif

namespace sparsellm {
namespace {

constexpr int kPrefetchBytes = 2048;

// Prefetch the lines a stream of C values will reach kPrefetchBytes after `at`, as many as one
// step can consume, without branches (a loop over the lines actually consumed mispredicts when
// that count varies, as it does with bitmasks).
template <int C>
inline void prefetch_ahead(const char* at) {
  constexpr int bytes = 32 * (C == kF32 ? 4 : C == kU8 ? 1 : C == kU4 ? 1 : 2) / (C == kU4 ? 2 : 1);
  for (int line = 0; line < (bytes + 63) / 64; ++line) _mm_prefetch(at + kPrefetchBytes + 64 * line, _MM_HINT_T0);
}

struct Tables {
  alignas(32) int8_t bf16_to_fp32[256][32];  // 256-bit pshufb control: 8 packed bfloat16 -> fp32 lanes of the set bits
  alignas(32) int8_t nm24_to_fp32[256][32];  // the same from a byte of 2:4 positions (four 2-bit ones)
  alignas(16) int8_t spread16[256][16];  // pshufb control: 8 packed 16-bit values -> lanes of the set bits
  alignas(16) int8_t spread8[256][16];   // the same for 8-bit values (low 8 bytes)
  alignas(32) int32_t permute[256][8];   // vpermps indices for fp32 values
  alignas(32) int32_t kept[256][8];      // -1 in the lanes of the set bits
  uint8_t nm24[256];                     // four 2-bit positions (two groups of 4) -> their 8-bit mask

  constexpr Tables() : bf16_to_fp32(), nm24_to_fp32(), spread16(), spread8(), permute(), kept(), nm24() {
    for (int m = 0; m < 256; ++m) {
      int packed = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (m >> lane) & 1;
        bf16_to_fp32[m][4 * lane] = bf16_to_fp32[m][4 * lane + 1] = int8_t(-128);
        bf16_to_fp32[m][4 * lane + 2] = set ? int8_t(2 * packed) : int8_t(-128);
        bf16_to_fp32[m][4 * lane + 3] = set ? int8_t(2 * packed + 1) : int8_t(-128);
        spread16[m][2 * lane] = set ? int8_t(2 * packed) : int8_t(-128);
        spread16[m][2 * lane + 1] = set ? int8_t(2 * packed + 1) : int8_t(-128);
        spread8[m][lane] = set ? int8_t(packed) : int8_t(-128);
        spread8[m][lane + 8] = int8_t(-128);
        permute[m][lane] = set ? packed : 0;
        kept[m][lane] = set ? -1 : 0;
        packed += set;
      }
      nm24[m] = uint8_t((1 << (m & 3)) | (1 << ((m >> 2) & 3)) | (16 << ((m >> 4) & 3)) | (16 << ((m >> 6) & 3)));
    }
    for (int m = 0; m < 256; ++m)
      for (int b = 0; b < 32; ++b) nm24_to_fp32[m][b] = bf16_to_fp32[nm24[m]][b];
  }
};

constexpr Tables kTables{};

inline int64_t popcount(uint64_t bits) { return _mm_popcnt_u64(bits); }

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m128i spread(const int8_t (&table)[256][16], unsigned m, __m128i packed) {
  return _mm_shuffle_epi8(packed, load128(table[m]));
}
inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
// Up to 8 bfloat16 values at `v` as fp32 in the lanes a row of bf16_to_fp32 / nm24_to_fp32 names
// (others zero): ~1.2x the bitmask GEMV of pshufb + widen (fewer vector operations per 8 weights;
// Zen 3, 2 threads).
inline __m256 expand_bf16(const uint16_t* v, const int8_t (&control)[32]) {
  const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(control));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(load128(v)), shuffle));
}
inline __m256 widen_u8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }
inline __m256 kept_lanes(unsigned m) { return _mm256_load_ps(reinterpret_cast<const float*>(kTables.kept[m])); }

// One codec per stored value type: 8 values at element index i as fp32 (quantized: the integer),
// or the next popcount(m) values spread into the lanes of the set bits of m (others zero).
template <int C>
struct Values;

template <>
struct Values<kF32> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const float*>(v) + i); }
  static __m256 load(const void* v, int64_t i) { return _mm256_loadu_ps(static_cast<const float*>(v) + i); }
  static __m256 expand(const void* v, int64_t i, unsigned m) {
    const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.permute[m]));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(load(v, i), index), kept_lanes(m));
  }
};

template <>
struct Values<kBF16> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const uint16_t*>(v) + i); }
  static __m256 load(const void* v, int64_t i) { return widen_bf16(load128(static_cast<const uint16_t*>(v) + i)); }
  static __m256 expand(const void* v, int64_t i, unsigned m) { return expand_bf16(static_cast<const uint16_t*>(v) + i, kTables.bf16_to_fp32[m]); }
};

template <>
struct Values<kF16> {
  static constexpr bool quantized = false;
  static const char* at(const void* v, int64_t i) { return reinterpret_cast<const char*>(static_cast<const uint16_t*>(v) + i); }
  static __m256 load(const void* v, int64_t i) { return _mm256_cvtph_ps(load128(static_cast<const uint16_t*>(v) + i)); }
  static __m256 expand(const void* v, int64_t i, unsigned m) {
    return _mm256_cvtph_ps(spread(kTables.spread16, m, load128(static_cast<const uint16_t*>(v) + i)));
  }
};

template <>
struct Values<kU8> {
  static constexpr bool quantized = true;
  static const char* at(const void* v, int64_t i) { return static_cast<const char*>(v) + i; }
  static __m128i bytes(const void* v, int64_t i) { return load128(static_cast<const uint8_t*>(v) + i); }
  static __m256 load(const void* v, int64_t i) { return widen_u8(bytes(v, i)); }
  static __m256 expand(const void* v, int64_t i, unsigned m) { return widen_u8(spread(kTables.spread8, m, bytes(v, i))); }
};

template <>
struct Values<kU4> {
  static constexpr bool quantized = true;
  static const char* at(const void* v, int64_t i) { return static_cast<const char*>(v) + (i >> 1); }
  // 8 nibbles from nibble i (low nibble first), one per byte.
  static __m128i bytes(const void* v, int64_t i) {
    __m128i raw = _mm_loadl_epi64(static_cast<const __m128i*>(static_cast<const void*>(static_cast<const uint8_t*>(v) + (i >> 1))));
    if (i & 1) raw = _mm_srli_epi64(raw, 4);
    const __m128i low = _mm_set1_epi8(0x0f);
    return _mm_unpacklo_epi8(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low));
  }
  static __m256 load(const void* v, int64_t i) { return widen_u8(bytes(v, i)); }
  static __m256 expand(const void* v, int64_t i, unsigned m) { return widen_u8(spread(kTables.spread8, m, bytes(v, i))); }
};

// 32 consecutive weights of one row in column order.
struct Block {
  __m256 w[4];
};

// Quantized values: w = q * scale + bias (see kernels.h); pruned lanes must stay zero.
template <int C>
inline void dequantize(const Weights& w, int64_t r, int64_t c, Block& blk, const unsigned* kept) {
  if constexpr (Values<C>::quantized) {
    for (int q = 0; q < 4; ++q) {
      __m256 scale, bias;
      if (!w.input_major) {
        const int64_t g = r * w.groups + c / w.group;
        scale = _mm256_set1_ps(w.scales[g]);
        bias = _mm256_set1_ps(w.biases[g]);
      } else {
        const int64_t g = (r / w.group) * w.cols + c + 8 * q;
        scale = _mm256_loadu_ps(w.scales + g);
        bias = _mm256_loadu_ps(w.biases + g);
      }
      blk.w[q] = _mm256_fmadd_ps(blk.w[q], scale, bias);
      if (kept) blk.w[q] = _mm256_and_ps(blk.w[q], kept_lanes(kept[q]));
    }
  }
}

template <int C>
inline void decode_dense(const Weights& w, int64_t i, int64_t r, int64_t c, Block& blk) {
  for (int q = 0; q < 4; ++q) blk.w[q] = Values<C>::load(w.values, i + 8 * q);
  dequantize<C>(w, r, c, blk, nullptr);
}

// The 32 weights of a half mask word from value index `off`; returns the index after them.
template <int C>
inline int64_t decode_bitmask(const Weights& w, int64_t off, uint32_t bits, int64_t r, int64_t c, Block& blk) {
  const unsigned kept[4] = {bits & 0xffu, (bits >> 8) & 0xffu, (bits >> 16) & 0xffu, bits >> 24};
  int64_t i = off;
  for (int q = 0; q < 4; ++q) {
    blk.w[q] = Values<C>::expand(w.values, i, kept[q]);
    i += popcount(kept[q]);
  }
  dequantize<C>(w, r, c, blk, kept);
  return i;
}

// 2:4 has no gather instruction worth using here: its positions become a bitmask.
inline uint32_t nm24_mask(uint32_t positions) {
  return uint32_t(kTables.nm24[positions & 0xff]) | uint32_t(kTables.nm24[(positions >> 8) & 0xff]) << 8 |
         uint32_t(kTables.nm24[(positions >> 16) & 0xff]) << 16 | uint32_t(kTables.nm24[positions >> 24]) << 24;
}

// Cursor over one (row, panel): decodes 32 columns per step whatever the format.
template <int C>
struct RowCursor {
  const Weights& w;
  int64_t r, c0, i;
  const uint64_t* mask = nullptr;

  RowCursor(const Weights& weights, int64_t p, int64_t row)
      : w(weights), r(row), c0(p * weights.panel), i(weights.value_start(p, row)) {
    if (w.format == kBitmask) mask = w.mask + w.rows * (c0 / 64) + r * (w.panel_width(p) / 64);
  }

  void step(int64_t half, Block& blk, bool prefetch = true) {  // half: index of the 32-column step in the panel
    const int64_t first = i, c = c0 + 32 * half;
    if (w.format == kDense) {
      decode_dense<C>(w, i, r, c, blk);
      i += 32;
    } else if (w.format == kBitmask) {
      if (prefetch && (half & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + half / 2) + kPrefetchBytes / 4, _MM_HINT_T0);
      i = decode_bitmask<C>(w, i, uint32_t(mask[half / 2] >> (32 * (half & 1))), r, c, blk);
    } else {
      decode_bitmask<C>(w, i, nm24_mask(w.positions[i / 16]), r, c, blk);
      i += 16;
    }
    if (prefetch) prefetch_ahead<C>(Values<C>::at(w.values, first));
  }
};

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Independent accumulators per token of a row: an FMA waits 4 cycles for the one before it on the
// same accumulator (Zen 3), so 2 chains let one token's row take at most 2 FMAs per 4 cycles. With
// 4 for 1-2 tokens: dense rows in cache 1.37x (one thread), bitmask 50 % cold 1.03-1.08x.
constexpr int chains(int tokens) { return tokens >= 4 ? 2 : 4; }
template <int N>
inline __m256 sum_chains(const __m256 (&acc)[N]) {
  __m256 sum = acc[0];
  for (int c = 1; c < N; ++c) sum = _mm256_add_ps(sum, acc[c]);
  return sum;
}

template <int C, int NB>
inline void row_panel(const Weights& w, const Batch& b, int64_t p, int64_t r, int64_t t0) {
  const int64_t steps = w.panel_width(p) / 32;
  const float* x = b.x + t0 * b.x_stride + p * w.panel;
  constexpr int kChains = chains(NB);
  __m256 acc[NB][kChains];
  for (int t = 0; t < NB; ++t)
    for (int c = 0; c < kChains; ++c) acc[t][c] = _mm256_setzero_ps();
  RowCursor<C> cursor(w, p, r);
  for (int64_t s = 0; s < steps; ++s) {
    Block blk;
    cursor.step(s, blk);
    for (int t = 0; t < NB; ++t) {
      const float* xt = x + t * b.x_stride + 32 * s;
      for (int q = 0; q < 4; ++q) acc[t][q % kChains] = _mm256_fmadd_ps(blk.w[q], _mm256_loadu_ps(xt + 8 * q), acc[t][q % kChains]);
    }
  }
  for (int t = 0; t < NB; ++t) b.y[(t0 + t) * b.y_stride + r] += hsum(sum_chains<kChains>(acc[t]));
}

// The bytes that locate a row's values, 8 per 64 columns: its mask words (bitmask) or its 2:4
// position words, which start at value `first` / 16.
template <int F>
inline const uint8_t* row_codes(const Weights& w, const uint64_t* mask, int64_t first) {
  if (F == kBitmask) return reinterpret_cast<const uint8_t*>(mask);
  return F == kNM24 ? reinterpret_cast<const uint8_t*>(w.positions + first / 16) : nullptr;
}

// The next 8 weights of a bfloat16 row (dense, bitmask or 2:4) as fp32, `v` moved past their values;
// `code` is their mask byte (bitmask) or position byte (2:4), unused for dense rows.
template <int F>
inline __m256 next_bf16(const uint16_t*& v, unsigned code) {
  if (F == kDense) {
    const __m256 weights = widen_bf16(load128(v));
    v += 8;
    return weights;
  }
  const __m256 weights = expand_bf16(v, F == kBitmask ? kTables.bf16_to_fp32[code] : kTables.nm24_to_fp32[code]);
  v += F == kBitmask ? popcount(code) : 4;
  return weights;
}

// bfloat16 bitmask and 2:4 rows, the formats pruning produces most: the generic cursor above spends
// ~70 instructions per 32 weights, most of them bookkeeping (the loop was bound by them at 6-10
// GB/s); here one mask byte (2:4: one byte of positions) per 8 columns read from memory, the value
// pointer advanced by its popcount, and no format branch in the loop. (A popcount of the bits
// below each byte of a 64-bit word, as before, cost two more operations per 8 weights.)
// Calls visit(k, q, weights) for the 8 weights at columns 64 k + 8 q of the panel, in order.
template <int F, typename Visit>
inline void each_block_bf16(const Weights& w, int64_t p, int64_t r, Visit&& visit) {
  const int64_t words = w.panel_width(p) / 64, first = w.value_start(p, r);
  const uint16_t* v = static_cast<const uint16_t*>(w.values) + first;
  const uint8_t* codes = row_codes<F>(w, F == kBitmask ? w.mask + w.rows * (p * w.panel / 64) + r * words : nullptr, first);
  for (int64_t k = 0; k < words; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    if (F == kBitmask && (k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + 8 * k) + kPrefetchBytes / 4, _MM_HINT_T0);
    // unrolled, so that a visitor's q % kChains names a register (GCC left this loop rolled for 4
    // tokens, and the accumulators went to the stack)
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) visit(k, q, next_bf16<F>(v, codes[8 * k + q]));
  }
}

template <int F, int NB>
inline void row_panel_bf16(const Weights& w, const Batch& b, int64_t p, int64_t r, int64_t t0) {
  const float* x = b.x + t0 * b.x_stride + p * w.panel;
  constexpr int kChains = chains(NB);
  __m256 acc[NB][kChains];
  for (int t = 0; t < NB; ++t)
    for (int c = 0; c < kChains; ++c) acc[t][c] = _mm256_setzero_ps();
  each_block_bf16<F>(w, p, r, [&](int64_t k, int q, __m256 weights) {
    for (int t = 0; t < NB; ++t)
      acc[t][q % kChains] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + t * b.x_stride + 64 * k + 8 * q), acc[t][q % kChains]);
  });
  for (int t = 0; t < NB; ++t) b.y[(t0 + t) * b.y_stride + r] += hsum(sum_chains<kChains>(acc[t]));
}

template <int C, int NB>
inline void row_panel_any(const Weights& w, const Batch& b, int64_t p, int64_t r, int64_t t0) {
  if (C == kBF16 && w.format == kBitmask) row_panel_bf16<kBitmask, NB>(w, b, p, r, t0);
  else if (C == kBF16 && w.format == kNM24) row_panel_bf16<kNM24, NB>(w, b, p, r, t0);
  else row_panel<C, NB>(w, b, p, r, t0);
}

template <int C>
void decode_codec(const Weights& w, int64_t p, int64_t row_begin, int64_t row_end, float* out, int64_t ld) {
  const int64_t steps = w.panel_width(p) / 32;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* o = out + (r - row_begin) * ld;
    auto store = [o](int64_t k, int q, __m256 weights) { _mm256_storeu_ps(o + 64 * k + 8 * q, weights); };
    if (C == kBF16 && w.format == kBitmask) { each_block_bf16<kBitmask>(w, p, r, store); continue; }
    if (C == kBF16 && w.format == kNM24) { each_block_bf16<kNM24>(w, p, r, store); continue; }
    RowCursor<C> cursor(w, p, r);
    for (int64_t s = 0; s < steps; ++s) {
      Block blk;
      cursor.step(s, blk);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(o + 32 * s + 8 * q, blk.w[q]);
    }
  }
}

// Products of more tokens than a GEMV group: the GEMV decodes each row again for every 4 tokens,
// and torch's fp32 GEMM ran 16 tokens at ~30 GFLOP/s on the Zen 3 (MKL on an AMD CPU). Here each
// block of kTileRows rows is decoded once per panel into fp32, then multiplied with all tokens by a
// register tile of kTileRows rows x kTileTokens tokens (12 accumulators, a weight vector loaded once
// per 3 FMAs) over sub-panels of kSubPanel columns, so decoded rows and inputs stay in L1.
constexpr int kTileRows = 4, kTileTokens = 3;
constexpr int64_t kSubPanel = 256;

// y[t][i] += rows[i] . x[t] over `width` columns, for the tile's rows i < valid and NT tokens t.
template <int NT>
inline void tile_rows(const float* rows, int64_t ld, const float* x, int64_t x_stride, int64_t width, float* y,
                      int64_t y_stride, int64_t valid) {
  __m256 acc[kTileRows][NT];
  for (int i = 0; i < kTileRows; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < width; c += 8) {
    for (int i = 0; i < kTileRows; ++i) {
      const __m256 weights = _mm256_loadu_ps(rows + i * ld + c);
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + t * x_stride + c), acc[i][t]);
    }
  }
  for (int t = 0; t < NT; ++t) {  // the four rows' sums side by side: [row 0, row 1, row 2, row 3]
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][t], acc[1][t]), _mm256_hadd_ps(acc[2][t], acc[3][t]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
    float* out = y + t * y_stride;
    if (valid == kTileRows) {
      _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), sums));
    } else {
      alignas(16) float lane[4];
      _mm_store_ps(lane, sums);
      for (int i = 0; i < valid; ++i) out[i] += lane[i];
    }
  }
}

template <int C>
void gemm_codec(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end) {
  std::vector<float> rows(kTileRows * w.panel, 0.0f);  // rows past `valid` keep old values: their sums are dropped
  for (int64_t p = 0; p < w.panels(); ++p) {
    const int64_t width = w.panel_width(p);
    for (int64_t r = row_begin; r < row_end; r += kTileRows) {
      const int64_t valid = std::min<int64_t>(kTileRows, row_end - r);
      decode_codec<C>(w, p, r, r + valid, rows.data(), width);
      for (int64_t s = 0; s < width; s += kSubPanel) {
        const int64_t cols = std::min(kSubPanel, width - s);
        const float* decoded = rows.data() + s;
        auto tile = [&](auto tokens, int64_t t) {
          tile_rows<decltype(tokens)::value>(decoded, width, b.x + t * b.x_stride + p * w.panel + s, b.x_stride, cols,
                                             b.y + t * b.y_stride + r, b.y_stride, valid);
        };
        int64_t t = 0;  // groups of 3 tokens, the last 4 as 2 + 2 (a group of 1 loads a weight per FMA)
        for (; b.n - t >= kTileTokens && b.n - t != 4; t += kTileTokens) tile(std::integral_constant<int, kTileTokens>{}, t);
        for (; b.n - t >= 2; t += 2) tile(std::integral_constant<int, 2>{}, t);
        if (b.n - t == 1) tile(std::integral_constant<int, 1>{}, t);
      }
    }
  }
}

template <int C>
void gemv_codec(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end) {
  if (b.n > 4) return gemm_codec<C>(w, b, row_begin, row_end);
  for (int64_t p = 0; p < w.panels(); ++p) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      int64_t t = 0;
      for (; t + 4 <= b.n; t += 4) row_panel_any<C, 4>(w, b, p, r, t);
      if (t + 2 <= b.n) { row_panel_any<C, 2>(w, b, p, r, t); t += 2; }
      if (t < b.n) row_panel_any<C, 1>(w, b, p, r, t);
    }
  }
}

template <int C>
void input_major_codec(const Weights& w, const Batch& b, const Active& a) {
  const int64_t steps = w.cols / 32;
  for (int64_t n = 0; n < a.count; ++n) {
    const int64_t j = a.inputs[n], next = a.inputs[n + 1 < a.count ? n + 1 : n];
    const int64_t ahead = w.format == kBitmask ? w.offsets[next] - w.offsets[j] : (next - j) * w.cols;
    for (int64_t t0 = 0; t0 < b.n; t0 += 4) {  // tokens in groups of 4; a row is re-read from cache
      __m256 scale[4];
      float* y[4];  // found once (see input_major_rows_bf16)
      int64_t used = 0;
      for (int64_t t = t0; t < b.n && t < t0 + 4; ++t) {
        const float v = b.x[t * b.x_stride + j];
        if (v != 0.0f) { scale[used] = _mm256_set1_ps(v); y[used++] = b.y + t * b.y_stride; }
      }
      if (used == 0) continue;
      RowCursor<C> cursor(w, 0, j);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t first = cursor.i;
        Block blk;
        cursor.step(s, blk, false);
        // The next active row is not adjacent: fetch it alongside this one, at the same position.
        prefetch_ahead<C>(Values<C>::at(w.values, first + ahead) - kPrefetchBytes);
        for (int64_t u = 0; u < used; ++u) {
          float* at = y[u] + 32 * s;
          for (int q = 0; q < 4; ++q) _mm256_storeu_ps(at + 8 * q, _mm256_fmadd_ps(blk.w[q], scale[u], _mm256_loadu_ps(at + 8 * q)));
        }
      }
    }
  }
}

// bfloat16 input-major rows of the three layouts (dense, bitmask, 2:4), decoded as row_panel_bf16
// does, `kRows` active inputs per pass: the generic cursor was bound by its bookkeeping (50 % weights
// + 50 % inputs ran slower than the dense input-major rows), and each y vector is loaded and stored
// once per `kRows` rows instead of once per row.
template <int F, int kRows, int kTokens>
inline void input_major_rows_bf16(const Weights& w, const Batch& b, const int32_t* inputs, const int32_t* next_inputs) {
  const int64_t words = w.cols / 64;
  const uint16_t* values = static_cast<const uint16_t*>(w.values);
  int64_t start[kRows], ahead[kRows];
  const uint8_t *codes[kRows], *next_codes[kRows];
  for (int r = 0; r < kRows; ++r) {
    start[r] = w.value_start(0, inputs[r]);
    codes[r] = row_codes<F>(w, F == kBitmask ? w.mask + inputs[r] * words : nullptr, start[r]);
    // the next rows are not adjacent to these: each is fetched alongside one of these, at the same
    // position, into L2 only; the hardware moves them on to L1. Fetched into L1, the 4 next rows
    // (~25 KB at 5632 columns) pushed out these rows and y; into L2, and with no prefetch of these
    // rows' own values (the previous group fetched them), 1.02-1.10x (A/B of the two builds in one
    // process, Zen 3)
    ahead[r] = w.value_start(0, next_inputs[r]) - start[r];
    next_codes[r] = row_codes<F>(w, F == kBitmask ? w.mask + next_inputs[r] * words : nullptr, ahead[r] + start[r]);
  }
  for (int64_t t0 = 0; t0 < b.n; t0 += kTokens) {  // tokens in groups; the rows are re-read from cache
    __m256 scale[kTokens][kRows];
    // each token's y, found once: a vector store may alias anything, so b.y and b.y_stride were
    // loaded again after every store of the loop below
    float* y[kTokens];
    int64_t used = 0;
    for (int64_t t = t0; t < b.n && t < t0 + kTokens; ++t) {
      bool any = false;
      for (int r = 0; r < kRows; ++r) {
        const float x = b.x[t * b.x_stride + inputs[r]];
        scale[used][r] = _mm256_set1_ps(x);
        any |= x != 0.0f;
      }
      if (any) y[used++] = b.y + t * b.y_stride;
    }
    if (used == 0) continue;
    const uint16_t* v[kRows];
    for (int r = 0; r < kRows; ++r) v[r] = values + start[r];
    for (int64_t k = 0; k < words; ++k) {
      // unrolled: GCC left this loop rolled, so v[] lived on the stack and each of the rows' value
      // pointers was stored back there after every 8 columns below (1.11-1.17x unrolled, A/B as above)
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        for (int line = 0; line < (F == kDense ? 2 : 1); ++line) {  // the bytes a row consumes per 64 columns
          _mm_prefetch(reinterpret_cast<const char*>(v[r] + ahead[r]) + 64 * line, _MM_HINT_T1);
        }
        if (F == kBitmask && (k & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_codes[r] + 8 * k), _MM_HINT_T1);
      }
      for (int q = 0; q < 8; ++q) {
        __m256 weights[kRows];
        for (int r = 0; r < kRows; ++r) weights[r] = next_bf16<F>(v[r], F == kDense ? 0 : codes[r][8 * k + q]);
        for (int64_t u = 0; u < used; ++u) {
          float* at = y[u] + 64 * k + 8 * q;
          __m256 acc = _mm256_loadu_ps(at);
          for (int r = 0; r < kRows; ++r) acc = _mm256_fmadd_ps(weights[r], scale[u][r], acc);
          _mm256_storeu_ps(at, acc);
        }
      }
    }
  }
}

template <int F, int kRows, int kTokens>
void input_major_groups_bf16(const Weights& w, const Batch& b, const Active& a) {
  int64_t n = 0;
  for (; n + kRows <= a.count; n += kRows)  // the next group's rows are fetched alongside (the last group: its own)
    input_major_rows_bf16<F, kRows, kTokens>(w, b, a.inputs + n, a.inputs + (n + 2 * kRows <= a.count ? n + kRows : n));
  for (; n < a.count; ++n)
    input_major_rows_bf16<F, 1, kTokens>(w, b, a.inputs + n, a.inputs + (n + 1 < a.count ? n + 1 : n));
}

// Up to 4 tokens share a pass over 4 dense or 2 sparse rows (a sparse row's decoding needs more
// registers); one token (decoding) needs fewer registers for its inputs, and takes 4 sparse rows
// too: 50 % weights + 50 % inputs at batch 1 ran 1.32-1.43x faster with this and the y pointers
// found once (2048², 4096², 5632x2048, 2048x5632, weights cold; Zen 3); 8 dense rows did not help
// (0.91-1.05x).
template <int F>
void input_major_bf16(const Weights& w, const Batch& b, const Active& a) {
  b.n == 1 ? input_major_groups_bf16<F, 4, 1>(w, b, a) : input_major_groups_bf16<F, F == kDense ? 4 : 2, 4>(w, b, a);
}

// Input-major products of more than 4 tokens: the rows above are decoded again for every 4 tokens.
// Here the outputs go in blocks of kColumnBlock columns; in each block the active rows, 8 at a time
// (4 at a time: 1.2-1.4x slower), are decoded once into fp32 (in L1), then each token's part of y
// is loaded and stored once for the 8 rows' FMAs. (Decoding 8 columns and then visiting every
// token's y there, 16 rows of y a matrix row apart, ran 3x slower: those rows share L1 sets.)
// `next` holds each row's next value (a bitmask row's values are found by walking its mask),
// `scale` the inputs, (row, token) row-major.
constexpr int64_t kColumnBlock = 512;

template <int F, int kRows>
inline void input_major_block_bf16(const Weights& w, const Batch& b, const int32_t* inputs, const uint16_t** next,
                                   const uint16_t* const* following, const float* scale, int64_t c0, int64_t c1) {
  const int64_t words = w.cols / 64;
  alignas(32) float decoded[kRows][kColumnBlock];
  for (int r = 0; r < kRows; ++r) {
    const uint16_t* v = next[r];
    const uint8_t* codes = row_codes<F>(w, F == kBitmask ? w.mask + inputs[r] * words : nullptr, w.value_start(0, inputs[r]));
    for (int64_t c = c0; c < c1; c += 8) {
      if ((c & 63) == 0) {  // the next rows' parts of this block, at the position this row has reached
        const char* ahead = reinterpret_cast<const char*>(following[r] + (v - next[r]));
        _mm_prefetch(ahead, _MM_HINT_T0);
        if (F == kDense) _mm_prefetch(ahead + 64, _MM_HINT_T0);
      }
      _mm256_store_ps(decoded[r] + (c - c0), next_bf16<F>(v, F == kDense ? 0 : codes[c / 8]));
    }
    next[r] = v;
  }
  for (int64_t t = 0; t < b.n; ++t) {
    __m256 x[kRows];
    for (int r = 0; r < kRows; ++r) x[r] = _mm256_broadcast_ss(scale + r * b.n + t);
    float* y = b.y + t * b.y_stride;
    for (int64_t c = c0; c < c1; c += 8) {
      __m256 acc = _mm256_loadu_ps(y + c);
      for (int r = 0; r < kRows; ++r) acc = _mm256_fmadd_ps(_mm256_load_ps(decoded[r] + (c - c0)), x[r], acc);
      _mm256_storeu_ps(y + c, acc);
    }
  }
}

template <int F>
void input_major_tokens_bf16(const Weights& w, const Batch& b, const Active& a) {
  constexpr int kRows = 8;
  if (a.count == 0) return;
  std::vector<const uint16_t*> next(a.count + kRows);
  std::vector<float> scale(a.count * b.n);
  for (int64_t n = 0; n < a.count; ++n) {
    next[n] = static_cast<const uint16_t*>(w.values) + w.value_start(0, a.inputs[n]);
    for (int64_t t = 0; t < b.n; ++t) scale[n * b.n + t] = b.x[t * b.x_stride + a.inputs[n]];
  }
  for (int r = 0; r < kRows; ++r) next[a.count + r] = next[a.count - 1];  // what the last rows prefetch
  for (int64_t c0 = 0; c0 < w.cols; c0 += kColumnBlock) {
    const int64_t c1 = std::min(w.cols, c0 + kColumnBlock);
    int64_t n = 0;
    for (; n + kRows <= a.count; n += kRows)
      input_major_block_bf16<F, kRows>(w, b, a.inputs + n, &next[n], &next[n + kRows], &scale[n * b.n], c0, c1);
    for (; n < a.count; ++n) input_major_block_bf16<F, 1>(w, b, a.inputs + n, &next[n], &next[n + 1], &scale[n * b.n], c0, c1);
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
template <int C> struct InputMajor {
  static void run(const Weights& w, const Batch& b, const Active& a) {
    if (C != kBF16 || w.cols % 64) return input_major_codec<C>(w, b, a);
    const bool tokens = b.n > 4;
    if (w.format == kBitmask) tokens ? input_major_tokens_bf16<kBitmask>(w, b, a) : input_major_bf16<kBitmask>(w, b, a);
    else if (w.format == kNM24) tokens ? input_major_tokens_bf16<kNM24>(w, b, a) : input_major_bf16<kNM24>(w, b, a);
    else tokens ? input_major_tokens_bf16<kDense>(w, b, a) : input_major_bf16<kDense>(w, b, a);
  }
};

}  // namespace

void gemv_avx2(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end) {
  by_codec<Gemv>(w.codec, w, b, row_begin, row_end);
}

void decode_avx2(const Weights& w, int64_t panel, int64_t row_begin, int64_t row_end, float* out, int64_t ld) {
  by_codec<Decode>(w.codec, w, panel, row_begin, row_end, out, ld);
}

void input_major_avx2(const Weights& w, const Batch& b, const Active& a) { by_codec<InputMajor>(w.codec, w, b, a); }

// bfloat16 values decoded as bfloat16 (the dense path's GEMM input when it runs in bfloat16).
void decode_bf16_avx2(const Weights& w, int64_t p, int64_t row_begin, int64_t row_end, uint16_t* out, int64_t ld) {
  const int64_t c0 = p * w.panel, width = w.panel_width(p), words = width / 64;
  const uint16_t* v = static_cast<const uint16_t*>(w.values);
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint16_t* o = out + (r - row_begin) * ld;
    if (w.format == kDense) {
      std::memcpy(o, v + w.dense_start(p, r), width * sizeof(uint16_t));
      continue;
    }
    const uint64_t* mask = w.format == kBitmask ? w.mask + w.rows * (c0 / 64) + r * words : nullptr;
    int64_t i = w.value_start(p, r);
    for (int64_t half = 0; half < 2 * words; ++half) {
      const uint32_t bits = mask ? uint32_t(mask[half / 2] >> (32 * (half & 1))) : nm24_mask(w.positions[i / 16]);
      for (int q = 0; q < 4; ++q) {
        const unsigned m = (bits >> (8 * q)) & 0xffu;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32 * half + 8 * q), spread(kTables.spread16, m, load128(v + i)));
        i += popcount(m);
      }
    }
  }
}

namespace {

// e^x for 8 lanes: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' expf polynomial, 2^n
// through the exponent bits (tests/test_decode_attention.py holds the attention it serves to 1e-6
// of a float64 reference). Inputs below -87.3 give 0 (scores minus their top are <= 0).
inline __m256 exp_ps(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 too_low = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_low, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 max_lanes(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0x4e));
  return _mm256_max_ps(v, _mm256_permute_ps(v, 0xb1));
}

template <int C>
void attention_chunk(const AttentionChunk& a) {
  const int64_t dim = a.dim, padded = (a.count + 7) / 8 * 8;
  // the scores of each query head for every key, a key's row read once for all heads sharing it;
  // four keys at a time, four running sums (one sum's chain of FMAs had bound the loop)
  int64_t key = 0;
  for (; key + 4 <= a.count; key += 4) {
    for (int64_t g = 0; g < a.shared; ++g) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 q = _mm256_loadu_ps(a.queries + g * dim + d);
        for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(q, Values<C>::load(a.keys, (key + u) * a.key_stride + d), acc[u]);
      }
      const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      _mm_storeu_ps(a.scores + g * padded + key, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
    }
  }
  for (; key < a.count; ++key) {
    for (int64_t g = 0; g < a.shared; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.queries + g * dim + d), Values<C>::load(a.keys, key * a.key_stride + d), acc);
      a.scores[g * padded + key] = sum_lanes(acc);
    }
  }
  for (int64_t g = 0; g < a.shared; ++g) {
    float* scores = a.scores + g * padded;
    std::fill(scores + a.count, scores + padded, -INFINITY);
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + j));
    top = max_lanes(top);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {  // the padding's -inf gives 0
      const __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
      _mm256_storeu_ps(scores + j, p);
      total = _mm256_add_ps(total, p);
    }
    float* result = a.result + g * (dim + 2);
    result[0] = _mm256_cvtss_f32(top);
    result[1] = sum_lanes(total);
    std::fill(result + 2, result + 2 + dim, 0.0f);
  }
  // each value row read once for all heads; two rows per pass, so each head's sums are loaded and
  // stored once for two rows (padding: p = 0, and the last row read twice)
  for (int64_t j = 0; j < a.count; j += 2) {
    const int64_t next = j + 1 < a.count ? j + 1 : j;
    for (int64_t g = 0; g < a.shared; ++g) {
      const __m256 p0 = _mm256_set1_ps(a.scores[g * padded + j]), p1 = _mm256_set1_ps(a.scores[g * padded + j + 1]);
      float* sums = a.result + g * (dim + 2) + 2;
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 sum = _mm256_fmadd_ps(p0, Values<C>::load(a.values, j * a.value_stride + d), _mm256_loadu_ps(sums + d));
        _mm256_storeu_ps(sums + d, _mm256_fmadd_ps(p1, Values<C>::load(a.values, next * a.value_stride + d), sum));
      }
    }
  }
}

}  // namespace

void attention_chunk_avx2(const AttentionChunk& a) {
  a.codec == kF32 ? attention_chunk<kF32>(a) : a.codec == kBF16 ? attention_chunk<kBF16>(a) : attention_chunk<kF16>(a);
}

}  // namespace sparsellm

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
