// Element loads/stores for the reference backend (all dtypes widen exactly to double).
#include <cstring>

#include "ref/ref.h"

namespace intfa::ref {

double load_scalar(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::f16: return half_bits_to_float(static_cast<const uint16_t*>(base)[idx]);
    case DType::bf16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[idx]);
    case DType::f32: return static_cast<const float*>(base)[idx];
    case DType::f64: return static_cast<const double*>(base)[idx];
    case DType::i8: return static_cast<const int8_t*>(base)[idx];
    case DType::u8: return static_cast<const uint8_t*>(base)[idx];
    case DType::i32: return static_cast<const int32_t*>(base)[idx];
  }
  return 0.0;
}

void store_scalar(void* base, DType dt, int64_t idx, double value) {
  switch (dt) {
    case DType::f16:
      static_cast<uint16_t*>(base)[idx] = float_to_half_bits(static_cast<float>(value));
      break;
    case DType::bf16:
      static_cast<uint16_t*>(base)[idx] = float_to_bf16_bits(static_cast<float>(value));
      break;
    case DType::f32: static_cast<float*>(base)[idx] = static_cast<float>(value); break;
    case DType::f64: static_cast<double*>(base)[idx] = value; break;
    case DType::i8: static_cast<int8_t*>(base)[idx] = static_cast<int8_t>(value); break;
    case DType::u8: static_cast<uint8_t*>(base)[idx] = static_cast<uint8_t>(value); break;
    case DType::i32: static_cast<int32_t*>(base)[idx] = static_cast<int32_t>(value); break;
  }
}

float round_to_dtype(float x, DType dt) {
  switch (dt) {
    case DType::f16: return half_bits_to_float(float_to_half_bits(x));
    case DType::bf16: return bf16_bits_to_float(float_to_bf16_bits(x));
    default: return x;
  }
}

}  // namespace intfa::ref
