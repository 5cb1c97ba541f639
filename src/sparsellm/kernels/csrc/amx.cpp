// AMX kernels (Intel's tile unit, with bfloat16 dot products): a product of a few tokens with
// bfloat16 weights. On CPUs that have it, torch's bfloat16 GEMM runs on these tiles, which made
// the FMA kernels 0.4-0.7x of torch at 16 tokens. Here every block of 32 weight rows is decoded
// once, panel by panel, by the AVX-512 decoder into a buffer that stays in L2, and multiplied there
// as two 16x32 tiles against each group of 16 tokens: the weights are read from memory once in the
// compact format, as in the GEMV, and the arithmetic costs little next to that read.
//
// Tiles: C (16 rows x 16 tokens, fp32) += A (16 rows x 32 columns of W, bf16) . B (x's 32 columns x
// 16 tokens in the pair-interleaved layout the tiles want: row i holds columns 2i, 2i+1 of each
// token). Float32 inputs are split as x = hi + lo, both bfloat16, and multiplied twice, so they
// keep ~16 bits instead of bfloat16's 8 (an error of ~1e-5 relative, like float32 summation);
// bfloat16 inputs are exact in one part.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 11
#define SPARSELLM_NO_AMX  // compilers before GCC 11 / clang 12 know no AMX instructions
#elif defined(__clang__) && __clang_major__ < 12
#define SPARSELLM_NO_AMX
#endif

#ifndef SPARSELLM_NO_AMX
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi2,popcnt,fma,f16c,avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi2,popcnt,fma,f16c,avx2")
#endif
#endif

namespace sparsellm {

#ifdef SPARSELLM_NO_AMX

bool amx_compiled() { return false; }
void pack_tokens_amx(const float*, int64_t, int64_t, bool, uint16_t*) {}
void gemm_amx(const Weights&, const uint16_t*, int64_t, bool, int64_t, int64_t, float*, int64_t) {}
void split_rows_amx(const float*, int64_t, int64_t, bool, uint16_t*) {}
void input_major_amx(const Weights&, const uint16_t*, int64_t, bool, int64_t, int64_t, float*) {}

#else

namespace {

constexpr int64_t kTile = 512;  // 16 x 32 bfloat16 values, one kilobyte

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Row-major: tiles 0-1 C for rows 0-15 / 16-31 of a block, 4 and 7 A, 5-6 B (x's hi and lo parts).
// Input-major: 0-1 C for two blocks of 16 outputs, 2-3 A (x's hi and lo), 4-5 B.
void configure_tiles() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = 16;
  }
  _tile_loadconfig(&config);
}

// Each float of v rounded to the nearest bfloat16 (ties to even), as the low 16 bits of its lane.
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}

inline __m512 widen(__m512i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16)); }

// 32 floats as 32 bfloat16 words, in order (16 column pairs), the part lost by rounding in `rest`.
inline __m512i round_pairs(__m512 a, __m512 b, __m512* rest_a, __m512* rest_b) {
  const __m512i ha = bf16_bits(a), hb = bf16_bits(b);
  *rest_a = _mm512_sub_ps(a, widen(ha));
  *rest_b = _mm512_sub_ps(b, widen(hb));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(ha)), _mm512_cvtepi32_epi16(hb), 1);
}

// Weight rows per block: two C tiles share each B tile. Tried and measured slower or no faster at
// 16 tokens on 4096² at 50 % (this layout: 2.1 ms): 64 rows decoded in tile order (2.4 ms); spans of
// 128-1024 columns per row so that the A tiles stay in L1 (2.7-5.8 ms: the decoder's 32-64
// interleaved streams cost more than the tiles' loads from L2 saved); prefetching the next block
// into L2 during the tiles (2.9 ms); the tiles of one panel interleaved with the decode of the
// next, double-buffered (2.07 vs 1.97 ms).
constexpr int64_t kBlockRows = 32;

// The tile intrinsics take literal tile numbers (they are spelled into the instruction), hence the
// macro and the unrolled helpers. C tile T += A . B: the A tiles of a block go in turn to tiles 4
// and 7 (two, so a load need not wait for the product reading the other), B is in 5 (lo in 6).
#define SPARSELLM_ROW_TILE(T, A, a, stride, split) \
  do {                                             \
    _tile_loadd(A, a, stride);                     \
    _tile_dpbf16ps(T, A, 5);                       \
    if (split) _tile_dpbf16ps(T, A, 6);            \
  } while (0)

// The C tiles of the first `tiles` row tiles (1 or 2) from / to their 256 floats each at c.
inline void load_sums(const float* c, int tiles) {
  _tile_loadd(0, c, 64);
  if (tiles > 1) _tile_loadd(1, c + 256, 64);
}

inline void store_sums(float* c, int tiles) {
  _tile_stored(0, c, 64);
  if (tiles > 1) _tile_stored(1, c + 256, 64);
}

}  // namespace

bool amx_compiled() { return true; }

// x (n rows of cols fp32, cols a multiple of 32) as B tiles: for each group of 16 tokens and each
// block of 32 columns, the hi tile (and the lo tile when split), tokens past n zero.
void pack_tokens_amx(const float* x, int64_t n, int64_t cols, bool split, uint16_t* out) {
  const int64_t groups = (n + 15) / 16, blocks = cols / 32, parts = split ? 2 : 1;
  std::memset(out, 0, sizeof(uint16_t) * groups * blocks * parts * kTile);
  // column pair i of token t goes to 32-bit word i * 16 + t of the tile
  const __m512i words = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = 0; k < blocks; ++k) {
      uint16_t* tile = out + ((t / 16 * blocks + k) * parts) * kTile;
      __m512 rest_a, rest_b, unused_a, unused_b;
      const __m512i hi = round_pairs(_mm512_loadu_ps(x + t * cols + 32 * k), _mm512_loadu_ps(x + t * cols + 32 * k + 16),
                                     &rest_a, &rest_b);
      _mm512_i32scatter_epi32(tile + 2 * (t % 16), words, hi, 4);
      if (split)
        _mm512_i32scatter_epi32(tile + kTile + 2 * (t % 16), words, round_pairs(rest_a, rest_b, &unused_a, &unused_b), 4);
    }
}

// y[t, r] = sum_c W[r, c] x[t, c] for rows [row_begin, row_end), x packed by pack_tokens_amx; bfloat16
// weights in any format the bfloat16 decoder reads. Per block of 32 rows and per panel, the rows
// are decoded into a row-major buffer (in L2), then multiplied as A tiles with every group of
// tokens. One group keeps its sums in the C tiles for the whole block; more store and reload theirs.
void gemm_amx(const Weights& w, const uint16_t* packed, int64_t n, bool split, int64_t row_begin, int64_t row_end,
              float* y, int64_t y_stride) {
  const int64_t groups = (n + 15) / 16, blocks = w.cols / 32, parts = split ? 2 : 1;
  const int64_t ld = w.panel + 32;  // a row stride off the multiples of 4 KiB, which alias in L1
  const bool resident = groups == 1;
  thread_local std::vector<uint16_t> decoded;
  thread_local std::vector<float> sums;
  decoded.resize(kBlockRows * ld);
  sums.resize(groups * kBlockRows * 16);
  const uint16_t* a = decoded.data();
  configure_tiles();
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kBlockRows) {
    const int64_t count = std::min(kBlockRows, row_end - r0);
    const int tiles = int((count + 15) / 16);
    if (count % 16) std::fill(decoded.begin(), decoded.end(), uint16_t(0));  // rows past the matrix: zero
    std::fill(sums.begin(), sums.end(), 0.0f);
    if (resident) load_sums(sums.data(), tiles);
    for (int64_t p = 0; p < w.panels(); ++p) {
      decode_bf16_avx512(w, p, r0, r0 + count, decoded.data(), ld);
      for (int64_t g = 0; g < groups; ++g) {
        float* c = sums.data() + g * kBlockRows * 16;
        if (!resident) load_sums(c, tiles);
        const uint16_t* b = packed + (g * blocks + p * w.panel / 32) * parts * kTile;
        for (int64_t j = 0; j < w.panel_width(p) / 32; ++j, b += parts * kTile) {
          _tile_loadd(5, b, 64);
          if (split) _tile_loadd(6, b + kTile, 64);
          SPARSELLM_ROW_TILE(0, 4, a + 32 * j, ld * 2, split);
          if (tiles > 1) SPARSELLM_ROW_TILE(1, 7, a + 16 * ld + 32 * j, ld * 2, split);
        }
        if (!resident) store_sums(c, tiles);
      }
    }
    if (resident) store_sums(sums.data(), tiles);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < count; ++r) y[t * y_stride + r0 + r] = sums[(t / 16) * kBlockRows * 16 + r * 16 + t % 16];
  }
  _tile_release();
}

// Input-major layouts (rows = inputs, columns = outputs): y[t, o] = sum_k x[t, k] W^T[k, o], with
// C (16 tokens x 16 outputs) += A (16 tokens x 32 inputs of x) . B (32 inputs x 16 outputs). Every
// operand lies tile after tile, each tile one contiguous kilobyte: with rows a matrix apart, a
// tile's 16 rows fell in one L1 set (strides of 8-16 KiB), 2-3x slower.

// x (n rows of `width` fp32) as A tiles: tile (group g, block of 32 inputs b) at (g * blocks + b) *
// 512, token t's 32 inputs at + t * 32; the lo part after all the hi tiles when split. Tokens past n
// and inputs past width are zero.
void split_rows_amx(const float* x, int64_t n, int64_t width, bool split, uint16_t* out) {
  const int64_t groups = (n + 15) / 16, blocks = (width + 31) / 32, lo = groups * blocks * kTile;
  std::memset(out, 0, sizeof(uint16_t) * lo * (split ? 2 : 1));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 valid = __mmask16(width - c >= 16 ? 0xffff : (1u << (width - c)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + t * width + c);
      const __m512i hi = bf16_bits(v);
      uint16_t* at = out + (t / 16 * blocks + c / 32) * kTile + t % 16 * 32 + c % 32;
      _mm256_mask_storeu_epi16(at, valid, _mm512_cvtepi32_epi16(hi));
      if (split) _mm256_mask_storeu_epi16(at + lo, valid, _mm512_cvtepi32_epi16(bf16_bits(_mm512_sub_ps(v, widen(hi)))));
    }
}

// The inputs [k_begin, k_end) (k_begin a multiple of 32, k_end > k_begin) into `partial`: C tiles (group g,
// block of 16 outputs o) at (g * cols / 16 + o) * 256. B is built a pass of a few blocks of inputs
// at a time: the decoder writes two input rows, interleaved value by value (16 pairs per 64-byte
// tile row) into tile (block b, outputs o) at (b * cols / 16 + o) * 512; C is stored once per pass
// (and loaded back but for the first).
void input_major_amx(const Weights& w, const uint16_t* x, int64_t n, bool split, int64_t k_begin, int64_t k_end,
                     float* partial) {
  const int64_t cols = w.cols, out_tiles = cols / 16, groups = (n + 15) / 16, x_blocks = (w.rows + 31) / 32;
  const uint16_t* x_lo = x + groups * x_blocks * kTile;
  // blocks of 32 inputs per pass: as many as ~1 MiB of pairs holds, so C is reloaded rarely
  const int64_t per_pass = std::clamp<int64_t>((1 << 20) / (32 * cols * 2), 1, 4);
  thread_local std::vector<uint16_t> pairs, rows;
  pairs.resize(per_pass * 32 * cols);
  rows.resize(2 * cols);
  configure_tiles();
  // value j of each of two rows a, b to words 2j, 2j + 1: the first 16 columns, then the next 16
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                         5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  for (int64_t k0 = k_begin; k0 < k_end; k0 += 32 * per_pass) {
    const int64_t k1 = std::min(k_end, k0 + 32 * per_pass), blocks = (k1 - k0 + 31) / 32;
    for (int64_t k = k0; k < k0 + 32 * blocks; k += 2) {
      for (int half = 0; half < 2; ++half) {
        uint16_t* row = rows.data() + half * cols;
        if (k + half < k1) decode_bf16_avx512(w, 0, k + half, k + half + 1, row, cols);
        else std::fill(row, row + cols, uint16_t(0));
      }
      uint16_t* out = pairs.data() + (k - k0) / 32 * out_tiles * kTile + (k - k0) % 32 / 2 * 32;
      for (int64_t o = 0; o < cols; o += 32, out += 2 * kTile) {
        const __m512i a = _mm512_loadu_si512(rows.data() + o), b = _mm512_loadu_si512(rows.data() + cols + o);
        _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, first, b));
        _mm512_storeu_si512(out + kTile, _mm512_permutex2var_epi16(a, second, b));
      }
    }
    for (int64_t o = 0; o < out_tiles; o += 2)
      for (int64_t g = 0; g < groups; ++g) {
        float* c = partial + (g * out_tiles + o) * 256;
        if (k0 == k_begin) {  // partial is written, not zeroed first
          _tile_zero(0);
          _tile_zero(1);
        } else {
          _tile_loadd(0, c, 64);
          _tile_loadd(1, c + 256, 64);
        }
        for (int64_t b = 0; b < blocks; ++b) {
          const uint16_t* pair = pairs.data() + (b * out_tiles + o) * kTile;
          const int64_t at = (g * x_blocks + k0 / 32 + b) * kTile;
          _tile_loadd(4, pair, 64);
          _tile_loadd(5, pair + kTile, 64);
          _tile_loadd(2, x + at, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 2, 5);
          if (split) {
            _tile_loadd(3, x_lo + at, 64);
            _tile_dpbf16ps(0, 3, 4);
            _tile_dpbf16ps(1, 3, 5);
          }
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
      }
  }
  _tile_release();
}

#endif

}  // namespace sparsellm

#ifndef SPARSELLM_NO_AMX
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
