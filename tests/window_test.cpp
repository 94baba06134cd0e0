// Sliding-window (local) attention, Options::window_left / window_right (FlashAttention's
// window_size): the float64 reference is softmax over exactly the keys the window names, the
// INT8 emulation of every scheme stays within its usual error of it, open windows are the
// unwindowed calls bit for bit, and bad windows get precise errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

using tools::Dist;
using tools::HostQKV;

struct Window {
  int sq, skv;
  bool causal;
  int left, right;
};

// Windows over Sq != Skv in both directions, including rows that see no key (Sq > Skv with a
// right edge) and windows wider than every sequence.
const std::vector<Window> kWindows = {
    {40, 40, true, 7, -1},  {40, 40, true, 0, -1},   {30, 70, false, 5, 9},  {70, 30, true, 3, 0},
    {33, 90, false, -1, 4}, {50, 45, false, 12, -1}, {20, 20, true, 500, -1}, {64, 200, true, 63, -1}};

Options window_options(const Window& w) {
  Options o;
  o.causal = w.causal;
  o.window_left = w.left;
  o.window_right = w.right;
  return o;
}

// Whether query i sees key j under window w: i + diag - left <= j <= i + diag + right, diag =
// Skv - Sq (an edge at -1 is open; causal is right = 0).
bool sees(const Window& w, bool causal, int i, int j) {
  const int diag = i + w.skv - w.sq, right = causal ? 0 : w.right;
  return (w.left < 0 || j >= diag - w.left) && (right < 0 || j <= diag + right);
}

// Float64 softmax over the keys query i sees, straight from the bf16 inputs, BHSD, no GQA.
void masked_softmax(const HostQKV& x, const Window& w, double scale, std::vector<double>* out,
                    std::vector<double>* lse) {
  const int B = x.batch, H = x.heads_q, Sq = x.seqlen_q, Skv = x.seqlen_kv, D = x.head_dim;
  out->assign(size_t(B) * H * Sq * D, 0.0);
  lse->assign(size_t(B) * H * Sq, -std::numeric_limits<double>::infinity());
  auto at = [&](const std::vector<uint16_t>& t, int b, int h, int s, int S, int d) {
    return double(tools::to_float(t[((size_t(b) * H + h) * S + s) * D + d], x.dtype));
  };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Sq; ++i) {
        std::vector<int> keys;
        for (int j = 0; j < Skv; ++j)
          if (sees(w, w.causal, i, j)) keys.push_back(j);
        if (keys.empty()) continue;
        std::vector<double> s(keys.size());
        double mx = -std::numeric_limits<double>::infinity();
        for (size_t n = 0; n < keys.size(); ++n) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += at(x.q, b, h, i, Sq, d) * at(x.k, b, h, keys[n], Skv, d);
          s[n] = dot * scale;
          mx = std::max(mx, s[n]);
        }
        double sum = 0;
        for (size_t n = 0; n < keys.size(); ++n) sum += (s[n] = std::exp(s[n] - mx));
        double* o = &(*out)[((size_t(b) * H + h) * Sq + i) * D];
        for (size_t n = 0; n < keys.size(); ++n)
          for (int d = 0; d < D; ++d) o[d] += s[n] / sum * at(x.v, b, h, keys[n], Skv, d);
        (*lse)[(size_t(b) * H + h) * Sq + i] = mx + std::log(sum);
      }
}

TEST(SlidingWindow, ReferenceIsSoftmaxOverTheWindow) {
  int seed = 40;
  for (const Window& w : kWindows) {
    SCOPED_TRACE("Sq " + std::to_string(w.sq) + " Skv " + std::to_string(w.skv) + (w.causal ? " causal" : "") +
                 " window (" + std::to_string(w.left) + ", " + std::to_string(w.right) + ")");
    HostQKV x = tools::make_inputs(Dist::normal, 2, 2, 2, w.sq, w.skv, 32, DType::bf16, ++seed);
    Result r = run_reference(x, window_options(w));
    ASSERT_TRUE(r.status.ok()) << r.status.message();
    std::vector<double> want, want_lse;
    masked_softmax(x, w, 1.0f / std::sqrt(32.0f), &want, &want_lse);  // the fp32 scale the API takes
    EXPECT_EQ(r.unwritten_out, 0);
    // Another summation order in float64.
    for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(r.out[i], want[i], 1e-12) << i;
    for (size_t i = 0; i < want_lse.size(); ++i) {
      if (std::isinf(want_lse[i])) {
        ASSERT_TRUE(std::isinf(r.lse[i]) && r.lse[i] < 0) << "row " << i << " sees no key";
      } else {
        ASSERT_NEAR(r.lse[i], want_lse[i], 1e-12) << i;
      }
    }
  }
}

// Every scheme's INT8 emulation with a window against the float64 reference with the same
// window: the error of the scheme, and rows that see no key give zeros and LSE -inf.
TEST(SlidingWindow, EmulationWithinSchemeErrorOfReference) {
  int seed = 60;
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
    for (const Window& w : kWindows) {
      SCOPED_TRACE(std::string(to_string(s)) + " Sq " + std::to_string(w.sq) + " Skv " + std::to_string(w.skv) +
                   (w.causal ? " causal" : "") + " window (" + std::to_string(w.left) + ", " +
                   std::to_string(w.right) + ")");
      HostQKV x = tools::make_inputs(Dist::normal, 2, 4, 2, w.sq, w.skv, 64, DType::bf16, ++seed);
      Options o = window_options(w);
      o.scheme = s;
      o.block_n = 16;  // several key blocks, some cut by the window
      Result got = run_attention(x, o), ref = run_reference(x, o);
      ASSERT_TRUE(got.status.ok()) << got.status.message();
      ASSERT_TRUE(ref.status.ok()) << ref.status.message();
      EXPECT_EQ(got.unwritten_out, 0);
      EXPECT_EQ(got.unwritten_lse, 0);
      // The unwindowed bounds for normal inputs (scheme_accuracy_test.cpp).
      const double bound = s == Scheme::paper ? 3.5e-2 : s == Scheme::accurate ? 2e-2 : 1.4e-2;
      const double err = rel_l2(got.out, ref.out);
      EXPECT_LT(err, bound);
      int64_t mismatched = 0;
      const double lse_err = max_abs_lse_error(got.lse, ref.lse, &mismatched);
      // A row with a few keys has the LSE error of its few scores, not the averaged one of a
      // long row: up to 0.03 measured (accurate, window 0), so 1.5x the unwindowed bounds.
      EXPECT_LT(lse_err, s == Scheme::paper ? 6e-2 : 4e-2);
      if (std::getenv("INTFA_VERBOSE")) std::printf("  rel_l2 %.3e lse %.3e\n", err, lse_err);
      EXPECT_EQ(mismatched, 0) << "rows that see no key must have LSE -inf on both sides";
      const int D = x.head_dim;
      for (size_t r = 0; r < ref.lse.size(); ++r)
        if (std::isinf(ref.lse[r]))
          for (int d = 0; d < D; ++d) ASSERT_EQ(got.out[r * D + d], 0.0) << "row " << r;
    }
}

// Open windows are the unwindowed calls: (-1, -1); causal with window_right = 0; a left edge
// past every key; a right edge past every key (which runs the causal-shaped launch internally).
TEST(SlidingWindow, OpenWindowsAreTheUnwindowedCallsBitForBit) {
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(to_string(s)) + (causal ? " causal" : ""));
      HostQKV x = tools::make_inputs(Dist::llm, 1, 4, 2, 37, 90, 64, DType::bf16, 70 + int(s));
      Options o;
      o.scheme = s;
      o.causal = causal;
      o.block_n = 32;
      const Result want = run_attention(x, o);
      ASSERT_TRUE(want.status.ok());
      std::vector<std::pair<int, int>> open = {{-1, -1}, {90 + 37, -1}};
      if (causal) open.push_back({-1, 0});
      else open.push_back({-1, 90});
      for (auto [left, right] : open) {
        SCOPED_TRACE("window (" + std::to_string(left) + ", " + std::to_string(right) + ")");
        Options ow = o;
        ow.window_left = left;
        ow.window_right = right;
        const Result got = run_attention(x, ow);
        ASSERT_TRUE(got.status.ok()) << got.status.message();
        EXPECT_EQ(got.out, want.out);
        EXPECT_EQ(got.lse, want.lse);
      }
    }
}

// A decode step with a causal window of W keys is attention over the cache's last W keys.
TEST(SlidingWindow, DecodeStepSeesTheLastWKeys) {
  const int Skv = 300, W = 77, D = 32;
  HostQKV x = tools::make_inputs(Dist::normal, 2, 2, 2, 1, Skv, D, DType::bf16, 90);
  Options o;
  o.causal = true;
  o.window_left = W - 1;
  Result got = run_reference(x, o);
  ASSERT_TRUE(got.status.ok());
  HostQKV last = x;
  last.seqlen_kv = W;
  last.k = slice_tokens(x.k, 2, 2, Skv, D, Skv - W, W);
  last.v = slice_tokens(x.v, 2, 2, Skv, D, Skv - W, W);
  Result want = run_reference(last, Options());
  ASSERT_TRUE(want.status.ok());
  for (size_t i = 0; i < want.out.size(); ++i) ASSERT_NEAR(got.out[i], want.out[i], 1e-12) << i;
  for (size_t i = 0; i < want.lse.size(); ++i) ASSERT_NEAR(got.lse[i], want.lse[i], 1e-12) << i;
}

// The bench's TOPS count the pairs the mask leaves visible: tools::visible_pairs against a
// count of the pairs masked_softmax's rule keeps, key by key.
TEST(SlidingWindow, BenchCountsTheVisiblePairs) {
  for (const Window& w : kWindows)
    for (bool causal : {false, true}) {
      if (causal && w.right > 0) continue;
      double n = 0;
      for (int i = 0; i < w.sq; ++i)
        for (int j = 0; j < w.skv; ++j) n += sees(w, causal, i, j);
      EXPECT_EQ(tools::visible_pairs(w.sq, w.skv, causal, w.left, w.right), n)
          << w.sq << " x " << w.skv << (causal ? " causal" : "") << " window (" << w.left << ", " << w.right << ")";
    }
  EXPECT_EQ(tools::visible_pairs(4, 4, true, -1, -1), 10.0);  // the causal triangle
  EXPECT_EQ(tools::visible_pairs(3, 5, false, -1, -1), 15.0);
}

TEST(SlidingWindow, BadWindowsArePreciseErrors) {
  HostQKV x = tools::make_inputs(Dist::normal, 1, 2, 2, 8, 8, 32, DType::bf16, 91);
  struct Bad { bool causal; int left, right; const char* says; };
  for (const Bad& b : {Bad{false, -2, -1, "window_left / window_right: expected -1 (no edge) or >= 0, got (-2, -1)"},
                       Bad{false, 3, -7, "got (3, -7)"},
                       Bad{true, 4, 2, "with causal it must be -1 or 0, got 2"}}) {
    Options o;
    o.causal = b.causal;
    o.window_left = b.left;
    o.window_right = b.right;
    for (bool reference : {false, true}) {
      const Status st = reference ? run_reference(x, o).status : run_attention(x, o).status;
      EXPECT_EQ(st.code(), StatusCode::invalid_argument);
      EXPECT_NE(st.message().find(b.says), std::string::npos) << st.message();
    }
  }
}

}  // namespace
}  // namespace intfa::testing
