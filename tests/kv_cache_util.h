// Helpers shared by the CPU and GPU KV cache tests (tests/kv_cache_test.cpp,
// tests/gpu/kv_cache_gpu_test.cpp); public API only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// The shared-prefix tests' caches (docs/KV_CACHE.md, "Shared pages"): sequence 0's prompt
// statistics (quantize() of its first lens[0] tokens of host k, v [B, Hkv, S, D] into `first`, a
// one-sequence host cache) copied into every sequence of the host cache `flat`, then each
// sequence's prompt written with them by append_kv (o.fixed_v_scale): sequence 0's first
// `prefix` tokens, then its own up to lens[b].
inline Status write_shared_prompts(const Tensor& k, const Tensor& v, const std::vector<int32_t>& lens, int prefix,
                                   const Options& o, const QuantizedQKV& first, const QuantizedQKV& flat) {
  Status st = quantize_prompt(batch_slice(k, 0), batch_slice(v, 0), lens[0], o, first);
  const size_t set = size_t(flat.v_scale.shape[1] * flat.v_scale.shape[2]) * sizeof(float);
  for (size_t b = 0; st.ok() && b < lens.size(); ++b) {
    std::memcpy(static_cast<char*>(flat.k_mean.data) + b * set, first.k_mean.data, set);
    std::memcpy(static_cast<char*>(flat.v_scale.data) + b * set, first.v_scale.data, set);
    const QuantizedQKV one = batch_of(flat, int64_t(b));
    st = append_kv(tokens(batch_slice(k, 0), 0, prefix), tokens(batch_slice(v, 0), 0, prefix), 0, o, one);
    if (st.ok() && lens[b] > prefix)
      st = append_kv(tokens(batch_slice(k, int64_t(b)), prefix, lens[b] - prefix),
                     tokens(batch_slice(v, int64_t(b)), prefix, lens[b] - prefix), prefix, o, one);
  }
  return st;
}

// The k8 and vt8 bytes of sequence 0's first `pages` pages of a (BHSD, unpadded) PagedCopy.
inline std::vector<int8_t> shared_page_bytes(const PagedCopy& pc, int pages) {
  const Tensor& k8 = pc.x.k8;
  const size_t bytes = size_t(k8.shape[1] * k8.shape[2] * k8.shape[3]);  // one page of K (and of V^T)
  std::vector<int8_t> out;
  for (int j = 0; j < pages; ++j) {
    const size_t at = size_t(pc.table[size_t(j)]) * bytes;
    out.insert(out.end(), pc.k8.begin() + at, pc.k8.begin() + at + bytes);
    out.insert(out.end(), pc.vt8.begin() + at, pc.vt8.begin() + at + bytes);
  }
  return out;
}

// Sequences 1 .. B - 1 of a (BHSD, unpadded) PagedCopy name sequence 0's first `pages` pages;
// returns those pages' bytes (shared_page_bytes), to compare after the appends.
inline std::vector<int8_t> share_first_pages(PagedCopy& pc, int pages) {
  const int64_t B = pc.x.block_table.shape[0], maxp = pc.x.block_table.shape[1];
  for (int64_t b = 1; b < B; ++b)
    for (int j = 0; j < pages; ++j) pc.table[size_t(b * maxp + j)] = pc.table[size_t(j)];
  return shared_page_bytes(pc, pages);
}

}  // namespace intfa::testing
