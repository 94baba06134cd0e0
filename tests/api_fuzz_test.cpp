// Random calls of the CPU backend's attention entry points: shapes (odd sizes, GQA, empty and
// ragged varlen sequences), padded strides, both layouts and dtypes, every scheme, and the options
// in random combination (causal, windows, soft-capping, sinks, scale, block_n, LSE), a few percent
// of each made invalid. Each call must either fail with a message, or write every element of its
// output (poisoned with NaN before) finite, with LSE finite or -inf; and then
// attention_int8(quantize(q, k, v)) must give the same bits (the documented equality).
// INTFA_FUZZ_SEED and INTFA_FUZZ_ITERS change the run (default: a fixed seed, 600 calls).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "intfa/intfa.h"
#include "test_util.h"

namespace intfa {
namespace {

using testing::env_or;
using testing::Fuzz;
using testing::HostTensor;

TEST(ApiFuzz, RandomCallsFailWithAMessageOrWriteFiniteOutputsThatTheInt8PathReproduces) {
  const uint64_t seed = env_or("INTFA_FUZZ_SEED", 20261128);
  const int iters = static_cast<int>(env_or("INTFA_FUZZ_ITERS", 600));
  Fuzz f(seed);
  int ok = 0, refused = 0, empty = 0;
  for (int it = 0; it < iters; ++it) {
    SCOPED_TRACE("INTFA_FUZZ_SEED=" + std::to_string(seed) + ", call " + std::to_string(it));
    const bool varlen = f.coin(0.3);
    const DType dt = f.coin(0.95) ? (f.coin() ? DType::f16 : DType::bf16) : (f.coin() ? DType::f32 : DType::i8);
    const int B = f.range(f.coin(0.05) ? 0 : 1, 3), hkv = f.range(1, 3);
    const int hq = hkv * f.range(1, 3) + (f.coin(0.03) ? 1 : 0);
    const int sq = f.range(f.coin(0.05) ? 0 : 1, 70), skv = f.range(f.coin(0.05) ? 0 : 1, 90);
    static const int kDims[] = {16, 32, 48, 64, 80, 128, 256, 8, 20, 272};  // the last 3 invalid
    const int D = kDims[f.range(0, f.coin(0.95) ? 6 : 9)];
    Options o;
    o.backend = Backend::cpu;
    o.causal = f.coin(0.4);
    o.layout = f.coin() ? Layout::BHSD : Layout::BSHD;
    o.scheme = static_cast<Scheme>(f.range(0, 2));
    if (f.coin(0.2)) o.window_left = f.range(-1, 40);
    if (f.coin(0.2)) o.window_right = o.causal ? f.range(-1, 0) : f.range(-1, 40);
    if (f.coin(0.03)) o.window_right = f.range(-5, 5);
    if (f.coin(0.15)) o.softcap = f.coin(0.9) ? static_cast<float>(f.range(1, 60)) : -1.f;
    if (f.coin(0.2)) o.scale = f.coin(0.9) ? 0.05f * f.range(1, 40) : -1.f;
    o.block_n = f.coin(0.9) ? 16 * f.range(1, 32) : f.range(0, 600);
    HostTensor sinks;
    if (f.coin(0.15)) {
      sinks = testing::random_sinks(f, hq);
      o.sinks = sinks.t;
    }
    const bool pad = f.coin(), bad_last = f.coin(0.02), want_lse = f.coin();
    HostTensor q, k, v, out, lse;
    std::vector<int32_t> cu_q, cu_k;
    Tensor tcq, tck;
    int max_q = sq, max_k = skv;
    Status st;
    if (!varlen) {
      const bool bshd = o.layout == Layout::BSHD;
      const std::vector<int64_t> qs = bshd ? std::vector<int64_t>{B, sq, hq, D} : std::vector<int64_t>{B, hq, sq, D};
      const std::vector<int64_t> ks = bshd ? std::vector<int64_t>{B, skv, hkv, D} : std::vector<int64_t>{B, hkv, skv, D};
      q = HostTensor(f, dt, qs, pad, bad_last), k = HostTensor(f, dt, ks, pad), v = HostTensor(f, dt, ks, pad);
      out = HostTensor(f, dt, qs, pad), lse = HostTensor(f, DType::f32, {B, hq, sq}, false);
    } else {
      cu_q.assign(B + 1, 0), cu_k.assign(B + 1, 0);
      max_q = max_k = 0;
      for (int b = 0; b < B; ++b) {
        const int lq = f.range(0, 40), lk = f.range(0, 50);
        cu_q[b + 1] = cu_q[b] + lq, cu_k[b + 1] = cu_k[b] + lk;
        max_q = std::max(max_q, lq), max_k = std::max(max_k, lk);
      }
      if (f.coin(0.05) && B > 0) cu_q[f.range(0, B)] += f.range(-3, 3);
      if (f.coin(0.05) && B > 0) cu_k[f.range(0, B)] += f.range(-3, 3);
      if (f.coin(0.05)) max_q = std::max(0, max_q - f.range(1, 5));
      if (f.coin(0.05)) max_k = std::max(0, max_k - f.range(1, 5));
      const int64_t tq = std::max(0, cu_q[B]) + (f.coin(0.03) ? 1 : 0), tk = std::max(0, cu_k[B]);
      q = HostTensor(f, dt, {tq, hq, D}, pad, bad_last), k = HostTensor(f, dt, {tk, hkv, D}, pad);
      v = HostTensor(f, dt, {tk, hkv, D}, pad), out = HostTensor(f, dt, {tq, hq, D}, pad);
      lse = HostTensor(f, DType::f32, {hq, tq}, false);
      const int64_t n[1] = {B + 1};
      tcq = make_tensor(cu_q.data(), DType::i32, 1, n), tck = make_tensor(cu_k.data(), DType::i32, 1, n);
    }
    q.fill(f), k.fill(f), v.fill(f);
    st = varlen ? attention_varlen(q.t, k.t, v.t, tcq, tck, max_q, max_k, out.t, want_lse ? &lse.t : nullptr, o)
                : attention(q.t, k.t, v.t, out.t, want_lse ? &lse.t : nullptr, o);
    if (!st.ok()) {
      ++refused;
      ASSERT_FALSE(st.message().empty()) << "an error without a message";
      continue;
    }
    ++ok;
    bool finite = true;
    out.each([&](int64_t byte) { finite &= std::isfinite(out.at(byte)); });
    ASSERT_TRUE(finite) << "an output element unwritten or not finite";
    if (want_lse) {
      bool sane = true;
      lse.each([&](int64_t byte) {
        const float x = lse.at(byte);
        sane &= std::isfinite(x) || x == -INFINITY;
      });
      ASSERT_TRUE(sane) << "an LSE element unwritten, NaN or +inf";
    }

    // No query row or no key (torch SDPA and FlashAttention take such calls): every output 0,
    // every LSE the head's sink or -inf; there is nothing to quantize.
    const int64_t rows_q = varlen ? q.t.shape[0] : int64_t(B) * sq, keys = varlen ? k.t.shape[0] : int64_t(skv);
    if (rows_q == 0 || keys == 0) {
      ++empty;
      bool zero = true;
      out.each([&](int64_t byte) { zero &= out.at(byte) == 0.f; });
      ASSERT_TRUE(zero) << "a call without keys wrote a nonzero output";
      if (want_lse) {
        const int64_t n = lse.t.numel(), per_head = varlen ? lse.t.shape[1] : sq;
        for (int64_t i = 0; i < n; ++i) {
          const float x = lse.at(4 * i);
          const int64_t h = (i / per_head) % hq;
          const float want = o.sinks.defined() ? static_cast<const float*>(o.sinks.data)[h] : -INFINITY;
          ASSERT_EQ(x, want) << "LSE " << i << " of a call without keys";
        }
      }
      continue;
    }

    // attention_int8(quantize(q, k, v)), same options: the same bits.
    ProblemShape ps;
    ps.batch = B, ps.heads_q = hq, ps.heads_kv = hkv, ps.seqlen_q = max_q, ps.seqlen_kv = max_k, ps.head_dim = D;
    ps.varlen = varlen;
    if (varlen) ps.total_q = q.t.shape[0], ps.total_kv = k.t.shape[0];
    const size_t bytes = quantized_bytes(ps, o.scheme);
    testing::AlignedBuffer qbuf(bytes);
    QuantizedQKV x;
    ASSERT_TRUE(alloc_quantized(ps, o.scheme, o.layout, qbuf.data(), bytes, false, 0, &x).ok());
    x.v = v.t;  // half: V as given
    const Tensor none;
    st = quantize(q.t, k.t, v.t, varlen ? tcq : none, varlen ? tck : none, o, x);
    ASSERT_TRUE(st.ok()) << st.message();
    HostTensor out2(f, dt, std::vector<int64_t>(out.t.shape, out.t.shape + out.t.ndim), false);
    HostTensor lse2(f, DType::f32, std::vector<int64_t>(lse.t.shape, lse.t.shape + lse.t.ndim), false);
    st = attention_int8(x, varlen ? tcq : none, varlen ? tck : none, max_q, max_k, out2.t, want_lse ? &lse2.t : nullptr, o);
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<uint8_t> a, b;
    out.each([&](int64_t byte) { a.insert(a.end(), &out.mem[byte], &out.mem[byte] + 2); });
    out2.each([&](int64_t byte) { b.insert(b.end(), &out2.mem[byte], &out2.mem[byte] + 2); });
    ASSERT_EQ(a, b) << "attention_int8(quantize()) differs from attention()";
    if (want_lse) ASSERT_EQ(lse.mem, lse2.mem) << "LSE of attention_int8(quantize()) differs";
  }
  // The mix must exercise both outcomes (a generator change that made every call invalid, or
  // none, would leave half of this test unrun).
  EXPECT_GT(ok, iters / 2);
  EXPECT_GT(refused, iters / 10);
  EXPECT_GT(empty, iters / 200);
}

}  // namespace
}  // namespace intfa
