// Helpers shared by the CPU and GPU KV cache tests (tests/kv_cache_test.cpp,
// tests/gpu/kv_cache_gpu_test.cpp); public API only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "intfa/intfa.h"
#include "inputs.h"

namespace intfa::testing {

// Tokens [t0, t0 + n) of a BHSD tensor [B, H, S, D] (or of a per-token [B, H, S] one), strides
// kept: the views a KV cache is read and written through.
inline Tensor tokens(Tensor t, int64_t t0, int64_t n) {
  t.data = static_cast<char*>(t.data) + t0 * t.stride[2] * static_cast<int64_t>(dtype_size(t.dtype));
  t.shape[2] = n;
  return t;
}

// Sequence b of a tensor batched in dim 0, as a batch of one.
inline Tensor batch_slice(Tensor t, int64_t b) {
  t.data = static_cast<char*>(t.data) + b * t.stride[0] * static_cast<int64_t>(dtype_size(t.dtype));
  t.shape[0] = 1;
  return t;
}

// Sequence b of every part of a (BHSD) QuantizedQKV.
inline QuantizedQKV batch_of(QuantizedQKV x, int64_t b) {
  for (Tensor* t : {&x.q8, &x.q_scale, &x.lse_offset, &x.k8, &x.k_scale, &x.k_mean, &x.vt8, &x.v_scale})
    if (t->defined()) *t = batch_slice(*t, b);
  return x;
}

// Garbage past sequence b's first lens[b] tokens of a host BHSD cache: k8 and vt8 bytes, k_scale
// NaN. A ragged call (seqused_kv) must not let any of it into the result.
inline void poison_past(const QuantizedQKV& c, const std::vector<int32_t>& lens) {
  const Tensor &k8 = c.k8, &ks = c.k_scale, &vt = c.vt8;
  for (int64_t b = 0; b < k8.shape[0]; ++b)
    for (int64_t h = 0; h < k8.shape[1]; ++h) {
      const int64_t L0 = std::max<int64_t>(0, std::min<int64_t>(lens[b], k8.shape[2]));
      for (int64_t t = L0; t < k8.shape[2]; ++t) {
        static_cast<float*>(ks.data)[b * ks.stride[0] + h * ks.stride[1] + t] = NAN;
        for (int64_t d = 0; d < k8.shape[3]; ++d)
          static_cast<int8_t*>(k8.data)[b * k8.stride[0] + h * k8.stride[1] + t * k8.stride[2] + d] =
              static_cast<int8_t>(t % 2 ? 127 : -128);
      }
      for (int64_t d = 0; d < vt.shape[2]; ++d)
        for (int64_t t = L0; t < vt.shape[3]; ++t)
          static_cast<int8_t*>(vt.data)[b * vt.stride[0] + h * vt.stride[1] + d * vt.stride[2] + t] =
              static_cast<int8_t>(t % 3 ? -128 : 127);
    }
}

// What attention_int8 reads: the queries of q and the first L tokens of `cache`.
inline QuantizedQKV cache_view(QuantizedQKV cache, const QuantizedQKV& q, int64_t L) {
  cache.q8 = q.q8;
  cache.q_scale = q.q_scale;
  cache.lse_offset = q.lse_offset;
  cache.k8 = tokens(cache.k8, 0, L);
  cache.k_scale = tokens(cache.k_scale, 0, L);
  return cache;
}

// Host storage for the query side of one call: q8 [B, Hq, Sq, D] (poisoned 0x55), q_scale and
// lse_offset (NaN).
struct QParts {
  std::vector<int8_t> q8;
  std::vector<float> qs, off;
  QuantizedQKV x;
  QParts(int B, int Hq, int Sq, int D, Scheme s)
      : q8(size_t(B) * Hq * Sq * D, 0x55), qs(size_t(B) * Hq * Sq, NAN), off(qs.size(), NAN) {
    x.scheme = s;
    x.q8 = make_tensor(q8.data(), DType::i8, {B, Hq, Sq, D});
    x.q_scale = make_tensor(qs.data(), DType::f32, {B, Hq, Sq});
    x.lse_offset = make_tensor(off.data(), DType::f32, {B, Hq, Sq});
  }
};

// The prompt: the first L0 tokens of host k, v ([B, Hkv, S, D]) quantized by quantize() into the
// first L0 tokens of a host cache. quantize() needs queries: the first key token, whose
// quantized parts are dropped.
inline Status quantize_prompt(const Tensor& k, const Tensor& v, int64_t L0, const Options& o,
                              const QuantizedQKV& cache) {
  QParts q(static_cast<int>(k.shape[0]), static_cast<int>(k.shape[1]), 1, static_cast<int>(k.shape[3]), o.scheme);
  return quantize(tokens(k, 0, 1), tokens(k, 0, L0), tokens(v, 0, L0), Tensor(), Tensor(), o,
                  cache_view(cache, q.x, L0));
}

using tools::PagedCopy;

}  // namespace intfa::testing
