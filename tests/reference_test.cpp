// intfa::attention_reference (the float64 oracle) against a naive O(N^2) long-double
// softmax(scale Q K^T) V written here: layouts, GQA, causal with Sq != Skv, LSE, scale option.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

struct Shape {
  int B, Hq, Hkv, Sq, Skv, D;
};

// Naive attention in long double on BHSD inputs. `scale` is the float the library uses.
void naive_attention(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v, float scale, bool causal,
                     std::vector<double>* out, std::vector<double>* lse) {
  out->assign(static_cast<size_t>(s.B) * s.Hq * s.Sq * s.D, 0.0);
  lse->assign(static_cast<size_t>(s.B) * s.Hq * s.Sq, 0.0);
  const int group = s.Hq / s.Hkv;
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.Hq; ++h) {
      const int hk = h / group;
      const double* Q = &q[((size_t(b) * s.Hq + h) * s.Sq) * s.D];
      const double* K = &k[((size_t(b) * s.Hkv + hk) * s.Skv) * s.D];
      const double* V = &v[((size_t(b) * s.Hkv + hk) * s.Skv) * s.D];
      for (int i = 0; i < s.Sq; ++i) {
        const int visible = causal ? std::max(0, std::min(s.Skv, i + s.Skv - s.Sq + 1)) : s.Skv;
        std::vector<long double> sc(visible);
        long double mx = -std::numeric_limits<long double>::infinity();
        for (int j = 0; j < visible; ++j) {
          long double dot = 0;
          for (int d = 0; d < s.D; ++d) dot += (long double)Q[i * s.D + d] * K[j * s.D + d];
          sc[j] = dot * (long double)scale;
          mx = std::max(mx, sc[j]);
        }
        long double sum = 0;
        std::vector<long double> o(s.D, 0);
        for (int j = 0; j < visible; ++j) {
          const long double w = std::exp(sc[j] - mx);
          sum += w;
          for (int d = 0; d < s.D; ++d) o[d] += w * V[j * s.D + d];
        }
        const size_t row = (size_t(b) * s.Hq + h) * s.Sq + i;
        for (int d = 0; d < s.D; ++d)
          (*out)[row * s.D + d] = visible ? static_cast<double>(o[d] / sum) : 0.0;
        (*lse)[row] = visible ? static_cast<double>(mx + std::log(sum))
                              : -std::numeric_limits<double>::infinity();
      }
    }
}

std::vector<double> random_vec(size_t n, std::mt19937_64& rng, double offset = 0) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> x(n);
  for (auto& e : x) e = nd(rng) + offset;
  return x;
}

// Checks out/lse of the reference against the naive result element by element.
void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                  const std::vector<double>& got_lse, const std::vector<double>& want_lse,
                  double rtol) {
  ASSERT_EQ(got.size(), want.size());
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= rtol * (std::fabs(want[i]) + scale))) {
      if (++bad <= 5) ADD_FAILURE() << "out[" << i << "] = " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0u);
  ASSERT_EQ(got_lse.size(), want_lse.size());
  bad = 0;
  for (size_t i = 0; i < want_lse.size(); ++i) {
    const bool ok = std::isinf(want_lse[i])
                        ? (got_lse[i] == want_lse[i])
                        : std::fabs(got_lse[i] - want_lse[i]) <= rtol * (1 + std::fabs(want_lse[i]));
    if (!ok && ++bad <= 5) ADD_FAILURE() << "lse[" << i << "] = " << got_lse[i] << ", want " << want_lse[i];
  }
  EXPECT_EQ(bad, 0u);
}

struct RefCase {
  Shape s;
  bool causal;
  Layout layout;
  float scale;  // 0: default
};

class ReferenceVsNaive : public ::testing::TestWithParam<RefCase> {};

TEST_P(ReferenceVsNaive, Float64InputsMatch) {
  const RefCase c = GetParam();
  const Shape& s = c.s;
  std::mt19937_64 rng(1000 + s.Sq * 31 + s.Skv * 7 + s.Hkv + c.causal * 3 + int(c.layout) * 5);
  auto q = random_vec(size_t(s.B) * s.Hq * s.Sq * s.D, rng);
  auto k = random_vec(size_t(s.B) * s.Hkv * s.Skv * s.D, rng, 0.5);
  auto v = random_vec(size_t(s.B) * s.Hkv * s.Skv * s.D, rng);
  const float scale = c.scale != 0.f ? c.scale : 1.0f / std::sqrt(static_cast<float>(s.D));
  std::vector<double> want, want_lse;
  naive_attention(s, q, k, v, scale, c.causal, &want, &want_lse);

  Options o;
  o.causal = c.causal;
  o.layout = c.layout;
  o.scale = c.scale;
  std::vector<double> out(want.size(), kNaN), lse(want_lse.size(), kNaN);
  Tensor tl = make_tensor(lse.data(), DType::f64, {s.B, s.Hq, s.Sq});
  Status st;
  if (c.layout == Layout::BSHD) {
    auto qs = swap_hs(q, s.B, s.Hq, s.Sq, s.D), ks = swap_hs(k, s.B, s.Hkv, s.Skv, s.D),
         vs = swap_hs(v, s.B, s.Hkv, s.Skv, s.D);
    st = attention_reference(make_tensor(qs.data(), DType::f64, {s.B, s.Sq, s.Hq, s.D}),
                             make_tensor(ks.data(), DType::f64, {s.B, s.Skv, s.Hkv, s.D}),
                             make_tensor(vs.data(), DType::f64, {s.B, s.Skv, s.Hkv, s.D}),
                             make_tensor(out.data(), DType::f64, {s.B, s.Sq, s.Hq, s.D}), &tl, o);
    out = swap_hs(out, s.B, s.Sq, s.Hq, s.D);
  } else {
    st = attention_reference(make_tensor(q.data(), DType::f64, {s.B, s.Hq, s.Sq, s.D}),
                             make_tensor(k.data(), DType::f64, {s.B, s.Hkv, s.Skv, s.D}),
                             make_tensor(v.data(), DType::f64, {s.B, s.Hkv, s.Skv, s.D}),
                             make_tensor(out.data(), DType::f64, {s.B, s.Hq, s.Sq, s.D}), &tl, o);
  }
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(count_nan(out), 0);
  EXPECT_EQ(count_nan(lse), 0);
  expect_close(out, want, lse, want_lse, 1e-12);

  // Fully masked rows (causal, Sq > Skv): exactly zero output and LSE = -inf.
  if (c.causal && s.Sq > s.Skv) {
    const int masked = s.Sq - s.Skv;
    for (int b = 0; b < s.B; ++b)
      for (int h = 0; h < s.Hq; ++h)
        for (int i = 0; i < masked; ++i) {
          const size_t row = (size_t(b) * s.Hq + h) * s.Sq + i;
          EXPECT_EQ(lse[row], -kInf) << "row " << i;
          for (int d = 0; d < s.D; ++d) ASSERT_EQ(out[row * s.D + d], 0.0) << "row " << i;
        }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ReferenceVsNaive,
    ::testing::Values(RefCase{{1, 1, 1, 1, 1, 16}, false, Layout::BHSD, 0.f},
                      RefCase{{2, 3, 3, 17, 29, 64}, false, Layout::BHSD, 0.f},
                      RefCase{{2, 3, 3, 17, 29, 64}, false, Layout::BSHD, 0.f},
                      RefCase{{1, 8, 2, 33, 40, 32}, false, Layout::BHSD, 0.f},   // GQA
                      RefCase{{1, 4, 1, 20, 21, 128}, false, Layout::BSHD, 0.f},  // MQA
                      RefCase{{1, 2, 2, 37, 37, 64}, true, Layout::BHSD, 0.f},
                      RefCase{{2, 4, 2, 13, 50, 64}, true, Layout::BHSD, 0.f},    // Sq < Skv
                      RefCase{{2, 4, 2, 50, 13, 64}, true, Layout::BSHD, 0.f},    // Sq > Skv
                      RefCase{{1, 2, 1, 70, 3, 16}, true, Layout::BHSD, 0.f},     // mostly masked
                      RefCase{{1, 2, 2, 16, 24, 64}, false, Layout::BHSD, 0.37f}));

// fp16/bf16 inputs: the reference reads them exactly (the naive code widens the same bits).
TEST(Reference, HalfInputsMatchNaive) {
  for (DType dt : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(name(dt));
    const Shape s{1, 4, 2, 45, 60, 64};
    auto x = tools::make_inputs(tools::Dist::llm, s.B, s.Hq, s.Hkv, s.Sq, s.Skv, s.D, dt, 77);
    std::vector<double> want, want_lse;
    naive_attention(s, widen(x.q, dt), widen(x.k, dt), widen(x.v, dt),
                    1.0f / std::sqrt(float(s.D)), true, &want, &want_lse);
    Result r = run_reference(x, [] { Options o; o.causal = true; return o; }());
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    expect_close(r.out, want, r.lse, want_lse, 1e-12);
  }
}

// float32 out / lse: the float64 result rounded once.
TEST(Reference, Float32OutputIsRoundedFloat64) {
  auto x = tools::make_inputs(tools::Dist::normal, 1, 2, 2, 19, 23, 64, DType::bf16, 5);
  Options o;
  o.causal = true;
  Result r64 = run_reference(x, o);
  ASSERT_TRUE(r64.status.ok());
  std::vector<float> out(r64.out.size(), NAN), lse(r64.lse.size(), NAN);
  Tensor tl = make_tensor(lse.data(), DType::f32, {1, 2, 19});
  Status st = attention_reference(x.tq(), x.tk(), x.tv(),
                                  make_tensor(out.data(), DType::f32, {1, 2, 19, 64}), &tl, o);
  ASSERT_TRUE(st.ok()) << st.message();
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<float>(r64.out[i])) << i;
  for (size_t i = 0; i < lse.size(); ++i) ASSERT_EQ(lse[i], static_cast<float>(r64.lse[i])) << i;
}

// Without an LSE tensor the output is the same.
TEST(Reference, LseIsOptional) {
  auto x = tools::make_inputs(tools::Dist::uniform, 1, 2, 1, 9, 31, 32, DType::f16, 6);
  Result r = run_reference(x, Options());
  ASSERT_TRUE(r.status.ok());
  std::vector<double> out(r.out.size(), kNaN);
  Status st = attention_reference(x.tq(), x.tk(), x.tv(),
                                  make_tensor(out.data(), DType::f64, {1, 2, 9, 32}), nullptr,
                                  Options());
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(out, r.out);
}

// Softmax shift invariance: adding a constant vector to every key changes LSE by scale*q.c but
// not the output (the property the accurate scheme's K smoothing relies on).
TEST(Reference, KeyShiftInvariance) {
  const Shape s{1, 2, 2, 11, 27, 64};
  std::mt19937_64 rng(9);
  auto q = random_vec(size_t(s.Hq) * s.Sq * s.D, rng);
  auto k = random_vec(size_t(s.Hkv) * s.Skv * s.D, rng);
  auto v = random_vec(size_t(s.Hkv) * s.Skv * s.D, rng);
  auto c = random_vec(s.D, rng, 3.0);
  auto k2 = k;
  for (size_t i = 0; i < k2.size(); ++i) k2[i] += c[i % s.D];
  std::vector<double> o1(q.size()), o2(q.size()), l1(s.Hq * s.Sq), l2(s.Hq * s.Sq);
  Tensor tl1 = make_tensor(l1.data(), DType::f64, {1, s.Hq, s.Sq});
  Tensor tl2 = make_tensor(l2.data(), DType::f64, {1, s.Hq, s.Sq});
  auto T = [&](std::vector<double>& x, int h, int n) {
    return make_tensor(x.data(), DType::f64, {1, h, n, s.D});
  };
  ASSERT_TRUE(attention_reference(T(q, s.Hq, s.Sq), T(k, s.Hkv, s.Skv), T(v, s.Hkv, s.Skv),
                                  T(o1, s.Hq, s.Sq), &tl1, Options()).ok());
  ASSERT_TRUE(attention_reference(T(q, s.Hq, s.Sq), T(k2, s.Hkv, s.Skv), T(v, s.Hkv, s.Skv),
                                  T(o2, s.Hq, s.Sq), &tl2, Options()).ok());
  const double scale = 1.0f / std::sqrt(float(s.D));
  for (size_t i = 0; i < o1.size(); ++i) EXPECT_NEAR(o1[i], o2[i], 1e-12);
  for (int h = 0; h < s.Hq; ++h)
    for (int i = 0; i < s.Sq; ++i) {
      double qc = 0;
      for (int d = 0; d < s.D; ++d) qc += q[(size_t(h) * s.Sq + i) * s.D + d] * c[d];
      EXPECT_NEAR(l2[h * s.Sq + i] - l1[h * s.Sq + i], scale * qc, 1e-10);
    }
}

// The bench's parallel input generator (tools::make_inputs_parallel): the shape, the same values
// for the same seed and others for another, and each distribution's traits per tensor: normal
// N(0, 1); uniform in [0, 1); llm with Q and K channels 0-3 scaled x10 and V not.
TEST(Inputs, ParallelGeneratorKeepsTheDistributions) {
  using tools::Dist;
  const int B = 2, Hq = 4, Hkv = 2, Sq = 33, Skv = 257, D = 64;
  auto a = tools::make_inputs_parallel(Dist::normal, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 5);
  ASSERT_EQ(a.q.size(), size_t(B) * Hq * Sq * D);
  ASSERT_EQ(a.k.size(), size_t(B) * Hkv * Skv * D);
  ASSERT_EQ(a.v.size(), a.k.size());
  EXPECT_EQ(a.q, tools::make_inputs_parallel(Dist::normal, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 5).q);
  EXPECT_NE(a.k, tools::make_inputs_parallel(Dist::normal, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 6).k);
  EXPECT_NE(std::vector<uint16_t>(a.k.begin(), a.k.begin() + Skv * D),
            std::vector<uint16_t>(a.k.begin() + Skv * D, a.k.begin() + 2 * Skv * D))
      << "two heads drew the same values";
  auto moments = [](const std::vector<uint16_t>& bits, DType dt, int d, int channel, double* mean, double* var) {
    double s = 0, s2 = 0;
    int64_t n = 0;
    for (size_t i = channel; i < bits.size(); i += d) {
      const double x = tools::to_float(bits[i], dt);
      s += x; s2 += x * x; ++n;
    }
    *mean = s / n;
    *var = s2 / n - *mean * *mean;
  };
  double mean, var;
  moments(a.v, DType::bf16, 1, 0, &mean, &var);
  EXPECT_LT(std::fabs(mean), 0.03);
  EXPECT_NEAR(var, 1.0, 0.05);
  auto u = tools::make_inputs_parallel(Dist::uniform, B, Hq, Hkv, Sq, Skv, D, DType::f16, 5);
  for (uint16_t bits : u.k) {
    const float x = tools::to_float(bits, DType::f16);
    ASSERT_TRUE(x >= 0.f && x <= 1.f) << x;  // [0, 1) rounded to fp16
  }
  moments(u.q, DType::f16, 1, 0, &mean, &var);
  EXPECT_NEAR(mean, 0.5, 0.02);
  auto l = tools::make_inputs_parallel(Dist::llm, B, Hq, Hkv, Sq, Skv, D, DType::bf16, 5);
  double m0, v0, m9, v9;
  moments(l.q, DType::bf16, D, 0, &m0, &v0);
  moments(l.q, DType::bf16, D, 9, &m9, &v9);
  EXPECT_NEAR(v0 / v9, 100.0, 25.0) << "Q channel 0 scaled x10";
  moments(l.k, DType::bf16, D, 9, &m9, &v9);
  EXPECT_GT(v9, 4.0) << "K offsets per channel and head (4 N(0, 1))";
  moments(l.v, DType::bf16, D, 0, &m0, &v0);
  EXPECT_NEAR(v0, 1.0, 0.2) << "V unscaled";
}

}  // namespace
}  // namespace intfa::testing
