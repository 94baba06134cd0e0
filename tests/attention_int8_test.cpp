// The pre-quantized entry point: quantize() + attention_int8() is attention() split in two (bit
// for bit), dense and varlen, for every scheme; the LSE offset is what turns the smoothed LSE
// into the true one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

TEST(AttentionInt8, QuantizeThenAttendEqualsAttention) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(to_string(s)) + (causal ? " causal" : ""));
      const int B = 2, Hq = 4, Hkv = 2, Sq = 45, Skv = 77, D = 64;
      HostQKV x = tools::make_inputs(Dist::llm, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 300 + int(s));
      Options o;
      o.scheme = s;
      o.causal = causal;
      o.backend = Backend::cpu;
      Result want = run_attention(x, o);
      ASSERT_TRUE(want.status.ok());

      HostQuantized hq(x, o);
      ASSERT_TRUE(hq.status.ok()) << hq.status.message();
      const QuantizedQKV& qx = hq.qkv;
      std::vector<float> out(want.out.size(), NAN), lse(want.lse.size(), NAN);
      Tensor tl = make_tensor(lse.data(), DType::f32, {B, Hq, Sq});
      Status st = attention_int8(qx, Tensor(), Tensor(), 0, 0,
                                 make_tensor(out.data(), DType::f32, {B, Hq, Sq, D}), &tl, o);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_EQ(widen(out), want.out);
      EXPECT_EQ(widen(lse), want.lse);

      // Without the LSE offset the LSE is the smoothed problem's: smaller by exactly the offset.
      if (s != Scheme::paper) {
        QuantizedQKV no_off = qx;
        no_off.lse_offset = Tensor();
        std::vector<float> lse2(lse.size(), NAN);
        Tensor tl2 = make_tensor(lse2.data(), DType::f32, {B, Hq, Sq});
        ASSERT_TRUE(attention_int8(no_off, Tensor(), Tensor(), 0, 0,
                                   make_tensor(out.data(), DType::f32, {B, Hq, Sq, D}), &tl2, o).ok());
        const float* off = static_cast<const float*>(qx.lse_offset.data);
        for (size_t i = 0; i < lse.size(); ++i) ASSERT_EQ(lse2[i] + off[i], lse[i]) << i;
      }
    }
  }
}

// A packed varlen problem on the host: fp16 THD q, k, v [T, H, D] for sequences cu_q / cu_kv,
// and the same quantized by quantize() into `buf` (qx).
struct Varlen {
  std::vector<int32_t> cq, ck;
  int n, Tq, Tk, Hq, Hkv, D;
  std::vector<uint16_t> q, k, v;
  Tensor tq, tk, tv, tcq, tck;
  std::unique_ptr<AlignedBuffer> buf;
  QuantizedQKV qx;
  Varlen(const Varlen&) = delete;  // the tensors point into its own vectors
  Varlen(std::vector<int32_t> cu_q, std::vector<int32_t> cu_kv, int hq, int hkv, int d, uint64_t seed)
      : cq(std::move(cu_q)), ck(std::move(cu_kv)), n(int(cq.size()) - 1), Tq(cq.back()), Tk(ck.back()),
        Hq(hq), Hkv(hkv), D(d) {
    HostQKV src = tools::make_inputs(Dist::normal, 1, Hq, Hkv, Tq, Tk, D, DType::f16, seed);
    // BHSD [1, H, T, D] -> THD [T, H, D].
    q = swap_hs(src.q, 1, Hq, Tq, D);
    k = swap_hs(src.k, 1, Hkv, Tk, D);
    v = swap_hs(src.v, 1, Hkv, Tk, D);
    tq = make_tensor(q.data(), DType::f16, {Tq, Hq, D});
    tk = make_tensor(k.data(), DType::f16, {Tk, Hkv, D});
    tv = make_tensor(v.data(), DType::f16, {Tk, Hkv, D});
    tcq = make_tensor(cq.data(), DType::i32, {n + 1});
    tck = make_tensor(ck.data(), DType::i32, {n + 1});
  }
  Status quantize_all(const Options& o) {
    ProblemShape ps;
    ps.batch = n; ps.heads_q = Hq; ps.heads_kv = Hkv; ps.head_dim = D;
    ps.varlen = true; ps.total_q = Tq; ps.total_kv = Tk;
    buf = std::make_unique<AlignedBuffer>(quantized_bytes(ps, o.scheme));
    Status st = alloc_quantized(ps, o.scheme, Layout::BHSD, buf->data(), buf->size(), false, 0, &qx);
    return st.ok() ? quantize(tq, tk, tv, tcq, tck, o, qx) : st;
  }
};

TEST(AttentionInt8, VarlenQuantizeThenAttendEqualsAttentionVarlen) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    Varlen x({0, 30, 31, 31, 120}, {0, 17, 18, 50, 200}, 2, 1, 64, 400);
    const int Hq = x.Hq, D = x.D, Tq = x.Tq;
    const Tensor &tq = x.tq, &tk = x.tk, &tv = x.tv, &tcq = x.tcq, &tck = x.tck;
    Options o;
    o.scheme = s;
    o.causal = true;
    std::vector<float> want(size_t(Tq) * Hq * D, NAN), want_lse(size_t(Hq) * Tq, NAN);
    Tensor twl = make_tensor(want_lse.data(), DType::f32, {Hq, Tq});
    ASSERT_TRUE(attention_varlen(tq, tk, tv, tcq, tck, 89, 150, make_tensor(want.data(), DType::f32, {Tq, Hq, D}), &twl, o).ok());
    EXPECT_EQ(count_nan(want), 0);
    EXPECT_EQ(count_nan(want_lse), 0);

    ASSERT_TRUE(x.quantize_all(o).ok());
    QuantizedQKV& qx = x.qx;
    if (s == Scheme::half) qx.v = tv;
    std::vector<float> out(want.size(), NAN), lse(want_lse.size(), NAN);
    Tensor tl = make_tensor(lse.data(), DType::f32, {Hq, Tq});
    Status st = attention_int8(qx, tcq, tck, 89, 150, make_tensor(out.data(), DType::f32, {Tq, Hq, D}), &tl, o);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(widen(out), widen(want));
    EXPECT_EQ(widen(lse), widen(want_lse));
  }
}

// Varlen with per-sequence key counts (seqused_kv) against float64 attention over each
// sequence's first count keys (causal bottom-right against the count): counts below, at and
// past the sequence's keys (clamped), 0 (zero rows, LSE -inf); full counts give what no counts
// give, bit for bit.
TEST(AttentionInt8, VarlenSequsedKvAgainstFloat64) {
  for (Scheme s : {Scheme::paper, Scheme::accurate})
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(to_string(s)) + (causal ? " causal" : ""));
      Varlen x({0, 30, 31, 31, 120, 160}, {0, 170, 180, 212, 362, 462}, 4, 2, 64, 410 + causal + 2 * int(s));
      std::vector<int32_t> used = {61, 400, 0, 150, 77};  // sequence 1: 10 keys, clamped
      const int n = x.n, Tq = x.Tq, Hq = x.Hq, Hkv = x.Hkv, D = x.D;
      const auto &cq = x.cq, &ck = x.ck;
      auto &q = x.q, &k = x.k, &v = x.v;
      Options o;
      o.scheme = s;
      o.causal = causal;
      ASSERT_TRUE(x.quantize_all(o).ok());
      const QuantizedQKV& qx = x.qx;
      const Tensor &tcq = x.tcq, &tck = x.tck;
      auto run = [&](const std::vector<int32_t>* counts, std::vector<float>& out, std::vector<float>& lse) {
        QuantizedQKV x = qx;
        if (counts) x.seqused_kv = make_tensor(const_cast<int32_t*>(counts->data()), DType::i32, {n});
        out.assign(size_t(Tq) * Hq * D, NAN);
        lse.assign(size_t(Hq) * Tq, NAN);
        Tensor tl = make_tensor(lse.data(), DType::f32, {Hq, Tq});
        Status st = attention_int8(x, tcq, tck, 89, 170, make_tensor(out.data(), DType::f32, {Tq, Hq, D}), &tl, o);
        ASSERT_TRUE(st.ok()) << st.message();
      };
      std::vector<float> out, lse, out_full, lse_full, out_none, lse_none;
      ASSERT_NO_FATAL_FAILURE(run(&used, out, lse));
      std::vector<int32_t> full(n);
      for (int b = 0; b < n; ++b) full[b] = ck[b + 1] - ck[b];
      ASSERT_NO_FATAL_FAILURE(run(&full, out_full, lse_full));
      ASSERT_NO_FATAL_FAILURE(run(nullptr, out_none, lse_none));
      EXPECT_EQ(widen(out_full), widen(out_none));
      EXPECT_EQ(widen(lse_full), widen(lse_none));
      EXPECT_EQ(count_nan(out), 0);

      for (int b = 0; b < n; ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        const int sq = cq[b + 1] - cq[b], kb = std::max(0, std::min(used[b], ck[b + 1] - ck[b]));
        if (sq == 0) continue;
        std::vector<double> got, got_lse, ref(size_t(sq) * Hq * D, NAN), ref_lse(size_t(Hq) * sq, NAN);
        for (int r = 0; r < sq; ++r)
          for (int i = 0; i < Hq * D; ++i) got.push_back(out[(size_t(cq[b]) + r) * Hq * D + i]);
        for (int h = 0; h < Hq; ++h)
          for (int r = 0; r < sq; ++r) got_lse.push_back(lse[size_t(h) * Tq + cq[b] + r]);
        if (kb == 0) {  // no key: zero rows, LSE -inf
          for (double x : got) ASSERT_EQ(x, 0.0);
          for (double x : got_lse) ASSERT_EQ(x, -INFINITY);
          continue;
        }
        // Sequence b as a BSHD batch of one over its first kb keys (views of the packed tensors).
        Options orf = o;
        orf.layout = Layout::BSHD;
        Tensor rq = make_tensor(q.data() + size_t(cq[b]) * Hq * D, DType::f16, {1, sq, Hq, D});
        Tensor rk = make_tensor(k.data() + size_t(ck[b]) * Hkv * D, DType::f16, {1, kb, Hkv, D});
        Tensor rv = make_tensor(v.data() + size_t(ck[b]) * Hkv * D, DType::f16, {1, kb, Hkv, D});
        Tensor rl = make_tensor(ref_lse.data(), DType::f64, {1, Hq, sq});
        Status st = attention_reference(rq, rk, rv, make_tensor(ref.data(), DType::f64, {1, sq, Hq, D}), &rl, orf);
        ASSERT_TRUE(st.ok()) << st.message();
        // Causal rows that see no key (Sq > count): zeros and -inf on both sides.
        for (size_t i = 0; i < ref.size(); ++i)
          if (std::isnan(ref[i])) ref[i] = 0.0;
        // The normal-input bounds of SchemeAccuracy (scheme_accuracy_test.cpp).
        EXPECT_LT(tools::compare(got, ref).rel_l2, s == Scheme::paper ? 3.5e-2 : 2e-2);
        for (size_t i = 0; i < ref_lse.size(); ++i) {
          if (std::isinf(ref_lse[i])) {
            EXPECT_EQ(got_lse[i], ref_lse[i]) << "lse " << i;
          } else {
            EXPECT_NEAR(got_lse[i], ref_lse[i], s == Scheme::paper ? 4e-2 : 2.5e-2) << "lse " << i;
          }
        }
      }
    }
}

}  // namespace
}  // namespace intfa::testing
