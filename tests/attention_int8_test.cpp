// The pre-quantized entry point: quantize() + attention_int8() is attention() split in two (bit
// for bit), dense and varlen, for every scheme; the LSE offset is what turns the smoothed LSE
// into the true one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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

      ProblemShape ps{B, Hq, Hkv, Sq, Skv, D};
      AlignedBuffer buf(quantized_bytes(ps, s));
      QuantizedQKV qx;
      ASSERT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf.data(), buf.size(), false, 0, &qx).ok());
      ASSERT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, qx).ok());
      if (s == Scheme::half) qx.v = x.tv();
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

TEST(AttentionInt8, VarlenQuantizeThenAttendEqualsAttentionVarlen) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    const int Hq = 2, Hkv = 1, D = 64;
    std::vector<int32_t> cq = {0, 30, 31, 31, 120}, ck = {0, 17, 18, 50, 200};
    const int n = 4, Tq = cq[n], Tk = ck[n];
    HostQKV src = tools::make_inputs(Dist::normal, 1, Hq, Hkv, Tq, Tk, D, DType::f16, 400);
    // BHSD [1, H, T, D] -> THD [T, H, D].
    auto q = swap_hs(src.q, 1, Hq, Tq, D), k = swap_hs(src.k, 1, Hkv, Tk, D), v = swap_hs(src.v, 1, Hkv, Tk, D);
    Tensor tq = make_tensor(q.data(), DType::f16, {Tq, Hq, D});
    Tensor tk = make_tensor(k.data(), DType::f16, {Tk, Hkv, D});
    Tensor tv = make_tensor(v.data(), DType::f16, {Tk, Hkv, D});
    Tensor tcq = make_tensor(cq.data(), DType::i32, {n + 1}), tck = make_tensor(ck.data(), DType::i32, {n + 1});
    Options o;
    o.scheme = s;
    o.causal = true;
    std::vector<float> want(size_t(Tq) * Hq * D, NAN), want_lse(size_t(Hq) * Tq, NAN);
    Tensor twl = make_tensor(want_lse.data(), DType::f32, {Hq, Tq});
    ASSERT_TRUE(attention_varlen(tq, tk, tv, tcq, tck, 89, 150, make_tensor(want.data(), DType::f32, {Tq, Hq, D}), &twl, o).ok());
    EXPECT_EQ(count_nan(want), 0);
    EXPECT_EQ(count_nan(want_lse), 0);

    ProblemShape ps;
    ps.batch = n; ps.heads_q = Hq; ps.heads_kv = Hkv; ps.head_dim = D;
    ps.varlen = true; ps.total_q = Tq; ps.total_kv = Tk;
    AlignedBuffer buf(quantized_bytes(ps, s));
    QuantizedQKV qx;
    ASSERT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf.data(), buf.size(), false, 0, &qx).ok());
    ASSERT_TRUE(quantize(tq, tk, tv, tcq, tck, o, qx).ok());
    if (s == Scheme::half) qx.v = tv;
    std::vector<float> out(want.size(), NAN), lse(want_lse.size(), NAN);
    Tensor tl = make_tensor(lse.data(), DType::f32, {Hq, Tq});
    Status st = attention_int8(qx, tcq, tck, 89, 150, make_tensor(out.data(), DType::f32, {Tq, Hq, D}), &tl, o);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(widen(out), widen(want));
    EXPECT_EQ(widen(lse), widen(want_lse));
  }
}

}  // namespace
}  // namespace intfa::testing
