// The contract between the generic bindings (bindings.cpp, compiled for any x86-64) and the
// ISA-specific kernel files (avx512.cpp, avx2.cpp). Kept free of torch headers on purpose: the ISA
// files are compiled with wider instruction sets, and inline functions shared with generic code
// could otherwise be emitted with instructions the running CPU lacks.
//
// Runtime layouts (built by sparsellm/kernels/layouts.py; the fallback in reference.py reads the same):
//  * every matrix is (rows, cols) with cols padded with zeros to a multiple of 64, cut into column
//    panels of `panel` columns (the last may be narrower), stored panel after panel, so a thread
//    streams one contiguous run per panel and the panel of x stays in L1;
//  * dense:   values, row-major within a panel;
//  * bitmask: one bit per weight, LSB first, 64-bit words, row-major within a panel; the kept
//             values packed in the same order; offsets[p * rows + r] = first value of (panel p, row r);
//  * 2:4:     two kept values per group of four columns, in column order; per 16 values one 32-bit
//             word of 2-bit in-group positions (value k at bits 2k..2k+1);
//  * quantized values (u8, u4) dequantize as q * scale + bias, with scale / bias fp32 per (row, group
//    of columns), bias = -zero_point * scale; pruned weights are zero whatever the bias;
//  * input-major (activation sparsity): the transposed matrix, one row per input, one panel.
#pragma once
#include <cstdint>

namespace sparsellm {

enum Codec : int { kF32 = 0, kBF16 = 1, kF16 = 2, kU8 = 3, kU4 = 4 };
enum Format : int { kDense = 0, kBitmask = 1, kNM24 = 2 };

struct Weights {
  int format = kDense;
  int codec = kBF16;
  int64_t rows = 0, cols = 0;  // cols: padded to a multiple of 64
  int64_t panel = 0;           // multiple of 64
  const void* values = nullptr;         // element units; u4 counts nibbles (low nibble first)
  const uint64_t* mask = nullptr;       // bitmask
  const int64_t* offsets = nullptr;     // bitmask: panels * rows + 1 entries
  const uint32_t* positions = nullptr;  // 2:4 in-group positions
  const float* scales = nullptr;        // quantized: (rows, groups), or (groups, cols) when input-major
  const float* biases = nullptr;
  int64_t group = 0, groups = 0;        // columns per quantization group (multiple of 64)
  bool input_major = false;             // groups run along rows: scale of (r, c) = scales[(r / group) * cols + c]

  int64_t panels() const { return (cols + panel - 1) / panel; }
  int64_t panel_width(int64_t p) const { return p + 1 < panels() ? panel : cols - p * panel; }
  // Where (panel p, row r) starts in a dense layout's values (halve it for 2:4's kept values).
  int64_t dense_start(int64_t p, int64_t r) const { return rows * p * panel + r * panel_width(p); }
  // Index of (panel p, row r)'s first stored value, whatever the format.
  int64_t value_start(int64_t p, int64_t r) const {
    return format == kBitmask ? offsets[p * rows + r] : format == kNM24 ? dense_start(p, r) / 2 : dense_start(p, r);
  }
};

// x: n rows of cols fp32 (zero-padded), y: n rows of `rows` fp32 accumulated into (y += W x).
struct Batch {
  const float* x = nullptr;
  int64_t n = 0, x_stride = 0;
  float* y = nullptr;
  int64_t y_stride = 0;
};

// Activation-sparse product with an input-major matrix: for the listed inputs (rows of the
// transposed matrix) y[t] += x[t, j] * W^T[j, :]; zero inputs are skipped per token.
struct Active {
  const int32_t* inputs = nullptr;
  int64_t count = 0;
};

// kAmx: the AVX-512 kernels, and AMX tiles for products of several tokens with bfloat16 weights.
enum Isa : int64_t { kAvx2 = 2, kAvx512 = 3, kAmx = 4 };

// Bits set in each 4-bit group of ``bits``, one count per nibble (the 2:4 checks of the codecs).
inline uint64_t nibble_popcounts(uint64_t bits) {
  const uint64_t pairs = (bits & 0x5555555555555555ULL) + ((bits >> 1) & 0x5555555555555555ULL);
  return (pairs & 0x3333333333333333ULL) + ((pairs >> 2) & 0x3333333333333333ULL);
}

// Whether a GEMV (input-major: its output) uses the AVX-512 bfloat16 lane order: within each
// block of 32 columns, the 16 even columns first, then the 16 odd ones.
inline bool even_odd_lanes(int64_t isa, const Weights& w) {
  return isa >= kAvx512 && w.codec == kBF16 && w.format != kNM24;
}

#define SPARSELLM_ISA_API(isa)                                                                        \
  void gemv_##isa(const Weights& w, const Batch& b, int64_t row_begin, int64_t row_end);             \
  void decode_##isa(const Weights& w, int64_t panel, int64_t row_begin, int64_t row_end, float* out,  \
                    int64_t ld);                                                                      \
  void input_major_##isa(const Weights& w, const Batch& b, const Active& active);                  \
  void decode_bf16_##isa(const Weights& w, int64_t panel, int64_t row_begin, int64_t row_end,         \
                         uint16_t* out, int64_t ld);

SPARSELLM_ISA_API(avx512)
SPARSELLM_ISA_API(avx2)

// One chunk of a decoded token's attention (bindings.cpp: decode_attention), AVX2 + FMA, which every
// CPU with the AVX-512 kernels has too: `shared` query heads (fp32, scaled, dim each, dim a multiple
// of 8) against `count` keys and values of one key head, rows key_stride / value_stride elements
// apart, in float32, bfloat16 or float16 (codec). Writes per head: the top score, the sum of
// exp(score - top) and the exp-weighted sum of the values (dim), (dim + 2) floats a head.
struct AttentionChunk {
  const float* queries = nullptr;
  int64_t shared = 0, dim = 0, count = 0;
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t key_stride = 0, value_stride = 0;
  int codec = kF32;
  float* scores = nullptr;  // scratch: shared rows of count rounded up to a multiple of 8
  float* result = nullptr;
};
void attention_chunk_avx2(const AttentionChunk& chunk);

// AMX (amx.cpp): whether this build has it; x as tiles (n tokens of cols fp32, cols a multiple of 64;
// groups of 16 tokens x blocks of 32 columns x (split ? 2 : 1) tiles of 512 words); y (n rows of
// y_stride) = W x for rows [row_begin, row_end) of a row-major layout with bfloat16 values.
bool amx_compiled();
void pack_tokens_amx(const float* x, int64_t n, int64_t cols, bool split, uint16_t* out);
void gemm_amx(const Weights& w, const uint16_t* packed, int64_t n, bool split, int64_t row_begin, int64_t row_end,
              float* y, int64_t y_stride);
// Input-major: x as A tiles (split_rows_amx); the product over inputs [k_begin, k_end) into partial, C tiles
// of (group of 16 tokens, block of 16 outputs), (n + 15) / 16 * w.cols / 16 tiles of 256 fp32.
void split_rows_amx(const float* x, int64_t n, int64_t width, bool split, uint16_t* out);
void input_major_amx(const Weights& w, const uint16_t* x, int64_t n, bool split, int64_t k_begin, int64_t k_end,
                     float* partial);

// One row of the checkpoint's bitmask codec (codec.cpp) with AVX-512 test / compress / expand;
// values are 2- or 4-byte patterns. scan writes ceil(columns / 8) mask bytes, returns the row's
// non-zeros and clears *fits24 if a group of 4 holds more than 2; scatter writes every column.
int64_t codec_scan_row_avx512(const void* row, int64_t columns, int bytes, uint8_t* mask, bool* fits24);
void codec_gather_row_avx512(const void* row, const uint8_t* mask, int64_t columns, int bytes, void* values);
void codec_scatter_row_avx512(const void* values, const uint8_t* mask, int64_t columns, int bytes, void* row);
int64_t codec_count_row_avx512(const uint8_t* mask, int64_t columns);  // set bits of one row's mask
// The N:M codec's per-weight stages (codec.cpp); value_type 0 float32, 1 bfloat16, 2 float16.
void codec_clear_signed_zeros_avx512(void* values, int64_t count, int bytes);
bool codec_quantize_avx512(const void* words, int64_t count, int value_type, float scale, float zero, int levels,
                           uint8_t* codes);
void codec_dequantize_avx512(const uint8_t* codes, int64_t count, int value_type, float scale, float zero,
                             void* words);

}  // namespace sparsellm
