// The device side of the per-token rounding rule (numerics.h: quant_scale / quant_inv_scale /
// quantize_s8) on fp16 / bf16 rows: shared by the quantizer's row items and the sm90 kernel,
// which quantizes Q tiles itself (fwd_sm90.cuh, FwdParams::q_in), so both give the same bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "cuda/ptx/ptx_sm80.cuh"

namespace intfa::quant {

// quantize_s8(x, inv) as the low byte of a float. v = x * inv (one fp32 product) has
// |v| <= 127 * (1 + 2^-24) < 127.5 because |x| <= amax and inv = fl(127 / amax), so the clamp of
// the rule never applies; adding 1.5 * 2^23 rounds v to an integer half-to-even (the sum's ulp
// is 1) and leaves that integer, two's complement, in the low mantissa bits. This replaces the
// quarter-rate float-to-int conversion by one full-rate add.
__device__ __forceinline__ uint32_t q8_bits(float x, float inv) {
  return __float_as_uint(__fadd_rn(__fmul_rn(x, inv), ptx::kMagic));
}

// 8 fp16/bf16 values (one 16-byte vector) -> fp32, exactly.
template <typename T> __device__ void to_float8(const uint4& v, float (&x)[8]);
template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// The packed pair type of an input type.
template <typename T> struct PairOf;
template <> struct PairOf<__half> { using type = __half2; };
template <> struct PairOf<__nv_bfloat16> { using type = __nv_bfloat162; };

// acc[i] = max(acc[i], |v pair i|) on packed fp16/bf16 pairs: an abs per two values, and ptxas
// folds two maxima into one 3-input VHMNMX (6 instructions per 8 values instead of 16).
template <typename T>
__device__ __forceinline__ void absmax_pairs(const uint4& v, uint32_t (&acc)[4]) {
  using T2 = typename PairOf<T>::type;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T2 a, b;
    memcpy(&a, &w[i], 4);
    memcpy(&b, &acc[i], 4);
    const T2 r = __hmax2(__habs2(a), b);
    memcpy(&acc[i], &r, 4);
  }
}

}  // namespace intfa::quant
