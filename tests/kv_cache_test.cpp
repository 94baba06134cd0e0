// The INT8 KV cache entry points (CPU backend): quantize_q() is quantize()'s Q side bit for bit,
// a prompt quantized straight into a longer cache equals quantize() of the prompt alone,
// append_kv() follows the documented rule for K (bit-identical to quantize() with the same mean)
// and V, and a decode loop over the cache (views of its first L tokens) stays within the
// scheme's error of float64 attention.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "fuzz_util.h"
#include "kv_cache_util.h"
#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

bool verbose() { return std::getenv("INTFA_TEST_VERBOSE") != nullptr; }

// A cache of `cap` tokens for B x Hkv heads (BHSD) in one buffer (alloc_quantized with one query
// row: only its K/V parts are used).
struct Cache {
  ProblemShape ps;
  std::unique_ptr<AlignedBuffer> buf;
  QuantizedQKV x;
  Cache(int B, int Hkv, int cap, int D, Scheme s) : ps{B, Hkv, Hkv, 1, cap, D} {
    buf = std::make_unique<AlignedBuffer>(quantized_bytes(ps, s));
    std::memset(buf->data(), 0x55, buf->size());  // poison: untouched bytes stay 0x55
    EXPECT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf->data(), buf->size(), false, 0, &x).ok());
  }
  QuantizedQKV view(const QuantizedQKV& q, int64_t L) const { return cache_view(x, q, L); }
};

// Fresh inputs (B sequences, Sq queries, cap keys) quantized by quantize() into a host Cache of
// cap tokens and the query parts qp; o: the scheme, causal flag and the emulation's 16-key blocks.
struct QuantizedCache {
  HostQKV x;
  Options o;
  Cache c;
  QParts qp;
  int cap;
  QuantizedCache(int B, int Hq, int Hkv, int Sq, int cap_, int D, Scheme s, bool causal, uint64_t seed)
      : x(tools::make_inputs(Dist::normal, B, Hq, Hkv, Sq, cap_, D, DType::bf16, seed)),
        c(B, Hkv, cap_, D, s), qp(B, Hq, Sq, D, s), cap(cap_) {
    o.scheme = s;
    o.causal = causal;
    o.block_n = 16;
    EXPECT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, view()).ok());
  }
  QuantizedQKV view() const { return c.view(qp.x, cap); }
};

template <typename T>
bool same_bytes(const Tensor& a, const T* b, size_t n) {
  return std::memcmp(a.data, b, n * sizeof(T)) == 0;
}

// Bytes of vt8 [B, H, D, cols] in columns [c0, c1) of every row.
std::vector<int8_t> vt_columns(const Tensor& vt, int64_t c0, int64_t c1) {
  std::vector<int8_t> out;
  const int8_t* p = static_cast<const int8_t*>(vt.data);
  for (int64_t b = 0; b < vt.shape[0]; ++b)
    for (int64_t h = 0; h < vt.shape[1]; ++h)
      for (int64_t d = 0; d < vt.shape[2]; ++d)
        for (int64_t c = c0; c < c1; ++c) out.push_back(p[b * vt.stride[0] + h * vt.stride[1] + d * vt.stride[2] + c]);
  return out;
}

TEST(KvCache, QuantizeQIsQuantizesQSide) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    for (Layout layout : {Layout::BHSD, Layout::BSHD}) {
      SCOPED_TRACE(std::string(to_string(s)) + " " + to_string(layout));
      const int B = 2, Hq = 4, Hkv = 2, Sq = 9, Skv = 33, D = 64;
      HostQKV x = tools::make_inputs(Dist::llm, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 70 + int(s));
      Options o;
      o.scheme = s;
      o.layout = layout;
      o.scale = 0.3f;
      ProblemShape ps{B, Hq, Hkv, Sq, Skv, D};
      AlignedBuffer buf(quantized_bytes(ps, s));
      QuantizedQKV want;
      ASSERT_TRUE(alloc_quantized(ps, s, layout, buf.data(), buf.size(), false, 0, &want).ok());
      std::vector<uint16_t> q = x.q, k = x.k, v = x.v;
      if (layout == Layout::BSHD) {
        q = swap_hs(x.q, B, Hq, Sq, D);
        k = swap_hs(x.k, B, Hkv, Skv, D);
        v = swap_hs(x.v, B, Hkv, Skv, D);
      }
      const bool bshd = layout == Layout::BSHD;
      Tensor tq = make_tensor(q.data(), x.dtype, {B, bshd ? Sq : Hq, bshd ? Hq : Sq, D});
      Tensor tk = make_tensor(k.data(), x.dtype, {B, bshd ? Skv : Hkv, bshd ? Hkv : Skv, D});
      Tensor tv = make_tensor(v.data(), x.dtype, {B, bshd ? Skv : Hkv, bshd ? Hkv : Skv, D});
      Status st = quantize(tq, tk, tv, Tensor(), Tensor(), o, want);
      ASSERT_TRUE(st.ok()) << st.message();

      QParts got(B, Hq, Sq, D, s);
      got.x.q8 = make_tensor(got.q8.data(), DType::i8, {B, bshd ? Sq : Hq, bshd ? Hq : Sq, D});
      st = quantize_q(tq, s == Scheme::paper ? Tensor() : want.k_mean, o, got.x);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_TRUE(same_bytes(want.q8, got.q8.data(), got.q8.size()));
      EXPECT_TRUE(same_bytes(want.q_scale, got.qs.data(), got.qs.size()));
      EXPECT_TRUE(same_bytes(want.lse_offset, got.off.data(), got.off.size()));
    }
  }
}

// The prompt quantized straight into the first L0 tokens of a longer cache (k8 / k_scale views,
// the cache's vt8) equals quantize() of the prompt alone; bytes past L0 are not touched.
TEST(KvCache, PromptIntoCacheEqualsQuantize) {
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    SCOPED_TRACE(to_string(s));
    const int B = 2, Hq = 4, Hkv = 2, Sq = 5, L0 = 29, cap = 100, D = 64;
    HostQKV x = tools::make_inputs(Dist::llm, B, Hq, Hkv, Sq, L0, D, DType::f16, 80 + int(s));
    Options o;
    o.scheme = s;
    ProblemShape ps{B, Hq, Hkv, Sq, L0, D};
    AlignedBuffer buf(quantized_bytes(ps, s));
    QuantizedQKV want;
    ASSERT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf.data(), buf.size(), false, 0, &want).ok());
    ASSERT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, want).ok());

    Cache c(B, Hkv, cap, D, s);
    QParts qp(B, Hq, Sq, D, s);
    QuantizedQKV out = c.view(qp.x, L0);
    Status st = quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, out);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_TRUE(same_bytes(want.q8, qp.q8.data(), qp.q8.size()));
    EXPECT_TRUE(same_bytes(want.k_mean, static_cast<float*>(c.x.k_mean.data), size_t(B) * Hkv * D));
    EXPECT_TRUE(same_bytes(want.v_scale, static_cast<float*>(c.x.v_scale.data), size_t(B) * Hkv * D));
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const int64_t row = b * Hkv + h;
        EXPECT_EQ(std::memcmp(static_cast<int8_t*>(want.k8.data) + row * L0 * D,
                              static_cast<int8_t*>(c.x.k8.data) + row * cap * D, size_t(L0) * D), 0);
        EXPECT_EQ(std::memcmp(static_cast<float*>(want.k_scale.data) + row * L0,
                              static_cast<float*>(c.x.k_scale.data) + row * cap, L0 * sizeof(float)), 0);
        EXPECT_EQ(static_cast<uint8_t*>(c.x.k8.data)[(row * cap + L0) * D], 0x55) << "token L0 written";
      }
    EXPECT_EQ(vt_columns(want.vt8, 0, L0), vt_columns(c.x.vt8, 0, L0));
    for (int8_t b : vt_columns(c.x.vt8, L0, cap)) ASSERT_EQ(uint8_t(b), 0x55) << "V^T column past L0 written";
  }
}

// append_kv with the mean and V scales of quantize() over all tokens: K bit-identical to
// quantize() (same mean, same rule), V by round(v / v_scale) (within one level of quantize()'s
// 127 / amax rule); appends in chunks equal one append; nothing outside the range moves.
TEST(KvCache, AppendFollowsTheRule) {
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    SCOPED_TRACE(to_string(s));
    const int B = 2, Hkv = 3, L = 41, cap = 64, D = 64;
    HostQKV x = tools::make_inputs(Dist::llm, B, Hkv, Hkv, 1, L, D, DType::bf16, 90 + int(s));
    Options o;
    o.scheme = s;
    ProblemShape ps{B, Hkv, Hkv, 1, L, D};
    AlignedBuffer buf(quantized_bytes(ps, s));
    QuantizedQKV want;
    ASSERT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf.data(), buf.size(), false, 0, &want).ok());
    ASSERT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, want).ok());

    Cache one(B, Hkv, cap, D, s), chunks(B, Hkv, cap, D, s);
    for (Cache* c : {&one, &chunks}) {
      std::memcpy(c->x.k_mean.data, want.k_mean.data, size_t(B) * Hkv * D * sizeof(float));
      std::memcpy(c->x.v_scale.data, want.v_scale.data, size_t(B) * Hkv * D * sizeof(float));
    }
    const int pos = 7;  // tokens land at pos .. pos + L - 1
    Status st = append_kv(x.tk(), x.tv(), pos, o, one.x);
    ASSERT_TRUE(st.ok()) << st.message();
    for (auto [t0, n] : {std::pair<int, int>{0, 3}, {3, 1}, {4, L - 4}})
      ASSERT_TRUE(append_kv(tokens(x.tk(), t0, n), tokens(x.tv(), t0, n), pos + t0, o, chunks.x).ok());
    EXPECT_EQ(std::memcmp(one.buf->data(), chunks.buf->data(), one.buf->size()), 0) << "chunked appends differ";

    const float* vs = static_cast<const float*>(want.v_scale.data);
    const int8_t* wvt = static_cast<const int8_t*>(want.vt8.data);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const int64_t row = b * Hkv + h;
        EXPECT_EQ(std::memcmp(static_cast<int8_t*>(want.k8.data) + row * L * D,
                              static_cast<int8_t*>(one.x.k8.data) + (row * cap + pos) * D, size_t(L) * D), 0);
        EXPECT_EQ(std::memcmp(static_cast<float*>(want.k_scale.data) + row * L,
                              static_cast<float*>(one.x.k_scale.data) + row * cap + pos, L * sizeof(float)), 0);
        for (int d = 0; d < D; ++d) {
          const float inv = 1.f / vs[row * D + d];
          const int8_t* got = static_cast<const int8_t*>(one.x.vt8.data) + row * one.x.vt8.stride[1] + d * one.x.vt8.stride[2];
          const int8_t* ref = wvt + row * want.vt8.stride[1] + d * want.vt8.stride[2];
          for (int t = 0; t < L; ++t) {
            const float val = tools::to_float(x.v[(row * L + t) * D + d], x.dtype);
            const int expect = std::max(-127, std::min(127, static_cast<int>(std::nearbyint(val * inv))));
            ASSERT_EQ(got[pos + t], expect) << "b" << b << " h" << h << " d" << d << " t" << t;
            ASSERT_LE(std::abs(int(got[pos + t]) - int(ref[t])), 1);
          }
          ASSERT_EQ(uint8_t(got[pos - 1]), 0x55);
          ASSERT_EQ(uint8_t(got[pos + L]), 0x55);
        }
      }
  }
}

// attention_int8 of one query row per head (qp's) over a contiguous cache view `flat` and over
// `paged`, its paged copy, each sequence b attending to its first used[b] keys: no NaN, the same
// bits.
void expect_paged_equals_flat(QuantizedQKV flat, QuantizedQKV paged, const QuantizedQKV& qp,
                              std::vector<int32_t> used, const Options& o) {
  const int64_t B = qp.q8.shape[0], Hq = qp.q8.shape[1], D = qp.q8.shape[3];
  for (QuantizedQKV* x : {&flat, &paged}) {
    x->q8 = qp.q8;
    x->q_scale = qp.q_scale;
    x->lse_offset = qp.lse_offset;
    x->seqused_kv = make_tensor(used.data(), DType::i32, {B});
  }
  std::vector<float> want(size_t(B * Hq * D), NAN), got(want.size(), NAN);
  ASSERT_TRUE(attention_int8(flat, Tensor(), Tensor(), 0, 0, make_tensor(want.data(), DType::f32, {B, Hq, 1, D}),
                             nullptr, o).ok());
  const Status st = attention_int8(paged, Tensor(), Tensor(), 0, 0, make_tensor(got.data(), DType::f32, {B, Hq, 1, D}),
                                   nullptr, o);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(count_nan(got), 0);
  EXPECT_EQ(got, want);
}

// One head of 16 channels in a cache of 8 tokens: V scales 0.01 (accurate: channel 1's 1.0), a
// pattern of V^T bytes, K mean 0; a new token at `pos` whose K and V are 1.0 (100 levels), but V
// channels 0 and 2 (+-12.0: 1200 levels) and 3 (0.0625: 6.25 levels).
struct OneHeadAppend {
  static constexpr int cap = 8, D = 16, pos = 2;
  Scheme scheme;
  Cache c;
  std::vector<float> vs;
  int8_t* vt;
  int64_t ds, cols;
  std::vector<int8_t> before;
  std::vector<uint16_t> k, v;
  explicit OneHeadAppend(Scheme s) : scheme(s), c(1, 1, cap, D, s), vs(D, 0.01f), k(D, 0x3c00), v(D, 0x3c00) {
    if (s != Scheme::paper) vs[1] = 1.f;
    std::memcpy(c.x.v_scale.data, vs.data(), D * sizeof(float));
    std::memset(c.x.k_mean.data, 0, D * sizeof(float));
    vt = static_cast<int8_t*>(c.x.vt8.data);
    ds = c.x.vt8.stride[2];
    cols = c.x.vt8.shape[3];
    for (int d = 0; d < D; ++d)
      for (int64_t col = 0; col < cols; ++col) vt[d * ds + col] = static_cast<int8_t>((col * 37 + d * 11) % 255 - 127);
    before.assign(vt, vt + D * ds);
    v[0] = 0x4a00;
    v[2] = 0xca00;
    v[3] = 0x2c00;
  }
  Status append(bool fixed_v_scale) {
    Options o;
    o.scheme = scheme;
    o.fixed_v_scale = fixed_v_scale;
    return append_kv(make_tensor(k.data(), DType::f16, {1, 1, 1, D}), make_tensor(v.data(), DType::f16, {1, 1, 1, D}), pos,
                     o, c.x);
  }
};

// V beyond the range of a channel's scale grows that scale to 1.25 x amax / 127 and requantizes
// the bytes the cache holds; paper grows the head's one scale; values within range leave the
// cache alone.
TEST(KvCache, AppendGrowsTheVScaleInsteadOfClamping) {
  for (Scheme s : {Scheme::accurate, Scheme::paper}) {
    SCOPED_TRACE(to_string(s));
    OneHeadAppend a(s);
    ASSERT_TRUE(a.append(false).ok());
    const int D = a.D, pos = a.pos;
    const float grown = 12.f / 127.f * 1.25f;
    const float* got_vs = static_cast<const float*>(a.c.x.v_scale.data);
    for (int d = 0; d < D; ++d) {
      const bool grows = s == Scheme::paper || d == 0 || d == 2;  // paper: the head's one scale
      SCOPED_TRACE("channel " + std::to_string(d));
      ASSERT_EQ(got_vs[d], grows ? grown : a.vs[d]);
      const float val = tools::to_float(a.v[d], DType::f16);
      EXPECT_EQ(a.vt[d * a.ds + pos], static_cast<int>(std::nearbyint(val * (1.f / got_vs[d]))));
      for (int64_t col = 0; col < a.cols; ++col) {
        if (col == pos) continue;
        const int8_t old = a.before[d * a.ds + col];
        const int want = grows ? static_cast<int>(std::nearbyint(float(old) * a.vs[d] * (1.f / grown))) : old;
        ASSERT_EQ(a.vt[d * a.ds + col], want) << "column " << col;
      }
    }
    EXPECT_EQ(a.vt[0 * a.ds + pos], 102);  // 12 / (1.25 * 12 / 127) = 101.6
    EXPECT_EQ(a.vt[2 * a.ds + pos], -102);
  }
}

// Options::fixed_v_scale: the same cache and token, but nothing grows: values past a scale
// saturate at +-127, v_scale is not written and no byte but the new column changes.
TEST(KvCache, FixedVScaleSaturatesAndChangesNothingElse) {
  for (Scheme s : {Scheme::accurate, Scheme::paper}) {
    SCOPED_TRACE(to_string(s));
    OneHeadAppend a(s);
    ASSERT_TRUE(a.append(true).ok());
    const int D = a.D, pos = a.pos;
    EXPECT_EQ(std::memcmp(a.c.x.v_scale.data, a.vs.data(), D * sizeof(float)), 0) << "v_scale unchanged";
    for (int d = 0; d < D; ++d) {
      SCOPED_TRACE("channel " + std::to_string(d));
      const float val = tools::to_float(a.v[d], DType::f16);
      const int want = static_cast<int>(std::clamp(std::nearbyint(val * (1.f / a.vs[d])), -127.f, 127.f));
      EXPECT_EQ(a.vt[d * a.ds + pos], want);
      for (int64_t col = 0; col < a.cols; ++col)
        if (col != pos) ASSERT_EQ(a.vt[d * a.ds + col], a.before[d * a.ds + col]) << "column " << col;
    }
    EXPECT_EQ(a.vt[0 * a.ds + pos], 127);
    EXPECT_EQ(a.vt[2 * a.ds + pos], -127);
    EXPECT_EQ(a.vt[3 * a.ds + pos], 6);
  }
}

// One set of statistics for every sequence (k_mean, v_scale [Hkv, D] seen as [B, Hkv, D] with
// batch stride 0), where they are only read: quantize_q, append_kv with fixed_v_scale and
// attention_int8 give the bits they give with the set copied per sequence; where they would be
// written (quantize(), append_kv growing scales) the call names the tensor.
TEST(KvCache, SharedStatisticsEqualCopiesPerSequence) {
  for (Scheme s : {Scheme::accurate, Scheme::paper}) {
    SCOPED_TRACE(to_string(s));
    const int B = 3, Hq = 4, Hkv = 2, cap = 48, D = 32, L0 = 20, n = 5;
    HostQKV x = tools::make_inputs(Dist::llm, B, Hq, Hkv, 2, cap, D, DType::bf16, 91 + int(s));
    Options o;
    o.scheme = s;
    o.fixed_v_scale = true;
    Cache shared(B, Hkv, cap, D, s), copied(B, Hkv, cap, D, s);
    ASSERT_TRUE(quantize_prompt(x.tk(), x.tv(), L0, o, copied.x).ok());
    // Sequence 0's statistics for all; both caches hold the same prompt bytes.
    const size_t set = size_t(Hkv) * D;
    std::vector<float> km(static_cast<float*>(copied.x.k_mean.data), static_cast<float*>(copied.x.k_mean.data) + set);
    std::vector<float> vs(static_cast<float*>(copied.x.v_scale.data), static_cast<float*>(copied.x.v_scale.data) + set);
    for (int b = 0; b < B; ++b) {
      std::memcpy(static_cast<float*>(copied.x.k_mean.data) + b * set, km.data(), set * sizeof(float));
      std::memcpy(static_cast<float*>(copied.x.v_scale.data) + b * set, vs.data(), set * sizeof(float));
    }
    std::memcpy(shared.buf->data(), copied.buf->data(), copied.buf->size());
    for (auto [t, v] : {std::pair<Tensor*, std::vector<float>*>{&shared.x.k_mean, &km}, {&shared.x.v_scale, &vs}}) {
      t->data = v->data();
      t->stride[0] = 0;
    }
    // Tokens L0 .. L0 + n - 1 of x's keys and values (some past the scales: they saturate).
    const Tensor kn = tokens(x.tk(), L0, n), vn = tokens(x.tv(), L0, n);
    for (Cache* c : {&shared, &copied}) {
      const Status st = append_kv(kn, vn, L0, o, c->x);
      ASSERT_TRUE(st.ok()) << st.message();
    }
    EXPECT_EQ(std::memcmp(shared.buf->data(), copied.buf->data(), copied.buf->size()), 0) << "cache bytes";
    EXPECT_EQ(std::vector<float>(static_cast<float*>(copied.x.v_scale.data), static_cast<float*>(copied.x.v_scale.data) + set), vs);
    QParts qs(B, Hq, 2, D, s), qc(B, Hq, 2, D, s);
    ASSERT_TRUE(quantize_q(x.tq(), shared.x.k_mean, o, qs.x).ok());
    ASSERT_TRUE(quantize_q(x.tq(), copied.x.k_mean, o, qc.x).ok());
    EXPECT_EQ(qs.off, qc.off);
    std::vector<float> want(size_t(B) * Hq * 2 * D, NAN), got(want.size(), NAN);
    o.causal = true;
    ASSERT_TRUE(attention_int8(copied.view(qc.x, L0 + n), Tensor(), Tensor(), 0, 0,
                               make_tensor(want.data(), DType::f32, {B, Hq, 2, D}), nullptr, o).ok());
    const Status st = attention_int8(shared.view(qs.x, L0 + n), Tensor(), Tensor(), 0, 0,
                                     make_tensor(got.data(), DType::f32, {B, Hq, 2, D}), nullptr, o);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(count_nan(got), 0);
    EXPECT_EQ(got, want);
    // Written statistics cannot be shared.
    o.fixed_v_scale = false;
    Status grow = append_kv(kn, vn, L0, o, shared.x);
    EXPECT_EQ(grow.code(), StatusCode::invalid_argument);
    EXPECT_NE(grow.message().find("cache.v_scale: a batch stride of 0"), std::string::npos) << grow.message();
    EXPECT_NE(grow.message().find("fixed_v_scale"), std::string::npos) << grow.message();
    QParts q1(B, Hkv, 1, D, s);
    const Status wq = quantize(tokens(x.tk(), 0, 1), tokens(x.tk(), 0, L0), tokens(x.tv(), 0, L0), Tensor(), Tensor(),
                               o, cache_view(shared.x, q1.x, L0));
    EXPECT_EQ(wq.code(), StatusCode::invalid_argument);
    EXPECT_NE(wq.message().find("k_mean: expected a contiguous tensor, got stride 0 in dim 0"), std::string::npos)
        << wq.message();
  }
}

// Prefix caching over a paged pool: sequences 1 and 2 start with sequence 0's first two pages
// (the same table entries) and go on in pages of their own. With one set of statistics and
// fixed_v_scale, appends to any of them leave the shared pages as they were, and each sequence's
// attention equals a contiguous cache holding its tokens.
TEST(KvCache, SharedPrefixPagesStayValid) {
  for (Scheme s : {Scheme::accurate, Scheme::paper}) {
    SCOPED_TRACE(to_string(s));
    const int B = 3, Hq = 4, Hkv = 2, cap = 64, D = 32, page = 16, prefix = 2 * page, n = 3;
    // Every sequence's tokens: the shared prefix (x's sequence 0), then its own.
    HostQKV x = tools::make_inputs(Dist::llm, B, Hq, Hkv, 1, cap, D, DType::bf16, 95 + int(s));
    HostQKV y = tools::make_inputs(Dist::llm, B, Hkv, Hkv, 1, n, D, DType::bf16, 96 + int(s));
    Options o;
    o.scheme = s;
    o.fixed_v_scale = true;
    const std::vector<int32_t> lens = {prefix + 5, prefix + 11, prefix};  // before the appends
    // The contiguous reference: sequence 0's statistics from its prompt for every sequence, and
    // each prompt written with them; the pool: a paged copy in which sequences 1 and 2 name
    // sequence 0's first two pages.
    Cache flat(B, Hkv, cap, D, s), first(1, Hkv, cap, D, s);
    ASSERT_TRUE(write_shared_prompts(x.tk(), x.tv(), lens, prefix, o, first.x, flat.x).ok());
    PagedCopy pc(flat.x, page, Layout::BHSD, 2, 5);
    const std::vector<int8_t> before = share_first_pages(pc, prefix / page);
    std::vector<int64_t> held(lens.begin(), lens.end());
    for (int b = 0; b < B; ++b) held[b] += n;
    pc.drop_pages_past(held);
    std::vector<int32_t> pos = lens;
    const Tensor tpos = make_tensor(pos.data(), DType::i32, {B});
    for (const QuantizedQKV* c : {&flat.x, &pc.x}) {
      const Status st = append_kv(y.tk(), y.tv(), tpos, o, *c);
      ASSERT_TRUE(st.ok()) << st.message();
    }
    EXPECT_EQ(shared_page_bytes(pc, prefix / page), before) << "the shared prefix pages changed";
    QParts qp(B, Hq, 1, D, s);
    ASSERT_TRUE(quantize_q(x.tq(), flat.x.k_mean, o, qp.x).ok());
    ASSERT_NO_FATAL_FAILURE(
        expect_paged_equals_flat(flat.view(qp.x, cap), pc.x, qp.x, std::vector<int32_t>(held.begin(), held.end()), o));
  }
}

// attention_int8 over a strided view of the cache equals the same tokens copied out compactly.
TEST(KvCache, AttentionOverCacheViewsEqualsCompactCopy) {
  const Scheme s = Scheme::accurate;
  const int B = 2, Hq = 4, Hkv = 2, Sq = 3, L = 45, cap = 70, D = 64;
  HostQKV x = tools::make_inputs(Dist::normal, B, Hq, Hkv, Sq, L, D, DType::bf16, 99);
  Options o;
  o.scheme = s;
  o.causal = true;
  o.block_n = 16;
  Cache c(B, Hkv, cap, D, s);
  QParts qp(B, Hq, Sq, D, s);
  ASSERT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, c.view(qp.x, L)).ok());

  ProblemShape ps{B, Hq, Hkv, Sq, L, D};
  AlignedBuffer buf(quantized_bytes(ps, s));
  QuantizedQKV compact;
  ASSERT_TRUE(alloc_quantized(ps, s, Layout::BHSD, buf.data(), buf.size(), false, 0, &compact).ok());
  ASSERT_TRUE(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, compact).ok());

  std::vector<float> a(size_t(B) * Hq * Sq * D, NAN), b(a.size(), NAN), la(size_t(B) * Hq * Sq, NAN), lb(la.size(), NAN);
  Tensor tla = make_tensor(la.data(), DType::f32, {B, Hq, Sq}), tlb = make_tensor(lb.data(), DType::f32, {B, Hq, Sq});
  Status st = attention_int8(c.view(qp.x, L), Tensor(), Tensor(), 0, 0, make_tensor(a.data(), DType::f32, {B, Hq, Sq, D}), &tla, o);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_TRUE(attention_int8(compact, Tensor(), Tensor(), 0, 0, make_tensor(b.data(), DType::f32, {B, Hq, Sq, D}), &tlb, o).ok());
  EXPECT_EQ(widen(a), widen(b));
  EXPECT_EQ(widen(la), widen(lb));
  EXPECT_EQ(count_nan(a), 0);
}

// A decode loop: the prompt fixes the statistics, then each step appends its token(s), quantizes
// its queries and attends over the cache's first L tokens; against float64 attention over the same
// (unquantized) tokens, causal bottom-right, GQA, one-token steps and a three-token chunk.
TEST(KvCache, DecodeLoopAgainstFloat64) {
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    for (Dist dist : {Dist::normal, Dist::llm}) {
      SCOPED_TRACE(std::string(to_string(s)) + " " + tools::to_string(dist));
      const int B = 2, Hq = 4, Hkv = 2, L0 = 37, steps = 8, cap = 64, D = 64;
      // Queries: one per new token; keys / values: the prompt, then the new tokens.
      HostQKV x = tools::make_inputs(dist, B, Hq, Hkv, steps, L0 + steps, D, DType::bf16, 500 + 10 * int(s) + int(dist));
      Options o;
      o.scheme = s;
      o.causal = true;
      o.block_n = 32;
      Cache c(B, Hkv, cap, D, s);
      ASSERT_TRUE(quantize_prompt(x.tk(), x.tv(), L0, o, c.x).ok());
      int L = L0;
      double sum_err = 0, sum_fresh = 0;
      // Steps: 1, 1, 3 (a chunk of queries, causal among themselves), 1, 1, 1.
      for (int n : {1, 1, 3, 1, 1, 1}) {
        SCOPED_TRACE("tokens " + std::to_string(L) + " + " + std::to_string(n));
        const int i = L - L0;  // first query / new token of the step
        Status st = append_kv(tokens(x.tk(), L, n), tokens(x.tv(), L, n), L, o, c.x);
        ASSERT_TRUE(st.ok()) << st.message();
        L += n;
        QParts qp(B, Hq, n, D, s);
        const Tensor q = tokens(x.tq(), i, n);
        st = quantize_q(q, c.x.k_mean, o, qp.x);
        ASSERT_TRUE(st.ok()) << st.message();
        std::vector<float> out(size_t(B) * Hq * n * D, NAN), lse(size_t(B) * Hq * n, NAN);
        Tensor tl = make_tensor(lse.data(), DType::f32, {B, Hq, n});
        st = attention_int8(c.view(qp.x, L), Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, Hq, n, D}),
                            &tl, o);
        ASSERT_TRUE(st.ok()) << st.message();

        // float64 over the step's queries and the first L tokens (copied out: the reference takes
        // contiguous BHSD).
        auto slice = [&](const std::vector<uint16_t>& src, int H, int S, int t0, int cnt) {
          std::vector<uint16_t> y(size_t(B) * H * cnt * D);
          for (int bh = 0; bh < B * H; ++bh)
            std::memcpy(&y[size_t(bh) * cnt * D], &src[(size_t(bh) * S + t0) * D], size_t(cnt) * D * 2);
          return y;
        };
        HostQKV r;
        r.batch = B, r.heads_q = Hq, r.heads_kv = Hkv, r.seqlen_q = n, r.seqlen_kv = L, r.head_dim = D, r.dtype = x.dtype;
        r.q = slice(x.q, Hq, steps, i, n);
        r.k = slice(x.k, Hkv, L0 + steps, 0, L);
        r.v = slice(x.v, Hkv, L0 + steps, 0, L);
        Result ref = run_reference(r, o);
        ASSERT_TRUE(ref.status.ok()) << ref.status.message();
        // The same step through attention(), which quantizes with statistics of exactly these
        // tokens: the cache's fixed ones should cost little on top.
        Result fresh = run_attention(r, o);
        ASSERT_TRUE(fresh.status.ok()) << fresh.status.message();
        const double err = rel_l2(widen(out), ref.out), fresh_err = rel_l2(fresh.out, ref.out);
        int64_t bad = 0, fresh_bad = 0;
        const double lse_err = max_abs_lse_error(widen(lse), ref.lse, &bad);
        const double fresh_lse_err = max_abs_lse_error(fresh.lse, ref.lse, &fresh_bad);
        if (verbose())
          std::printf("  %s %s L=%d: rel_l2 %.4f (fresh %.4f), lse err %.4f (fresh %.4f)\n", to_string(s),
                      tools::to_string(dist), L, err, fresh_err, lse_err, fresh_lse_err);
        // One query's error is noisy (llm rows attend to a few keys): a bound per step, and the
        // fixed statistics' cost over the whole loop.
        EXPECT_LT(err, s == Scheme::accurate ? 0.05 : 0.25);
        EXPECT_LT(lse_err, 1.5 * fresh_lse_err + 0.1);
        EXPECT_EQ(bad, 0);
        sum_err += err;
        sum_fresh += fresh_err;
      }
      EXPECT_LT(sum_err, 1.6 * sum_fresh + 0.01) << "fixed statistics cost more than quantizing each step afresh";
    }
  }
}

// A ragged batch (seqused_kv): one call over the whole cache equals one call per sequence over
// views of its first tokens, bit for bit, with garbage (NaN scales, extreme bytes) past every
// sequence's count; counts past the cache clamp to it, negative ones to 0 (zero rows, LSE -inf).
TEST(KvCache, RaggedAttentionEqualsOneCallPerSequence) {
  for (Scheme s : {Scheme::accurate, Scheme::paper})
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(to_string(s)) + (causal ? " causal" : ""));
      const int B = 4, Hq = 4, Hkv = 2, Sq = 3, cap = 70, D = 64;
      const QuantizedCache qc(B, Hq, Hkv, Sq, cap, D, s, causal, 31 + causal + 2 * int(s));
      const Options& o = qc.o;
      const Cache& c = qc.c;
      const QParts& qp = qc.qp;
      std::vector<int32_t> lens = {45, -3, 100, 1};
      poison_past(c.x, lens);
      QuantizedQKV all = c.view(qp.x, cap);
      all.seqused_kv = make_tensor(lens.data(), DType::i32, {B});
      std::vector<float> out(size_t(B) * Hq * Sq * D, NAN), lse(size_t(B) * Hq * Sq, NAN);
      const Tensor tlse = make_tensor(lse.data(), DType::f32, {B, Hq, Sq});
      Status st = attention_int8(all, Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, Hq, Sq, D}), &tlse, o);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_EQ(count_nan(out), 0);
      const size_t per_out = size_t(Hq) * Sq * D, per_lse = size_t(Hq) * Sq;
      for (int b = 0; b < B; ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        const int L = std::max(0, std::min(cap, int(lens[b])));
        std::vector<float> want(per_out, 0.f), want_lse(per_lse, -INFINITY);
        if (L > 0) {
          Tensor tl = make_tensor(want_lse.data(), DType::f32, {1, Hq, Sq});
          st = attention_int8(batch_of(c.view(qp.x, L), b), Tensor(), Tensor(), 0, 0,
                              make_tensor(want.data(), DType::f32, {1, Hq, Sq, D}), &tl, o);
          ASSERT_TRUE(st.ok()) << st.message();
        }
        EXPECT_EQ(std::vector<float>(out.begin() + b * per_out, out.begin() + (b + 1) * per_out), want);
        EXPECT_EQ(std::vector<float>(lse.begin() + b * per_lse, lse.begin() + (b + 1) * per_lse), want_lse);
      }
    }
}

// Paged KV (block_table) on the CPU backend: the contiguous cache's call, bit for bit (outputs
// and LSE), whatever the page order; both k8 layouts, causal or not, both schemes, all keys or
// ragged counts, whose table entries past a sequence's count are -1 (never read).
TEST(KvCache, PagedAttentionEqualsContiguous) {
  for (Scheme s : {Scheme::accurate, Scheme::paper})
    for (bool causal : {false, true})
      for (Layout layout : {Layout::BHSD, Layout::BSHD})
        for (bool ragged : {false, true})
          for (int window : {-1, 20}) {  // a sliding window whose edge falls inside a page
            SCOPED_TRACE(std::string(to_string(s)) + (causal ? " causal " : " ") + to_string(layout) +
                         (ragged ? " ragged" : "") + " window_left " + std::to_string(window));
            // BSHD q8 [B, 1, Hq, D] is BHSD [B, Hq, 1, D] in memory: one query row there.
            const int B = 3, Hq = 4, Hkv = 2, Sq = layout == Layout::BHSD ? 3 : 1, cap = 64, D = 64, page = 16;
            QuantizedCache qc(B, Hq, Hkv, Sq, cap, D, s, causal, 41 + int(s) + 2 * causal);
            Options o = qc.o;
            o.window_left = window;
            QuantizedQKV flat = qc.view();
            // Causal calls read V^T pages with padded rows (a strided vt8).
            PagedCopy pc(flat, page, layout, 5, 7 + ragged, causal ? 16 : 0);
            std::vector<int32_t> lens = {45, -3, 100};
            if (ragged) {
              flat.seqused_kv = pc.x.seqused_kv = make_tensor(lens.data(), DType::i32, {B});
              pc.drop_pages_past(lens);  // not read
            }
            if (layout == Layout::BSHD) pc.x.q8 = make_tensor(qc.qp.q8.data(), DType::i8, {B, Sq, Hq, D});
            const std::vector<int64_t> oshape = layout == Layout::BHSD ? std::vector<int64_t>{B, Hq, Sq, D}
                                                                       : std::vector<int64_t>{B, Sq, Hq, D};
            std::vector<float> want(size_t(B) * Hq * Sq * D, NAN), got(want.size(), NAN);
            std::vector<float> want_lse(size_t(B) * Hq * Sq, NAN), got_lse(want_lse.size(), NAN);
            const Tensor twl = make_tensor(want_lse.data(), DType::f32, {B, Hq, Sq});
            const Tensor tgl = make_tensor(got_lse.data(), DType::f32, {B, Hq, Sq});
            Status st = attention_int8(flat, Tensor(), Tensor(), 0, 0,
                                       make_tensor(want.data(), DType::f32, {B, Hq, Sq, D}), &twl, o);
            ASSERT_TRUE(st.ok()) << st.message();
            Tensor tout = make_tensor(got.data(), DType::f32, {oshape[0], oshape[1], oshape[2], oshape[3]});
            st = attention_int8(pc.x, Tensor(), Tensor(), 0, 0, tout, &tgl, o);
            ASSERT_TRUE(st.ok()) << st.message();
            EXPECT_EQ(count_nan(got), 0);
            EXPECT_EQ(got, want);
            EXPECT_EQ(got_lse, want_lse);
            if (window < 0) continue;
            // The pages wholly before each sequence's first visible key (row 0's, the lowest)
            // given back (-1): never read, the same bits; a window one page wider reaches a
            // released page, which the host check names.
            std::vector<int64_t> first(B);
            for (int b = 0; b < B; ++b) {
              const int64_t kv = ragged ? std::clamp(lens[b], 0, cap) : cap;
              first[b] = std::max<int64_t>(0, kv - Sq - window);
            }
            pc.drop_pages_before(first);
            std::fill(got.begin(), got.end(), NAN);
            std::fill(got_lse.begin(), got_lse.end(), NAN);
            st = attention_int8(pc.x, Tensor(), Tensor(), 0, 0, tout, &tgl, o);
            ASSERT_TRUE(st.ok()) << st.message();
            EXPECT_EQ(got, want);
            EXPECT_EQ(got_lse, want_lse);
            if (first[0] >= page) {
              Options wider = o;
              wider.window_left = window + page;
              st = attention_int8(pc.x, Tensor(), Tensor(), 0, 0, tout, &tgl, wider);
              EXPECT_EQ(st.code(), StatusCode::invalid_argument);
              EXPECT_NE(st.message().find("block_table[0][" + std::to_string(first[0] / page - 1) +
                                          "]: expected a page in [0, "), std::string::npos) << st.message();
            }
          }
}

// Random paged calls: the fixed cases above one option at a time, these in combination (page
// sizes 16-256, shuffled pages with spares, several query rows, GQA, head dims, ragged counts
// past both ends, causal, windows whose left edge gives pages back, soft-capping, sinks, scale,
// LSE). Each paged call gives the contiguous call's bits. INTFA_FUZZ_SEED / INTFA_FUZZ_ITERS.
TEST(KvCache, PagedAttentionRandomCallsEqualContiguous) {
  std::mt19937 rng(static_cast<uint32_t>(env_or("INTFA_FUZZ_SEED", 20261128)));
  const int iters = static_cast<int>(env_or("INTFA_FUZZ_ITERS", 60));
  auto pick = [&](int lo, int hi) { return lo + static_cast<int>(rng() % static_cast<unsigned>(hi - lo + 1)); };
  auto coin = [&](int percent) { return static_cast<int>(rng() % 100) < percent; };
  static const int kPages[] = {16, 32, 48, 64, 128, 256};
  for (int it = 0; it < iters; ++it) {
    const Scheme s = coin(50) ? Scheme::accurate : Scheme::paper;
    const int B = pick(1, 3), Hkv = pick(1, 3), Hq = Hkv * pick(1, 3), Sq = pick(1, 5), D = 16 * pick(1, 8);
    const int page = kPages[pick(0, 5)], cap = page * pick(1, std::max(1, 300 / page));
    const bool causal = coin(50);
    SCOPED_TRACE("call " + std::to_string(it) + ": " + to_string(s) + " B" + std::to_string(B) + " H" +
                 std::to_string(Hq) + "/" + std::to_string(Hkv) + " Sq" + std::to_string(Sq) + " D" +
                 std::to_string(D) + " page " + std::to_string(page) + " cap " + std::to_string(cap) +
                 (causal ? " causal" : ""));
    QuantizedCache qc(B, Hq, Hkv, Sq, cap, D, s, causal, 1000 + it);
    Options o = qc.o;
    o.block_n = 16 * pick(1, 8);
    if (coin(30)) o.window_left = pick(0, cap);
    if (coin(20)) o.window_right = causal ? 0 : pick(0, 40);
    if (coin(25)) o.softcap = static_cast<float>(pick(2, 40));
    if (coin(25)) o.scale = 0.02f * pick(1, 10);
    std::vector<float> z(Hq);
    for (float& v : z) v = coin(15) ? -INFINITY : static_cast<float>(pick(-3, 5));
    if (coin(25)) o.sinks = make_tensor(z.data(), DType::f32, {Hq});
    QuantizedQKV flat = qc.view();
    PagedCopy pc(flat, page, Layout::BHSD, pick(0, 4), static_cast<uint32_t>(pick(0, 99)), causal && coin(50) ? 16 : 0);
    std::vector<int32_t> lens(B);
    const bool ragged = coin(50);
    if (ragged) {
      for (int32_t& n : lens) n = pick(-3, cap + 3);
      flat.seqused_kv = pc.x.seqused_kv = make_tensor(lens.data(), DType::i32, {B});
      pc.drop_pages_past(lens);  // not read
    }
    if (o.window_left >= 0 && o.window_right <= 0) {  // pages wholly before row 0's first key
      std::vector<int64_t> first(B);
      for (int b = 0; b < B; ++b) {
        const int64_t kv = ragged ? std::clamp(lens[b], 0, cap) : cap;
        first[b] = std::max<int64_t>(0, kv - Sq - o.window_left);
      }
      pc.drop_pages_before(first);
    }
    const bool want_lse = coin(70);
    std::vector<float> want(size_t(B) * Hq * Sq * D, NAN), got(want.size(), NAN);
    std::vector<float> want_lse_v(size_t(B) * Hq * Sq, NAN), got_lse(want_lse_v.size(), NAN);
    const Tensor twl = make_tensor(want_lse_v.data(), DType::f32, {B, Hq, Sq});
    const Tensor tgl = make_tensor(got_lse.data(), DType::f32, {B, Hq, Sq});
    Status st = attention_int8(flat, Tensor(), Tensor(), 0, 0, make_tensor(want.data(), DType::f32, {B, Hq, Sq, D}),
                               want_lse ? &twl : nullptr, o);
    ASSERT_TRUE(st.ok()) << st.message();
    st = attention_int8(pc.x, Tensor(), Tensor(), 0, 0, make_tensor(got.data(), DType::f32, {B, Hq, Sq, D}),
                        want_lse ? &tgl : nullptr, o);
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_EQ(count_nan(got), 0);
    ASSERT_EQ(got, want);
    if (want_lse) ASSERT_EQ(got_lse, want_lse_v);
  }
}

// Paged KV errors: each names the argument, what was expected and what came.
TEST(KvCache, PagedErrors) {
  const int B = 2, Hq = 2, Hkv = 2, Sq = 1, cap = 32, D = 64, page = 16;
  QuantizedCache qc(B, Hq, Hkv, Sq, cap, D, Scheme::accurate, false, 5);
  HostQKV& x = qc.x;
  const Options& o = qc.o;
  QParts& qp = qc.qp;
  PagedCopy pc(qc.view(), page, Layout::BHSD, 1, 3);
  std::vector<float> out(size_t(B) * Hq * Sq * D);
  const Tensor tout = make_tensor(out.data(), DType::f32, {B, Hq, Sq, D});
  auto run = [&](const QuantizedQKV& q) { return attention_int8(q, Tensor(), Tensor(), 0, 0, tout, nullptr, o); };
  auto expect = [&](const Status& st, StatusCode code, const std::string& has) {
    EXPECT_EQ(st.code(), code) << st.message();
    EXPECT_NE(st.message().find(has), std::string::npos) << st.message();
  };
  ASSERT_TRUE(run(pc.x).ok());
  QuantizedQKV q = pc.x;
  std::vector<float> wide(size_t(B) * 2);
  q.block_table = make_tensor(wide.data(), DType::f32, {B, 2});
  expect(run(q), StatusCode::unsupported_type, "block_table: expected dtype int32");
  q = pc.x;
  q.block_table = make_tensor(pc.table.data(), DType::i32, {B + 1, 1});
  expect(run(q), StatusCode::invalid_argument, "block_table: expected [batch = 2, max_pages >= 1]");
  pc.table[3] = int32_t(pc.x.k8.shape[0]);  // sequence 1's second page: past the pool
  expect(run(pc.x), StatusCode::invalid_argument, "block_table[1][1]: expected a page in [0, 5)");
  pc.table[3] = 0;
  q = pc.x;
  q.k8 = make_tensor(pc.k8.data(), DType::i8, {5, Hkv, 8, D});  // pages of 8 tokens
  expect(run(q), StatusCode::invalid_argument, "page_size (the token dim of the pages) must be a multiple of 16, got 8");
  q = pc.x;
  q.k_scale = make_tensor(pc.ks.data(), DType::f32, {B, Hkv, cap});
  expect(run(q), StatusCode::invalid_argument, "k_scale");
  q = pc.x;
  q.vt8 = make_tensor(pc.vt8.data(), DType::i8, {5, Hkv, D, 8});
  expect(run(q), StatusCode::invalid_argument, "vt8: expected V^T pages [num_pages = 5, heads_kv = 2, head_dim = 64, >= page_size = 16]");
  std::vector<int32_t> cu = {0, 1, 2};
  const Tensor tcu = make_tensor(cu.data(), DType::i32, {3});
  QuantizedQKV v = pc.x;
  v.q8 = make_tensor(qp.q8.data(), DType::i8, {B * Sq, Hq, D});
  v.q_scale = make_tensor(qp.qs.data(), DType::f32, {Hq, B * Sq});
  v.lse_offset = Tensor();
  expect(attention_int8(v, tcu, tcu, 1, cap, make_tensor(out.data(), DType::f32, {B * Sq, Hq, D}), nullptr, o),
         StatusCode::invalid_argument, "block_table: paged KV takes dense queries");
  q = pc.x;
  q.scheme = Scheme::half;
  Options oh = o;
  oh.scheme = Scheme::half;
  expect(attention_int8(q, Tensor(), Tensor(), 0, 0, tout, nullptr, oh), StatusCode::not_available,
         "block_table: paged KV holds int8 V^T pages");
  expect(quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, pc.x), StatusCode::invalid_argument,
         "out.block_table: quantize() writes contiguous tensors");
  // append_kv into pages: the entries of the pages it writes must name pages.
  pc.table[2] = -1;  // sequence 1's first page
  expect(append_kv(tokens(x.tk(), 0, 1), tokens(x.tv(), 0, 1), 0, o, pc.x), StatusCode::invalid_argument,
         "block_table[1][0]: expected a page in [0, 5)");
  pc.table[2] = 1;
  // The pages before the new tokens (the V sweep's): a page or -1 (given back), nothing else.
  pc.table[2] = -2;
  expect(append_kv(tokens(x.tk(), 0, 1), tokens(x.tv(), 0, 1), 16, o, pc.x), StatusCode::invalid_argument,
         "block_table[1][0]: expected a page in [0, 5) (it holds keys of sequence 1 that the V sweep requantizes; "
         "-1: a released page), got -2");
  pc.table[2] = -1;
  EXPECT_TRUE(append_kv(tokens(x.tk(), 0, 1), tokens(x.tv(), 0, 1), 16, o, pc.x).ok());
  pc.table[2] = 1;
  expect(append_kv(tokens(x.tk(), 0, 1), tokens(x.tv(), 0, 1), cap, o, pc.x), StatusCode::invalid_argument,
         "pos: expected 0 <= pos and pos + new tokens (1) <= the cache's 32 tokens, got pos 32");
  q = pc.x;
  q.vt8 = make_tensor(pc.vt8.data(), DType::i8, {5, Hkv, D, 8});
  expect(append_kv(tokens(x.tk(), 0, 1), tokens(x.tv(), 0, 1), 0, o, q), StatusCode::invalid_argument,
         "cache.vt8: expected V^T pages [num_pages = 5");
}

// append_kv into a paged cache writes what it writes into the contiguous one (read back through
// the table: K rows and scales, V^T columns, V scales, and the attention over the result), with
// V scales that grow (the held columns requantized, page by page); one position for all or one
// per sequence (a token past the capacity dropped). Table entries past the pages an append
// touches are -1: never read or written.
TEST(KvCache, PagedAppendEqualsContiguous) {
  for (Scheme s : {Scheme::paper, Scheme::accurate})
    for (bool per_seq : {false, true}) {
      SCOPED_TRACE(std::string(to_string(s)) + (per_seq ? " per-sequence positions" : ""));
      const int B = 3, Hq = 4, Hkv = 2, cap = 64, D = 64, page = 16, L0 = 20, n = 3;
      HostQKV x = tools::make_inputs(Dist::normal, B, Hkv, Hkv, 1, cap, D, DType::bf16, 61 + int(s));
      HostQKV y = tools::make_inputs(Dist::llm, B, Hkv, Hkv, 1, n, D, DType::bf16, 62 + int(s));
      Options o;
      o.scheme = s;
      Cache c(B, Hkv, cap, D, s);
      ASSERT_TRUE(quantize_prompt(x.tk(), x.tv(), L0, o, c.x).ok());
      float* vs = static_cast<float*>(c.x.v_scale.data);  // small scales: the new tokens grow them
      for (int i = 0; i < B * Hkv * D; i += 3) vs[i] *= 0.05f;
      PagedCopy pc(c.x, page, Layout::BHSD, 4, 11);
      std::vector<int32_t> pos = {L0, 5, 62};
      std::vector<int64_t> end(B);
      for (int b = 0; b < B; ++b) end[b] = std::min<int64_t>(cap, (per_seq ? pos[b] : L0) + n);
      pc.drop_pages_past(end);
      // Sequence 2's first two pages given back (-1, a local layer's window has passed them):
      // the V sweep skips them (their bytes are not compared below).
      const int64_t released = per_seq ? 2 * page : 0;
      pc.drop_pages_before(std::vector<int64_t>{0, 0, released});
      const Tensor tpos = make_tensor(pos.data(), DType::i32, {B});
      for (const QuantizedQKV* cache : {&c.x, &pc.x}) {
        const Status st = per_seq ? append_kv(y.tk(), y.tv(), tpos, o, *cache) : append_kv(y.tk(), y.tv(), L0, o, *cache);
        ASSERT_TRUE(st.ok()) << st.message();
      }
      const int8_t *ck = static_cast<const int8_t*>(c.x.k8.data), *cv = static_cast<const int8_t*>(c.x.vt8.data);
      const float* cs = static_cast<const float*>(c.x.k_scale.data);
      const Tensor &k8 = c.x.k8, &vt = c.x.vt8, &ks = c.x.k_scale;
      int64_t checked = 0;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hkv; ++h)
          for (int64_t t = b == 2 ? released : 0; t < end[b]; ++t, ++checked) {
            const int64_t pg = pc.table[size_t(b) * (cap / page) + t / page], r = t % page;
            ASSERT_EQ(pc.ks[(pg * Hkv + h) * page + r], cs[b * ks.stride[0] + h * ks.stride[1] + t]) << b << " " << t;
            for (int d = 0; d < D; ++d) {
              ASSERT_EQ(pc.k8[((pg * Hkv + h) * page + r) * D + d], ck[b * k8.stride[0] + h * k8.stride[1] + t * D + d]);
              ASSERT_EQ(pc.vt8[((pg * Hkv + h) * D + d) * page + r],
                        cv[b * vt.stride[0] + h * vt.stride[1] + d * vt.stride[2] + t]) << b << " " << h << " " << d << " " << t;
            }
          }
      EXPECT_EQ(checked, Hkv * (end[0] + end[1] + end[2] - released));
      EXPECT_EQ(pc.vs, std::vector<float>(vs, vs + B * Hkv * D));
      // Attention over each sequence's tokens: the same bits.
      HostQKV qx = tools::make_inputs(Dist::normal, B, Hq, Hkv, 1, 1, D, DType::bf16, 63);
      QParts qp(B, Hq, 1, D, s);
      std::vector<float> km_stats(size_t(B) * Hkv * D, 0.f);
      const Tensor tkm = make_tensor(s == Scheme::accurate ? static_cast<float*>(c.x.k_mean.data) : km_stats.data(),
                                     DType::f32, {B, Hkv, D});
      ASSERT_TRUE(quantize_q(qx.tq(), tkm, o, qp.x).ok());
      Options oa = o;  // with released pages: a local layer's window, which does not reach them
      if (released) {
        oa.causal = true;
        oa.window_left = 20;
      }
      ASSERT_NO_FATAL_FAILURE(
          expect_paged_equals_flat(c.view(qp.x, cap), pc.x, qp.x, std::vector<int32_t>(end.begin(), end.end()), oa));
    }
}

// append_kv with a position per sequence writes what one append per sequence writes, and drops
// the tokens whose position falls outside the cache. The reference is a cache 8 tokens longer
// whose column c + 4 stands for column c: every position is valid there.
TEST(KvCache, AppendAtPerSequencePositions) {
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    SCOPED_TRACE(to_string(s));
    const int B = 3, Hkv = 2, cap = 40, D = 64, n = 3, shift = 4;
    HostQKV x = tools::make_inputs(Dist::llm, B, Hkv, Hkv, 1, n, D, DType::bf16, 17 + int(s));
    Options o;
    o.scheme = s;
    Cache rag(B, Hkv, cap, D, s), ref(B, Hkv, cap + 2 * shift, D, s);
    // The same statistics and the same held V^T bytes (column c of rag = column c + shift of ref);
    // small scales on some channels, so that they grow and the held bytes are requantized.
    for (Cache* c : {&rag, &ref}) {
      float* km = static_cast<float*>(c->x.k_mean.data);
      float* vs = static_cast<float*>(c->x.v_scale.data);
      for (int i = 0; i < B * Hkv * D; ++i) {
        km[i] = 0.01f * float(i % 7 - 3);
        vs[i] = s == Scheme::paper ? 0.004f : (i % 5 ? 0.05f : 0.001f);
      }
      const Tensor& vt = c->x.vt8;
      const int64_t off = c == &ref ? shift : 0;
      for (int64_t bh = 0; bh < B * Hkv; ++bh)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t col = 0; col < cap; ++col)
            static_cast<int8_t*>(vt.data)[bh * vt.stride[1] + d * vt.stride[2] + col + off] =
                static_cast<int8_t>((col * 29 + d * 7 + bh) % 255 - 127);
    }
    std::vector<int32_t> pos = {5, -2, cap - 1};  // sequence 1 loses 2 tokens, sequence 2 its last 2
    Status st = append_kv(x.tk(), x.tv(), make_tensor(pos.data(), DType::i32, {B}), o, rag.x);
    ASSERT_TRUE(st.ok()) << st.message();
    for (int b = 0; b < B; ++b) {
      st = append_kv(batch_slice(x.tk(), b), batch_slice(x.tv(), b), pos[b] + shift, o, batch_of(ref.x, b));
      ASSERT_TRUE(st.ok()) << st.message();
    }
    EXPECT_EQ(std::memcmp(rag.x.v_scale.data, ref.x.v_scale.data, size_t(B) * Hkv * D * sizeof(float)), 0);
    const int64_t rcap = cap + 2 * shift;
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      SCOPED_TRACE("head " + std::to_string(bh));
      const int8_t* rk = static_cast<const int8_t*>(rag.x.k8.data) + bh * cap * D;
      const int8_t* fk = static_cast<const int8_t*>(ref.x.k8.data) + (bh * rcap + shift) * D;
      EXPECT_EQ(std::memcmp(rk, fk, size_t(cap) * D), 0) << "k8";
      const float* rs = static_cast<const float*>(rag.x.k_scale.data) + bh * cap;
      const float* fs = static_cast<const float*>(ref.x.k_scale.data) + bh * rcap + shift;
      EXPECT_EQ(std::memcmp(rs, fs, cap * sizeof(float)), 0) << "k_scale";
      for (int d = 0; d < D; ++d) {
        const int8_t* rv = static_cast<const int8_t*>(rag.x.vt8.data) + bh * rag.x.vt8.stride[1] + d * rag.x.vt8.stride[2];
        const int8_t* fv = static_cast<const int8_t*>(ref.x.vt8.data) + bh * ref.x.vt8.stride[1] + d * ref.x.vt8.stride[2];
        ASSERT_EQ(std::memcmp(rv, fv + shift, cap), 0) << "vt8 channel " << d;
      }
    }
    // The dropped tokens: nothing of sequence 1 before column 0 or of sequence 2 past the cache.
    const float* ks = static_cast<const float*>(rag.x.k_scale.data);
    EXPECT_FALSE(std::isnan(ks[1 * Hkv * cap + 0])) << "sequence 1's third token lands at 0";
    EXPECT_FALSE(std::isnan(ks[2 * Hkv * cap + cap - 1]));
  }
}

TEST(KvCache, ErrorsNameTheArgument) {
  const int B = 1, Hkv = 2, cap = 16, D = 64;
  Cache c(B, Hkv, cap, D, Scheme::accurate);
  HostQKV x = tools::make_inputs(Dist::normal, B, 4, Hkv, 2, 4, D, DType::f16, 7);
  Options o;
  auto has = [](const Status& st, StatusCode code, const char* a, const char* b) {
    return st.code() == code && st.message().find(a) != std::string::npos && st.message().find(b) != std::string::npos;
  };
  Status st = append_kv(x.tk(), x.tv(), 13, o, c.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "pos", "<= the cache's 16 tokens, got pos 13")) << st.message();
  st = append_kv(x.tk(), x.tv(), -1, o, c.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "pos", "got pos -1")) << st.message();
  st = append_kv(x.tq(), x.tq(), 0, o, c.x);  // 4 heads against the cache's 2
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "cache.k8", "(1, 4, 64)")) << st.message();
  Options half = o;
  half.scheme = Scheme::half;
  QuantizedQKV hc = c.x;
  hc.scheme = Scheme::half;
  st = append_kv(x.tk(), x.tv(), 0, half, hc);
  EXPECT_TRUE(has(st, StatusCode::not_available, "half", "append_kv")) << st.message();
  Options paper = o;
  paper.scheme = Scheme::paper;
  st = append_kv(x.tk(), x.tv(), 0, paper, c.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "cache.scheme", "expected paper")) << st.message();

  QParts qp(B, 4, 2, D, Scheme::accurate);
  st = quantize_q(x.tq(), Tensor(), o, qp.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "k_mean", "got null data")) << st.message();
  std::vector<float> bad_mean(3 * D);
  st = quantize_q(x.tq(), make_tensor(bad_mean.data(), DType::f32, {B, 3, D}), o, qp.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "k_mean", "heads_kv dividing heads_q = 4")) << st.message();
  QuantizedQKV no_off = qp.x;
  no_off.lse_offset = Tensor();
  EXPECT_TRUE(quantize_q(x.tq(), Tensor(), o, no_off).ok()) << "the mean is only needed for lse_offset";
  QuantizedQKV small = qp.x;
  small.q_scale.shape[2] = 1;
  st = quantize_q(x.tq(), c.x.k_mean, o, small);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "out.q_scale", "[batch, heads_q, seqlen_q] = [1, 4, 2]")) << st.message();

  std::vector<int32_t> pos2(2);
  st = append_kv(x.tk(), x.tv(), make_tensor(pos2.data(), DType::i32, {2}), o, c.x);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "pos", "[batch] = [1], got [2]")) << st.message();
  std::vector<float> posf(1);
  st = append_kv(x.tk(), x.tv(), make_tensor(posf.data(), DType::f32, {1}), o, c.x);
  EXPECT_TRUE(has(st, StatusCode::unsupported_type, "pos", "expected dtype int32")) << st.message();

  // attention_int8 takes strided k_scale views but still wants the last dim contiguous.
  QParts q1(B, 4, 1, D, Scheme::accurate);
  QuantizedQKV v = c.view(q1.x, 4);
  v.k_scale.stride[2] = 2;
  std::vector<float> out(size_t(B) * 4 * D);
  st = attention_int8(v, Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, 4, 1, D}), nullptr, o);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "k_scale", "contiguous last dim")) << st.message();
  // ... and no two entries in one place (an output of quantize() would be written twice).
  v = c.view(q1.x, 4);
  v.k_scale.stride[1] = 2;  // rows of 4 tokens 2 floats apart
  st = attention_int8(v, Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, 4, 1, D}), nullptr, o);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "k_scale", "stride of dim 1 >= 4), got 2")) << st.message();
  // seqused_kv: int32 [batch] in the memory of q8; quantize() takes none.
  v = c.view(q1.x, 4);
  std::vector<int32_t> used(2, 4);
  v.seqused_kv = make_tensor(used.data(), DType::i32, {2});
  st = attention_int8(v, Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, 4, 1, D}), nullptr, o);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "seqused_kv", "[batch] = [1], got [2]")) << st.message();
  v.seqused_kv = make_tensor(out.data(), DType::f32, {1});
  st = attention_int8(v, Tensor(), Tensor(), 0, 0, make_tensor(out.data(), DType::f32, {B, 4, 1, D}), nullptr, o);
  EXPECT_TRUE(has(st, StatusCode::unsupported_type, "seqused_kv", "expected dtype int32")) << st.message();
  v = c.view(q1.x, 4);
  v.seqused_kv = make_tensor(used.data(), DType::i32, {1});
  st = quantize(x.tq(), tokens(x.tk(), 0, 4), tokens(x.tv(), 0, 4), Tensor(), Tensor(), o, v);
  EXPECT_TRUE(has(st, StatusCode::invalid_argument, "out.seqused_kv", "expected undefined")) << st.message();
}

}  // namespace
}  // namespace intfa::testing
