// Host-side dtype helpers: names, sizes and fp16/bf16 conversions (round to nearest even), the
// same rounding the GPU's __float2half_rn / __float2bfloat16_rn use.
#include <cmath>
#include <cstring>

#include "intfa/intfa.h"

namespace intfa {

static uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_half_bits(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (absx < 0x38800000u) {  // subnormal half (or zero): value = m * 2^-24
    // Adding 0.5 (2^-1) as float aligns the mantissa so the FPU rounds to nearest even for us.
    float v = bits_float(absx) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(v) - 0x3f000000u));
  }
  uint32_t mant_odd = (absx >> 13) & 1u;
  absx += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round half to even
  return static_cast<uint16_t>(sign | (absx >> 13));
}

float half_bits_to_float(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t float_to_bf16_bits(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::f16: case DType::bf16: return 2;
    case DType::f32: case DType::i32: return 4;
    case DType::f64: return 8;
    case DType::i8: case DType::u8: return 1;
  }
  return 0;
}

const char* to_string(DType dt) {
  switch (dt) {
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i8: return "int8";
    case DType::u8: return "uint8";
    case DType::i32: return "int32";
  }
  return "unknown";
}
const char* to_string(Layout l) { return l == Layout::BHSD ? "BHSD" : "BSHD"; }
const char* to_string(Scheme s) {
  switch (s) {
    case Scheme::paper: return "paper";
    case Scheme::accurate: return "accurate";
    case Scheme::half: return "half";
  }
  return "unknown";
}
const char* to_string(Backend b) {
  switch (b) {
    case Backend::automatic: return "auto";
    case Backend::cpu: return "cpu";
    case Backend::gpu: return "gpu";
  }
  return "unknown";
}
const char* to_string(GpuPath p) {
  switch (p) {
    case GpuPath::automatic: return "auto";
    case GpuPath::sm80: return "sm80";
    case GpuPath::sm90: return "sm90";
    case GpuPath::decode: return "decode";
  }
  return "unknown";
}

bool parse_scheme(const std::string& s, Scheme* out) {
  for (Scheme c : {Scheme::paper, Scheme::accurate, Scheme::half})
    if (s == to_string(c)) return *out = c, true;
  return false;
}
bool parse_layout(const std::string& s, Layout* out) {
  for (Layout c : {Layout::BHSD, Layout::BSHD})
    if (s == to_string(c)) return *out = c, true;
  return false;
}
bool parse_backend(const std::string& s, Backend* out) {
  for (Backend c : {Backend::automatic, Backend::cpu, Backend::gpu})
    if (s == to_string(c)) return *out = c, true;
  return false;
}
bool parse_path(const std::string& s, GpuPath* out) {
  for (GpuPath c : {GpuPath::automatic, GpuPath::sm80, GpuPath::sm90, GpuPath::decode})
    if (s == to_string(c)) return *out = c, true;
  return false;
}

int64_t Tensor::numel() const {
  if (ndim < 1 || ndim > 4) return 0;  // not a tensor this library can describe
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

Tensor make_tensor(void* data, DType dtype, int ndim, const int64_t* shape, bool on_device,
                   int device_index) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = ndim;
  t.on_device = on_device;
  t.device_index = device_index;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride;
    stride *= shape[i];
  }
  return t;
}

Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, bool on_device,
                   int device_index) {
  int64_t s[4] = {0, 0, 0, 0};
  int n = 0;
  for (int64_t v : shape) {
    if (n < 4) s[n] = v;
    ++n;
  }
  if (n > 4) {  // not representable; keep the rank so validation names it
    Tensor t;
    t.data = data;
    t.dtype = dtype;
    t.ndim = n;
    t.on_device = on_device;
    t.device_index = device_index;
    return t;
  }
  return make_tensor(data, dtype, n, s, on_device, device_index);
}

}  // namespace intfa
