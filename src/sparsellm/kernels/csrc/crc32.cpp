// CRC-32 as zlib computes it (reflected polynomial 0xEDB88320, state inverted on entry and exit),
// the checksum compact.json records for every tensor. Blocks of 64 bytes are folded with carry-less
// multiplies (PCLMULQDQ, after Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
// Instruction"): four 128-bit lanes, each step multiplies a lane by x^(512 +- 32) mod P and adds the
// next 16 bytes; the lanes are folded into one, then reduced to 32 bits (Barrett). Short buffers,
// tails and CPUs without PCLMULQDQ take the byte-at-a-time table. zlib.crc32 here runs ~3 GB/s.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace sparsellm {
namespace {

constexpr uint32_t kPolynomial = 0xEDB88320u;

constexpr std::array<uint32_t, 256> byte_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t byte = 0; byte < 256; ++byte) {
    uint32_t crc = byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (crc & 1 ? kPolynomial : 0);
    table[byte] = crc;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = byte_table();

uint32_t crc_bytes(uint32_t state, const uint8_t* data, int64_t length) {
  for (int64_t i = 0; i < length; ++i) state = kTable[(state ^ data[i]) & 0xff] ^ (state >> 8);
  return state;
}

// Polynomials mod P, bit-reflected (bit 31 is x^0): a * b, and x^(8 * bytes), so that the CRC of
// A then B is crc(A) * x^(8 |B|) + crc(B) (zlib's crc32_combine): chunks are checksummed in parallel.
uint32_t multiply_mod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
    if (a & bit) product ^= b;
    b = b & 1 ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

uint32_t x_to_8n(int64_t bytes) {
  uint32_t power = 1u << 31, square = 1u << 23;  // x^0, and x^8 (one byte)
  for (; bytes; bytes >>= 1, square = multiply_mod(square, square))
    if (bytes & 1) power = multiply_mod(power, square);
  return power;
}

// x^k mod P for the fold distances, bit-reflected (the constants of the paper and of Linux's
// crc32-pclmul): 4 lanes apart (512 + 32, 512 - 32 bits), 1 lane apart (128 + 32, 128 - 32), 64 bits.
constexpr uint64_t kFold4Low = 0x154442bd4, kFold4High = 0x1c6e41596;
constexpr uint64_t kFold1Low = 0x1751997d0, kFold1High = 0x0ccaa009e;
constexpr uint64_t kFold64 = 0x163cd6124;
constexpr uint64_t kPolynomial33 = 0x1DB710641, kBarrett = 0x1F7011641;  // P(x) and floor(x^64 / P(x)), reflected

__attribute__((target("pclmul,sse4.1"))) inline __m128i fold(__m128i lane, __m128i constants, __m128i next) {
  const __m128i low = _mm_clmulepi64_si128(lane, constants, 0x00);
  const __m128i high = _mm_clmulepi64_si128(lane, constants, 0x11);
  return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

// ``length`` a multiple of 16, at least 64
__attribute__((target("pclmul,sse4.1"))) uint32_t crc_folded(uint32_t state, const uint8_t* data, int64_t length) {
  const auto load = [](const uint8_t* at) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at)); };
  __m128i x0 = _mm_xor_si128(load(data), _mm_cvtsi32_si128(int(state)));
  __m128i x1 = load(data + 16), x2 = load(data + 32), x3 = load(data + 48);
  const __m128i fold4 = _mm_set_epi64x(int64_t(kFold4High), int64_t(kFold4Low));
  int64_t at = 64;
  for (; at + 64 <= length; at += 64) {
    x0 = fold(x0, fold4, load(data + at));
    x1 = fold(x1, fold4, load(data + at + 16));
    x2 = fold(x2, fold4, load(data + at + 32));
    x3 = fold(x3, fold4, load(data + at + 48));
  }
  const __m128i fold1 = _mm_set_epi64x(int64_t(kFold1High), int64_t(kFold1Low));
  x0 = fold(x0, fold1, x1);
  x0 = fold(x0, fold1, x2);
  x0 = fold(x0, fold1, x3);
  for (; at < length; at += 16) x0 = fold(x0, fold1, load(data + at));

  const __m128i low32 = _mm_set_epi32(0, 0, 0, -1);
  // 128 -> 64 bits
  x0 = _mm_xor_si128(_mm_clmulepi64_si128(x0, fold1, 0x10), _mm_srli_si128(x0, 8));
  // 64 -> 32 bits
  x0 = _mm_xor_si128(_mm_srli_si128(x0, 4),
                     _mm_clmulepi64_si128(_mm_and_si128(x0, low32), _mm_set_epi64x(0, int64_t(kFold64)), 0x00));
  // Barrett reduction
  const __m128i barrett = _mm_set_epi64x(int64_t(kBarrett), int64_t(kPolynomial33));
  __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x0, low32), barrett, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), barrett, 0x00);
  return uint32_t(_mm_extract_epi32(_mm_xor_si128(t, x0), 1));
}

// zlib.crc32(data, crc) of a contiguous CPU tensor's bytes
int64_t crc32(const at::Tensor& tensor, int64_t crc) {
  if (!tensor.is_contiguous() || !tensor.device().is_cpu())
    throw std::invalid_argument("crc32: a contiguous CPU tensor");
  const uint8_t* data = static_cast<const uint8_t*>(tensor.data_ptr());
  const int64_t length = tensor.numel() * tensor.element_size();
  static const bool pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  const auto one_pass = [&](uint32_t state, const uint8_t* at, int64_t bytes) {  // zlib's crc32(state, at, bytes)
    state = ~state;
    const int64_t folded = pclmul && bytes >= 64 ? bytes / 16 * 16 : 0;
    if (folded) state = crc_folded(state, at, folded);
    return ~crc_bytes(state, at + folded, bytes - folded);
  };
  constexpr int64_t kChunk = int64_t(1) << 22;  // 4 MiB: below this, threads cost more than they save
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (length + kChunk - 1) / kChunk);
  pybind11::gil_scoped_release released;
  if (chunks <= 1) return one_pass(uint32_t(crc), data, length);
  const int64_t per_chunk = (length + chunks - 1) / chunks;
  std::vector<uint32_t> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      partial[c] = one_pass(0, data + c * per_chunk, std::min(per_chunk, length - c * per_chunk));
  });
  uint32_t state = uint32_t(crc);
  for (int64_t c = 0; c < chunks; ++c)
    state = multiply_mod(x_to_8n(std::min(per_chunk, length - c * per_chunk)), state) ^ partial[c];
  return int64_t(state);
}

}  // namespace

void bind_crc32(pybind11::module& m) {
  m.def("crc32", &crc32, "zlib.crc32 of a contiguous CPU tensor's bytes, continuing from crc");
}

}  // namespace sparsellm
