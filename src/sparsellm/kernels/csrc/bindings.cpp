// Python bindings: argument checks, input preparation (fp32, zero-padded), threading with
// at::parallel_for, and the choice of the ISA-specific kernel (checked against the running CPU).
// Bound with pybind11 (a call costs a few microseconds, a third of a dispatcher op's with a custom
// class argument) through torch's caster header alone, not torch/extension.h, to halve the build.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace sparsellm {
namespace {

// AMX needs the CPU's tile and bfloat16 tile instructions, and Linux's permission to use the tile
// state (asked once per process; a kernel before 5.16 does not grant it).
bool amx_usable() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!amx_compiled() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tiles = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return tiles && bf16 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAmx) return cpu_has(kAvx512) && amx_usable();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  if (isa == kAvx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi2");
#else
  (void)isa;
  return false;
#endif
}

// Whether torch's bfloat16 GEMM has hardware under it (AVX512_BF16; the Xeons with AMX have it):
// without it, it ran 5x slower than float32 (Zen 3, 64 x 4096 x 4096: 110 vs 21 ms).
bool has_bf16_dot_products() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> found;
  if (cpu_has(kAmx)) found.push_back("amx");
  if (cpu_has(kAvx512)) found.push_back("avx512");
  if (cpu_has(kAvx2)) found.push_back("avx2");
  return found;
}

const void* data_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

// The runtime layout of one matrix, as the Python side (layouts.py) holds it.
Weights unpack(int64_t format, int64_t codec, int64_t rows, int64_t cols, int64_t panel, int64_t group,
               bool input_major, const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
               const at::Tensor& positions, const at::Tensor& scales, const at::Tensor& biases) {
  TORCH_CHECK(cols % 64 == 0 && panel % 64 == 0 && panel > 0, "columns and panel must be multiples of 64");
  TORCH_CHECK(format >= kDense && format <= kNM24 && codec >= kF32 && codec <= kU4, "unknown format or codec");
  for (const at::Tensor* t : {&values, &mask, &offsets, &positions, &scales, &biases})
    TORCH_CHECK(t->numel() == 0 || (t->is_contiguous() && t->device().is_cpu()), "layout tensors must be contiguous CPU tensors");
  Weights w;
  w.format = int(format);
  w.codec = int(codec);
  w.rows = rows;
  w.cols = cols;
  w.panel = panel;
  w.values = data_or_null(values);
  w.mask = static_cast<const uint64_t*>(data_or_null(mask));
  w.offsets = offsets.numel() ? offsets.data_ptr<int64_t>() : nullptr;
  w.positions = static_cast<const uint32_t*>(data_or_null(positions));
  w.scales = scales.numel() ? scales.data_ptr<float>() : nullptr;
  w.biases = biases.numel() ? biases.data_ptr<float>() : nullptr;
  w.group = group;
  w.groups = group > 0 ? (input_major ? (rows + group - 1) / group : (cols + group - 1) / group) : 0;
  w.input_major = input_major;
  TORCH_CHECK(w.values != nullptr, "no values");
  TORCH_CHECK(format != kBitmask || (w.mask && w.offsets), "bitmask layout without mask or offsets");
  TORCH_CHECK(format != kNM24 || w.positions, "2:4 layout without positions");
  TORCH_CHECK(codec < kU8 || (w.scales && w.biases && group % 64 == 0), "quantized layout without scales, or group not a multiple of 64");
  return w;
}

// Threads pay off only with enough work each: this many weights per chunk of rows at least (an
// OpenMP region costs microseconds, and far more when the machine is busy).
constexpr int64_t kMinWeightsPerThread = 1 << 16;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(16, kMinWeightsPerThread / std::max<int64_t>(cols, 1)); }

// Where column j of a block of 32 goes in the even/odd lane order of kernels.h.
inline int64_t even_odd_index(int64_t j) { return (j & ~int64_t(31)) + ((j & 1) << 4) + ((j & 31) >> 1); }

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

// x (n, features; float32, bfloat16 or float16) as float32 (n, width), zero-padded, with |x| <=
// threshold zeroed when threshold >= 0 (activation sparsity; NaN too) and, if asked, in even/odd
// lane order. One pass in C++: this runs for every layer of every decoded token, where a chain of
// small tensor operations would cost more than the product itself; threaded over tokens when they
// are many (prefill: one thread took 0.3-0.5 ms a layer at 512 tokens, 5 % of the sample's prefill,
// and ATen's abs / compare / fill two fifths of a 256 x 2048 layer's time).
at::Tensor prepare(const at::Tensor& x, int64_t width, double threshold, bool even_odd = false) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= width, "input must be (tokens, features)");
  const at::Tensor input = x.contiguous();
  const int64_t n = input.size(0), features = input.size(1);
  at::Tensor out = at::empty({n, width}, input.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const bool drop = threshold >= 0;
  const float cut = float(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "prepare", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kMinWeightsPerThread / width), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* from = in + t * features;
        float* row = o + t * width;
        // by value: a float captured by reference might alias the row, and the loop would reload it
        auto kept = [from, drop, cut](int64_t j) {
          const float v = as_float(from[j]);
          return drop && !(std::fabs(v) > cut) ? 0.0f : v;
        };
        if (even_odd) {
          std::fill(row, row + width, 0.0f);
          for (int64_t j = 0; j < features; ++j) row[even_odd_index(j)] = kept(j);
        } else {  // a plain loop, which the compiler vectorises
          for (int64_t j = 0; j < features; ++j) row[j] = kept(j);
          std::fill(row + features, row + width, 0.0f);
        }
      }
    });
  });
  return out;
}

bool use_avx512(int64_t isa) {
  TORCH_CHECK(isa == kAmx || isa == kAvx512 || isa == kAvx2, "unknown instruction set");
  TORCH_CHECK(cpu_has(Isa(isa)), "this CPU cannot run the ", isa == kAmx ? "AMX" : isa == kAvx512 ? "AVX-512" : "AVX2",
              " kernels");
  return isa >= kAvx512;
}

// A layout's tensors, unpacked once into the struct the kernels read (and kept alive with it), so
// a call passes one object instead of a dozen arguments.
struct Handle {
  Weights w;
  int64_t out_features = 0, in_features = 0;
  std::vector<at::Tensor> tensors;
};

std::shared_ptr<Handle> make_handle(int64_t out_features, int64_t in_features, int64_t format, int64_t codec,
                                    int64_t rows, int64_t cols, int64_t panel, int64_t group, bool input_major,
                                    const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                                    const at::Tensor& positions, const at::Tensor& scales, const at::Tensor& biases) {
  auto handle = std::make_shared<Handle>();
  handle->w = unpack(format, codec, rows, cols, panel, group, input_major, values, mask, offsets, positions, scales,
                     biases);
  handle->out_features = out_features;
  handle->in_features = in_features;
  handle->tensors = {values, mask, offsets, positions, scales, biases};
  TORCH_CHECK((input_major ? cols : rows) >= out_features && (input_major ? rows : cols) >= in_features,
              "layout smaller than its features");
  return handle;
}

// A (rows, cols) buffer of `dtype` kept from call to call (per calling thread), valid until the
// thread asks for one again: a fresh one of a few MiB each call is fresh pages from the kernel,
// zeroed on first touch, at a cost near the decoding's. A view over the memory, not a tensor op:
// narrowing and viewing took ~3 us, a sixth of a small decoded layer.
at::Tensor scratch(int64_t rows, int64_t cols, at::ScalarType dtype) {
  thread_local at::Tensor bytes;
  const int64_t needed = rows * cols * int64_t(at::elementSize(dtype));
  if (!bytes.defined() || bytes.numel() < needed) bytes = at::empty({needed}, at::TensorOptions().dtype(at::kByte));
  return at::from_blob(bytes.data_ptr(), {rows, cols}, at::TensorOptions().dtype(dtype));
}

// Float32 results of the kernels: `parts` partial sums (one per thread), each (tokens, ld), in
// natural column order or in the even/odd lane order of kernels.h.
struct Partials {
  const float* y;
  int64_t ld, parts = 1;
  bool even_odd = false;
};

// f rounded to the nearest even value of type T, as ATen's conversion does. For bfloat16 without a
// branch, so that loops of it vectorise: c10's conversion did not, and the output layer's 49152
// values took 0.14 ms.
template <typename T>
inline T rounded(float f) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t nearest_even = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return T(uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : nearest_even), T::from_bits());
  } else {
    return static_cast<T>(f);
  }
}

// The layer's output (n tokens, `width` features) in its own dtype, columns [c0, c1): out[t, c] =
// the sum of the partials at (t, c) + bias[c], rounded once.
void store_columns(const Partials& p, const float* bias, at::Tensor& out, int64_t n, int64_t width, int64_t c0,
                   int64_t c1) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "store_columns", [&] {
    scalar_t* o = out.data_ptr<scalar_t>() + c0;
    for (int64_t t = 0; t < n; ++t, o += width) {
      const float* row = p.y + t * p.ld;
      if (p.parts == 1 && !p.even_odd) {  // the GEMV's case: a loop the compiler vectorises
        for (int64_t c = c0; c < c1; ++c) o[c - c0] = rounded<scalar_t>(row[c] + (bias ? bias[c] : 0.0f));
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = p.even_odd ? even_odd_index(c) : c;
        float sum = bias ? bias[c] : 0.0f;
        for (int64_t part = 0; part < p.parts; ++part) sum += row[part * n * p.ld + at];
        o[c - c0] = rounded<scalar_t>(sum);
      }
    }
  });
}

// Tokens from which a row-major product with bfloat16 weights runs on AMX tiles. Their cost hardly
// grows up to 16 tokens; the FMA GEMV's does. Measured (4096², 50 % bitmask, 2 threads, weights
// cold): tiles 2.0 / 2.2 / 2.1 ms at 2 / 4 / 8 tokens, the GEMV 1.4 / 1.7 / 4.0 ms.
constexpr int64_t kTileMinTokens = 6;

// y = x W^T on AMX tiles (see amx.cpp): threads take chunks of 64 rows (two of its blocks).
at::Tensor tiles(const at::Tensor& x, const Weights& w, double threshold) {
  const at::Tensor xp = prepare(x, w.cols, threshold);
  const int64_t n = xp.size(0), groups = (n + 15) / 16;
  const bool split = x.scalar_type() != at::kBFloat16;  // bfloat16 inputs are exact in one part
  at::Tensor packed = at::empty({groups * (w.cols / 32) * (split ? 2 : 1) * 512}, xp.options().dtype(at::kShort));
  auto* words = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
  pack_tokens_amx(xp.data_ptr<float>(), n, w.cols, split, words);
  at::Tensor y = at::empty({n, w.rows}, xp.options());
  at::parallel_for(0, (w.rows + 63) / 64, std::max<int64_t>(1, row_grain(w.cols) / 64), [&](int64_t b0, int64_t b1) {
    gemm_amx(w, words, n, split, 64 * b0, std::min(w.rows, 64 * b1), y.data_ptr<float>(), w.rows);
  });
  return y;
}

// out = s(x) W^T (+ bias) for a row-major layout (rows = output features). Each thread writes its
// rows of the output itself, in the output's dtype: decoding calls this for every layer of every
// token, and a zeroed y, its narrowing, bias and conversion by ATen cost ~4.5 us a call with
// bfloat16 inputs (8 x 64: 7.5 -> 3.1 us; 192 x 576, weights cold: 25 -> 21 us; Zen 3).
void gemv(const at::Tensor& x, const Weights& w, int64_t isa, double threshold, const float* bias, int64_t features,
          at::Tensor& out) {
  const at::Tensor xp = prepare(x, w.cols, threshold, even_odd_lanes(isa, w));
  const int64_t n = xp.size(0);
  const bool direct = out.scalar_type() == at::kFloat && features == w.rows && !bias;
  float* y = direct ? out.data_ptr<float>() : scratch(n, w.rows, at::kFloat).data_ptr<float>();
  const Batch b{xp.data_ptr<float>(), n, w.cols, y, w.rows};
  auto run = [&](auto kernel) {
    at::parallel_for(0, w.rows, row_grain(w.cols), [&](int64_t r0, int64_t r1) {
      for (int64_t t = 0; t < n; ++t) std::fill(y + t * w.rows + r0, y + t * w.rows + r1, 0.0f);
      kernel(w, b, r0, r1);
      if (!direct) store_columns({y, w.rows}, bias, out, n, features, r0, std::min(r1, features));
    });
  };
  use_avx512(isa) ? run(gemv_avx512) : run(gemv_avx2);
}

// The same on AMX tiles (amx.cpp): threads split the inputs in blocks of 32, and their partial sums
// (tile after tile) are added into y.
at::Tensor tiles_input_major(const at::Tensor& x, const Weights& w, double threshold, int64_t out_features) {
  const at::Tensor xp = prepare(x, w.rows, threshold);
  const int64_t n = xp.size(0), groups = (n + 15) / 16, blocks = (w.rows + 31) / 32;
  const bool split = x.scalar_type() != at::kBFloat16;
  at::Tensor tiles = at::empty({(split ? 2 : 1) * groups * blocks * 512}, xp.options().dtype(at::kShort));
  auto* words = reinterpret_cast<uint16_t*>(tiles.data_ptr<int16_t>());
  split_rows_amx(xp.data_ptr<float>(), n, w.rows, split, words);
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), blocks, blocks * 32 * w.cols / kMinWeightsPerThread}));
  at::Tensor partial = scratch(parts, groups * 16 * w.cols, at::kFloat);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part)
      input_major_amx(w, words, n, split, 32 * (blocks * part / parts), std::min(w.rows, 32 * (blocks * (part + 1) / parts)),
                      partial[part].data_ptr<float>());
  });
  at::Tensor y = at::empty({n, out_features}, xp.options());
  const float* sums = partial.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c0 = 0; c0 < out_features; c0 += 16) {  // token t's 16 outputs of a tile lie in a row
      const float* from = sums + ((t / 16) * (w.cols / 16) + c0 / 16) * 256 + (t % 16) * 16;
      float* to = out + t * out_features + c0;
      const int64_t width = std::min<int64_t>(16, out_features - c0);
      std::copy(from, from + width, to);
      for (int64_t part = 1; part < parts; ++part)
        for (int64_t c = 0; c < width; ++c) to[c] += from[part * groups * 16 * w.cols + c];
    }
  return y;
}

// out = s(x) W^T (+ bias) with an input-major layout (rows = input features, cols = padded output
// features), s zeroing |x| <= threshold; only the rows of surviving inputs are read. Threads split
// the inputs (not the outputs), so each streams long contiguous runs, and their partial sums are
// added as the output is written.
void input_major(const at::Tensor& x, const Weights& w, int64_t isa, double threshold, const float* bias,
                 int64_t features, at::Tensor& out) {
  const at::Tensor xp = prepare(x, w.rows, threshold);
  const int64_t n = xp.size(0);
  const float* xs = xp.data_ptr<float>();
  std::vector<int32_t> active;
  active.reserve(w.rows);
  for (int64_t j = 0; j < w.rows; ++j)
    for (int64_t t = 0; t < n; ++t)
      if (xs[t * w.rows + j] != 0.0f) { active.push_back(int32_t(j)); break; }
  const int64_t work = int64_t(active.size()) * w.cols;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWeightsPerThread));
  float* partial = scratch(threads * n, w.cols, at::kFloat).data_ptr<float>();
  auto run = [&](auto kernel) {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t part = t0; part < t1; ++part) {  // one part per thread
        const int64_t lo = int64_t(active.size()) * part / threads, hi = int64_t(active.size()) * (part + 1) / threads;
        float* y = partial + part * n * w.cols;
        std::fill(y, y + n * w.cols, 0.0f);
        kernel(w, Batch{xs, n, w.rows, y, w.cols}, Active{active.data() + lo, hi - lo});
      }
    });
  };
  use_avx512(isa) ? run(input_major_avx512) : run(input_major_avx2);
  store_columns({partial, w.cols, threads, even_odd_lanes(isa, w)}, bias, out, n, features, 0, features);
}

// Rows [row_begin, row_end) of panel p, dense, into `out` (float32, or bfloat16 for bfloat16 values).
void decode_rows(const Weights& w, int64_t isa, int64_t p, int64_t row_begin, int64_t row_end, at::Tensor& out) {
  const int64_t width = w.panel_width(p);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || w.codec == kBF16, "only bfloat16 values decode to bfloat16");
  auto run = [&](auto kernel, auto kernel_bf16) {
    at::parallel_for(row_begin, row_end, row_grain(width), [&](int64_t r0, int64_t r1) {
      if (bf16)
        kernel_bf16(w, p, r0, r1, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + (r0 - row_begin) * width, width);
      else
        kernel(w, p, r0, r1, out.data_ptr<float>() + (r0 - row_begin) * width, width);
    });
  };
  use_avx512(isa) ? run(decode_avx512, decode_bf16_avx512) : run(decode_avx2, decode_bf16_avx2);
}

// The dense path for many tokens (prefill): decode a block of rows at a time into a buffer that
// stays in cache and multiply it with the BLAS GEMM. The matrix is never dense in memory as a
// whole. Input-major layouts give y = x W (rows = inputs), row-major y = x W^T. The GEMM runs in
// bfloat16 only when inputs and weights are bfloat16 already (rounding other values would change
// them) and the CPU has bfloat16 dot products (see has_bf16_dot_products). Blocks have from
// `block_rows` to twice as many rows, as even as they divide: at 512 tokens (Zen 3, MKL), the
// sample's output layer (49152 x 576) in blocks of 512 rows ran 1.06x torch's one GEMM, in blocks
// of 4 MiB (1820 rows) 0.84-0.88x; a 576-row matrix ran 4 % slower as 512 + 64 rows than whole.
// Input-major blocks cut the sum (rows are inputs) and each re-reads y, so they are 4x larger:
// TinyLlama's 2048 x 2048 ran 0.84x torch in blocks of 512 rows, 0.96x in one block.
at::Tensor dense(const at::Tensor& x, const Handle& h, int64_t isa, double threshold, int64_t block_rows) {
  const Weights& w = h.w;
  static const bool bf16_gemm = has_bf16_dot_products();
  const auto dtype = bf16_gemm && x.scalar_type() == at::kBFloat16 && w.codec == kBF16 ? at::kBFloat16 : at::kFloat;
  const int64_t width = w.input_major ? w.rows : w.cols;
  // x goes to the GEMM as it is when it needs no padding or threshold (converted if need be: exact
  // for bfloat16 inputs), else through prepare
  const at::Tensor xp = (threshold < 0 && x.size(1) == width ? x : prepare(x, width, threshold)).to(dtype).contiguous();
  // Every part of y is first written with beta = 0 (its old value unread), then accumulated into.
  at::Tensor y = at::empty({x.size(0), w.input_major ? w.cols : w.rows}, x.options().dtype(dtype));
  // Float values stored dense are a matrix already: multiply them where they lie (a panel at a time
  // when they are in the GEMM's dtype, else a block of rows converted at a time).
  const bool stored_dense = w.format == kDense && w.codec <= kF16;
  const bool in_place = stored_dense && (w.codec == kBF16 ? dtype == at::kBFloat16 : w.codec == kF32 && dtype == at::kFloat);
  const int64_t blocks = std::max<int64_t>(1, w.rows / std::max<int64_t>(16, w.input_major ? 4 * block_rows : block_rows));
  const int64_t block = in_place ? w.rows : (w.rows + blocks - 1) / blocks;
  for (int64_t p = 0; p < w.panels(); ++p) {
    const int64_t panel_width = w.panel_width(p);
    at::Tensor buffer = in_place ? at::Tensor() : scratch(block, panel_width, dtype);
    for (int64_t r0 = 0; r0 < w.rows; r0 += block) {
      const int64_t r1 = std::min(w.rows, r0 + block);
      at::Tensor tile = buffer.defined() ? buffer.narrow(0, 0, r1 - r0) : at::Tensor();
      if (!stored_dense) {
        decode_rows(w, isa, p, r0, r1, tile);
      } else {
        at::Tensor stored = h.tensors[0].narrow(0, w.rows * p * w.panel + r0 * panel_width, (r1 - r0) * panel_width)
                                .view({r1 - r0, panel_width});
        tile = in_place ? stored : tile.copy_(stored);
      }
      if (w.input_major)
        y.narrow(1, p * w.panel, panel_width).addmm_(xp.narrow(1, r0, r1 - r0), tile, r0 == 0 ? 0 : 1);
      else
        y.narrow(1, r0, r1 - r0).addmm_(xp.narrow(1, p * w.panel, panel_width), tile.t(), p == 0 ? 0 : 1);
    }
  }
  return y;
}

// The layer: y (..., out_features) in x's dtype = s(x) W^T + bias, with s zeroing |x| <= threshold
// (threshold < 0: no activation sparsity), through the sparse kernel or the dense path.
at::Tensor linear(const at::Tensor& x, const Handle& h, int64_t isa, double threshold, bool sparse,
                  const std::optional<at::Tensor>& bias, int64_t block_rows) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == h.in_features, "input has ", x.size(-1), " features, the layer ",
              h.in_features);
  const at::Tensor flat = x.reshape({-1, h.in_features});
  const Weights& w = h.w;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = h.out_features;
  const bool on_tiles = isa == kAmx && w.codec == kBF16 && flat.size(0) >= kTileMinTokens;
  if (sparse && !on_tiles) {  // the kernels write the output themselves
    const at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* b = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
    at::Tensor out = at::empty(shape, x.options());
    w.input_major ? input_major(flat, w, isa, threshold, b, h.out_features, out)
                  : gemv(flat, w, isa, threshold, b, h.out_features, out);
    return out;
  }
  at::Tensor y = !sparse ? dense(flat, h, isa, threshold, block_rows)
               : w.input_major ? tiles_input_major(flat, w, threshold, h.out_features) : tiles(flat, w, threshold);
  if (y.size(1) != h.out_features) y = y.narrow(1, 0, h.out_features);
  if (bias.has_value()) y = y.add(*bias);
  return (y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type())).reshape(shape);
}

// Rows [row_begin, row_end) of one panel as a dense fp32 matrix (rows x panel width).
at::Tensor decode(const Handle& h, int64_t panel_index, int64_t row_begin, int64_t row_end, int64_t isa) {
  const Weights& w = h.w;
  TORCH_CHECK(0 <= panel_index && panel_index < w.panels() && 0 <= row_begin && row_begin <= row_end && row_end <= w.rows,
              "panel or rows out of range");
  at::Tensor out = at::empty({row_end - row_begin, w.panel_width(panel_index)}, at::TensorOptions().dtype(at::kFloat));
  decode_rows(w, isa, panel_index, row_begin, row_end, out);
  return out;
}

// sum of a[i] * b[i] in float32, in eight running sums: a loop the compiler vectorises without
// reassociating
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += as_float(a[i + l]) * as_float(b[i + l]);
  float sum = 0.0f;
  for (; i < n; ++i) sum += as_float(a[i]) * as_float(b[i]);
  for (float lane : lanes) sum += lane;
  return sum;
}

// The Llama family's RMS normalisation of each row of x: weight * (x / sqrt(mean(x^2) + eps)) in
// float32, the normalised row rounded to x's dtype before the product with the weight (x's dtype
// too), which rounds again, as transformers' module computes it. One call for the module's eight
// tensor ops: a decoded token passes two of these a layer, and in a decoding model each op took
// ~10 us, the module ~90 us.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t width = weight.numel();
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == width && width > 0,
              "rms_norm: the input's last dimension must equal the weight's size");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: the input and the weight differ in dtype");
  const at::Tensor in = x.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t rows = in.numel() / width, grain = std::max<int64_t>(1, kMinWeightsPerThread / width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "rms_norm", [&] {
    const scalar_t* xs = in.data_ptr<scalar_t>();
    const scalar_t* ws = w.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = xs + r * width;
        const float scale = 1.0f / std::sqrt(dot(row, row, width) / float(width) + float(eps));
        scalar_t* o = os + r * width;
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t normalised = rounded<scalar_t>(as_float(row[c]) * scale);
          o[c] = rounded<scalar_t>(as_float(ws[c]) * as_float(normalised));
        }
      }
    });
  });
  return out;
}

// Attention of one new token per sequence, the decoding step: query (batch, heads, 1, dim), keys and
// values (batch, kv_heads, length, dim) with heads a multiple of kv_heads (grouped queries), no mask
// (every cached key is visible). softmax(scale q k^T) v in float32, returned as (batch, 1, heads,
// dim) in the query's dtype, the layout transformers' attention functions return. One call for
// what torch's scaled_dot_product_attention and transformers' glue around it did in ~10 ops.
// The query heads that share keys and values read them in one pass, on AVX2 (attention_chunk_avx2),
// and the keys go in chunks of kKeysPerChunk, each chunk's softmax partial sums merged at the end
// (flash-decoding), so that the threads share a sequence with few key heads. The chunks depend on
// the length only, not on the threads, so results do too. Each head reading the keys again, in code
// for any x86-64 with a scalar exp, had been 2.0-2.9x slower a layer at 128-2048 keys (sample and
// TinyLlama heads; benchmarks/ab_kernel_builds.py --attention).
constexpr int64_t kKeysPerChunk = 256;  // a multiple of 8 (the AVX2 chunk's scratch)

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes() && query.size(2) == 1 &&
                  query.size(0) == key.size(0) && query.size(3) == key.size(3) && query.size(3) > 0 &&
                  key.size(1) > 0 && key.size(2) > 0 && query.size(1) % key.size(1) == 0,
              "decode_attention: shapes do not fit one query token with grouped keys");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "decode_attention: query, keys and values differ in dtype");
  // keys and values are read where they lie when each token's vector is contiguous (a cache's
  // views of a longer buffer are), else copied
  const auto rows_of = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = query.contiguous(), k = rows_of(key), v = rows_of(value);
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), length = k.size(2), dim = q.size(3);
  const int64_t shared = heads / kv_heads, chunks = (length + kKeysPerChunk - 1) / kKeysPerChunk;
  const int64_t items = batch * kv_heads * chunks;  // (sequence, key head, chunk of keys)
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / (std::min(length, kKeysPerChunk) * dim * shared));
  // per item and query head of it: the chunk's top score, its sum of exp(score - top), and the
  // exp-weighted sum of its values (dim)
  const int64_t stride = dim + 2;
  std::vector<float> partial(items * shared * stride);
  at::Tensor out = at::empty({batch, 1, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qs = q.data_ptr<scalar_t>();
    const scalar_t* ks = k.data_ptr<scalar_t>();
    const scalar_t* vs = v.data_ptr<scalar_t>();
    constexpr int codec = std::is_same_v<scalar_t, float> ? kF32 : std::is_same_v<scalar_t, at::BFloat16> ? kBF16 : kF16;
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> queries(shared * dim), scores(shared * kKeysPerChunk);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t chunk = item % chunks, kv = (item / chunks) % kv_heads, b = item / (chunks * kv_heads);
        const int64_t first = chunk * kKeysPerChunk, count = std::min(length, first + kKeysPerChunk) - first;
        const scalar_t* keys = ks + b * k.stride(0) + kv * k.stride(1) + first * k.stride(2);
        const scalar_t* values = vs + b * v.stride(0) + kv * v.stride(1) + first * v.stride(2);
        for (int64_t g = 0; g < shared; ++g)
          for (int64_t d = 0; d < dim; ++d) queries[g * dim + d] = as_float(qs[((b * heads) + kv * shared + g) * dim + d]) * float(scale);
        float* result = partial.data() + item * shared * stride;
        if (dim % 8 == 0) {
          attention_chunk_avx2({queries.data(), shared, dim, count, keys, values, k.stride(2), v.stride(2), codec,
                                scores.data(), result});
          continue;
        }
        // other head sizes: the same sums, one lane at a time
        for (int64_t g = 0; g < shared; ++g) {
          float* r = result + g * stride;
          r[0] = -INFINITY;
          for (int64_t j = 0; j < count; ++j) {
            scores[g * kKeysPerChunk + j] = dot(queries.data() + g * dim, keys + j * k.stride(2), dim);
            r[0] = std::max(r[0], scores[g * kKeysPerChunk + j]);
          }
          r[1] = 0.0f;
          std::fill(r + 2, r + stride, 0.0f);
          for (int64_t j = 0; j < count; ++j) {
            const float p = std::exp(scores[g * kKeysPerChunk + j] - r[0]);
            r[1] += p;
            for (int64_t d = 0; d < dim; ++d) r[2 + d] += p * as_float(values[j * v.stride(2) + d]);
          }
        }
      }
    });
    scalar_t* os = out.data_ptr<scalar_t>();
    std::vector<float> sums(dim);
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
      const int64_t b = bh / heads, kv = (bh % heads) / shared, g = (bh % heads) % shared;
      const float* first = partial.data() + ((b * kv_heads + kv) * chunks * shared + g) * stride;
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * shared * stride]);
      std::fill(sums.begin(), sums.end(), 0.0f);
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* r = first + c * shared * stride;
        const float weight = std::exp(r[0] - top);  // 1 for a single chunk
        total += weight * r[1];
        for (int64_t d = 0; d < dim; ++d) sums[d] += weight * r[2 + d];
      }
      for (int64_t d = 0; d < dim; ++d) os[bh * dim + d] = rounded<scalar_t>(sums[d] / total);
    }
  });
  return out;
}

// The attention's projections split into heads, (batch, tokens, heads * dim) -> (batch, heads,
// tokens, dim), queries and keys rotated as transformers' apply_rotary_pos_emb computes it in their
// dtype: q * cos + rotate_half(q) * sin, each product and the sum rounded. cos and sin: (batch or 1,
// tokens, dim). One call for the ~20 tensor ops of the views, transposes and rotations (~120 us a
// decoded layer).
std::vector<at::Tensor> rotary_heads(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& cos, const at::Tensor& sin, int64_t dim) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.sizes() == key.sizes() && dim > 0 && dim % 2 == 0 &&
                  query.size(0) == key.size(0) && query.size(1) == key.size(1) && query.size(2) % dim == 0 &&
                  key.size(2) % dim == 0 && cos.dim() == 3 && cos.sizes() == sin.sizes() &&
                  (cos.size(0) == 1 || cos.size(0) == query.size(0)) && cos.size(1) == query.size(1) &&
                  cos.size(2) == dim,
              "rotary_heads: shapes do not fit (batch, tokens, heads * dim) projections and (batch, tokens, dim) angles");
  for (const at::Tensor* t : {&key, &value, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "rotary_heads: the inputs differ in dtype");
  const int64_t batch = query.size(0), tokens = query.size(1), heads = query.size(2) / dim, kv_heads = key.size(2) / dim;
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor c = cos.expand({batch, tokens, dim}).contiguous(), s = sin.expand({batch, tokens, dim}).contiguous();
  at::Tensor q_out = at::empty({batch, heads, tokens, dim}, q.options());
  at::Tensor k_out = at::empty({batch, kv_heads, tokens, dim}, q.options());
  at::Tensor v_out = at::empty({batch, kv_heads, tokens, dim}, q.options());
  const int64_t half = dim / 2, grain = std::max<int64_t>(1, kMinWeightsPerThread / ((heads + 2 * kv_heads) * dim));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_heads", [&] {
    auto rotate = [&](const scalar_t* in, const scalar_t* cs, const scalar_t* sn, scalar_t* out) {
      for (int64_t d = 0; d < dim; ++d) {
        const float turned = d < half ? -as_float(in[d + half]) : as_float(in[d - half]);
        const float straight = as_float(rounded<scalar_t>(as_float(in[d]) * as_float(cs[d])));
        out[d] = rounded<scalar_t>(straight + as_float(rounded<scalar_t>(turned * as_float(sn[d]))));
      }
    };
    const scalar_t *qs = q.data_ptr<scalar_t>(), *ks = k.data_ptr<scalar_t>(), *vs = v.data_ptr<scalar_t>();
    const scalar_t *cs = c.data_ptr<scalar_t>(), *sn = s.data_ptr<scalar_t>();
    scalar_t *qo = q_out.data_ptr<scalar_t>(), *ko = k_out.data_ptr<scalar_t>(), *vo = v_out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * tokens, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t bt = t0; bt < t1; ++bt) {  // bt: a token of a sequence
        const int64_t b = bt / tokens, t = bt % tokens;
        for (int64_t h = 0; h < heads; ++h)
          rotate(qs + (bt * heads + h) * dim, cs + bt * dim, sn + bt * dim, qo + ((b * heads + h) * tokens + t) * dim);
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t at = ((b * kv_heads + h) * tokens + t) * dim;
          rotate(ks + (bt * kv_heads + h) * dim, cs + bt * dim, sn + bt * dim, ko + at);
          std::memcpy(vo + at, vs + (bt * kv_heads + h) * dim, dim * sizeof(scalar_t));
        }
      }
    });
  });
  return {q_out, k_out, v_out};
}

}  // namespace

void bind_codec(pybind11::module& m);  // codec.cpp
void bind_crc32(pybind11::module& m);  // crc32.cpp
void bind_moe(pybind11::module& m);  // moe.cpp

}  // namespace sparsellm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsellm CPU kernels for sparse and quantized linear layers";
  pybind11::class_<sparsellm::Handle, std::shared_ptr<sparsellm::Handle>>(m, "Handle");
  m.def("cpu_isas", &sparsellm::cpu_isas, "instruction sets of this CPU that the kernels can use, best first");
  m.def("has_bf16_dot_products", &sparsellm::has_bf16_dot_products, "whether this CPU multiplies bfloat16 (AVX512_BF16)");
  m.def("handle", &sparsellm::make_handle, "the kernels' view of a layout (see layouts.py)");
  m.def("linear", &sparsellm::linear, "y = s(x) W^T + bias through the sparse kernel or the dense path");
  m.def("decode", &sparsellm::decode, "rows of one panel as a dense fp32 matrix");
  m.def("decode_attention", &sparsellm::decode_attention, "softmax(scale q k^T) v for one query token, grouped keys");
  m.def("rotary_heads", &sparsellm::rotary_heads, "projections split into heads, queries and keys rotated");
  m.def("rms_norm", &sparsellm::rms_norm, "weight * x / sqrt(mean(x^2) + eps) per row, rounded as transformers'");
  sparsellm::bind_codec(m);
  sparsellm::bind_crc32(m);
  sparsellm::bind_moe(m);
}
