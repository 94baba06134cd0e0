// fp16/bf16 host conversions: exact round trips and round-half-to-even.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "intfa/intfa.h"

using namespace intfa;

TEST(Dtype, HalfRoundTripAllFinite) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / nan
    EXPECT_EQ(float_to_half_bits(half_bits_to_float(h)), h) << std::hex << b;
  }
}

TEST(Dtype, HalfRoundsHalfToEven) {
  // 1 + 2^-11 lies halfway between 1 and the next half (1 + 2^-10): ties go to even (1).
  EXPECT_EQ(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(float_to_half_bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(float_to_half_bits(70000.f), 0x7c00);         // overflow to inf
  EXPECT_EQ(float_to_half_bits(std::ldexp(1.0f, -25)), 0);  // half of the smallest subnormal
  EXPECT_EQ(float_to_half_bits(std::ldexp(3.0f, -25)), 2);  // 1.5 ulp of subnormal -> 2
}

TEST(Dtype, Bf16RoundTripAndTies) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    if ((h & 0x7f80) == 0x7f80) continue;
    EXPECT_EQ(float_to_bf16_bits(bf16_bits_to_float(h)), h);
  }
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
}
