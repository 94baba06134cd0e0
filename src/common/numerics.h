// The quantization arithmetic every backend shares bit for bit (rounding rule in intfa.h).
// Host- and device-safe; the CUDA path uses the _rn intrinsics so no FMA contraction or
// fast-math can change a rounding.
#pragma once

#include <cstdint>

#include "common/params.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace intfa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kQMax = 127;    // symmetric int8 range used for Q, K, V (and paper's P)
constexpr int kPMaxU8 = 255;  // unsigned P levels of the accurate scheme

// Attention sinks (Options::sinks) at a row's end, in any backend's frame: a = log2 of the row's
// sum there (m + log2 l, -inf for a row that saw no key), z2 = (z - lse_offset) log2 e the sink
// logit in the same frame (the smoothed scores are shifted by lse_offset, the sink is not).
// The row's output is multiplied by scale = 2^a / (2^a + 2^z2), and lse2 = log2(2^a + 2^z2),
// taken around the larger term so nothing overflows, replaces a in the LSE. z2 = -inf gives
// scale 1 and lse2 = a exactly; a = -inf gives scale 0 (zeros, as without a sink) and lse2 = z2.
struct SinkFold {
  float scale, lse2;
};
// log2 of a row's softmax denominator (m the running max, l the sum in its frame); -inf for a
// row that saw no key. lse_of: the LSE written for it, natural log plus the K-smoothing offset.
INTFA_HD float row_log2_sum(float m, float l) { return l > 0.f ? m + log2f(l) : -INFINITY; }
INTFA_HD float lse_of(float lse2, float off) { return lse2 == -INFINITY ? -INFINITY : lse2 * kLn2 + off; }
// A sink logit z in the kernels' frame: z2 = (z - lse_offset) log2 e.
INTFA_HD float sink_frame(float z, float lse_offset) { return (z - lse_offset) * kLog2e; }
INTFA_HD SinkFold fold_sink(float a, float z2) {
  const float hi = a > z2 ? a : z2, lo = a > z2 ? z2 : a;
  if (!(hi > -INFINITY)) return {0.f, -INFINITY};  // no key and no sink
  const float lse2 = hi + log2f(1.f + exp2f(lo - hi));
  return {exp2f(a - lse2), lse2};
}

// Rows whose max |x| is below 2^-100 are treated as zero rows: 127/amax would overflow fp32
// for bf16 inputs near FLT_MIN, and such values are far below any meaningful attention input.
constexpr float kQuantTiny = 7.888609052210118e-31f;  // 2^-100

// IEEE division and product on both sides: the device spells them __fdiv_rn / __fmul_rn so no
// flag can make them approximate or contract them.
INTFA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
INTFA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
// Scale stored with the quantized tensor (dequantized x ~= x8 * s).
INTFA_HD float quant_scale(float amax) { return amax >= kQuantTiny ? div_rn(amax, 127.f) : 1.f; }
// Multiplier applied before rounding (1 for zero rows, so every |x| < 2^-100 rounds to 0).
INTFA_HD float quant_inv_scale(float amax) { return amax >= kQuantTiny ? div_rn(127.f, amax) : 1.f; }

// The multiplier of a value quantized against a stored scale s (append_kv's V): 1 / s, or 1 for
// anything below 2^-100, so no value becomes inf or NaN.
INTFA_HD float inv_of_scale(float s) { return s >= kQuantTiny ? div_rn(1.f, s) : 1.f; }

// Round half to even, then clamp to [-127, 127].
INTFA_HD int8_t quantize_s8(float x, float inv) {
#if defined(__CUDA_ARCH__)
  int r = __float2int_rn(__fmul_rn(x, inv));
#else
  int r = static_cast<int>(std::nearbyint(x * inv));
#endif
  r = r > kQMax ? kQMax : r;
  r = r < -kQMax ? -kQMax : r;
  return static_cast<int8_t>(r);
}

// append_kv's V: a new value clamps when |v| / s rounds past 127; the group's scale then grows to
// 1.25 x amax / 127 (headroom, so the scale grows by at least 25% each time and a cache is
// requantized only a few times over its life).
INTFA_HD bool v_needs_growth(float amax_new, float s) { return mul_rn(amax_new, inv_of_scale(s)) > 127.5f; }
INTFA_HD float grown_v_scale(float amax_new) { return mul_rn(quant_scale(amax_new), 1.25f); }
// A stored int8 value requantized from scale s to s2: round(x8 * s * (1 / s2)), each product
// rounded to fp32.
INTFA_HD int8_t requantize_s8(int8_t x8, float s, float s2) {
  return quantize_s8(mul_rn(static_cast<float>(x8), s), inv_of_scale(s2));
}

// p in [0, 1] -> round(levels * p) with levels 127 (paper, s8) or 255 (accurate, u8).
INTFA_HD int quantize_p(float p, float levels) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(p * levels);
#else
  return static_cast<int>(std::nearbyint(p * levels));
#endif
}

}  // namespace intfa
