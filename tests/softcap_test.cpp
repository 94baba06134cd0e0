// Logit soft-capping, Options::softcap (Gemma 2, Grok; flash_attn's softcap): the float64
// reference is softmax(cap * tanh(scale q.k / cap)) written out here; the INT8 emulation of every
// scheme stays within its usual error of it, and for accurate / half the smoothed scores are moved
// back by their K-mean term before the tanh (inputs with a large per-channel K offset would show
// it); a very large cap is no cap; pre-quantized calls need the LSE offset; bad values get precise
// errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

Options case_options(const MaskCase& c, float cap) {
  Options o;
  o.causal = c.causal;
  o.window_left = c.left;
  o.softcap = cap;
  return o;
}

// Float64 softmax of cap * tanh(scale q.k / cap) over the visible keys, straight from the bf16
// inputs (BHSD), as Gemma 2 writes it.
void capped_softmax(const HostQKV& x, const MaskCase& c, double cap, double scale, std::vector<double>* out,
                    std::vector<double>* lse) {
  const int B = x.batch, Hq = c.hq, Sq = c.sq, D = x.head_dim;
  out->assign(size_t(B) * Hq * Sq * D, 0.0);
  lse->assign(size_t(B) * Hq * Sq, -std::numeric_limits<double>::infinity());
  std::vector<int> keys;
  std::vector<double> logits;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Sq; ++i) {
        visible_dots(x, c, b, h, i, &keys, &logits);
        if (keys.empty()) continue;
        for (double& l : logits) l = cap * std::tanh(l * scale / cap);
        const double mx = *std::max_element(logits.begin(), logits.end());
        double sum = 0;
        for (double& l : logits) sum += (l = std::exp(l - mx));
        for (double& l : logits) l /= sum;
        add_weighted_v(x, c, b, h, keys, logits, &(*out)[((size_t(b) * Hq + h) * Sq + i) * D]);
        (*lse)[(size_t(b) * Hq + h) * Sq + i] = mx + std::log(sum);
      }
}

TEST(Softcap, ReferenceIsTheCappedSoftmax) {
  int seed = 900;
  for (const MaskCase& c : kMaskCases) {
    SCOPED_TRACE(describe(c));
    HostQKV x = tools::make_inputs(Dist::llm, 2, c.hq, c.hkv, c.sq, c.skv, 32, DType::bf16, ++seed);
    std::vector<double> want, want_lse;
    capped_softmax(x, c, 5.0, 1.0f / std::sqrt(32.0f), &want, &want_lse);
    expect_reference_is(run_reference(x, case_options(c, 5.f)), want, want_lse);
  }
}

// The emulation of every scheme against the float64 reference with the same cap. Normal inputs
// (scores ~N(0, 1)) under a cap of 2, which moves every row (the uncapped call is checked to be
// far from the capped reference): within the scheme's usual error, output and LSE. llm-like
// inputs (outlier channels, a per-channel K offset) under a cap of 8: scale q . k_mean is large
// there, and accurate / half, whose smoothed scores lack it, must add it back before the tanh
// (measured without it: rel. error ~1.0 instead of 0.02). Their LSE error is the scheme's own
// on such inputs (0.5-4 uncapped), so only the output is bounded there.
TEST(Softcap, EmulationWithinSchemeErrorOfTheCappedReference) {
  int seed = 920;
  for (Dist dist : {Dist::normal, Dist::llm})
    for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
      for (Layout layout : {Layout::BHSD, Layout::BSHD})
        for (const MaskCase& c : kMaskCases) {
          const bool llm = dist == Dist::llm;
          SCOPED_TRACE(std::string(to_string(s)) + " " + to_string(layout) + " " + describe(c) +
                       (llm ? " llm" : " normal"));
          HostQKV x = tools::make_inputs(dist, 2, c.hq, c.hkv, c.sq, c.skv, 64, DType::bf16, ++seed);
          Options o = case_options(c, llm ? 8.f : 2.f);
          o.scheme = s;
          o.layout = layout;
          o.block_n = 16;  // several key blocks
          Options plain = o;
          plain.softcap = 0.f;
          const Result got = run_attention(x, o), ref = run_reference(x, o), uncapped = run_attention(x, plain);
          ASSERT_TRUE(got.status.ok()) << got.status.message();
          ASSERT_TRUE(ref.status.ok() && uncapped.status.ok());
          EXPECT_EQ(got.unwritten_out, 0);
          EXPECT_EQ(got.unwritten_lse, 0);
          const double bound = llm ? (s == Scheme::paper ? 6e-2 : 3e-2)
                                   : s == Scheme::paper ? 3.5e-2 : s == Scheme::accurate ? 2e-2 : 1.4e-2;
          const double err = rel_l2(got.out, ref.out);
          EXPECT_LT(err, bound);
          int64_t mismatched = 0;
          const double lse_err = max_abs_lse_error(got.lse, ref.lse, &mismatched);
          EXPECT_EQ(mismatched, 0);
          if (!llm) {
            EXPECT_GT(rel_l2(uncapped.out, ref.out), std::max(0.1, 4 * err));
            EXPECT_LT(lse_err, s == Scheme::paper ? 6e-2 : 4e-2);
          }
        }
}

// A cap far above every score is no cap: within float rounding of the uncapped call.
TEST(Softcap, LargeCapIsNoCap) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    HostQKV x = tools::make_inputs(Dist::normal, 1, 4, 2, 37, 90, 64, DType::bf16, 950 + int(s));
    Options o;
    o.scheme = s;
    o.causal = true;
    o.block_n = 32;
    Options capped = o;
    capped.softcap = 1e5f;
    const Result a = run_attention(x, o), b = run_attention(x, capped);
    ASSERT_TRUE(a.status.ok() && b.status.ok());
    EXPECT_LT(rel_l2(b.out, a.out), 1e-3);  // P8 may round a level the other way here and there
    int64_t mismatched = 0;
    EXPECT_LT(max_abs_lse_error(b.lse, a.lse, &mismatched), 1e-3);
    EXPECT_EQ(mismatched, 0);
  }
}

// quantize() + attention_int8() with softcap is attention() with softcap bit for bit; accurate
// and half need the LSE offset then (the K-mean term enters the tanh), paper not.
TEST(Softcap, PreQuantizedCallsNeedTheLseOffset) {
  Options o;
  o.softcap = 10.f;
  expect_prequantized_needs_lse_offset(o, "qkv.lse_offset: softcap", 960);
}

TEST(Softcap, BadValuesArePreciseErrors) {
  HostQKV x = tools::make_inputs(Dist::normal, 1, 4, 2, 8, 8, 32, DType::bf16, 970);
  for (float bad : {-1.f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Options o;
    o.softcap = bad;
    for (bool reference : {false, true}) {
      const Result r = reference ? run_reference(x, o) : run_attention(x, o);
      EXPECT_EQ(r.status.code(), StatusCode::invalid_argument);
      EXPECT_NE(r.status.message().find("softcap: expected a finite value >= 0 (0: no soft-capping), got"),
                std::string::npos)
          << r.status.message();
    }
  }
}

}  // namespace
}  // namespace intfa::testing
