// Scalar stand-ins for the AVX-512 intrinsics SIMDe 0.7.4 lacks, for run.sh (tests only, never shipped):
// each does what Intel's guide says, lane by lane.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#define EMU static inline
#define P512(x) simde__m512_to_private(x)
#define P512I(x) simde__m512i_to_private(x)
#define P256I(x) simde__m256i_to_private(x)
#define P128I(x) simde__m128i_to_private(x)

EMU simde__m512i emu_maskz_expand_epi16(uint32_t k, simde__m512i a) {
  simde__m512i_private r = {}, s = P512I(a); int j = 0;
  for (int i = 0; i < 32; ++i) r.i16[i] = ((k >> i) & 1) ? s.i16[j++] : 0;
  return simde__m512i_from_private(r);
}
EMU simde__m256i emu256_maskz_expand_epi16(uint16_t k, simde__m256i a) {
  simde__m256i_private r = {}, s = P256I(a); int j = 0;
  for (int i = 0; i < 16; ++i) r.i16[i] = ((k >> i) & 1) ? s.i16[j++] : 0;
  return simde__m256i_from_private(r);
}
EMU simde__m512i emu_maskz_expand_epi32(uint16_t k, simde__m512i a) {
  simde__m512i_private r = {}, s = P512I(a); int j = 0;
  for (int i = 0; i < 16; ++i) r.i32[i] = ((k >> i) & 1) ? s.i32[j++] : 0;
  return simde__m512i_from_private(r);
}
EMU simde__m512 emu_maskz_expand_ps(uint16_t k, simde__m512 a) {
  simde__m512_private r = {}, s = P512(a); int j = 0;
  for (int i = 0; i < 16; ++i) r.f32[i] = ((k >> i) & 1) ? s.f32[j++] : 0.0f;
  return simde__m512_from_private(r);
}
EMU simde__m128i emu128_maskz_expand_epi8(uint16_t k, simde__m128i a) {
  simde__m128i_private r = {}, s = P128I(a); int j = 0;
  for (int i = 0; i < 16; ++i) r.i8[i] = ((k >> i) & 1) ? s.i8[j++] : 0;
  return simde__m128i_from_private(r);
}
EMU simde__m512i emu_maskz_compress_epi16(uint32_t k, simde__m512i a) {
  simde__m512i_private r = {}, s = P512I(a); int j = 0;
  for (int i = 0; i < 32; ++i) if ((k >> i) & 1) r.i16[j++] = s.i16[i];
  return simde__m512i_from_private(r);
}
EMU simde__m512i emu_maskz_loadu_epi16(uint32_t k, const void* p) {
  simde__m512i_private r = {}; const int16_t* q = static_cast<const int16_t*>(p);
  for (int i = 0; i < 32; ++i) if ((k >> i) & 1) r.i16[i] = q[i];
  return simde__m512i_from_private(r);
}
EMU simde__m256i emu256_maskz_loadu_epi16(uint16_t k, const void* p) {
  simde__m256i_private r = {}; const int16_t* q = static_cast<const int16_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) r.i16[i] = q[i];
  return simde__m256i_from_private(r);
}
EMU simde__m512i emu_maskz_loadu_epi32(uint16_t k, const void* p) {
  simde__m512i_private r = {}; const int32_t* q = static_cast<const int32_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) r.i32[i] = q[i];
  return simde__m512i_from_private(r);
}
EMU simde__m128i emu128_maskz_loadu_epi8(uint16_t k, const void* p) {
  simde__m128i_private r = {}; const int8_t* q = static_cast<const int8_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) r.i8[i] = q[i];
  return simde__m128i_from_private(r);
}
EMU void emu_mask_storeu_epi16(void* p, uint32_t k, simde__m512i a) {
  simde__m512i_private s = P512I(a); int16_t* q = static_cast<int16_t*>(p);
  for (int i = 0; i < 32; ++i) if ((k >> i) & 1) q[i] = s.i16[i];
}
EMU void emu256_mask_storeu_epi16(void* p, uint16_t k, simde__m256i a) {
  simde__m256i_private s = P256I(a); int16_t* q = static_cast<int16_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) q[i] = s.i16[i];
}
EMU void emu_mask_storeu_epi32(void* p, uint16_t k, simde__m512i a) {
  simde__m512i_private s = P512I(a); int32_t* q = static_cast<int32_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) q[i] = s.i32[i];
}
EMU void emu_mask_cvtepi32_storeu_epi8(void* p, uint16_t k, simde__m512i a) {
  simde__m512i_private s = P512I(a); int8_t* q = static_cast<int8_t*>(p);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) q[i] = int8_t(s.i32[i]);
}
EMU simde__m256i emu_cvtepi32_epi16(simde__m512i a) {
  simde__m512i_private s = P512I(a); simde__m256i_private r;
  for (int i = 0; i < 16; ++i) r.i16[i] = int16_t(s.i32[i]);
  return simde__m256i_from_private(r);
}
EMU simde__m512 emu_cvtepi32_ps(simde__m512i a) {
  simde__m512i_private s = P512I(a); simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = float(s.i32[i]);
  return simde__m512_from_private(r);
}
EMU simde__m512i emu_cvtepu16_epi32(simde__m256i a) {
  simde__m256i_private s = P256I(a); simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = s.u16[i];
  return simde__m512i_from_private(r);
}
EMU simde__m512i emu_cvtepu8_epi32(simde__m128i a) {
  simde__m128i_private s = P128I(a); simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = s.u8[i];
  return simde__m512i_from_private(r);
}
EMU simde__m512 emu_cvtph_ps(simde__m256i a) {
  simde__m256i_private s = P256I(a); simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = _cvtsh_ss(s.u16[i]);
  return simde__m512_from_private(r);
}
EMU simde__m256i emu_cvtps_ph(simde__m512 a, int) {
  simde__m512_private s = P512(a); simde__m256i_private r;
  for (int i = 0; i < 16; ++i) r.u16[i] = _cvtss_sh(s.f32[i], 0);
  return simde__m256i_from_private(r);
}
EMU simde__m512i emu_cvttps_epi32(simde__m512 a) {
  simde__m512_private s = P512(a); simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = (std::isnan(s.f32[i]) || std::fabs(s.f32[i]) >= 2147483648.0f) ? INT32_MIN : int32_t(s.f32[i]);
  return simde__m512i_from_private(r);
}
EMU uint16_t emu_mask_cmp_unord_ps_mask(uint16_t k, simde__m512 a, simde__m512 b) {
  simde__m512_private x = P512(a), y = P512(b); uint16_t r = 0;
  for (int i = 0; i < 16; ++i) if (((k >> i) & 1) && (std::isnan(x.f32[i]) || std::isnan(y.f32[i]))) r |= uint16_t(1u << i);
  return r;
}
EMU uint16_t emu_mask_cmpneq_epi32_mask(uint16_t k, simde__m512i a, simde__m512i b) {
  simde__m512i_private x = P512I(a), y = P512I(b); uint16_t r = 0;
  for (int i = 0; i < 16; ++i) if (((k >> i) & 1) && x.i32[i] != y.i32[i]) r |= uint16_t(1u << i);
  return r;
}
EMU float emu_reduce_add_ps(simde__m512 a) {
  simde__m512_private s = P512(a); float t[16];
  for (int i = 0; i < 16; ++i) t[i] = s.f32[i];
  for (int w = 8; w >= 1; w /= 2) for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

#define _mm512_maskz_expand_epi16 emu_maskz_expand_epi16
#define _mm256_maskz_expand_epi16 emu256_maskz_expand_epi16
#define _mm512_maskz_expand_epi32 emu_maskz_expand_epi32
#define _mm512_maskz_expand_ps emu_maskz_expand_ps
#define _mm_maskz_expand_epi8 emu128_maskz_expand_epi8
#define _mm512_maskz_compress_epi16 emu_maskz_compress_epi16
#define _mm512_maskz_loadu_epi16 emu_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 emu256_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi32 emu_maskz_loadu_epi32
#define _mm_maskz_loadu_epi8 emu128_maskz_loadu_epi8
#define _mm512_mask_storeu_epi16 emu_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 emu256_mask_storeu_epi16
#define _mm512_mask_storeu_epi32 emu_mask_storeu_epi32
#define _mm512_mask_cvtepi32_storeu_epi8 emu_mask_cvtepi32_storeu_epi8
#define _mm512_cvtepi32_epi16 emu_cvtepi32_epi16
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_cvtepu8_epi32 emu_cvtepu8_epi32
#define _mm512_cvtph_ps emu_cvtph_ps
#define _mm512_cvtps_ph emu_cvtps_ph
#define _mm512_cvttps_epi32 emu_cvttps_epi32
#define _mm512_mask_cmp_ps_mask(k, a, b, p) emu_mask_cmp_unord_ps_mask(k, a, b)
#define _mm512_mask_cmpneq_epi32_mask emu_mask_cmpneq_epi32_mask
#define _mm512_reduce_add_ps emu_reduce_add_ps
#define _mm_popcnt_u64(x) __builtin_popcountll(x)
