// Helpers shared by the CPU tests: host buffers, layout conversion, poisoned outputs, and thin
// wrappers that run intfa::attention / attention_reference on tools::HostQKV inputs.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "inputs.h"
#include "intfa/intfa.h"

namespace intfa::testing {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// A host buffer whose data() is `align`-byte aligned.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t bytes, size_t align = 256) : raw_(bytes + align, 0), bytes_(bytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw_.data());
    ptr_ = reinterpret_cast<uint8_t*>((p + align - 1) / align * align);
  }
  void* data() { return ptr_; }
  size_t size() const { return bytes_; }

 private:
  std::vector<uint8_t> raw_;
  uint8_t* ptr_;
  size_t bytes_;
};

// [B, H, S, D] -> [B, S, H, D] (and back with the same call and swapped H/S arguments).
template <class T>
std::vector<T> swap_hs(const std::vector<T>& x, int B, int H, int S, int D) {
  std::vector<T> y(x.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int s = 0; s < S; ++s)
        for (int d = 0; d < D; ++d)
          y[((static_cast<size_t>(b) * S + s) * H + h) * D + d] =
              x[((static_cast<size_t>(b) * H + h) * S + s) * D + d];
  return y;
}

inline std::vector<double> widen(const std::vector<uint16_t>& bits, DType dt) {
  std::vector<double> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = tools::to_float(bits[i], dt);
  return out;
}
inline std::vector<double> widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

inline int64_t count_nan(const std::vector<float>& x) {
  int64_t n = 0;
  for (float v : x) n += std::isnan(v);
  return n;
}
inline int64_t count_nan(const std::vector<double>& x) {
  int64_t n = 0;
  for (double v : x) n += std::isnan(v);
  return n;
}

inline const char* name(DType dt) { return to_string(dt); }

// Output of one attention run (BHSD order, widened to double).
struct Result {
  Status status;
  std::vector<double> out;  // [B, Hq, Sq, D]
  std::vector<double> lse;  // [B, Hq, Sq]
  int64_t unwritten_out = 0, unwritten_lse = 0;  // NaN poison left behind
};

// intfa::attention on the CPU backend with a float32 output (poisoned with NaN first) and an
// LSE. Inputs are given in BHSD order; with opts.layout == BSHD they are transposed first and
// the output transposed back.
inline Result run_attention(tools::HostQKV& x, Options opts) {
  opts.backend = Backend::cpu;
  Result r;
  const int B = x.batch, Hq = x.heads_q, Hkv = x.heads_kv, Sq = x.seqlen_q, Skv = x.seqlen_kv,
            D = x.head_dim;
  std::vector<float> out(static_cast<size_t>(B) * Hq * Sq * D,
                         std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(static_cast<size_t>(B) * Hq * Sq, std::numeric_limits<float>::quiet_NaN());
  Tensor tl = make_tensor(lse.data(), DType::f32, {B, Hq, Sq});
  if (opts.layout == Layout::BSHD) {
    auto q = swap_hs(x.q, B, Hq, Sq, D), k = swap_hs(x.k, B, Hkv, Skv, D),
         v = swap_hs(x.v, B, Hkv, Skv, D);
    Tensor tq = make_tensor(q.data(), x.dtype, {B, Sq, Hq, D});
    Tensor tk = make_tensor(k.data(), x.dtype, {B, Skv, Hkv, D});
    Tensor tv = make_tensor(v.data(), x.dtype, {B, Skv, Hkv, D});
    Tensor to = make_tensor(out.data(), DType::f32, {B, Sq, Hq, D});
    r.status = attention(tq, tk, tv, to, &tl, opts);
    out = swap_hs(out, B, Sq, Hq, D);
  } else {
    Tensor to = make_tensor(out.data(), DType::f32, {B, Hq, Sq, D});
    r.status = attention(x.tq(), x.tk(), x.tv(), to, &tl, opts);
  }
  r.unwritten_out = count_nan(out);
  r.unwritten_lse = count_nan(lse);
  r.out = widen(out);
  r.lse = widen(lse);
  return r;
}

// intfa::attention_reference (float64 out and LSE) on BHSD inputs.
inline Result run_reference(tools::HostQKV& x, Options opts) {
  opts.layout = Layout::BHSD;
  Result r;
  r.out.assign(static_cast<size_t>(x.batch) * x.heads_q * x.seqlen_q * x.head_dim, kNaN);
  r.lse.assign(static_cast<size_t>(x.batch) * x.heads_q * x.seqlen_q, kNaN);
  Tensor to = make_tensor(r.out.data(), DType::f64, {x.batch, x.heads_q, x.seqlen_q, x.head_dim});
  Tensor tl = make_tensor(r.lse.data(), DType::f64, {x.batch, x.heads_q, x.seqlen_q});
  r.status = attention_reference(x.tq(), x.tk(), x.tv(), to, &tl, opts);
  r.unwritten_out = count_nan(r.out);
  r.unwritten_lse = count_nan(r.lse);
  return r;
}

// quantize() of x (BHSD, dense) on the CPU backend into a buffer of its own; the half scheme
// takes x's V as qkv.v, as attention() does.
struct HostQuantized {
  ProblemShape shape;
  AlignedBuffer buf;
  QuantizedQKV qkv;
  Status status;
  HostQuantized(tools::HostQKV& x, const Options& o)
      : shape{x.batch, x.heads_q, x.heads_kv, x.seqlen_q, x.seqlen_kv, x.head_dim},
        buf(quantized_bytes(shape, o.scheme)) {
    status = alloc_quantized(shape, o.scheme, Layout::BHSD, buf.data(), buf.size(), false, 0, &qkv);
    if (status.ok()) status = quantize(x.tq(), x.tk(), x.tv(), Tensor(), Tensor(), o, qkv);
    if (o.scheme == Scheme::half) qkv.v = x.tv();
  }
};

inline double rel_l2(const std::vector<double>& got, const std::vector<double>& ref) {
  return tools::compare(got, ref).rel_l2;
}

// Max |got - ref| over entries where ref is finite; counts entries where exactly one of the two
// is -inf or where got is NaN in `mismatched`.
inline double max_abs_lse_error(const std::vector<double>& got, const std::vector<double>& ref,
                                int64_t* mismatched) {
  double e = 0;
  *mismatched = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i]) || std::isinf(got[i]) != std::isinf(ref[i])) {
      ++*mismatched;
      continue;
    }
    if (std::isfinite(ref[i])) e = std::max(e, std::fabs(got[i] - ref[i]));
  }
  return e;
}

// A copy of a BHSD operand restricted to tokens [t0, t0 + n) of every (b, h).
inline std::vector<uint16_t> slice_tokens(const std::vector<uint16_t>& x, int B, int H, int S,
                                          int D, int t0, int n) {
  std::vector<uint16_t> y(static_cast<size_t>(B) * H * n * D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      std::memcpy(&y[((static_cast<size_t>(b) * H + h) * n) * D],
                  &x[((static_cast<size_t>(b) * H + h) * S + t0) * D], sizeof(uint16_t) * n * D);
  return y;
}

// A mask shape for the tests of options that act per row (sinks, soft-capping): heads, lengths,
// causal, window_left (-1: none). kMaskCases: GQA and MHA; Sq > Skv causal leaves the first rows
// without keys; a window cuts blocks.
struct MaskCase {
  int hq, hkv, sq, skv;
  bool causal;
  int left;
};
inline const std::vector<MaskCase> kMaskCases = {
    {4, 2, 40, 70, false, -1}, {4, 4, 33, 33, true, -1}, {6, 2, 70, 30, true, -1}, {4, 1, 50, 90, true, 20}};
inline std::string describe(const MaskCase& c) {
  return "Hq " + std::to_string(c.hq) + " Hkv " + std::to_string(c.hkv) + " Sq " + std::to_string(c.sq) + " Skv " +
         std::to_string(c.skv) + (c.causal ? " causal" : "") + " left " + std::to_string(c.left);
}

// The float64 oracles of sinks_test / softcap_test, written out from x's bf16 inputs (BHSD):
// the keys that row i of query head h in batch b sees under c's mask (bottom-right causal, a
// window's left edge) and their q . k in double.
inline void visible_dots(const tools::HostQKV& x, const MaskCase& c, int b, int h, int i, std::vector<int>* keys,
                         std::vector<double>* dots) {
  const int D = x.head_dim, hk = h / (c.hq / c.hkv), diag = i + c.skv - c.sq;
  auto at = [&](const std::vector<uint16_t>& t, int H, int hh, int S, int s, int d) {
    return double(tools::to_float(t[((size_t(b) * H + hh) * S + s) * D + d], x.dtype));
  };
  keys->clear();
  dots->clear();
  for (int j = 0; j < c.skv; ++j) {
    if ((c.causal && j > diag) || (c.left >= 0 && j < diag - c.left)) continue;
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += at(x.q, c.hq, h, c.sq, i, d) * at(x.k, c.hkv, hk, c.skv, j, d);
    keys->push_back(j);
    dots->push_back(dot);
  }
}

// o[d] += sum over n of w[n] * V[keys[n], d] for query head h's K/V head in batch b (double).
inline void add_weighted_v(const tools::HostQKV& x, const MaskCase& c, int b, int h, const std::vector<int>& keys,
                           const std::vector<double>& w, double* o) {
  const int D = x.head_dim, hk = h / (c.hq / c.hkv);
  for (size_t n = 0; n < keys.size(); ++n)
    for (int d = 0; d < D; ++d)
      o[d] += w[n] * tools::to_float(x.v[((size_t(b) * c.hkv + hk) * c.skv + keys[n]) * D + d], x.dtype);
}

// The float64 oracle's run r against a float64 softmax written out in the test (want, want_lse,
// BHSD): every output and LSE written, each within 1e-12, rows without keys -inf exactly.
inline void expect_reference_is(const Result& r, const std::vector<double>& want,
                                const std::vector<double>& want_lse) {
  ASSERT_TRUE(r.status.ok()) << r.status.message();
  EXPECT_EQ(r.unwritten_out, 0);
  EXPECT_EQ(r.unwritten_lse, 0);
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(r.out[i], want[i], 1e-12) << i;
  for (size_t i = 0; i < want_lse.size(); ++i) {
    if (std::isinf(want_lse[i])) ASSERT_EQ(r.lse[i], want_lse[i]) << "row " << i << " (no key)";
    else ASSERT_NEAR(r.lse[i], want_lse[i], 1e-12) << i;
  }
}

// quantize() + attention_int8() with `o` (its sinks or softcap, causal) is attention() with `o`
// bit for bit for every scheme, on llm inputs (large K means); without qkv.lse_offset, accurate
// and half are refused with a message starting `says` + the scheme (the smoothed scores lack the
// K-mean term those options need), paper is not (its scores are not shifted).
inline void expect_prequantized_needs_lse_offset(Options o, const std::string& says, int seed) {
  const int B = 2, Hq = 4, Hkv = 2, Sq = 45, Skv = 77, D = 64;
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half}) {
    SCOPED_TRACE(to_string(s));
    tools::HostQKV x = tools::make_inputs(tools::Dist::llm, B, Hq, Hkv, Sq, Skv, D, DType::bf16, seed + int(s));
    o.scheme = s;
    o.causal = true;
    o.backend = Backend::cpu;
    const Result want = run_attention(x, o);
    ASSERT_TRUE(want.status.ok());
    HostQuantized hq(x, o);
    ASSERT_TRUE(hq.status.ok()) << hq.status.message();
    const QuantizedQKV& qx = hq.qkv;
    std::vector<float> out(want.out.size(), NAN), lse(want.lse.size(), NAN);
    const Tensor to = make_tensor(out.data(), DType::f32, {B, Hq, Sq, D});
    Tensor tl = make_tensor(lse.data(), DType::f32, {B, Hq, Sq});
    Status st = attention_int8(qx, Tensor(), Tensor(), 0, 0, to, &tl, o);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(widen(out), want.out);
    EXPECT_EQ(widen(lse), want.lse);
    QuantizedQKV no_off = qx;
    no_off.lse_offset = Tensor();
    st = attention_int8(no_off, Tensor(), Tensor(), 0, 0, to, &tl, o);
    if (s == Scheme::paper) {
      EXPECT_TRUE(st.ok()) << st.message();
    } else {
      EXPECT_EQ(st.code(), StatusCode::invalid_argument);
      EXPECT_NE(st.message().find(says + " with scheme " + to_string(s)), std::string::npos) << st.message();
    }
  }
}

}  // namespace intfa::testing
