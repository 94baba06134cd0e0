// Quantizer properties through the public intfa::quantize on host tensors: the documented
// rounding rule bit for bit, round-trip error, zero rows, clamping, symmetry, per-tensor vs
// per-channel V scales, K smoothing mean, V transposed, LSE offset, varlen independence.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "common/numerics.h"
#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

// The result of quantize() on host memory plus accessors in BHSD / BSHD-agnostic terms.
struct HostQuantized {
  ProblemShape shape;
  Layout layout = Layout::BHSD;
  std::unique_ptr<AlignedBuffer> buf;
  QuantizedQKV x;
  Status status;

  int8_t* q8() const { return static_cast<int8_t*>(x.q8.data); }
  int8_t* k8() const { return static_cast<int8_t*>(x.k8.data); }
  int8_t* vt8() const { return static_cast<int8_t*>(x.vt8.data); }
  float* f(const Tensor& t) const { return static_cast<float*>(t.data); }
  // Dense BHSD/BSHD element offsets.
  int64_t qi(int b, int h, int t, int d) const {
    return layout == Layout::BHSD
               ? ((int64_t(b) * shape.heads_q + h) * shape.seqlen_q + t) * shape.head_dim + d
               : ((int64_t(b) * shape.seqlen_q + t) * shape.heads_q + h) * shape.head_dim + d;
  }
  int64_t ki(int b, int h, int t, int d) const {
    return layout == Layout::BHSD
               ? ((int64_t(b) * shape.heads_kv + h) * shape.seqlen_kv + t) * shape.head_dim + d
               : ((int64_t(b) * shape.seqlen_kv + t) * shape.heads_kv + h) * shape.head_dim + d;
  }
  float q_scale(int b, int h, int t) const {
    return f(x.q_scale)[(int64_t(b) * shape.heads_q + h) * shape.seqlen_q + t];
  }
  float lse_offset(int b, int h, int t) const {
    return f(x.lse_offset)[(int64_t(b) * shape.heads_q + h) * shape.seqlen_q + t];
  }
  float k_scale(int b, int h, int t) const {
    return f(x.k_scale)[(int64_t(b) * shape.heads_kv + h) * shape.seqlen_kv + t];
  }
  float k_mean(int b, int h, int d) const {
    return f(x.k_mean)[(int64_t(b) * shape.heads_kv + h) * shape.head_dim + d];
  }
  float v_scale(int b, int h, int d) const {
    return f(x.v_scale)[(int64_t(b) * shape.heads_kv + h) * shape.head_dim + d];
  }
  int8_t vt(int b, int h, int d, int t) const {
    return vt8()[b * x.vt8.stride[0] + h * x.vt8.stride[1] + d * x.vt8.stride[2] + t];
  }
};

// Quantizes BHSD host inputs (transposed to BSHD first when asked).
std::unique_ptr<HostQuantized> quantize_host(HostQKV& in, Scheme scheme,
                                             Layout layout = Layout::BHSD) {
  auto r = std::make_unique<HostQuantized>();
  r->layout = layout;
  ProblemShape& s = r->shape;
  s.batch = in.batch; s.heads_q = in.heads_q; s.heads_kv = in.heads_kv;
  s.seqlen_q = in.seqlen_q; s.seqlen_kv = in.seqlen_kv; s.head_dim = in.head_dim;
  const size_t bytes = quantized_bytes(s, scheme);
  r->buf = std::make_unique<AlignedBuffer>(bytes);
  // Poison: 0x80 is -128 as int8 (never a valid quantized value) and a NaN pattern as f32.
  std::memset(r->buf->data(), 0xff, bytes);
  Status st = alloc_quantized(s, scheme, layout, r->buf->data(), bytes, false, 0, &r->x);
  if (!st.ok()) { r->status = st; return r; }
  Options o;
  o.scheme = scheme;
  o.layout = layout;
  o.backend = Backend::cpu;
  if (layout == Layout::BSHD) {
    auto q = swap_hs(in.q, in.batch, in.heads_q, in.seqlen_q, in.head_dim);
    auto k = swap_hs(in.k, in.batch, in.heads_kv, in.seqlen_kv, in.head_dim);
    auto v = swap_hs(in.v, in.batch, in.heads_kv, in.seqlen_kv, in.head_dim);
    r->status = quantize(make_tensor(q.data(), in.dtype, {in.batch, in.seqlen_q, in.heads_q, in.head_dim}),
                         make_tensor(k.data(), in.dtype, {in.batch, in.seqlen_kv, in.heads_kv, in.head_dim}),
                         make_tensor(v.data(), in.dtype, {in.batch, in.seqlen_kv, in.heads_kv, in.head_dim}),
                         Tensor(), Tensor(), o, r->x);
  } else {
    r->status = quantize(in.tq(), in.tk(), in.tv(), Tensor(), Tensor(), o, r->x);
  }
  return r;
}

float at(const std::vector<uint16_t>& x, DType dt, size_t i) { return tools::to_float(x[i], dt); }
size_t bhsd(int H, int S, int D, int b, int h, int t, int d) {
  return ((size_t(b) * H + h) * S + t) * D + d;
}

// The documented rule (intfa.h), written out independently.
float rule_scale(float amax) { return amax == 0.f ? 1.f : amax / 127.f; }
int rule_q(float x, float amax) {
  const float inv = amax == 0.f ? 1.f : 127.f / amax;
  const float y = x * inv;
  long r = std::lrint(y);  // default rounding mode: half to even
  return static_cast<int>(std::clamp(r, -127L, 127L));
}

// K smoothing mean as documented: fp64 sum / n -> fp32 -> input dtype.
std::vector<float> expected_k_mean(const HostQKV& in, int b, int h, int t0, int n) {
  std::vector<float> mean(in.head_dim, 0.f);
  for (int d = 0; d < in.head_dim; ++d) {
    double sum = 0;
    for (int t = t0; t < t0 + n; ++t)
      sum += at(in.k, in.dtype, bhsd(in.heads_kv, in.seqlen_kv, in.head_dim, b, h, t, d));
    const float m = n ? static_cast<float>(sum / n) : 0.f;
    mean[d] = tools::to_float(in.dtype == DType::bf16 ? float_to_bf16_bits(m) : float_to_half_bits(m),
                              in.dtype);
  }
  return mean;
}

struct QCase {
  Scheme scheme;
  Dist dist;
  DType dtype;
  Layout layout;
};
std::string case_name(const ::testing::TestParamInfo<QCase>& i) {
  return std::string(to_string(i.param.scheme)) + "_" + tools::to_string(i.param.dist) + "_" +
         (i.param.dtype == DType::bf16 ? "bf16" : "fp16") + "_" + to_string(i.param.layout);
}

class QuantizeRule : public ::testing::TestWithParam<QCase> {};

// Every quantized value and scale equals the documented rule bit for bit (q, k' and V^T), and
// the round trip is within half a quantization step.
TEST_P(QuantizeRule, BitExactAndRoundTrip) {
  const QCase c = GetParam();
  const int B = 2, Hq = 4, Hkv = 2, Sq = 37, Skv = 53, D = 64;
  HostQKV in = tools::make_inputs(c.dist, B, Hq, Hkv, Sq, Skv, D, c.dtype,
                                  100 + int(c.scheme) * 10 + int(c.dist) * 3 + int(c.dtype));
  auto r = quantize_host(in, c.scheme, c.layout);
  ASSERT_TRUE(r->status.ok()) << r->status.message();
  const bool smooth = c.scheme != Scheme::paper;
  const float scale = 1.0f / std::sqrt(float(D));
  int64_t bad_q = 0, bad_rt = 0, bad_scale = 0;
  auto report = [&](int64_t& counter, const std::string& what) {
    if (++counter <= 5) ADD_FAILURE() << what;
  };

  // Q rows.
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int t = 0; t < Sq; ++t) {
        float amax = 0;
        for (int d = 0; d < D; ++d)
          amax = std::max(amax, std::fabs(at(in.q, c.dtype, bhsd(Hq, Sq, D, b, h, t, d))));
        const float s = r->q_scale(b, h, t);
        if (s != rule_scale(amax)) report(bad_scale, "q_scale");
        for (int d = 0; d < D; ++d) {
          const float x = at(in.q, c.dtype, bhsd(Hq, Sq, D, b, h, t, d));
          const int q8 = r->q8()[r->qi(b, h, t, d)];
          if (q8 != rule_q(x, amax)) report(bad_q, "q8 at b" + std::to_string(b) + " h" + std::to_string(h) + " t" + std::to_string(t) + " d" + std::to_string(d) + ": " + std::to_string(q8) + " vs " + std::to_string(rule_q(x, amax)));
          if (!(std::fabs(double(q8) * s - x) <= 0.5 * s * (1 + 1e-6) + 1e-7 * std::fabs(x)))
            report(bad_rt, "q round trip");
        }
      }
  // K' rows (K minus the smoothing mean for accurate/half).
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h) {
      std::vector<float> mean = smooth ? expected_k_mean(in, b, h, 0, Skv) : std::vector<float>(D, 0.f);
      if (smooth) {
        for (int d = 0; d < D; ++d) EXPECT_EQ(r->k_mean(b, h, d), mean[d]) << "k_mean b" << b << " h" << h << " d" << d;
      }
      for (int t = 0; t < Skv; ++t) {
        std::vector<float> row(D);
        float amax = 0;
        for (int d = 0; d < D; ++d) {
          row[d] = at(in.k, c.dtype, bhsd(Hkv, Skv, D, b, h, t, d)) - mean[d];
          amax = std::max(amax, std::fabs(row[d]));
        }
        const float s = r->k_scale(b, h, t);
        if (s != rule_scale(amax)) report(bad_scale, "k_scale");
        for (int d = 0; d < D; ++d) {
          const int k8 = r->k8()[r->ki(b, h, t, d)];
          if (k8 != rule_q(row[d], amax)) report(bad_q, "k8");
          if (!(std::fabs(double(k8) * s - row[d]) <= 0.5 * s * (1 + 1e-6) + 1e-7 * std::fabs(row[d])))
            report(bad_rt, "k round trip");
        }
      }
    }
  // V: per-tensor (paper) or per-channel (accurate) scales, stored transposed.
  if (c.scheme != Scheme::half) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h) {
        std::vector<float> amax(D, 0.f);
        for (int t = 0; t < Skv; ++t)
          for (int d = 0; d < D; ++d)
            amax[d] = std::max(amax[d], std::fabs(at(in.v, c.dtype, bhsd(Hkv, Skv, D, b, h, t, d))));
        if (c.scheme == Scheme::paper) std::fill(amax.begin(), amax.end(), *std::max_element(amax.begin(), amax.end()));
        for (int d = 0; d < D; ++d) {
          const float s = r->v_scale(b, h, d);
          if (s != rule_scale(amax[d])) report(bad_scale, "v_scale d" + std::to_string(d));
          for (int t = 0; t < Skv; ++t) {
            const float x = at(in.v, c.dtype, bhsd(Hkv, Skv, D, b, h, t, d));
            const int v8 = r->vt(b, h, d, t);
            if (v8 != rule_q(x, amax[d])) report(bad_q, "vt8");
            if (!(std::fabs(double(v8) * s - x) <= 0.5 * s * (1 + 1e-6) + 1e-7 * std::fabs(x)))
              report(bad_rt, "v round trip");
          }
        }
      }
  }
  // LSE offset: scale * Q . kmean (0 for paper, which does not smooth).
  int64_t bad_off = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / (Hq / Hkv);
      for (int t = 0; t < Sq; ++t) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(at(in.q, c.dtype, bhsd(Hq, Sq, D, b, h, t, d))) * r->k_mean(b, hk, d);
        const double want = smooth ? scale * dot : 0.0;
        const double got = r->lse_offset(b, h, t);
        if (!(std::fabs(got - want) <= 1e-5 * (1 + std::fabs(want)))) report(bad_off, "lse_offset " + std::to_string(got) + " vs " + std::to_string(want));
      }
    }
  EXPECT_EQ(bad_q, 0);
  EXPECT_EQ(bad_rt, 0);
  EXPECT_EQ(bad_scale, 0);
  EXPECT_EQ(bad_off, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Schemes, QuantizeRule,
    ::testing::Values(QCase{Scheme::paper, Dist::normal, DType::bf16, Layout::BHSD},
                      QCase{Scheme::paper, Dist::llm, DType::f16, Layout::BSHD},
                      QCase{Scheme::accurate, Dist::normal, DType::f16, Layout::BHSD},
                      QCase{Scheme::accurate, Dist::llm, DType::bf16, Layout::BHSD},
                      QCase{Scheme::accurate, Dist::uniform, DType::bf16, Layout::BSHD},
                      QCase{Scheme::half, Dist::llm, DType::f16, Layout::BHSD},
                      QCase{Scheme::half, Dist::normal, DType::bf16, Layout::BSHD}),
    case_name);

// The BSHD quantization is the BHSD one, transposed (same values, same scales).
TEST(Quantize, BshdMatchesBhsd) {
  HostQKV in = tools::make_inputs(Dist::llm, 2, 4, 2, 19, 23, 64, DType::bf16, 8);
  auto a = quantize_host(in, Scheme::accurate, Layout::BHSD);
  auto b = quantize_host(in, Scheme::accurate, Layout::BSHD);
  ASSERT_TRUE(a->status.ok() && b->status.ok());
  for (int bb = 0; bb < 2; ++bb)
    for (int h = 0; h < 4; ++h)
      for (int t = 0; t < 19; ++t) {
        ASSERT_EQ(a->q_scale(bb, h, t), b->q_scale(bb, h, t));
        ASSERT_EQ(a->lse_offset(bb, h, t), b->lse_offset(bb, h, t));
        for (int d = 0; d < 64; ++d) ASSERT_EQ(a->q8()[a->qi(bb, h, t, d)], b->q8()[b->qi(bb, h, t, d)]);
      }
  for (int bb = 0; bb < 2; ++bb)
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 23; ++t)
        for (int d = 0; d < 64; ++d) {
          ASSERT_EQ(a->k8()[a->ki(bb, h, t, d)], b->k8()[b->ki(bb, h, t, d)]);
          ASSERT_EQ(a->vt(bb, h, d, t), b->vt(bb, h, d, t));
        }
}

// A row (or V channel) whose max |x| is 0 gets scale 1 and all-zero codes.
TEST(Quantize, ZeroRowsGetScaleOne) {
  for (Scheme scheme : {Scheme::paper, Scheme::accurate}) {
    SCOPED_TRACE(to_string(scheme));
    const int Sq = 5, Skv = 7, D = 32;
    HostQKV in = tools::make_inputs(Dist::normal, 1, 1, 1, Sq, Skv, D, DType::f16, 3);
    for (int d = 0; d < D; ++d) in.q[bhsd(1, Sq, D, 0, 0, 2, d)] = 0;  // q row 2 zero
    // K: every row the same vector, so K' = K - mean(K) is exactly zero for accurate; for paper
    // make one K row zero.
    for (int t = 0; t < Skv; ++t)
      for (int d = 0; d < D; ++d)
        in.k[bhsd(1, Skv, D, 0, 0, t, d)] =
            scheme == Scheme::paper ? (t == 4 ? 0 : in.k[bhsd(1, Skv, D, 0, 0, t, d)])
                                    : in.k[bhsd(1, Skv, D, 0, 0, 0, d)];
    for (int t = 0; t < Skv; ++t) in.v[bhsd(1, Skv, D, 0, 0, t, 3)] = 0x8000;  // V channel 3: -0
    auto r = quantize_host(in, scheme);
    ASSERT_TRUE(r->status.ok()) << r->status.message();
    EXPECT_EQ(r->q_scale(0, 0, 2), 1.f);
    for (int d = 0; d < D; ++d) EXPECT_EQ(r->q8()[r->qi(0, 0, 2, d)], 0);
    for (int t = 0; t < Skv; ++t) {
      if (scheme == Scheme::paper && t != 4) continue;
      EXPECT_EQ(r->k_scale(0, 0, t), 1.f) << "t " << t;
      for (int d = 0; d < D; ++d) EXPECT_EQ(r->k8()[r->ki(0, 0, t, d)], 0);
    }
    if (scheme == Scheme::accurate) {
      EXPECT_EQ(r->v_scale(0, 0, 3), 1.f);
      for (int t = 0; t < Skv; ++t) EXPECT_EQ(r->vt(0, 0, 3, t), 0);
    }
  }
  // paper: V all zero -> the per-tensor scale is 1.
  HostQKV in = tools::make_inputs(Dist::normal, 1, 1, 1, 3, 4, 16, DType::bf16, 4);
  std::fill(in.v.begin(), in.v.end(), 0);
  auto r = quantize_host(in, Scheme::paper);
  ASSERT_TRUE(r->status.ok());
  for (int d = 0; d < 16; ++d) {
    EXPECT_EQ(r->v_scale(0, 0, d), 1.f);
    for (int t = 0; t < 4; ++t) EXPECT_EQ(r->vt(0, 0, d, t), 0);
  }
}

// The shared rounding primitive: half to even, clamped to [-127, 127] (never -128).
TEST(Quantize, PrimitiveRoundsHalfToEvenAndClamps) {
  EXPECT_EQ(quantize_s8(0.5f, 1.f), 0);
  EXPECT_EQ(quantize_s8(1.5f, 1.f), 2);
  EXPECT_EQ(quantize_s8(2.5f, 1.f), 2);
  EXPECT_EQ(quantize_s8(-2.5f, 1.f), -2);
  EXPECT_EQ(quantize_s8(-3.5f, 1.f), -4);
  EXPECT_EQ(quantize_s8(126.5f, 1.f), 126);
  EXPECT_EQ(quantize_s8(127.49f, 1.f), 127);
  EXPECT_EQ(quantize_s8(-127.5f, 1.f), -127);
  EXPECT_EQ(quantize_s8(-128.f, 1.f), -127);
  EXPECT_EQ(quantize_s8(1000.f, 1.f), 127);
  EXPECT_EQ(quantize_s8(-1e6f, 1.f), -127);
  EXPECT_EQ(quant_scale(0.f), 1.f);
  EXPECT_EQ(quant_inv_scale(0.f), 1.f);
  EXPECT_EQ(quantize_p(0.5f / 255.f, 255.f), 0);  // just below a tie after the multiply
  EXPECT_EQ(quantize_p(1.f, 255.f), 255);
  EXPECT_EQ(quantize_p(1.f, 127.f), 127);
}

// Extreme magnitudes (fp16 max, subnormals, bf16 near its max) stay within [-127, 127], the
// row max maps to exactly +-127, and no code is -128.
TEST(Quantize, ExtremeValuesClampToSymmetricRange) {
  for (DType dt : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(name(dt));
    const int S = 4, D = 16;
    HostQKV in = tools::make_inputs(Dist::normal, 1, 1, 1, S, S, D, dt, 11);
    auto bits = [&](float x) { return dt == DType::bf16 ? float_to_bf16_bits(x) : float_to_half_bits(x); };
    const float big = dt == DType::bf16 ? 3.0e38f : 65504.f;
    const float tiny = dt == DType::bf16 ? 1e-30f : 6e-8f;
    for (auto* t : {&in.q, &in.k, &in.v}) {
      (*t)[0] = bits(big);
      (*t)[1] = bits(-big);
      (*t)[2] = bits(tiny);
      (*t)[D + 0] = bits(-big);  // row 1: max is negative
      (*t)[D + 1] = bits(big / 3);
    }
    auto r = quantize_host(in, Scheme::paper);
    ASSERT_TRUE(r->status.ok());
    for (int i = 0; i < S * D; ++i) {
      ASSERT_GE(r->q8()[i], -127);
      ASSERT_GE(r->k8()[i], -127);
    }
    EXPECT_EQ(r->q8()[0], 127);
    EXPECT_EQ(r->q8()[1], -127);
    EXPECT_EQ(r->q8()[2], 0);
    EXPECT_EQ(r->q8()[D], -127);
    EXPECT_EQ(r->k8()[0], 127);
    EXPECT_EQ(r->k8()[D], -127);
    EXPECT_EQ(r->vt(0, 0, 0, 0), 127);
    EXPECT_EQ(r->vt(0, 0, 1, 0), -127);
    for (int d = 0; d < D; ++d)
      for (int t = 0; t < S; ++t) ASSERT_GE(r->vt(0, 0, d, t), -127);
  }
}

// A bf16 row whose values are all tiny but nonzero (bf16 has fp32's exponent range): 127 / amax
// overflows fp32 when amax < 127 / FLT_MAX (about 3.7e-37). Whatever the library does about it
// (quantize exactly, or treat the row as zero with scale 1), every code must have the sign of
// its input (or be 0) and dequantize to within half a step of it.
TEST(Quantize, TinyBf16RowsKeepSignAndPrecision) {
  const int S = 2, D = 16;
  HostQKV in = tools::make_inputs(Dist::normal, 1, 1, 1, S, S, D, DType::bf16, 12);
  for (auto* t : {&in.q, &in.k, &in.v})
    for (int d = 0; d < D; ++d) {
      const float x = (d % 2 ? -1.f : 1.f) * (1 + d) * 1e-38f;  // amax 1.6e-37
      (*t)[d] = float_to_bf16_bits(x);
    }
  auto r = quantize_host(in, Scheme::paper);
  ASSERT_TRUE(r->status.ok());
  const float s = r->q_scale(0, 0, 0);
  for (int d = 0; d < D; ++d) {
    const float x = bf16_bits_to_float(in.q[d]);
    const int q8 = r->q8()[d];
    EXPECT_TRUE(q8 == 0 || (q8 > 0) == (x > 0)) << "d " << d << ": x = " << x << ", q8 = " << q8;
    EXPECT_LE(std::fabs(double(q8) * s - x), 0.5 * s * (1 + 1e-6)) << "d " << d << ", q8 = " << q8 << ", scale " << s;
  }
  const float ks = r->k_scale(0, 0, 0);
  for (int d = 0; d < D; ++d) {
    const float x = bf16_bits_to_float(in.k[d]);
    const int k8 = r->k8()[r->ki(0, 0, 0, d)];
    EXPECT_TRUE(k8 == 0 || (k8 > 0) == (x > 0)) << "k d " << d << ": k8 = " << k8;
    EXPECT_LE(std::fabs(double(k8) * ks - x), 0.5 * ks * (1 + 1e-6)) << "k d " << d;
  }
}

// quantize(-x) == -quantize(x): same scales, negated codes, negated K mean, same LSE offset.
TEST(Quantize, SignSymmetry) {
  for (Scheme scheme : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(scheme));
    const int B = 1, Hq = 2, Hkv = 1, Sq = 21, Skv = 30, D = 64;
    HostQKV a = tools::make_inputs(Dist::llm, B, Hq, Hkv, Sq, Skv, D, DType::f16, 21);
    HostQKV n = a;
    for (auto* t : {&n.q, &n.k, &n.v})
      for (auto& e : *t) e ^= 0x8000;
    auto ra = quantize_host(a, scheme), rn = quantize_host(n, scheme);
    ASSERT_TRUE(ra->status.ok() && rn->status.ok());
    for (int i = 0; i < B * Hq * Sq * D; ++i) ASSERT_EQ(rn->q8()[i], -ra->q8()[i]) << i;
    for (int i = 0; i < B * Hkv * Skv * D; ++i) ASSERT_EQ(rn->k8()[i], -ra->k8()[i]) << i;
    for (int t = 0; t < Sq; ++t)
      for (int h = 0; h < Hq; ++h) {
        ASSERT_EQ(rn->q_scale(0, h, t), ra->q_scale(0, h, t));
        ASSERT_EQ(rn->lse_offset(0, h, t), ra->lse_offset(0, h, t));
      }
    for (int t = 0; t < Skv; ++t) ASSERT_EQ(rn->k_scale(0, 0, t), ra->k_scale(0, 0, t));
    for (int d = 0; d < D; ++d) ASSERT_EQ(rn->k_mean(0, 0, d), -ra->k_mean(0, 0, d));
    if (scheme == Scheme::half) continue;
    for (int d = 0; d < D; ++d) {
      ASSERT_EQ(rn->v_scale(0, 0, d), ra->v_scale(0, 0, d));
      for (int t = 0; t < Skv; ++t) ASSERT_EQ(rn->vt(0, 0, d, t), -ra->vt(0, 0, d, t));
    }
  }
}

// paper: one V scale per (batch, head) = max|V| / 127; accurate: one per channel, which differ
// when the channels do.
TEST(Quantize, VScalePerTensorVsPerChannel) {
  HostQKV in = tools::make_inputs(Dist::normal, 2, 2, 2, 8, 40, 64, DType::bf16, 31);
  for (int t = 0; t < 40; ++t)  // channel 5 of head (0,1) is an outlier channel
    in.v[bhsd(2, 40, 64, 0, 1, t, 5)] = float_to_bf16_bits(20.f * tools::to_float(in.v[bhsd(2, 40, 64, 0, 1, t, 5)], DType::bf16));
  auto p = quantize_host(in, Scheme::paper), a = quantize_host(in, Scheme::accurate);
  ASSERT_TRUE(p->status.ok() && a->status.ok());
  for (int b = 0; b < 2; ++b)
    for (int h = 0; h < 2; ++h) {
      float amax = 0;
      for (int t = 0; t < 40; ++t)
        for (int d = 0; d < 64; ++d) amax = std::max(amax, std::fabs(at(in.v, DType::bf16, bhsd(2, 40, 64, b, h, t, d))));
      float lo = 1e30f, hi = 0;
      for (int d = 0; d < 64; ++d) {
        EXPECT_EQ(p->v_scale(b, h, d), amax / 127.f);
        lo = std::min(lo, a->v_scale(b, h, d));
        hi = std::max(hi, a->v_scale(b, h, d));
      }
      EXPECT_LT(lo, hi);
      EXPECT_EQ(hi, amax / 127.f);
    }
  EXPECT_GT(a->v_scale(0, 1, 5), 5 * a->v_scale(0, 1, 6));
}

// Varlen quantization treats each sequence on its own: it equals quantizing that sequence alone
// as a dense batch of 1 (including an empty q sequence and an empty kv sequence).
TEST(Quantize, VarlenEqualsPerSequenceDense) {
  for (Scheme scheme : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(scheme));
    const int Hq = 4, Hkv = 2, D = 64;
    const DType dt = DType::bf16;
    const std::vector<int> lq = {5, 0, 33, 3, 17}, lk = {9, 11, 20, 0, 64};
    const int n = static_cast<int>(lq.size());
    std::vector<int32_t> cq(n + 1, 0), ck(n + 1, 0);
    for (int i = 0; i < n; ++i) { cq[i + 1] = cq[i] + lq[i]; ck[i + 1] = ck[i] + lk[i]; }
    const int Tq = cq[n], Tk = ck[n];
    // Each sequence's inputs (a dense batch of 1, at least one token on each side).
    std::vector<HostQKV> seq;
    for (int i = 0; i < n; ++i)
      seq.push_back(tools::make_inputs(Dist::llm, 1, Hq, Hkv, std::max(lq[i], 1), std::max(lk[i], 1), D, dt, 500 + i));
    // Packed THD inputs.
    std::vector<uint16_t> q(size_t(Tq) * Hq * D), k(size_t(Tk) * Hkv * D), v(k.size());
    for (int i = 0; i < n; ++i) {
      for (int t = 0; t < lq[i]; ++t)
        for (int h = 0; h < Hq; ++h)
          for (int d = 0; d < D; ++d)
            q[(size_t(cq[i] + t) * Hq + h) * D + d] = seq[i].q[bhsd(Hq, seq[i].seqlen_q, D, 0, h, t, d)];
      for (int t = 0; t < lk[i]; ++t)
        for (int h = 0; h < Hkv; ++h)
          for (int d = 0; d < D; ++d) {
            k[(size_t(ck[i] + t) * Hkv + h) * D + d] = seq[i].k[bhsd(Hkv, seq[i].seqlen_kv, D, 0, h, t, d)];
            v[(size_t(ck[i] + t) * Hkv + h) * D + d] = seq[i].v[bhsd(Hkv, seq[i].seqlen_kv, D, 0, h, t, d)];
          }
    }
    ProblemShape s;
    s.batch = n; s.heads_q = Hq; s.heads_kv = Hkv; s.head_dim = D;
    s.varlen = true; s.total_q = Tq; s.total_kv = Tk;
    const size_t bytes = quantized_bytes(s, scheme);
    AlignedBuffer buf(bytes);
    std::memset(buf.data(), 0xff, bytes);
    QuantizedQKV x;
    ASSERT_TRUE(alloc_quantized(s, scheme, Layout::BHSD, buf.data(), bytes, false, 0, &x).ok());
    Options o;
    o.scheme = scheme;
    Status st = quantize(make_tensor(q.data(), dt, {Tq, Hq, D}), make_tensor(k.data(), dt, {Tk, Hkv, D}),
                         make_tensor(v.data(), dt, {Tk, Hkv, D}), make_tensor(cq.data(), DType::i32, {n + 1}),
                         make_tensor(ck.data(), DType::i32, {n + 1}), o, x);
    ASSERT_TRUE(st.ok()) << st.message();
    const int8_t* q8 = static_cast<int8_t*>(x.q8.data);
    const int8_t* k8 = static_cast<int8_t*>(x.k8.data);
    const int8_t* vt8 = static_cast<int8_t*>(x.vt8.data);
    const float* qs = static_cast<float*>(x.q_scale.data);
    const float* lo = static_cast<float*>(x.lse_offset.data);
    const float* ks = static_cast<float*>(x.k_scale.data);
    const float* km = static_cast<float*>(x.k_mean.data);
    const float* vs = static_cast<float*>(x.v_scale.data);
    for (int i = 0; i < n; ++i) {
      SCOPED_TRACE("sequence " + std::to_string(i));
      auto r = quantize_host(seq[i], scheme);
      ASSERT_TRUE(r->status.ok());
      for (int t = 0; t < lq[i]; ++t)
        for (int h = 0; h < Hq; ++h) {
          const int64_t tok = cq[i] + t;
          ASSERT_EQ(qs[h * Tq + tok], r->q_scale(0, h, t));
          ASSERT_EQ(lo[h * Tq + tok], lk[i] > 0 ? r->lse_offset(0, h, t) : 0.f);  // no keys: no mean
          for (int d = 0; d < D; ++d) ASSERT_EQ(q8[(tok * Hq + h) * D + d], r->q8()[r->qi(0, h, t, d)]);
        }
      for (int h = 0; h < Hkv; ++h) {
        for (int d = 0; d < D; ++d) {
          const int64_t c = (int64_t(i) * Hkv + h) * D + d;
          if (scheme != Scheme::paper) {
            ASSERT_EQ(km[c], lk[i] ? r->k_mean(0, h, d) : 0.f) << "d " << d;
          }
          if (scheme != Scheme::half) {
            ASSERT_EQ(vs[c], lk[i] ? r->v_scale(0, h, d) : 1.f) << "d " << d;
          }
        }
        for (int t = 0; t < lk[i]; ++t) {
          const int64_t tok = ck[i] + t;
          ASSERT_EQ(ks[h * Tk + tok], r->k_scale(0, h, t));
          for (int d = 0; d < D; ++d) {
            ASSERT_EQ(k8[(tok * Hkv + h) * D + d], r->k8()[r->ki(0, h, t, d)]);
            if (scheme != Scheme::half) {
              ASSERT_EQ(vt8[h * x.vt8.stride[0] + d * x.vt8.stride[1] + vt_seq_start(ck.data(), i) + t],
                        r->vt(0, h, d, t));
            }
          }
        }
      }
    }
  }
}

// quantize() rejects an output whose scheme differs from the options.
TEST(Quantize, SchemeMismatchRejected) {
  HostQKV in = tools::make_inputs(Dist::normal, 1, 1, 1, 4, 4, 16, DType::f16, 1);
  ProblemShape s{1, 1, 1, 4, 4, 16};
  AlignedBuffer buf(quantized_bytes(s, Scheme::paper));
  QuantizedQKV x;
  ASSERT_TRUE(alloc_quantized(s, Scheme::paper, Layout::BHSD, buf.data(), buf.size(), false, 0, &x).ok());
  Options o;
  o.scheme = Scheme::accurate;
  Status st = quantize(in.tq(), in.tk(), in.tv(), Tensor(), Tensor(), o, x);
  EXPECT_EQ(st.code(), StatusCode::invalid_argument);
  EXPECT_NE(st.message().find("scheme"), std::string::npos) << st.message();
}

// alloc_quantized: sizes, alignment and the quantized_bytes contract.
TEST(Quantize, AllocQuantizedChecksBuffer) {
  ProblemShape s{2, 4, 2, 33, 65, 64};
  for (Scheme scheme : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    const size_t bytes = quantized_bytes(s, scheme);
    AlignedBuffer buf(bytes + 512);
    QuantizedQKV x;
    ASSERT_TRUE(alloc_quantized(s, scheme, Layout::BHSD, buf.data(), bytes, false, 0, &x).ok());
    // Every part lies inside the buffer and is 256-byte aligned.
    for (const Tensor* t : {&x.q8, &x.q_scale, &x.lse_offset, &x.k8, &x.k_scale, &x.k_mean, &x.vt8, &x.v_scale}) {
      if (!t->defined()) continue;
      const uintptr_t p = reinterpret_cast<uintptr_t>(t->data), b0 = reinterpret_cast<uintptr_t>(buf.data());
      EXPECT_EQ(p % 256, 0u);
      int64_t span = 1;
      for (int i = 0; i < t->ndim; ++i) span += (t->shape[i] - 1) * t->stride[i];
      EXPECT_LE(p + span * dtype_size(t->dtype), b0 + bytes);
    }
    EXPECT_EQ(x.vt8.defined(), scheme != Scheme::half);
    Status st = alloc_quantized(s, scheme, Layout::BHSD, buf.data(), bytes - 1, false, 0, &x);
    EXPECT_EQ(st.code(), StatusCode::invalid_argument);
    EXPECT_NE(st.message().find("bytes"), std::string::npos) << st.message();
    st = alloc_quantized(s, scheme, Layout::BHSD, static_cast<uint8_t*>(buf.data()) + 16, bytes, false, 0, &x);
    EXPECT_EQ(st.code(), StatusCode::invalid_argument);
    EXPECT_NE(st.message().find("aligned"), std::string::npos) << st.message();
    st = alloc_quantized(s, scheme, Layout::BHSD, nullptr, bytes, false, 0, &x);
    EXPECT_EQ(st.code(), StatusCode::invalid_argument);
  }
}

}  // namespace
}  // namespace intfa::testing
