// Scalar stand-ins for the AVX-512 intrinsics SIMDe 0.7.4 lacks, for run.sh (tests only, never shipped):
// each does what Intel's guide says, lane by lane, on a copy of the vector's lanes.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace emulated {

template <typename L, int N>
struct Lanes {
  L at[N] = {};
};

// A vector's N lanes of type L, and back.
template <typename L, int N, typename V>
inline Lanes<L, N> lanes(const V& v) {
  static_assert(sizeof(V) >= N * sizeof(L));
  Lanes<L, N> out;
  std::memcpy(out.at, &v, sizeof out.at);
  return out;
}
template <typename V, typename L, int N>
inline V vector(const Lanes<L, N>& lanes) {
  V out{};
  std::memcpy(&out, lanes.at, sizeof lanes.at);
  return out;
}

inline bool bit(uint64_t mask, int i) { return (mask >> i) & 1; }

template <typename L, int N, typename V>
inline V maskz_expand(uint64_t k, V a) {
  const Lanes<L, N> in = lanes<L, N>(a);
  Lanes<L, N> out;
  for (int i = 0, j = 0; i < N; ++i) out.at[i] = bit(k, i) ? in.at[j++] : L(0);
  return vector<V>(out);
}
template <typename L, int N, typename V>
inline V maskz_compress(uint64_t k, V a) {
  const Lanes<L, N> in = lanes<L, N>(a);
  Lanes<L, N> out;
  for (int i = 0, j = 0; i < N; ++i) if (bit(k, i)) out.at[j++] = in.at[i];
  return vector<V>(out);
}
template <typename V, typename L, int N>
inline V maskz_load(uint64_t k, const void* p) {
  Lanes<L, N> out;
  for (int i = 0; i < N; ++i) if (bit(k, i)) out.at[i] = static_cast<const L*>(p)[i];
  return vector<V>(out);
}
// Stores lane i of a (as type To) where bit i of k is set.
template <typename L, int N, typename To = L, typename V>
inline void mask_store(void* p, uint64_t k, V a) {
  const Lanes<L, N> in = lanes<L, N>(a);
  for (int i = 0; i < N; ++i) if (bit(k, i)) static_cast<To*>(p)[i] = To(in.at[i]);
}
// 16 lanes converted one by one with f.
template <typename R, typename From, typename To, typename V, typename F>
inline R convert(V a, F f) {
  const Lanes<From, 16> in = lanes<From, 16>(a);
  Lanes<To, 16> out;
  for (int i = 0; i < 16; ++i) out.at[i] = f(in.at[i]);
  return vector<R>(out);
}
template <typename R, typename From, typename To, typename V>
inline R convert(V a) {
  return convert<R, From, To>(a, [](From v) { return To(v); });
}
// Bit i set where bit i of k is and test(lane i of a, lane i of b).
template <typename L, typename V, typename Test>
inline uint16_t compare(uint16_t k, V a, V b, Test test) {
  const Lanes<L, 16> x = lanes<L, 16>(a), y = lanes<L, 16>(b);
  uint16_t out = 0;
  for (int i = 0; i < 16; ++i) if (bit(k, i) && test(x.at[i], y.at[i])) out |= uint16_t(1u << i);
  return out;
}
inline int32_t truncated(float v) {  // out of range and NaN: the "integer indefinite" value
  return std::isnan(v) || std::fabs(v) >= 2147483648.0f ? INT32_MIN : int32_t(v);
}
inline float reduce_add(simde__m512 a) {  // a tree of sums, as the instruction sequence adds
  Lanes<float, 16> t = lanes<float, 16>(a);
  for (int w = 8; w >= 1; w /= 2) for (int i = 0; i < w; ++i) t.at[i] += t.at[i + w];
  return t.at[0];
}

}  // namespace emulated

#define _mm512_maskz_expand_epi16(k, a) emulated::maskz_expand<int16_t, 32>(k, a)
#define _mm256_maskz_expand_epi16(k, a) emulated::maskz_expand<int16_t, 16>(k, a)
#define _mm512_maskz_expand_epi32(k, a) emulated::maskz_expand<int32_t, 16>(k, a)
#define _mm512_maskz_expand_ps(k, a) emulated::maskz_expand<float, 16>(k, a)
#define _mm_maskz_expand_epi8(k, a) emulated::maskz_expand<int8_t, 16>(k, a)
#define _mm512_maskz_compress_epi16(k, a) emulated::maskz_compress<int16_t, 32>(k, a)
#define _mm512_maskz_loadu_epi16(k, p) emulated::maskz_load<simde__m512i, int16_t, 32>(k, p)
#define _mm256_maskz_loadu_epi16(k, p) emulated::maskz_load<simde__m256i, int16_t, 16>(k, p)
#define _mm512_maskz_loadu_epi32(k, p) emulated::maskz_load<simde__m512i, int32_t, 16>(k, p)
#define _mm_maskz_loadu_epi8(k, p) emulated::maskz_load<simde__m128i, int8_t, 16>(k, p)
#define _mm512_mask_storeu_epi16(p, k, a) emulated::mask_store<int16_t, 32>(p, k, a)
#define _mm256_mask_storeu_epi16(p, k, a) emulated::mask_store<int16_t, 16>(p, k, a)
#define _mm512_mask_storeu_epi32(p, k, a) emulated::mask_store<int32_t, 16>(p, k, a)
#define _mm512_mask_cvtepi32_storeu_epi8(p, k, a) emulated::mask_store<int32_t, 16, int8_t>(p, k, a)
#define _mm512_cvtepi32_epi16(a) emulated::convert<simde__m256i, int32_t, int16_t>(a)
#define _mm512_cvtepi32_ps(a) emulated::convert<simde__m512, int32_t, float>(a)
#define _mm512_cvtepu16_epi32(a) emulated::convert<simde__m512i, uint16_t, int32_t>(a)
#define _mm512_cvtepu8_epi32(a) emulated::convert<simde__m512i, uint8_t, int32_t>(a)
#define _mm512_cvtph_ps(a) emulated::convert<simde__m512, uint16_t, float>(a, [](uint16_t h) { return _cvtsh_ss(h); })
#define _mm512_cvtps_ph(a, rounding) \
  emulated::convert<simde__m256i, float, uint16_t>(a, [](float f) { return uint16_t(_cvtss_sh(f, 0)); })
#define _mm512_cvttps_epi32(a) emulated::convert<simde__m512i, float, int32_t>(a, emulated::truncated)
// the kernels compare only for "unordered" (NaN): the predicate argument is not read
#define _mm512_mask_cmp_ps_mask(k, a, b, predicate) \
  emulated::compare<float>(k, a, b, [](float x, float y) { return std::isnan(x) || std::isnan(y); })
#define _mm512_mask_cmpneq_epi32_mask(k, a, b) emulated::compare<int32_t>(k, a, b, [](int32_t x, int32_t y) { return x != y; })
#define _mm512_reduce_add_ps(a) emulated::reduce_add(a)
#define _mm_popcnt_u64(x) __builtin_popcountll(x)
