// The compact checkpoint's bitmask layout, encoded and decoded in one pass over each matrix
// (format/codec.py holds the numpy reference these must equal bit for bit). Values are handled as
// their raw 16- or 32-bit patterns, so every float dtype (NaN included) round-trips exactly; a
// weight counts as pruned when its bits are +-0. Bitmask rows are LSB first, padded with zero bits
// to whole bytes, as compressed-tensors' sparse-bitmask. Rows run in parallel, each through the
// AVX-512 row functions (avx512.cpp: test, compress, expand 32 values at a time) when the caller
// says the CPU has them, else through the portable loops below.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

namespace sparsellm {
namespace {

// Rows are split among threads in chunks of about this many weights.
constexpr int64_t kGrain = 1 << 16;

int64_t grain_rows(int64_t columns) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(columns, 1)); }

template <typename T>
int64_t scan_row(const T* row, int64_t columns, uint8_t* mask, bool* fits24) {
  constexpr T magnitude = T(~(T(1) << (8 * sizeof(T) - 1)));  // every bit but the sign
  int64_t count = 0;
  bool fits = true;
  for (int64_t byte = 0; byte < (columns + 7) / 8; ++byte) {
    const int64_t c0 = byte * 8, width = std::min<int64_t>(8, columns - c0);
    unsigned value = 0;
    for (int64_t j = 0; j < width; ++j) value |= unsigned((row[c0 + j] & magnitude) != 0) << j;
    mask[byte] = uint8_t(value);
    const int low = __builtin_popcount(value & 0xfu), high = __builtin_popcount(value >> 4);
    count += low + high;
    fits = fits && low <= 2 && high <= 2;
  }
  if (!fits) *fits24 = false;
  return count;
}

template <typename T>
void gather_row(const T* row, const uint8_t* mask, int64_t columns, T* out) {
  for (int64_t byte = 0; byte < (columns + 7) / 8; ++byte)
    for (unsigned value = mask[byte]; value; value &= value - 1) *out++ = row[byte * 8 + __builtin_ctz(value)];
}

template <typename T>
void scatter_row(const T* in, const uint8_t* mask, int64_t columns, T* row) {
  std::memset(row, 0, columns * sizeof(T));
  for (int64_t byte = 0; byte < (columns + 7) / 8; ++byte)
    for (unsigned value = mask[byte]; value; value &= value - 1) row[byte * 8 + __builtin_ctz(value)] = *in++;
}

// -0.0 (or any +-0 pattern) as +0.0: the format stores one zero
template <typename T>
void clear_signed_zeros(T* values, int64_t count) {
  constexpr T magnitude = T(~(T(1) << (8 * sizeof(T) - 1)));
  for (int64_t i = 0; i < count; ++i) values[i] = (values[i] & magnitude) ? values[i] : T(0);
}

int64_t row_bytes(int64_t columns) { return (columns + 7) / 8; }

// The row operations with their implementation picked once here: AVX-512, or the portable loops
// above for 2- or 4-byte values.
int64_t scan_row_with(bool avx512, const char* row, int64_t columns, int bytes, uint8_t* mask, bool* fits24) {
  if (avx512) return codec_scan_row_avx512(row, columns, bytes, mask, fits24);
  return bytes == 2 ? scan_row(reinterpret_cast<const int16_t*>(row), columns, mask, fits24)
                    : scan_row(reinterpret_cast<const int32_t*>(row), columns, mask, fits24);
}

void gather_row_with(bool avx512, const char* row, const uint8_t* mask, int64_t columns, int bytes, char* out) {
  if (avx512) codec_gather_row_avx512(row, mask, columns, bytes, out);
  else if (bytes == 2) gather_row(reinterpret_cast<const int16_t*>(row), mask, columns, reinterpret_cast<int16_t*>(out));
  else gather_row(reinterpret_cast<const int32_t*>(row), mask, columns, reinterpret_cast<int32_t*>(out));
}

void scatter_row_with(bool avx512, const char* in, const uint8_t* mask, int64_t columns, int bytes, char* row) {
  if (avx512) codec_scatter_row_avx512(in, mask, columns, bytes, row);
  else if (bytes == 2) scatter_row(reinterpret_cast<const int16_t*>(in), mask, columns, reinterpret_cast<int16_t*>(row));
  else scatter_row(reinterpret_cast<const int32_t*>(in), mask, columns, reinterpret_cast<int32_t*>(row));
}

void clear_signed_zeros_with(bool avx512, char* values, int64_t count, int bytes) {
  if (avx512) codec_clear_signed_zeros_avx512(values, count, bytes);
  else if (bytes == 2) clear_signed_zeros(reinterpret_cast<int16_t*>(values), count);
  else clear_signed_zeros(reinterpret_cast<int32_t*>(values), count);
}

int64_t count_row(const uint8_t* mask, int64_t columns) {
  int64_t count = 0;
  for (int64_t byte = 0; byte < row_bytes(columns); ++byte) count += __builtin_popcount(mask[byte]);
  return count;
}

int value_bytes(const at::Tensor& bits, const char* what) {
  if (bits.dim() < 1 || !bits.is_contiguous() || !bits.device().is_cpu() ||
      (bits.scalar_type() != at::kShort && bits.scalar_type() != at::kInt))
    throw std::invalid_argument(std::string(what) + ": a contiguous CPU int16 or int32 tensor of float bits");
  return int(bits.element_size());
}

void check_mask(const at::Tensor& mask, const at::Tensor& offsets, int64_t rows, int64_t columns) {
  if (mask.dim() != 2 || !mask.is_contiguous() || mask.scalar_type() != at::kByte || mask.size(0) != rows ||
      mask.size(1) != row_bytes(columns))
    throw std::invalid_argument("bitmask: a contiguous (rows, ceil(columns / 8)) uint8 tensor");
  if (offsets.dim() != 1 || !offsets.is_contiguous() || offsets.scalar_type() != at::kLong || offsets.size(0) != rows)
    throw std::invalid_argument("row offsets: a contiguous (rows,) int64 tensor");
}

// (bitmask (rows, ceil(columns / 8)) uint8, non-zeros per row int64, whether every group of 4
// consecutive weights holds at most 2 non-zeros and the width is a multiple of 4).
std::tuple<at::Tensor, at::Tensor, bool> bitmask_scan(const at::Tensor& bits, bool avx512) {
  const int bytes = value_bytes(bits, "bitmask_scan");
  if (bits.dim() != 2) throw std::invalid_argument("bitmask_scan: a matrix");
  const int64_t rows = bits.size(0), columns = bits.size(1);
  at::Tensor mask = at::empty({rows, row_bytes(columns)}, at::TensorOptions().dtype(at::kByte));
  at::Tensor counts = at::empty({rows}, at::TensorOptions().dtype(at::kLong));
  const char* data = static_cast<const char*>(bits.data_ptr());
  uint8_t* masks = mask.data_ptr<uint8_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  std::atomic<bool> fits24{columns % 4 == 0};
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    bool fits = true;
    for (int64_t r = begin; r < end; ++r) {
      const char* row = data + r * columns * bytes;
      uint8_t* out = masks + r * row_bytes(columns);
      count[r] = scan_row_with(avx512, row, columns, bytes, out, &fits);
    }
    if (!fits) fits24.store(false, std::memory_order_relaxed);
  });
  return {mask, counts, fits24.load()};
}

// The values at the set bits of ``mask``, row-major; row r's start at offsets[r], ``total`` in all.
at::Tensor bitmask_gather(const at::Tensor& bits, const at::Tensor& mask, const at::Tensor& offsets, int64_t total,
                          bool avx512) {
  const int bytes = value_bytes(bits, "bitmask_gather");
  if (bits.dim() != 2) throw std::invalid_argument("bitmask_gather: a matrix");
  const int64_t rows = bits.size(0), columns = bits.size(1);
  check_mask(mask, offsets, rows, columns);
  at::Tensor values = at::empty({total}, bits.options());
  const char* data = static_cast<const char*>(bits.data_ptr());
  char* out = static_cast<char*>(values.data_ptr());
  const uint8_t* masks = mask.data_ptr<uint8_t>();
  const int64_t* start = offsets.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const char* row = data + r * columns * bytes;
      const uint8_t* m = masks + r * row_bytes(columns);
      gather_row_with(avx512, row, m, columns, bytes, out + start[r] * bytes);
    }
  });
  return values;
}

// Writes the dense matrix into ``out`` (rows, columns) and returns whether the offsets, the bitmask
// and the number of values agree (if not, some rows were left unwritten and ``out`` must be dropped).
bool bitmask_scatter(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets, at::Tensor& out,
                     bool avx512) {
  const int bytes = value_bytes(out, "bitmask_scatter");
  if (out.dim() != 2) throw std::invalid_argument("bitmask_scatter: a matrix to write into");
  const int64_t rows = out.size(0), columns = out.size(1), total = values.numel();
  check_mask(mask, offsets, rows, columns);
  if (values.dim() != 1 || !values.is_contiguous() || values.scalar_type() != out.scalar_type())
    throw std::invalid_argument("bitmask_scatter: values must be a contiguous 1-D tensor of the output's type");
  if (rows == 0) return total == 0;
  const uint8_t* masks = mask.data_ptr<uint8_t>();
  const int64_t* start = offsets.data_ptr<int64_t>();
  const char* in = static_cast<const char*>(values.data_ptr());
  char* data = static_cast<char*>(out.data_ptr());
  std::atomic<bool> consistent{true};
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* m = masks + r * row_bytes(columns);
      // each row is checked against its own offsets before a value is read: never out of bounds
      const int64_t stop = r + 1 < rows ? start[r + 1] : total;
      if (start[r] < 0 || stop > total || start[r] + (avx512 ? codec_count_row_avx512(m, columns)
                                                             : count_row(m, columns)) != stop) {
        ok = false;
        continue;
      }
      scatter_row_with(avx512, in + start[r] * bytes, m, columns, bytes, data + r * columns * bytes);
    }
    if (!ok) consistent.store(false, std::memory_order_relaxed);
  });
  return consistent.load();
}

// Whether every group of 4 columns of a (rows, ceil(columns / 8)) bitmask has exactly 2 bits set,
// as sparse-24-bitmask requires (columns a multiple of 4; padding bits are the caller's to check).
bool bitmask_two_of_four(const at::Tensor& mask, int64_t columns) {
  if (mask.dim() != 2 || !mask.is_contiguous() || mask.scalar_type() != at::kByte || mask.size(1) != row_bytes(columns))
    throw std::invalid_argument("bitmask_two_of_four: a contiguous (rows, ceil(columns / 8)) uint8 tensor");
  if (columns % 4) return false;
  const int64_t rows = mask.size(0), bytes = row_bytes(columns);
  const uint8_t* data = mask.data_ptr<uint8_t>();
  std::atomic<bool> all{true};
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t r = begin; r < end && ok; ++r)
      for (int64_t b = 0; b < bytes; b += 8) {
        const int64_t taken = std::min<int64_t>(8, bytes - b);
        uint64_t bits = 0x3333333333333333ULL;  // groups past the row's end count as valid
        std::memcpy(&bits, data + r * bytes + b, taken);
        if (columns - 8 * b < 64) {  // the row's last groups: keep the real ones, pad with valid ones
          const uint64_t real = (uint64_t(1) << (columns - 8 * b)) - 1;
          bits = (bits & real) | (0x3333333333333333ULL & ~real);
        }
        ok = ok && nibble_popcounts(bits) == 0x2222222222222222ULL;
      }
    if (!ok) all.store(false, std::memory_order_relaxed);
  });
  return all.load();
}

// -- N:M layout (format/nm.py; sparse-nm and sparse-24-bitmask) ----------------------------------
// Each group of M columns keeps N positions: one of P patterns, numbered as bits.pattern_table
// does; k pattern numbers share a byte as base-P digits, least significant first. The tables come
// from Python: ``numbers`` (2^M int16: the pattern of each group mask topped up with its first free
// positions, -1 when more than N are kept), ``positions`` (P, N uint8, ascending), ``digits``
// (256, k int16: the numbers a byte holds, -1 for a byte no pattern numbers make) and, where a
// byte's k groups span at most 12 columns (2:4: 3 groups), ``by_bits`` (2^(k M) int32: the pattern
// byte and kept positions of each non-zero mask of k groups, bit 31 when one keeps more than N;
// else empty). Values are stored row by row, N per group; quantized ones as codes of ``code_bits``
// packed LSB first per row.
//
// A row goes through in stages, so that only the pattern bookkeeping is done per group and every
// per-weight step is a pass the AVX-512 functions (avx512.cpp) run 16 or 32 lanes at a time:
// encode = patterns and stored-position mask from the non-zero mask (per group), gather of the
// stored values, quantization per grid; decode = the same in reverse.

enum ValueType : int64_t { kValueF32 = 0, kValueBF16 = 1, kValueF16 = 2 };

// A float's raw bits: 32 for float32, 16 for bfloat16 and float16.
template <int64_t kType>
using Bits = std::conditional_t<kType == kValueF32, uint32_t, uint16_t>;

template <int64_t kType>
float to_float(Bits<kType> bits) {
  if constexpr (kType == kValueF32) {
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
  } else if constexpr (kType == kValueBF16) {
    return float(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  } else {
    return float(c10::Half(bits, c10::Half::from_bits()));
  }
}

template <int64_t kType>
Bits<kType> from_float(float value) {  // rounds to nearest even, as torch's casts do
  if constexpr (kType == kValueF32) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    return bits;
  } else if constexpr (kType == kValueBF16) {
    return c10::BFloat16(value).x;
  } else {
    return c10::Half(value).x;
  }
}

template <typename F>
auto with_value_type(int64_t value_type, F&& f) {
  switch (value_type) {
    case kValueF32: return f(std::integral_constant<int64_t, kValueF32>{});
    case kValueBF16: return f(std::integral_constant<int64_t, kValueBF16>{});
    case kValueF16: return f(std::integral_constant<int64_t, kValueF16>{});
    default: throw std::invalid_argument("N:M codec: unknown value type");
  }
}

// round half to even, as torch.round; std::nearbyint is a library call that saves the FP environment
float round_even(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer
  return std::fabs(x) < 4194304.0f ? (x + kMagic) - kMagic : x;  // larger: clamped to the codes anyway
}

// Codes of ``count`` float words on one grid (scale, zero point); false if one is off the grid.
template <int64_t kType>
bool quantize_words(const Bits<kType>* words, int64_t count, float scale, float zero, int levels, uint8_t* codes) {
  const float top = float(levels - 1);
  for (int64_t i = 0; i < count; ++i) {
    const float code = std::min(std::max(round_even(to_float<kType>(words[i]) / scale) + zero, 0.0f), top);
    if (std::isnan(code) || from_float<kType>((code - zero) * scale) != words[i]) return false;
    codes[i] = uint8_t(code);
  }
  return true;
}

template <int64_t kType>
void dequantize_codes(const uint8_t* codes, int64_t count, float scale, float zero, Bits<kType>* words) {
  for (int64_t i = 0; i < count; ++i) words[i] = from_float<kType>((float(codes[i]) - zero) * scale);
}

// Codes of 2, 4 or 8 bits, 8 / bits to a byte, LSB first (the last byte padded with zero bits).
template <int kBits>
void pack_codes_as(const uint8_t* codes, int64_t count, uint8_t* out) {
  constexpr int kPer = 8 / kBits;
  const int64_t whole = count / kPer;
  for (int64_t b = 0; b < whole; ++b) {
    unsigned byte = 0;
    for (int j = 0; j < kPer; ++j) byte |= unsigned(codes[b * kPer + j]) << (j * kBits);
    out[b] = uint8_t(byte);
  }
  if (count % kPer) {
    unsigned byte = 0;
    for (int64_t j = 0; j < count % kPer; ++j) byte |= unsigned(codes[whole * kPer + j]) << (j * kBits);
    out[whole] = uint8_t(byte);
  }
}

template <int kBits>
void unpack_codes_as(const uint8_t* packed, int64_t count, uint8_t* codes) {
  constexpr int kPer = 8 / kBits;
  constexpr unsigned kMask = (1u << kBits) - 1;
  for (int64_t b = 0; b < count / kPer; ++b)
    for (int j = 0; j < kPer; ++j) codes[b * kPer + j] = uint8_t((packed[b] >> (j * kBits)) & kMask);
  for (int64_t i = count / kPer * kPer; i < count; ++i) codes[i] = uint8_t((packed[i / kPer] >> (i % kPer * kBits)) & kMask);
}

void pack_codes(const uint8_t* codes, int64_t count, int bits, uint8_t* out) {
  bits == 2 ? pack_codes_as<2>(codes, count, out) : bits == 4 ? pack_codes_as<4>(codes, count, out)
                                                              : pack_codes_as<8>(codes, count, out);
}

void unpack_codes(const uint8_t* packed, int64_t count, int bits, uint8_t* codes) {
  bits == 2 ? unpack_codes_as<2>(packed, count, codes) : bits == 4 ? unpack_codes_as<4>(packed, count, codes)
                                                                   : unpack_codes_as<8>(packed, count, codes);
}

struct NMTables {
  int64_t n, m, k, patterns;  // k: pattern numbers per byte
  const int16_t* numbers;
  const int16_t* digits;
  const uint32_t* by_bits;   // per non-zero mask of k groups (k * M <= 12): byte | kept << 8 | invalid << 31; or null
  uint32_t kept[256];        // per pattern number: its kept positions as bits
  uint32_t byte_kept[256];   // per byte: the kept positions of its k groups, k * M <= 32 bits
};

NMTables nm_tables(int64_t n, int64_t m, const at::Tensor& numbers, const at::Tensor& positions,
                   const at::Tensor& digits, const at::Tensor& by_bits) {
  if (m < 1 || m > 16 || n < 1 || n > m) throw std::invalid_argument("N:M codec: needs 1 <= N <= M <= 16");
  if (numbers.scalar_type() != at::kShort || !numbers.is_contiguous() || numbers.numel() != (int64_t(1) << m) ||
      positions.scalar_type() != at::kByte || !positions.is_contiguous() || positions.dim() != 2 ||
      positions.size(1) != n || positions.size(0) > 256 || digits.scalar_type() != at::kShort ||
      !digits.is_contiguous() || digits.dim() != 2 || digits.size(0) != 256 || digits.size(1) * m > 32)
    throw std::invalid_argument("N:M codec: malformed pattern tables");
  if (by_bits.numel() && (by_bits.scalar_type() != at::kInt || !by_bits.is_contiguous() ||
                          by_bits.numel() != (int64_t(1) << (digits.size(1) * m))))
    throw std::invalid_argument("N:M codec: malformed pattern tables");
  NMTables t{n, m, digits.size(1), positions.size(0), numbers.data_ptr<int16_t>(), digits.data_ptr<int16_t>(),
             by_bits.numel() ? reinterpret_cast<const uint32_t*>(by_bits.data_ptr<int32_t>()) : nullptr, {}, {}};
  const uint8_t* position = positions.data_ptr<uint8_t>();
  for (int64_t p = 0; p < t.patterns; ++p)
    for (int64_t i = 0; i < n; ++i) t.kept[p] |= 1u << position[p * n + i];
  for (int byte = 0; byte < 256; ++byte)
    for (int64_t d = 0; d < t.k; ++d) {
      const int16_t number = t.digits[byte * t.k + d];
      if (number >= t.patterns) throw std::invalid_argument("N:M codec: malformed pattern tables");
      if (number >= 0) t.byte_kept[byte] |= t.kept[number] << (d * m);
    }
  return t;
}

// The grid of a quantized layer: per (row, group of ``width`` columns) float32 scale and zero point.
struct Grid {
  const float* scale = nullptr;
  const float* zero = nullptr;
  int64_t groups = 0, width = 0, bits = 0;
  bool on() const { return scale != nullptr; }
};

Grid grid_of(const at::Tensor& scale, const at::Tensor& zero, int64_t rows, int64_t columns, int64_t width,
             int64_t bits) {
  if (scale.numel() == 0) return {};
  if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("N:M codec: codes of 2, 4 or 8 bits");
  if (width < 1 || (columns + width - 1) / width != scale.size(1))
    throw std::invalid_argument("N:M codec: the grid's groups do not cover the columns");
  if (scale.scalar_type() != at::kFloat || zero.scalar_type() != at::kFloat || !scale.is_contiguous() ||
      !zero.is_contiguous() || scale.dim() != 2 || scale.size(0) != rows || !scale.sizes().equals(zero.sizes()))
    throw std::invalid_argument("N:M codec: scale and zero point must be contiguous (rows, groups) float32");
  return {scale.data_ptr<float>(), zero.data_ptr<float>(), scale.size(1), width, bits};
}

int64_t code_row_bytes(int64_t count, int64_t bits) { return (count * bits + 7) / 8; }

// Appends bit fields to a row of bytes, LSB first, 4 bytes at a time (the row's buffer has 4
// spare bytes past its last whole byte).
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  void put(uint32_t value, int bits) {  // value < 2^bits, bits <= 32
    pending_ |= uint64_t(value) << filled_;
    filled_ += bits;
    if (filled_ >= 32) {
      std::memcpy(out_, &pending_, 4);
      out_ += 4, pending_ >>= 32, filled_ -= 32;
    }
  }
  void flush() {
    for (; filled_ > 0; filled_ -= 8) *out_++ = uint8_t(pending_), pending_ >>= 8;
    filled_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t pending_ = 0;
  int filled_ = 0;
};

// ``count`` (<= 32) bits of a mask from ``column`` on; masks are read 8 bytes at a time, so the
// row buffers they live in have 8 spare bytes.
uint32_t mask_bits(const uint8_t* mask, int64_t column, int count) {
  uint64_t word;
  std::memcpy(&word, mask + column / 8, 8);
  return uint32_t((word >> (column % 8)) & ((uint64_t(1) << count) - 1));
}

int64_t set_bits_between(const uint8_t* mask, int64_t from, int64_t to) {
  int64_t count = 0;
  for (int64_t c = from; c < to; c += 32) count += __builtin_popcount(mask_bits(mask, c, int(std::min<int64_t>(32, to - c))));
  return count;
}

// Per-row scratch of one thread: the non-zero and stored-position masks (with the spare bytes
// mask_bits reads), the stored values as words, their codes.
struct RowScratch {
  std::vector<uint8_t> nonzero, stored, words, codes;
  RowScratch(int64_t columns, int64_t per_row, int bytes)
      : nonzero(row_bytes(columns) + 8), stored(row_bytes(columns) + 8), words(per_row * bytes), codes(per_row) {}
};

// Stage: quantize (or dequantize) a row's stored values grid group by grid group; a grid group's
// values are the stored positions among its columns: N per M columns when M divides its width,
// else counted on the stored-position mask.
template <typename F>
bool for_each_grid_group(const Grid& grid, int64_t r, int64_t columns, const NMTables& t, const uint8_t* stored_mask,
                         F&& f) {
  for (int64_t g = 0, first = 0; g < grid.groups; ++g) {
    const int64_t from = g * grid.width, to = std::min(columns, (g + 1) * grid.width);
    const int64_t count = grid.width % t.m ? set_bits_between(stored_mask, from, to) : (to - from) / t.m * t.n;
    if (!f(first, count, grid.scale[r * grid.groups + g], grid.zero[r * grid.groups + g])) return false;
    first += count;
  }
  return true;
}

// One row, from its non-zero bitmask (bitmask_scan's): 0 ok, 1 a group keeps more than N weights,
// 2 a kept weight is not on its grid.
int64_t nm_encode_row(const char* row, const uint8_t* nonzero_row, int64_t columns, int bytes, int64_t value_type,
                      const NMTables& t, const Grid& grid, int64_t r, bool avx512, RowScratch& scratch,
                      uint8_t* pattern_row, uint8_t* mask_row, char* value_row) {
  const int m = int(t.m), k = int(t.k), base = int(t.patterns);
  const int64_t per_row = columns / m * t.n;
  uint8_t* nonzero = scratch.nonzero.data();  // a copy with the spare bytes mask_bits reads
  uint8_t* stored_mask = scratch.stored.data();
  std::memcpy(nonzero, nonzero_row, row_bytes(columns));

  // a pattern byte (k groups) at a time: its groups' non-zero bits in one read
  BitWriter stored(stored_mask);
  const uint32_t group_bits = (1u << m) - 1;
  const int64_t groups = columns / m;
  const int64_t whole = t.by_bits ? groups / k * k : 0;  // groups encoded a byte at a time by one lookup
  for (int64_t g0 = 0; g0 < whole; g0 += k) {
    const uint32_t entry = t.by_bits[mask_bits(nonzero, g0 * m, k * m)];
    if (entry >> 31) return 1;
    *pattern_row++ = uint8_t(entry);
    stored.put((entry >> 8) & 0xfff, k * m);
  }
  for (int64_t g0 = whole; g0 < groups; g0 += k) {
    const int in_byte = int(std::min<int64_t>(k, groups - g0));
    const uint32_t bits = mask_bits(nonzero, g0 * m, in_byte * m);
    int number_or = 0;
    unsigned pattern_byte = 0;
    uint32_t kept = 0;
    for (int d = in_byte - 1; d >= 0; --d) {
      const int number = t.numbers[(bits >> (d * m)) & group_bits];
      number_or |= number;
      pattern_byte = pattern_byte * unsigned(base) + unsigned(number);
      kept |= t.kept[number & 0xff] << (d * m);
    }
    if (number_or < 0) return 1;
    *pattern_row++ = uint8_t(pattern_byte);
    stored.put(kept, in_byte * m);
  }
  stored.flush();
  std::memcpy(mask_row, stored_mask, row_bytes(columns));

  // stored values: kept weights, and the positions that topped a group up (+-0.0, stored as +0.0)
  char* words = grid.on() ? reinterpret_cast<char*>(scratch.words.data()) : value_row;
  gather_row_with(avx512, row, stored_mask, columns, bytes, words);
  clear_signed_zeros_with(avx512, words, per_row, bytes);
  if (!grid.on()) return 0;

  const int levels = 1 << grid.bits;
  uint8_t* codes = scratch.codes.data();
  const bool on_grid = for_each_grid_group(grid, r, columns, t, stored_mask, [&](int64_t first, int64_t count, float s,
                                                                           float z) {
    if (avx512) return codec_quantize_avx512(words + first * bytes, count, int(value_type), s, z, levels, codes + first);
    return with_value_type(value_type, [&](auto type) {
      using T = Bits<decltype(type)::value>;
      return quantize_words<decltype(type)::value>(reinterpret_cast<const T*>(words) + first, count, s, z, levels,
                                                   codes + first);
    });
  });
  if (!on_grid) return 2;
  pack_codes(codes, per_row, int(grid.bits), reinterpret_cast<uint8_t*>(value_row));
  return 0;
}

// From a matrix and its non-zero bitmask (bitmask_scan's): (pattern bytes (rows, ceil(groups / k)),
// bitmask of the stored positions (rows, ceil(columns / 8)), values: float bits (rows, columns * N /
// M) or packed codes, status): status 0 ok, 1 a group keeps more than N weights, 2 a kept weight is
// not on its grid (codes only; the outputs are then void).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> nm_encode(
    const at::Tensor& bits, const at::Tensor& nonzero, int64_t value_type, int64_t n, int64_t m, const at::Tensor& numbers,
    const at::Tensor& positions, const at::Tensor& digits, const at::Tensor& by_bits, const at::Tensor& scale,
    const at::Tensor& zero, int64_t code_bits, int64_t group_width, bool avx512) {
  const int bytes = value_bytes(bits, "nm_encode");
  const NMTables t = nm_tables(n, m, numbers, positions, digits, by_bits);
  if (bits.dim() != 2 || bits.size(1) % m) throw std::invalid_argument("nm_encode: a matrix whose width M divides");
  if (bytes != (value_type == kValueF32 ? 4 : 2)) throw std::invalid_argument("nm_encode: value type and bits differ");
  const int64_t rows = bits.size(0), columns = bits.size(1), groups = columns / m, per_row = groups * n;
  if (nonzero.dim() != 2 || !nonzero.is_contiguous() || nonzero.scalar_type() != at::kByte ||
      nonzero.size(0) != rows || nonzero.size(1) != row_bytes(columns))
    throw std::invalid_argument("nm_encode: the non-zero bitmask must be (rows, ceil(columns / 8)) uint8");
  const uint8_t* nonzero_data = nonzero.data_ptr<uint8_t>();
  const Grid grid = grid_of(scale, zero, rows, columns, group_width, code_bits);
  const int64_t pattern_bytes = (groups + t.k - 1) / t.k;
  // every byte is written (the rows' writers flush their last partial byte)
  at::Tensor patterns = at::empty({rows, pattern_bytes}, at::TensorOptions().dtype(at::kByte));
  at::Tensor mask = at::empty({rows, row_bytes(columns)}, at::TensorOptions().dtype(at::kByte));
  at::Tensor values = grid.on() ? at::empty({rows, code_row_bytes(per_row, code_bits)}, patterns.options())
                                : at::empty({rows, per_row}, bits.options());
  const char* data = static_cast<const char*>(bits.data_ptr());
  uint8_t* pattern_data = patterns.data_ptr<uint8_t>();
  uint8_t* mask_data = mask.data_ptr<uint8_t>();
  char* value_data = static_cast<char*>(values.data_ptr());
  const int64_t value_row = grid.on() ? values.size(1) : per_row * bytes;
  std::atomic<int64_t> status{0};
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    RowScratch scratch(columns, per_row, bytes);
    for (int64_t r = begin; r < end && status.load(std::memory_order_relaxed) == 0; ++r) {
      const int64_t found = nm_encode_row(data + r * columns * bytes, nonzero_data + r * row_bytes(columns), columns,
                                          bytes, value_type, t, grid, r, avx512, scratch, pattern_data + r * pattern_bytes,
                                          mask_data + r * row_bytes(columns), value_data + r * value_row);
      if (found) status.store(found);
    }
  });
  return {patterns, mask, values, status.load()};
}

// One row into ``out``; false when a pattern byte is not one the encoder makes or the padding
// digits past the last group are not zero.
bool nm_decode_row(const uint8_t* pattern_row, int64_t pattern_bytes, int64_t columns, int bytes, int64_t value_type,
                   const NMTables& t, const Grid& grid, int64_t r, bool avx512, RowScratch& scratch,
                   const char* value_row, char* out) {
  const int64_t groups = columns / t.m, per_row = groups * t.n;
  uint8_t* stored_mask = scratch.stored.data();
  BitWriter stored(stored_mask);
  const int64_t whole = groups / t.k;  // bytes whose k digits all number groups
  bool valid = true;
  for (int64_t b = 0; b < whole; ++b) {
    valid &= t.digits[int64_t(pattern_row[b]) * t.k] >= 0;
    stored.put(t.byte_kept[pattern_row[b]], int(t.k * t.m));
  }
  if (whole < pattern_bytes) {  // the last byte: digits past the last group must be 0
    const int16_t* held = t.digits + int64_t(pattern_row[whole]) * t.k;
    const int64_t in_row = groups - whole * t.k;
    valid &= held[0] >= 0;
    for (int64_t d = in_row; d < t.k; ++d) valid &= held[d] == 0;
    stored.put(t.byte_kept[pattern_row[whole]] & uint32_t((uint64_t(1) << (in_row * t.m)) - 1), int(in_row * t.m));
  }
  if (!valid) return false;
  stored.flush();

  const char* words = value_row;
  if (grid.on()) {
    uint8_t* codes = scratch.codes.data();
    char* decoded = reinterpret_cast<char*>(scratch.words.data());
    unpack_codes(reinterpret_cast<const uint8_t*>(value_row), per_row, int(grid.bits), codes);
    for_each_grid_group(grid, r, columns, t, stored_mask, [&](int64_t first, int64_t count, float s, float z) {
      if (avx512) codec_dequantize_avx512(codes + first, count, int(value_type), s, z, decoded + first * bytes);
      else with_value_type(value_type, [&](auto type) {
        using T = Bits<decltype(type)::value>;
        dequantize_codes<decltype(type)::value>(codes + first, count, s, z, reinterpret_cast<T*>(decoded) + first);
      });
      return true;
    });
    words = decoded;
  }
  scatter_row_with(avx512, words, stored_mask, columns, bytes, out);
  return true;
}

// Writes the dense matrix into ``out`` (rows, columns; float bits of ``value_type``) from pattern
// bytes and float bits or packed codes; returns false (``out`` then partly written) when a pattern
// byte is not one the encoder makes or the padding digits past the last group are not zero.
bool nm_decode(const at::Tensor& patterns, const at::Tensor& values, int64_t value_type, int64_t n, int64_t m,
               const at::Tensor& numbers, const at::Tensor& positions, const at::Tensor& digits,
               const at::Tensor& by_bits, const at::Tensor& scale, const at::Tensor& zero, int64_t code_bits,
               int64_t group_width, at::Tensor& out, bool avx512) {
  const int bytes = value_bytes(out, "nm_decode");
  const NMTables t = nm_tables(n, m, numbers, positions, digits, by_bits);
  if (out.dim() != 2 || out.size(1) % m) throw std::invalid_argument("nm_decode: a matrix whose width M divides");
  if (bytes != (value_type == kValueF32 ? 4 : 2)) throw std::invalid_argument("nm_decode: value type and bits differ");
  const int64_t rows = out.size(0), columns = out.size(1), groups = columns / m, per_row = groups * n;
  const Grid grid = grid_of(scale, zero, rows, columns, group_width, code_bits);
  const int64_t pattern_bytes = (groups + t.k - 1) / t.k;
  if (patterns.scalar_type() != at::kByte || !patterns.is_contiguous() || patterns.dim() != 2 ||
      patterns.size(0) != rows || patterns.size(1) != pattern_bytes)
    throw std::invalid_argument("nm_decode: pattern bytes must be (rows, ceil(groups / k)) uint8");
  const int64_t value_row = grid.on() ? code_row_bytes(per_row, code_bits) : per_row;
  if (!values.is_contiguous() || values.dim() != 2 || values.size(0) != rows || values.size(1) != value_row ||
      (grid.on() ? values.scalar_type() != at::kByte : values.scalar_type() != out.scalar_type()))
    throw std::invalid_argument("nm_decode: values must be (rows, stored per row) of the output's type, or codes");
  char* data = static_cast<char*>(out.data_ptr());
  const uint8_t* pattern_data = patterns.data_ptr<uint8_t>();
  const char* value_data = static_cast<const char*>(values.data_ptr());
  const int64_t value_row_bytes = value_row * values.element_size();
  std::atomic<bool> valid{true};
  at::parallel_for(0, rows, grain_rows(columns), [&](int64_t begin, int64_t end) {
    RowScratch scratch(columns, per_row, bytes);
    for (int64_t r = begin; r < end && valid.load(std::memory_order_relaxed); ++r)
      if (!nm_decode_row(pattern_data + r * pattern_bytes, pattern_bytes, columns, bytes, value_type, t, grid, r,
                         avx512, scratch, value_data + r * value_row_bytes, data + r * columns * bytes))
        valid.store(false);
  });
  return valid.load();
}

}  // namespace

void bind_codec(pybind11::module& m) {
  m.def("nm_encode", &nm_encode, "N:M pattern bytes, position bitmask and values (or checked codes) of a matrix");
  m.def("nm_decode", &nm_decode, "pattern bytes and values (or codes) written into a dense matrix");
  m.def("bitmask_scan", &bitmask_scan, "(bitmask, non-zeros per row, fits 2:4) of a matrix of float bits");
  m.def("bitmask_gather", &bitmask_gather, "the values at a bitmask's set bits, row-major");
  m.def("bitmask_scatter", &bitmask_scatter, "a bitmask and its values written into a dense matrix");
  m.def("bitmask_two_of_four", &bitmask_two_of_four, "whether a bitmask sets exactly 2 of every 4 columns");
}

}  // namespace sparsellm
