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

int64_t row_bytes(int64_t columns) { return (columns + 7) / 8; }

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
      count[r] = avx512 ? codec_scan_row_avx512(row, columns, bytes, out, &fits)
                 : bytes == 2 ? scan_row(reinterpret_cast<const int16_t*>(row), columns, out, &fits)
                              : scan_row(reinterpret_cast<const int32_t*>(row), columns, out, &fits);
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
      char* to = out + start[r] * bytes;
      if (avx512) codec_gather_row_avx512(row, m, columns, bytes, to);
      else if (bytes == 2) gather_row(reinterpret_cast<const int16_t*>(row), m, columns, reinterpret_cast<int16_t*>(to));
      else gather_row(reinterpret_cast<const int32_t*>(row), m, columns, reinterpret_cast<int32_t*>(to));
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
      const char* from = in + start[r] * bytes;
      char* row = data + r * columns * bytes;
      if (avx512) codec_scatter_row_avx512(from, m, columns, bytes, row);
      else if (bytes == 2) scatter_row(reinterpret_cast<const int16_t*>(from), m, columns, reinterpret_cast<int16_t*>(row));
      else scatter_row(reinterpret_cast<const int32_t*>(from), m, columns, reinterpret_cast<int32_t*>(row));
    }
    if (!ok) consistent.store(false, std::memory_order_relaxed);
  });
  return consistent.load();
}

// -- N:M layout (format/nm.py; sparse-nm and sparse-24-bitmask) ----------------------------------
// Each group of M columns keeps N positions: one of P patterns, numbered as bits.pattern_table
// does; k pattern numbers share a byte as base-P digits, least significant first. The tables come
// from Python: ``numbers`` (2^M int16: the pattern of each group mask topped up with its first free
// positions, -1 when more than N are kept), ``positions`` (P, N uint8, ascending), ``digits``
// (256, k int16: the numbers a byte holds, -1 for a byte no pattern numbers make). Values are
// stored row by row, N per group; quantized ones as codes of ``code_bits`` packed LSB first per row.

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

// Calls f(std::integral_constant<int64_t, type>, std::integral_constant<int, M or 0>) for a runtime
// ValueType and M: the row functions are compiled per value type, and for M = 4 (2:4) apart.
template <typename F>
auto with_row_kernel(int64_t value_type, int64_t m, F&& f) {
  const auto with_m = [&](auto type) {
    return m == 4 ? f(type, std::integral_constant<int, 4>{}) : f(type, std::integral_constant<int, 0>{});
  };
  switch (value_type) {
    case kValueF32: return with_m(std::integral_constant<int64_t, kValueF32>{});
    case kValueBF16: return with_m(std::integral_constant<int64_t, kValueBF16>{});
    case kValueF16: return with_m(std::integral_constant<int64_t, kValueF16>{});
    default: throw std::invalid_argument("N:M codec: unknown value type");
  }
}

// round half to even, as torch.round; std::nearbyint is a library call that saves the FP environment
float round_even(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer
  return std::fabs(x) < 4194304.0f ? (x + kMagic) - kMagic : x;  // larger: clamped to the codes anyway
}

struct NMTables {
  int64_t n, m, k, patterns;  // k: pattern numbers per byte
  const int16_t* numbers;
  const uint8_t* positions;
  const int16_t* digits;
};

NMTables nm_tables(int64_t n, int64_t m, const at::Tensor& numbers, const at::Tensor& positions,
                   const at::Tensor& digits) {
  if (m < 1 || m > 16 || n < 1 || n > m) throw std::invalid_argument("N:M codec: needs 1 <= N <= M <= 16");
  if (numbers.scalar_type() != at::kShort || !numbers.is_contiguous() || numbers.numel() != (int64_t(1) << m) ||
      positions.scalar_type() != at::kByte || !positions.is_contiguous() || positions.dim() != 2 ||
      positions.size(1) != n || digits.scalar_type() != at::kShort || !digits.is_contiguous() ||
      digits.dim() != 2 || digits.size(0) != 256)
    throw std::invalid_argument("N:M codec: malformed pattern tables");
  return {n, m, digits.size(1), positions.size(0), numbers.data_ptr<int16_t>(), positions.data_ptr<uint8_t>(),
          digits.data_ptr<int16_t>()};
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

// The grid entry of the columns a row reaches in ascending order, without a division per weight.
class GridCursor {
 public:
  GridCursor(const Grid& grid, int64_t row)
      : scale_(grid.scale + row * grid.groups), zero_(grid.zero + row * grid.groups), width_(grid.width),
        end_(grid.width) {}
  // (scale, zero point) of ``column``, which must not be left of the previous call's
  std::pair<float, float> at(int64_t column) {
    while (column >= end_) ++scale_, ++zero_, end_ += width_;
    return {*scale_, *zero_};
  }
  // whether ``column`` starts a new grid since the previous call (then ``at`` moves to it)
  bool moves(int64_t column) const { return column >= end_; }

 private:
  const float* scale_;
  const float* zero_;
  int64_t width_, end_;
};

// The decoded words of every code of one grid, (q - z) * s cast as torch casts: a lookup per
// weight instead of arithmetic and a rounding (for codes of up to 4 bits: 16 words per group).
template <int64_t kType>
struct CodeTable {
  Bits<kType> words[16];
  void fill(float s, float z, int levels) {
    for (int q = 0; q < levels; ++q) words[q] = from_float<kType>((float(q) - z) * s);
  }
};

// Appends bit fields to a row of bytes, LSB first, a whole byte at a time.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  void put(uint32_t value, int bits) {  // value < 2^bits, bits <= 32
    pending_ |= uint64_t(value) << filled_;
    for (filled_ += bits; filled_ >= 8; filled_ -= 8) *out_++ = uint8_t(pending_), pending_ >>= 8;
  }
  void flush() {
    if (filled_) *out_++ = uint8_t(pending_), pending_ = 0, filled_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t pending_ = 0;
  int filled_ = 0;
};

// One row; kM is M when known at compile time (0: read it from the tables). Table fields are
// copied to locals: byte stores may alias anything, and would otherwise force reloads.
template <int64_t kType, int kM, typename T = Bits<kType>>
int64_t nm_encode_row(const T* row, int64_t columns, const NMTables& t, const Grid& grid, int64_t r,
                      uint8_t* pattern_row, uint8_t* mask_row, T* value_row, uint8_t* code_row) {
  constexpr T magnitude = T(~(T(1) << (8 * sizeof(T) - 1)));
  const int m = kM ? kM : int(t.m), n = int(t.n), k = int(t.k), base = int(t.patterns), code_bits = int(grid.bits);
  const int16_t* const numbers = t.numbers;
  const uint8_t* const positions = t.positions;
  const bool quantized = grid.on();
  const float top = float((1 << code_bits) - 1);
  GridCursor cursor(grid, r);
  BitWriter mask(mask_row), codes(code_row);
  unsigned pattern_byte = 0, weight = 1;
  int digit = 0;
  for (int64_t c0 = 0; c0 < columns; c0 += m) {
    uint32_t group_mask = 0;
    for (int j = 0; j < m; ++j) group_mask |= uint32_t((row[c0 + j] & magnitude) != 0) << j;
    const int number = numbers[group_mask];
    if (number < 0) return 1;
    pattern_byte += unsigned(number) * weight;
    if (++digit == k) *pattern_row++ = uint8_t(pattern_byte), pattern_byte = 0, digit = 0, weight = 1;
    else weight *= unsigned(base);
    uint32_t stored_mask = 0;
    for (int i = 0; i < n; ++i) {
      const int position = positions[number * n + i];
      stored_mask |= 1u << position;
      const T word = (row[c0 + position] & magnitude) ? row[c0 + position] : T(0);  // -0.0 is stored as +0.0
      if (!quantized) {
        *value_row++ = word;
        continue;
      }
      const auto [s, z] = cursor.at(c0 + position);
      const float code = std::min(std::max(round_even(to_float<kType>(word) / s) + z, 0.0f), top);
      if (std::isnan(code) || from_float<kType>((code - z) * s) != word) return 2;
      codes.put(uint32_t(code), code_bits);
    }
    mask.put(stored_mask, m);
  }
  if (digit) *pattern_row = uint8_t(pattern_byte);
  mask.flush();
  codes.flush();
  return 0;
}

// (pattern bytes (rows, ceil(groups / k)), bitmask of the stored positions (rows, ceil(columns / 8)),
// values: float bits (rows, columns * N / M) or packed codes, status): status 0 ok, 1 a group keeps
// more than N weights, 2 a kept weight is not on its grid (codes only; the outputs are then void).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> nm_encode(
    const at::Tensor& bits, int64_t value_type, int64_t n, int64_t m, const at::Tensor& numbers,
    const at::Tensor& positions, const at::Tensor& digits, const at::Tensor& scale, const at::Tensor& zero,
    int64_t code_bits, int64_t group_width) {
  const int bytes = value_bytes(bits, "nm_encode");
  const NMTables t = nm_tables(n, m, numbers, positions, digits);
  if (bits.dim() != 2 || bits.size(1) % m) throw std::invalid_argument("nm_encode: a matrix whose width M divides");
  if (bytes != (value_type == kValueF32 ? 4 : 2)) throw std::invalid_argument("nm_encode: value type and bits differ");
  const int64_t rows = bits.size(0), columns = bits.size(1), groups = columns / m, per_row = groups * n;
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
    for (int64_t r = begin; r < end && status.load(std::memory_order_relaxed) == 0; ++r) {
      uint8_t* code_row = grid.on() ? reinterpret_cast<uint8_t*>(value_data + r * value_row) : nullptr;
      const int64_t found = with_row_kernel(value_type, m, [&](auto type, auto kM) {
        using T = Bits<decltype(type)::value>;
        return nm_encode_row<decltype(type)::value, decltype(kM)::value>(
            reinterpret_cast<const T*>(data) + r * columns, columns, t, grid, r, pattern_data + r * pattern_bytes,
            mask_data + r * row_bytes(columns), reinterpret_cast<T*>(value_data + r * value_row), code_row);
      });
      if (found) status.store(found);
    }
  });
  return {patterns, mask, values, status.load()};
}

// One row, each group of M built in registers and stored whole (no clearing pass, no scattered
// stores); kM is M when known at compile time (0: read it from the tables).
template <int64_t kType, int kM, typename T = Bits<kType>>
bool nm_decode_row(const uint8_t* pattern_row, int64_t pattern_bytes, int64_t groups, const NMTables& t,
                   const Grid& grid, int64_t r, const T* value_row, const uint8_t* code_row, T* row) {
  const int m = kM ? kM : int(t.m), n = int(t.n), k = int(t.k), code_bits = int(grid.bits);
  const int16_t* const digits = t.digits;
  const uint8_t* const positions = t.positions;
  const bool quantized = grid.on();
  const uint32_t code_mask = (1u << code_bits) - 1;
  GridCursor cursor(grid, r);
  uint64_t pending = 0;  // code bits read ahead, LSB first
  int filled = 0;
  CodeTable<kType> table;
  if (quantized && code_bits <= 4 && grid.groups > 0) {
    const auto [s, z] = cursor.at(0);
    table.fill(s, z, 1 << code_bits);
  }
  for (int64_t b = 0, g = 0; b < pattern_bytes; ++b) {
    const int16_t* held = digits + int64_t(pattern_row[b]) * k;
    for (int d = 0; d < k; ++d, ++g) {
      if (held[d] < 0 || (g >= groups && held[d] != 0)) return false;
      if (g >= groups) continue;
      const uint8_t* kept = positions + held[d] * n;
      T group[16] = {};
      for (int i = 0; i < n; ++i) {
        if (!quantized) {
          group[kept[i]] = *value_row++;
          continue;
        }
        if (filled < code_bits) pending |= uint64_t(*code_row++) << filled, filled += 8;
        const uint32_t code = uint32_t(pending) & code_mask;
        pending >>= code_bits, filled -= code_bits;
        const int64_t column = g * m + kept[i];
        if (code_bits > 4) {
          const auto [s, z] = cursor.at(column);
          group[kept[i]] = from_float<kType>((float(code) - z) * s);
          continue;
        }
        if (cursor.moves(column)) {
          const auto [s, z] = cursor.at(column);
          table.fill(s, z, 1 << code_bits);
        }
        group[kept[i]] = table.words[code];
      }
      std::memcpy(row + g * m, group, m * sizeof(T));
    }
  }
  return true;
}

// Writes the dense matrix into ``out`` (rows, columns; float bits of ``value_type``) from pattern
// bytes and float bits or packed codes; returns false (``out`` then partly written) when a pattern
// byte is not one the encoder makes or the padding digits past the last group are not zero.
bool nm_decode(const at::Tensor& patterns, const at::Tensor& values, int64_t value_type, int64_t n, int64_t m,
               const at::Tensor& numbers, const at::Tensor& positions, const at::Tensor& digits,
               const at::Tensor& scale, const at::Tensor& zero, int64_t code_bits, int64_t group_width,
               at::Tensor& out) {
  const int bytes = value_bytes(out, "nm_decode");
  const NMTables t = nm_tables(n, m, numbers, positions, digits);
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
    for (int64_t r = begin; r < end && valid.load(std::memory_order_relaxed); ++r) {
      const char* from = value_data + r * value_row_bytes;
      const uint8_t* code_row = grid.on() ? reinterpret_cast<const uint8_t*>(from) : nullptr;
      const bool ok = with_row_kernel(value_type, m, [&](auto type, auto kM) {
        using T = Bits<decltype(type)::value>;
        return nm_decode_row<decltype(type)::value, decltype(kM)::value>(
            pattern_data + r * pattern_bytes, pattern_bytes, groups, t, grid, r, reinterpret_cast<const T*>(from),
            code_row, reinterpret_cast<T*>(data) + r * columns);
      });
      if (!ok) valid.store(false);
    }
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
}

}  // namespace sparsellm
