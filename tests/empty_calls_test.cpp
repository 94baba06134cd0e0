// attention() / attention_varlen() calls with no query row or no key, which torch SDPA and
// FlashAttention take: no batch, no query rows, no keys, varlen batches whose sequences are all
// empty, null data behind empty tensors. Rows without keys give 0 and LSE -inf (or the head's
// sink), as rows that see no key do in every other call; what stays invalid says so.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

constexpr float kNegInf = -INFINITY;

struct EmptyCalls : ::testing::Test {
  static constexpr int Hq = 4, Hkv = 2, D = 64;
  AlignedBuffer qb{1 << 16}, kb{1 << 16}, vb{1 << 16}, ob{1 << 18}, lb{1 << 14};
  Options opts;
  void SetUp() override {
    opts.backend = Backend::cpu;
    std::memset(ob.data(), 0xff, ob.size());  // NaN in every float dtype
    std::memset(lb.data(), 0xff, lb.size());
  }
  std::vector<float> lse_values(int64_t n) {
    std::vector<float> v(n);
    std::memcpy(v.data(), lb.data(), n * 4);
    return v;
  }
  // Every element of out (n elements of dt, contiguous) is +0.
  bool out_zero(int64_t n, DType dt) {
    const auto* p = static_cast<const uint8_t*>(ob.data());
    for (int64_t i = 0; i < n * static_cast<int64_t>(dtype_size(dt)); ++i)
      if (p[i] != 0) return false;
    return true;
  }
};

TEST_F(EmptyCalls, NoKeysGiveZerosAndLseMinusInf) {
  for (Layout layout : {Layout::BHSD, Layout::BSHD})
    for (DType out_dt : {DType::f16, DType::bf16, DType::f32})
      for (Scheme scheme : {Scheme::paper, Scheme::accurate, Scheme::half}) {
        SCOPED_TRACE(to_string(layout) + std::string(" ") + to_string(out_dt) + " " + to_string(scheme));
        SetUp();
        const int B = 2, Sq = 5;
        const bool bshd = layout == Layout::BSHD;
        const DType in_dt = out_dt == DType::f32 ? DType::bf16 : out_dt;
        opts.layout = layout;
        opts.scheme = scheme;
        opts.causal = scheme == Scheme::paper;
        Tensor q = make_tensor(qb.data(), in_dt, bshd ? std::initializer_list<int64_t>{B, Sq, Hq, D}
                                                            : std::initializer_list<int64_t>{B, Hq, Sq, D});
        Tensor k = make_tensor(kb.data(), in_dt, bshd ? std::initializer_list<int64_t>{B, 0, Hkv, D}
                                                            : std::initializer_list<int64_t>{B, Hkv, 0, D});
        Tensor v = make_tensor(vb.data(), in_dt, {k.shape[0], k.shape[1], k.shape[2], k.shape[3]});
        Tensor out = make_tensor(ob.data(), out_dt, {q.shape[0], q.shape[1], q.shape[2], q.shape[3]});
        Tensor lse = make_tensor(lb.data(), DType::f32, {B, Hq, Sq});
        Status st = attention(q, k, v, out, &lse, opts);
        ASSERT_TRUE(st.ok()) << st.message();
        EXPECT_TRUE(out_zero(int64_t(B) * Sq * Hq * D, out_dt));
        for (float x : lse_values(int64_t(B) * Hq * Sq)) ASSERT_EQ(x, kNegInf);
      }
}

TEST_F(EmptyCalls, NoKeysWithSinksGiveTheSinkAsLse) {
  const int B = 1, Sq = 3;
  std::vector<float> z = {0.5f, -2.f, kNegInf, 3.f};
  opts.sinks = make_tensor(z.data(), DType::f32, {Hq});
  Tensor q = make_tensor(qb.data(), DType::f16, {B, Hq, Sq, D});
  Tensor k = make_tensor(kb.data(), DType::f16, {B, Hkv, 0, D});
  Tensor v = make_tensor(vb.data(), DType::f16, {B, Hkv, 0, D});
  Tensor out = make_tensor(ob.data(), DType::f16, {B, Hq, Sq, D});
  Tensor lse = make_tensor(lb.data(), DType::f32, {B, Hq, Sq});
  Status st = attention(q, k, v, out, &lse, opts);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_TRUE(out_zero(int64_t(B) * Hq * Sq * D, DType::f16));
  const auto got = lse_values(int64_t(B) * Hq * Sq);
  for (int h = 0; h < Hq; ++h)
    for (int t = 0; t < Sq; ++t) EXPECT_EQ(got[h * Sq + t], z[h]) << "head " << h << " row " << t;
}

TEST_F(EmptyCalls, ReferenceTakesThemToo) {
  // The float64 oracle: no keys give 0 and -inf (f64 out and LSE); no rows write nothing.
  std::vector<float> z = {0.5f, -2.f, kNegInf, 3.f};
  for (bool sinks : {false, true}) {
    SetUp();
    if (sinks) opts.sinks = make_tensor(z.data(), DType::f32, {Hq});
    Tensor q = make_tensor(qb.data(), DType::f16, {1, Hq, 3, D});
    Tensor k = make_tensor(nullptr, DType::f16, {1, Hkv, 0, D});
    Tensor out = make_tensor(ob.data(), DType::f64, {1, Hq, 3, D});
    Tensor lse = make_tensor(lb.data(), DType::f64, {1, Hq, 3});
    Status st = attention_reference(q, k, k, out, &lse, opts);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_TRUE(out_zero(Hq * 3 * D, DType::f64));
    const auto* l = static_cast<const double*>(lb.data());
    for (int i = 0; i < Hq * 3; ++i) EXPECT_EQ(l[i], sinks ? double(z[i / 3]) : double(kNegInf)) << i;
  }
  Tensor q0 = make_tensor(nullptr, DType::f16, {0, Hq, 3, D}), k0 = make_tensor(nullptr, DType::f16, {0, Hkv, 5, D});
  Tensor out0 = make_tensor(nullptr, DType::f64, {0, Hq, 3, D});
  Status st = attention_reference(q0, k0, k0, out0, nullptr, opts);
  EXPECT_TRUE(st.ok()) << st.message();
}

TEST_F(EmptyCalls, NoBatchOrNoQueryRowsWriteNothing) {
  for (int which = 0; which < 2; ++which) {
    SetUp();
    const int B = which == 0 ? 0 : 3, Sq = which == 0 ? 7 : 0;
    // Null data behind the empty tensors, as torch may hand over for them.
    Tensor q = make_tensor(nullptr, DType::f16, {B, Hq, Sq, D});
    Tensor k = make_tensor(B ? kb.data() : nullptr, DType::f16, {B, Hkv, 9, D});
    Tensor v = make_tensor(B ? vb.data() : nullptr, DType::f16, {B, Hkv, 9, D});
    Tensor out = make_tensor(nullptr, DType::f16, {B, Hq, Sq, D});
    Tensor lse = make_tensor(nullptr, DType::f32, {B, Hq, Sq});
    Status st = attention(q, k, v, out, &lse, opts);
    EXPECT_TRUE(st.ok()) << st.message();
  }
  const auto* p = static_cast<const uint8_t*>(ob.data());
  EXPECT_EQ(p[0], 0xff);  // nothing written anywhere
}

TEST_F(EmptyCalls, VarlenWithoutKeysOrQueries) {
  // Three sequences, none with a key: rows 0, LSE -inf; max_seqlen_kv 0 is allowed then.
  std::vector<int32_t> cu_q = {0, 2, 2, 5}, cu_k = {0, 0, 0, 0};
  Tensor tcq = make_tensor(cu_q.data(), DType::i32, {4}), tck = make_tensor(cu_k.data(), DType::i32, {4});
  Tensor q = make_tensor(qb.data(), DType::bf16, {5, Hq, D});
  Tensor k = make_tensor(nullptr, DType::bf16, {0, Hkv, D});
  Tensor v = make_tensor(nullptr, DType::bf16, {0, Hkv, D});
  Tensor out = make_tensor(ob.data(), DType::bf16, {5, Hq, D});
  Tensor lse = make_tensor(lb.data(), DType::f32, {Hq, 5});
  for (int max_k : {0, 4}) {
    SetUp();
    Status st = attention_varlen(q, k, v, tcq, tck, 3, max_k, out, &lse, opts);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_TRUE(out_zero(5 * Hq * D, DType::bf16));
    for (float x : lse_values(Hq * 5)) ASSERT_EQ(x, kNegInf);
  }
  // No query row at all (keys present): nothing to write.
  SetUp();
  std::vector<int32_t> cu_q0 = {0, 0, 0, 0}, cu_k3 = {0, 4, 4, 9};
  Tensor q0 = make_tensor(nullptr, DType::bf16, {0, Hq, D});
  Tensor k9 = make_tensor(kb.data(), DType::bf16, {9, Hkv, D}), v9 = make_tensor(vb.data(), DType::bf16, {9, Hkv, D});
  Tensor out0 = make_tensor(nullptr, DType::bf16, {0, Hq, D});
  Tensor lse0 = make_tensor(nullptr, DType::f32, {Hq, 0});
  Status st = attention_varlen(q0, k9, v9, make_tensor(cu_q0.data(), DType::i32, {4}),
                               make_tensor(cu_k3.data(), DType::i32, {4}), 0, 5, out0, &lse0, opts);
  EXPECT_TRUE(st.ok()) << st.message();
  // max_seqlen 0 with a non-empty sequence stays an error.
  st = attention_varlen(q, k9, v9, tcq, make_tensor(cu_k3.data(), DType::i32, {4}), 3, 0, out, &lse, opts);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("max_seqlen_kv: expected >= 1, got 0"), std::string::npos) << st.message();
}

TEST_F(EmptyCalls, WhatStaysInvalidSaysSo) {
  // Empty tensors still go through every other check.
  Tensor q = make_tensor(nullptr, DType::f32, {0, Hq, 3, D});
  Tensor k = make_tensor(nullptr, DType::f32, {0, Hkv, 3, D});
  Tensor out = make_tensor(nullptr, DType::f32, {0, Hq, 3, D});
  Status st = attention(q, k, k, out, nullptr, opts);
  EXPECT_EQ(st.code(), StatusCode::unsupported_type) << st.message();
  EXPECT_NE(st.message().find("q: expected dtype float16 or bfloat16, got float32"), std::string::npos) << st.message();
  q.dtype = k.dtype = out.dtype = DType::f16;
  Tensor k3 = make_tensor(nullptr, DType::f16, {0, 3, 3, D});
  st = attention(q, k3, k3, out, nullptr, opts);
  EXPECT_NE(st.message().find("must divide heads_q"), std::string::npos) << st.message();
  Tensor out_bad = make_tensor(nullptr, DType::f16, {0, Hq, 4, D});
  st = attention(q, k, k, out_bad, nullptr, opts);
  EXPECT_NE(st.message().find("out: expected the shape of q"), std::string::npos) << st.message();
  // A non-empty tensor without data is still refused.
  Tensor q_null = make_tensor(nullptr, DType::f16, {1, Hq, 3, D});
  Tensor k_empty = make_tensor(nullptr, DType::f16, {1, Hkv, 0, D});
  Tensor out1 = make_tensor(ob.data(), DType::f16, {1, Hq, 3, D});
  st = attention(q_null, k_empty, k_empty, out1, nullptr, opts);
  EXPECT_NE(st.message().find("q: expected a tensor, got null data"), std::string::npos) << st.message();
  // quantize() has nothing to lay out for an empty problem: alloc_quantized refuses it.
  ProblemShape s{0, Hq, Hkv, 3, 3, D};
  QuantizedQKV x;
  st = alloc_quantized(s, Scheme::accurate, Layout::BHSD, qb.data(), qb.size(), false, 0, &x);
  EXPECT_NE(st.message().find("every size must be >= 1"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace intfa::testing
