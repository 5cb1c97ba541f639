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
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>

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

}  // namespace

void bind_codec(pybind11::module& m) {
  m.def("bitmask_scan", &bitmask_scan, "(bitmask, non-zeros per row, fits 2:4) of a matrix of float bits");
  m.def("bitmask_gather", &bitmask_gather, "the values at a bitmask's set bits, row-major");
  m.def("bitmask_scatter", &bitmask_scatter, "a bitmask and its values written into a dense matrix");
}

}  // namespace sparsellm
