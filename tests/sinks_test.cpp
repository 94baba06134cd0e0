// Attention sinks, Options::sinks (gpt-oss): the float64 reference is softmax over the visible
// keys plus one sink column that is dropped afterwards; the INT8 emulation of every scheme stays
// within its usual error of it and folds the sink exactly as the algebra says (out scaled by
// e^(lse - lse_sink), lse_sink = logaddexp(lse, z)); -inf sinks are no sinks bit for bit; rows
// that see no key give zeros and LSE z; pre-quantized calls need the LSE offset; bad sinks get
// precise errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

// Sink logits that matter: around the LSE of N(0,1) scores over ~50 keys (~4.5), one far below
// (no effect), one far above (the row's output nearly vanishes) and -inf (none).
std::vector<float> sinks_for(int hq) {
  const float pick[] = {4.f, -30.f, 6.5f, 2.f, 40.f, -std::numeric_limits<float>::infinity()};
  std::vector<float> z(hq);
  for (int h = 0; h < hq; ++h) z[h] = pick[h % 6];
  return z;
}

Options case_options(const MaskCase& c, std::vector<float>& z) {
  Options o;
  o.causal = c.causal;
  o.window_left = c.left;
  o.sinks = make_tensor(z.data(), DType::f32, {int64_t(z.size())});
  return o;
}

// Float64 softmax over [visible scores, z_h] with the sink column dropped, straight from the
// bf16 inputs (BHSD), as gpt-oss writes it.
void softmax_with_sink_column(const HostQKV& x, const MaskCase& c, const std::vector<float>& z, double scale,
                              std::vector<double>* out, std::vector<double>* lse) {
  const int B = x.batch, Hq = c.hq, Sq = c.sq, D = x.head_dim;
  out->assign(size_t(B) * Hq * Sq * D, 0.0);
  lse->assign(size_t(B) * Hq * Sq, 0.0);
  std::vector<int> keys;
  std::vector<double> logits;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Sq; ++i) {
        visible_dots(x, c, b, h, i, &keys, &logits);
        for (double& l : logits) l *= scale;
        logits.push_back(z[h]);  // the sink column
        const double mx = *std::max_element(logits.begin(), logits.end());
        double sum = 0;
        for (double& l : logits) sum += (l = std::isinf(l) ? 0.0 : std::exp(l - mx));
        for (double& l : logits) l /= sum > 0 ? sum : 1.0;
        add_weighted_v(x, c, b, h, keys, logits, &(*out)[((size_t(b) * Hq + h) * Sq + i) * D]);  // the sink: no value
        (*lse)[(size_t(b) * Hq + h) * Sq + i] = sum > 0 ? mx + std::log(sum) : -std::numeric_limits<double>::infinity();
      }
}

TEST(Sinks, ReferenceIsSoftmaxWithASinkColumn) {
  int seed = 500;
  for (const MaskCase& c : kMaskCases) {
    SCOPED_TRACE(describe(c));
    HostQKV x = tools::make_inputs(Dist::normal, 2, c.hq, c.hkv, c.sq, c.skv, 32, DType::bf16, ++seed);
    std::vector<float> z = sinks_for(c.hq);
    std::vector<double> want, want_lse;
    softmax_with_sink_column(x, c, z, 1.0f / std::sqrt(32.0f), &want, &want_lse);
    expect_reference_is(run_reference(x, case_options(c, z)), want, want_lse);
  }
}

// The emulation (the GPU kernels' epilogue, fold_sink) of every scheme against the float64
// reference with the same sinks; and against itself without sinks: out_z = out e^(lse - lse_z)
// with lse_z = logaddexp(lse, z) row by row, which holds only if the sink enters in the frame of
// the smoothed scores (lse_offset) for accurate and half.
TEST(Sinks, EmulationWithinSchemeErrorAndFoldsTheSinkExactly) {
  int seed = 600;
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
    for (Layout layout : {Layout::BHSD, Layout::BSHD})
      for (const MaskCase& c : kMaskCases) {
        // llm inputs (outlier channels) give logits of ~100 and the scheme's LSE error with them:
        // the reference comparison takes normal inputs, the fold's algebra both.
        const Dist dist = (seed % 2) ? Dist::llm : Dist::normal;
        SCOPED_TRACE(std::string(to_string(s)) + " " + to_string(layout) + " " + describe(c) +
                     (dist == Dist::llm ? " llm" : " normal"));
        HostQKV x = tools::make_inputs(dist, 2, c.hq, c.hkv, c.sq, c.skv, 64, DType::bf16, ++seed);
        std::vector<float> z = sinks_for(c.hq);
        Options o = case_options(c, z);
        o.scheme = s;
        o.layout = layout;
        o.block_n = 16;  // several key blocks
        Options plain = o;
        plain.sinks = Tensor();
        const Result got = run_attention(x, o), ref = run_reference(x, o), base = run_attention(x, plain);
        ASSERT_TRUE(got.status.ok()) << got.status.message();
        ASSERT_TRUE(ref.status.ok() && base.status.ok());
        EXPECT_EQ(got.unwritten_out, 0);
        EXPECT_EQ(got.unwritten_lse, 0);
        // The bounds of the window tests (window_test.cpp): a sink only scales rows.
        const double bound = s == Scheme::paper ? 3.5e-2 : s == Scheme::accurate ? 2e-2 : 1.4e-2;
        int64_t mismatched = 0;
        const double lse_err = max_abs_lse_error(got.lse, ref.lse, &mismatched);
        if (dist == Dist::normal) {
          EXPECT_LT(rel_l2(got.out, ref.out), bound);
          EXPECT_LT(lse_err, s == Scheme::paper ? 6e-2 : 4e-2);
        }
        EXPECT_EQ(mismatched, 0);
        const int D = x.head_dim, Sq = c.sq;
        for (size_t r = 0; r < got.lse.size(); ++r) {
          const double zr = z[(r / Sq) % c.hq], l = base.lse[r];
          const double want_lse = std::isinf(l) ? zr : std::isinf(zr) ? l : std::max(l, zr) + std::log1p(std::exp(-std::fabs(l - zr)));
          if (std::isinf(want_lse)) ASSERT_EQ(got.lse[r], want_lse) << r;
          else ASSERT_NEAR(got.lse[r], want_lse, 2e-5 * std::max(1.0, std::fabs(want_lse))) << r;
          const double f = std::isinf(l) ? 0.0 : std::exp(l - want_lse);
          for (int d = 0; d < D; ++d)
            ASSERT_NEAR(got.out[r * D + d], base.out[r * D + d] * f, 1e-5 * (std::fabs(base.out[r * D + d]) + 1e-3))
                << "row " << r << " d " << d;
        }
      }
}

// Sinks of -inf are no sinks: the same bits from the emulation and the reference.
TEST(Sinks, MinusInfinityIsNoSinkBitForBit) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    HostQKV x = tools::make_inputs(Dist::llm, 1, 4, 2, 37, 90, 64, DType::bf16, 700 + int(s));
    std::vector<float> z(4, -std::numeric_limits<float>::infinity());
    Options o;
    o.scheme = s;
    o.causal = true;
    o.block_n = 32;
    Options with = o;
    with.sinks = make_tensor(z.data(), DType::f32, {4});
    const Result a = run_attention(x, o), b = run_attention(x, with);
    ASSERT_TRUE(a.status.ok() && b.status.ok());
    EXPECT_EQ(a.out, b.out);
    EXPECT_EQ(a.lse, b.lse);
    const Result ra = run_reference(x, o), rb = run_reference(x, with);
    ASSERT_TRUE(ra.status.ok() && rb.status.ok());
    EXPECT_EQ(ra.out, rb.out);
    EXPECT_EQ(ra.lse, rb.lse);
  }
}

// A row that sees no key gives zeros and the sink's logit as its LSE (the denominator is e^z).
TEST(Sinks, RowsWithoutKeysGiveZerosAndTheSinkAsLse) {
  HostQKV x = tools::make_inputs(Dist::normal, 1, 2, 2, 60, 20, 32, DType::bf16, 710);
  std::vector<float> z = {1.5f, -3.f};
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    Options o;
    o.scheme = s;
    o.causal = true;  // rows 0..39 see no key (bottom-right diagonal, Sq > Skv)
    o.sinks = make_tensor(z.data(), DType::f32, {2});
    for (bool reference : {false, true}) {
      const Result r = reference ? run_reference(x, o) : run_attention(x, o);
      ASSERT_TRUE(r.status.ok());
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 40; ++i) {
          const size_t row = size_t(h) * 60 + i;
          ASSERT_NEAR(r.lse[row], z[h], 1e-6) << "head " << h << " row " << i;
          for (int d = 0; d < 32; ++d) ASSERT_EQ(r.out[row * 32 + d], 0.0);
        }
    }
  }
}

// quantize() + attention_int8() with sinks is attention() with sinks bit for bit; accurate and
// half need the LSE offset then (the sink is compared with the unsmoothed scores), paper not.
TEST(Sinks, PreQuantizedCallsNeedTheLseOffset) {
  std::vector<float> z = sinks_for(4);
  Options o;
  o.sinks = make_tensor(z.data(), DType::f32, {4});
  expect_prequantized_needs_lse_offset(o, "qkv.lse_offset: sinks", 720);
}

TEST(Sinks, BadSinksArePreciseErrors) {
  HostQKV x = tools::make_inputs(Dist::normal, 1, 4, 2, 8, 8, 32, DType::bf16, 730);
  std::vector<float> ok(4, 1.f), five(5, 1.f), nan_z = {1.f, NAN, 0.f, 0.f},
                     inf_z = {1.f, 2.f, std::numeric_limits<float>::infinity(), 0.f};
  std::vector<uint16_t> half_z(4, 0);
  struct Bad { Tensor t; StatusCode code; const char* says; };
  Tensor on_gpu = make_tensor(ok.data(), DType::f32, {4}, true, 0);
  for (const Bad& b : {Bad{make_tensor(five.data(), DType::f32, {5}), StatusCode::invalid_argument,
                           "sinks: expected shape [heads_q] = [4], got [5]"},
                       Bad{make_tensor(ok.data(), DType::f32, {2, 2}), StatusCode::invalid_argument,
                           "sinks: expected shape [heads_q] = [4], got [2, 2]"},
                       Bad{make_tensor(half_z.data(), DType::f16, {4}), StatusCode::unsupported_type,
                           "sinks: expected dtype float32, got float16"},
                       Bad{make_tensor(nan_z.data(), DType::f32, {4}), StatusCode::invalid_argument,
                           "sinks: expected finite logits or -inf (no sink), got nan for head 1"},
                       Bad{make_tensor(inf_z.data(), DType::f32, {4}), StatusCode::invalid_argument,
                           "got inf for head 2"},
                       Bad{on_gpu, StatusCode::invalid_argument, "sinks: expected"}}) {
    Options o;
    o.sinks = b.t;
    for (bool reference : {false, true}) {
      const Status st = reference ? run_reference(x, o).status : run_attention(x, o).status;
      EXPECT_EQ(st.code(), b.code) << st.message();
      EXPECT_NE(st.message().find(b.says), std::string::npos) << st.message();
    }
  }
}

}  // namespace
}  // namespace intfa::testing
