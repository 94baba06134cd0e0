// Random-call helpers shared by the CPU and GPU API fuzz tests (api_fuzz_test.cpp,
// gpu/api_fuzz_gpu_test.cpp): a seeded generator, host tensors with padded strides poisoned with
// NaN, and the seed / iteration overrides from the environment.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "inputs.h"
#include "intfa/intfa.h"

namespace intfa::testing {

class Fuzz {
 public:
  explicit Fuzz(uint64_t seed) : rng_(seed) {}
  int range(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(rng_); }
  float normal() { return std::normal_distribution<float>(0.f, 1.f)(rng_); }

 private:
  std::mt19937_64 rng_;
};

inline size_t elem_bytes(DType dt) {
  switch (dt) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: return 8;
    case DType::i8: case DType::u8: return 1;
    default: return 2;
  }
}

// A host tensor of `shape` whose non-last strides may carry padding; memory poisoned with 0xff
// bytes (NaN in every float dtype) unless filled.
struct HostTensor {
  std::vector<uint8_t> mem;
  Tensor t;

  HostTensor() = default;
  // pad_unit: padding comes in multiples of it (8 elements: 16-byte rows for the GPU paths).
  HostTensor(Fuzz& f, DType dt, std::vector<int64_t> shape, bool pad, bool bad_last = false, int pad_unit = 1) {
    const int nd = static_cast<int>(shape.size());
    int64_t stride[4] = {}, s = 1;
    for (int i = nd - 1; i >= 0; --i) {
      stride[i] = s;
      s *= std::max<int64_t>(1, shape[i]) + (pad && i < nd - 1 ? pad_unit * f.range(0, 3) : 0);
      if (pad && i == nd - 1) s += 8 * f.range(0, 1);  // rows a few elements apart
    }
    if (bad_last) stride[nd - 1] = 2;
    int64_t last = 0;
    for (int i = 0; i < nd; ++i) last += std::max<int64_t>(0, shape[i] - 1) * stride[i];
    mem.assign((last + 1) * elem_bytes(dt), 0xff);
    t.data = mem.data();
    t.dtype = dt;
    t.ndim = nd;
    for (int i = 0; i < nd; ++i) t.shape[i] = shape[i], t.stride[i] = stride[i];
  }
  // Every element position of the tensor, as a byte offset.
  template <class Fn> void each(Fn&& fn) const {
    int64_t idx[4] = {0, 0, 0, 0};
    int64_t n = 1;
    for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
    for (int64_t e = 0; e < n; ++e) {
      int64_t rest = e, off = 0;
      for (int i = t.ndim - 1; i >= 0; --i) idx[i] = rest % t.shape[i], rest /= t.shape[i];
      for (int i = 0; i < t.ndim; ++i) off += idx[i] * t.stride[i];
      fn(off * static_cast<int64_t>(elem_bytes(t.dtype)));
    }
  }
  float at(int64_t byte) const {
    if (t.dtype == DType::f32) {
      float x;
      std::memcpy(&x, &mem[byte], 4);
      return x;
    }
    uint16_t h;
    std::memcpy(&h, &mem[byte], 2);
    return tools::to_float(h, t.dtype);
  }
  // Normal values, a few percent of them 50x (outliers), in fp16 / bf16 / f32 (other dtypes: 0).
  void fill(Fuzz& f) {
    each([&](int64_t byte) {
      const float x = f.normal() * (f.coin(0.02) ? 50.f : 1.f);
      if (t.dtype == DType::f16 || t.dtype == DType::bf16) {
        const uint16_t h = t.dtype == DType::bf16 ? float_to_bf16_bits(x) : float_to_half_bits(x);
        std::memcpy(&mem[byte], &h, 2);
      } else if (t.dtype == DType::f32) {
        std::memcpy(&mem[byte], &x, 4);
      } else {
        std::memset(&mem[byte], 0, elem_bytes(t.dtype));
      }
    });
  }
};

// Attention sinks for a random call: hq logits, whole numbers in [-5, 5], a tenth of them -inf
// (no sink for that head).
inline HostTensor random_sinks(Fuzz& f, int hq) {
  HostTensor z(f, DType::f32, {hq}, false);
  z.each([&](int64_t byte) {
    const float x = f.coin(0.1) ? -INFINITY : static_cast<float>(f.range(-5, 5));
    std::memcpy(&z.mem[byte], &x, 4);
  });
  return z;
}

inline uint64_t env_or(const char* name, uint64_t fallback) {
  const char* e = std::getenv(name);
  return e && *e ? std::strtoull(e, nullptr, 10) : fallback;
}

}  // namespace intfa::testing
