// Helpers for the GPU tests: device buffers, poisoning, host<->device QuantizedQKV mirroring.
// Only the public API (plus the backend test hooks) is used.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "intfa/intfa.h"

namespace intfa::testing {

inline bool have_gpu() { return device_info(0).present; }

#define INTFA_REQUIRE_GPU()                                              \
  do {                                                                   \
    if (!::intfa::testing::have_gpu()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define INTFA_ASSERT_OK(expr)                      \
  do {                                             \
    ::intfa::Status _s = (expr);                   \
    ASSERT_TRUE(_s.ok()) << #expr ": " << _s.message(); \
  } while (0)

// Device allocation freed on scope exit; poisoned with 0xFF bytes (NaN in every float dtype).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    Status st = gpu_malloc(&ptr, n);
    EXPECT_TRUE(st.ok()) << st.message();
    if (st.ok()) (void)gpu_memset(ptr, 0xFF, n);
  }
  DeviceBuffer(const void* host, size_t n) : DeviceBuffer(n) {
    if (ptr) (void)gpu_copy_to_device(ptr, host, n);
  }
  ~DeviceBuffer() {
    if (ptr) (void)gpu_free(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  std::vector<T> to_host() const {
    std::vector<T> h(bytes / sizeof(T));
    Status st = gpu_copy_to_host(h.data(), ptr, h.size() * sizeof(T));
    EXPECT_TRUE(st.ok()) << st.message();
    return h;
  }
};

// A host tensor moved to the device (same shape and strides).
inline Tensor on_device(Tensor t, void* ptr) {
  t.data = ptr;
  t.on_device = true;
  return t;
}

// 256-byte aligned host buffer for alloc_quantized().
struct HostBuffer {
  std::vector<uint8_t> raw;
  void* ptr = nullptr;
  explicit HostBuffer(size_t n) : raw(n + 256) {
    ptr = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw.data()) + 255) & ~uintptr_t(255));
  }
};

}  // namespace intfa::testing
