// GPU quantization (src/cuda/quant) against the CPU reference quantizer, through the public API:
// every quantized tensor must match byte for byte (lse_offset within an fp32 rounding bound).
// Also prints the quantization throughput next to a device-to-device copy (no assertion on time).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "inputs.h"
#include "intfa/intfa.h"

// The public API has no device-to-device copy and times with host gaps in between; the bandwidth
// test calls the CUDA runtime (linked into intfa) through its C signatures instead (pointer types
// as void*, enums as int): kind 3 is cudaMemcpyDeviceToDevice.
extern "C" {
int cudaMemcpyAsync(void* dst, const void* src, size_t count, int kind, void* stream);
int cudaEventCreate(void** event);
int cudaEventRecord(void* event, void* stream);
int cudaEventSynchronize(void* event);
int cudaEventElapsedTime(float* ms, void* start, void* end);
int cudaEventDestroy(void* event);
}

namespace {

using namespace intfa;
using tools::Dist;

#define GPU_OK(expr)                                   \
  do {                                                 \
    const Status _st = (expr);                         \
    ASSERT_TRUE(_st.ok()) << #expr << ": " << _st.message(); \
  } while (0)

#define REQUIRE_GPU()                                                        \
  do {                                                                       \
    if (!device_info(0).present) GTEST_SKIP() << "no CUDA device: " << device_info(0).error; \
  } while (0)

struct Case {
  Scheme scheme = Scheme::accurate;
  DType dtype = DType::bf16;
  Layout layout = Layout::BHSD;
  int batch = 1, hq = 1, hkv = 1, sq = 1, skv = 1, d = 128;
  Dist dist = Dist::normal;
  std::vector<int> seq_q, seq_kv;  // non-empty: varlen with these sequence lengths
  bool with_lse = true, with_kmean = true;
  int pad = 0;  // extra elements in the row stride of q, k, v (strided views)
  bool tiny = false;  // bf16: rows and V channels near and below the 2^-100 zero-row threshold
  uint64_t seed = 1;

  bool varlen() const { return !seq_q.empty(); }
  std::string name() const {
    std::string s = std::string(to_string(scheme)) + " " + to_string(dtype) + " " +
                    (varlen() ? "varlen" : to_string(layout)) + " d" + std::to_string(d) + " " +
                    tools::to_string(dist) + " B" + std::to_string(batch) + " Hq" +
                    std::to_string(hq) + " Hkv" + std::to_string(hkv);
    if (varlen()) {
      s += " q{";
      for (int n : seq_q) s += std::to_string(n) + ",";
      s += "} kv{";
      for (int n : seq_kv) s += std::to_string(n) + ",";
      s += "}";
    } else {
      s += " Sq" + std::to_string(sq) + " Skv" + std::to_string(skv);
    }
    if (pad) s += " pad" + std::to_string(pad);
    if (tiny) s += " tiny";
    if (!with_lse) s += " no-lse";
    if (!with_kmean) s += " no-kmean";
    return s;
  }
};

// A host buffer with a 256-byte aligned start.
struct AlignedBuf {
  std::vector<uint8_t> raw;
  uint8_t* ptr = nullptr;
  explicit AlignedBuf(size_t n, uint8_t fill = 0) : raw(n + 256, fill) {
    ptr = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw.data()) + 255) & ~uintptr_t(255));
  }
};

struct DevBuf {
  void* ptr = nullptr;
  explicit DevBuf(size_t n) {
    const Status st = gpu_malloc(&ptr, std::max<size_t>(n, 1));
    if (!st.ok()) ptr = nullptr;
  }
  ~DevBuf() {
    if (ptr) (void)gpu_free(ptr);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

Tensor strided(void* data, DType dt, std::vector<int64_t> shape, std::vector<int64_t> stride,
               bool dev) {
  Tensor t;
  t.data = data;
  t.dtype = dt;
  t.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride[i];
  }
  t.on_device = dev;
  return t;
}

// Inputs of one case in the layout the case asks for, plus what the checks need.
struct Inputs {
  tools::HostQKV x;  // BHSD [batch or nseq][h][max len][d]
  std::vector<uint16_t> q, k, v;  // laid out for the API call
  std::vector<int64_t> shape_q, shape_kv, stride_q, stride_kv;
  std::vector<int32_t> cu_q, cu_kv;
  int64_t total_q = 0, total_kv = 0;
};

Inputs make_case_inputs(const Case& c) {
  Inputs in;
  const int nb = c.varlen() ? static_cast<int>(c.seq_q.size()) : c.batch;
  int mq = c.sq, mkv = c.skv;
  if (c.varlen()) {
    mq = std::max(1, *std::max_element(c.seq_q.begin(), c.seq_q.end()));
    mkv = std::max(1, *std::max_element(c.seq_kv.begin(), c.seq_kv.end()));
  }
  in.x = tools::make_inputs(c.dist, nb, c.hq, c.hkv, mq, mkv, c.d, c.dtype, c.seed);
  const int64_t D = c.d, row = D + c.pad;
  if (c.tiny) {
    // Every 5th row times 2^-105 (below the zero-row threshold), the next times 2^-98 (just
    // above), the next zero; V channels 5 and 6 tiny and zero over the whole sequence.
    auto scale = [&](uint16_t& e, float f) { e = float_to_bf16_bits(tools::to_float(e, c.dtype) * f); };
    for (auto* t : {&in.x.q, &in.x.k, &in.x.v}) {
      for (size_t r = 0; r * D < t->size(); ++r) {
        const float f = r % 5 == 1 ? std::ldexp(1.f, -105) : r % 5 == 2 ? std::ldexp(1.f, -98) : r % 5 == 3 ? 0.f : 1.f;
        if (f != 1.f)
          for (int64_t ch = 0; ch < D; ++ch) scale((*t)[r * D + ch], f);
      }
    }
    for (size_t r = 0; r * D < in.x.v.size(); ++r) {
      scale(in.x.v[r * D + 5], std::ldexp(1.f, -110));
      scale(in.x.v[r * D + 6], 0.f);
    }
  }
  // Copies x's [b][h][t][:] rows into dst at (b, h, t) -> element offset.
  auto scatter = [&](const std::vector<uint16_t>& src, int heads, int len,
                     const std::vector<int>* lens, std::vector<uint16_t>& dst, auto&& at) {
    for (int b = 0; b < nb; ++b)
      for (int h = 0; h < heads; ++h)
        for (int t = 0; t < (lens ? (*lens)[b] : len); ++t)
          std::copy_n(&src[((static_cast<size_t>(b) * heads + h) * len + t) * D], D, &dst[at(b, h, t)]);
  };
  if (c.varlen()) {
    in.cu_q.assign(1, 0);
    in.cu_kv.assign(1, 0);
    for (int b = 0; b < nb; ++b) {
      in.cu_q.push_back(in.cu_q.back() + c.seq_q[b]);
      in.cu_kv.push_back(in.cu_kv.back() + c.seq_kv[b]);
    }
    in.total_q = in.cu_q.back();
    in.total_kv = in.cu_kv.back();
    in.shape_q = {in.total_q, c.hq, D};
    in.shape_kv = {in.total_kv, c.hkv, D};
    in.stride_q = {c.hq * row, row, 1};
    in.stride_kv = {c.hkv * row, row, 1};
    in.q.assign(static_cast<size_t>(in.total_q) * c.hq * row, 0);
    in.k.assign(static_cast<size_t>(in.total_kv) * c.hkv * row, 0);
    in.v.assign(in.k.size(), 0);
    auto atq = [&](int b, int h, int t) { return (in.cu_q[b] + t) * in.stride_q[0] + h * row; };
    auto atkv = [&](int b, int h, int t) { return (in.cu_kv[b] + t) * in.stride_kv[0] + h * row; };
    scatter(in.x.q, c.hq, mq, &c.seq_q, in.q, atq);
    scatter(in.x.k, c.hkv, mkv, &c.seq_kv, in.k, atkv);
    scatter(in.x.v, c.hkv, mkv, &c.seq_kv, in.v, atkv);
    return in;
  }
  auto dense = [&](int heads, int len, std::vector<int64_t>& shape, std::vector<int64_t>& stride) {
    if (c.layout == Layout::BHSD) {
      shape = {c.batch, heads, len, D};
      stride = {heads * len * row, len * row, row, 1};
    } else {
      shape = {c.batch, len, heads, D};
      stride = {len * heads * row, heads * row, row, 1};
    }
  };
  dense(c.hq, c.sq, in.shape_q, in.stride_q);
  dense(c.hkv, c.skv, in.shape_kv, in.stride_kv);
  in.q.assign(static_cast<size_t>(in.stride_q[0]) * c.batch, 0);
  in.k.assign(static_cast<size_t>(in.stride_kv[0]) * c.batch, 0);
  in.v.assign(in.k.size(), 0);
  const bool bhsd = c.layout == Layout::BHSD;
  auto atq = [&](int b, int h, int t) {
    return b * in.stride_q[0] + (bhsd ? h * in.stride_q[1] + t * in.stride_q[2] : t * in.stride_q[1] + h * in.stride_q[2]);
  };
  auto atkv = [&](int b, int h, int t) {
    return b * in.stride_kv[0] + (bhsd ? h * in.stride_kv[1] + t * in.stride_kv[2] : t * in.stride_kv[1] + h * in.stride_kv[2]);
  };
  scatter(in.x.q, c.hq, c.sq, nullptr, in.q, atq);
  scatter(in.x.k, c.hkv, c.skv, nullptr, in.k, atkv);
  scatter(in.x.v, c.hkv, c.skv, nullptr, in.v, atkv);
  return in;
}

ProblemShape shape_of(const Case& c, const Inputs& in) {
  ProblemShape s;
  s.batch = c.varlen() ? static_cast<int>(c.seq_q.size()) : c.batch;
  s.heads_q = c.hq;
  s.heads_kv = c.hkv;
  s.head_dim = c.d;
  s.varlen = c.varlen();
  s.seqlen_q = c.varlen() ? static_cast<int>(in.total_q) : c.sq;
  s.seqlen_kv = c.varlen() ? static_cast<int>(in.total_kv) : c.skv;
  s.total_q = in.total_q;
  s.total_kv = in.total_kv;
  return s;
}

// Reports the first mismatching 4-byte word of two float tensors (bit comparison).
::testing::AssertionResult same_floats(const char* what, const float* want, const float* got,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(&want[i], &got[i], 4) != 0)
      return ::testing::AssertionFailure() << what << "[" << i << "]: cpu " << want[i] << " gpu "
                                           << got[i] << " (of " << n << ")";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult same_bytes(const char* what, const int8_t* want, const int8_t* got,
                                      int64_t n, int64_t base_index = 0) {
  for (int64_t i = 0; i < n; ++i) {
    if (want[i] != got[i])
      return ::testing::AssertionFailure() << what << "[" << base_index + i << "]: cpu "
                                           << int(want[i]) << " gpu " << int(got[i]);
  }
  return ::testing::AssertionSuccess();
}

// Quantizes the case on the CPU and on the GPU (outputs poisoned with 0x7f first) and compares.
void run_case(const Case& c) {
  SCOPED_TRACE(c.name());
  const Inputs in = make_case_inputs(c);
  const ProblemShape shape = shape_of(c, in);
  const size_t bytes = quantized_bytes(shape, c.scheme);

  Options opts;
  opts.scheme = c.scheme;
  opts.layout = c.layout;

  // CPU reference.
  Inputs hin = in;  // the API takes non-const data pointers
  Tensor hq = strided(hin.q.data(), c.dtype, in.shape_q, in.stride_q, false);
  Tensor hk = strided(hin.k.data(), c.dtype, in.shape_kv, in.stride_kv, false);
  Tensor hv = strided(hin.v.data(), c.dtype, in.shape_kv, in.stride_kv, false);
  Tensor hcq, hckv;
  if (c.varlen()) {
    hcq = make_tensor(hin.cu_q.data(), DType::i32, {static_cast<int64_t>(hin.cu_q.size())});
    hckv = make_tensor(hin.cu_kv.data(), DType::i32, {static_cast<int64_t>(hin.cu_kv.size())});
  }
  AlignedBuf href(bytes, 0x7f);
  QuantizedQKV hx;
  GPU_OK(alloc_quantized(shape, c.scheme, c.layout, href.ptr, bytes, false, 0, &hx));
  if (c.scheme == Scheme::half) hx.v = hv;
  if (!c.with_lse) hx.lse_offset = Tensor();
  if (!c.with_kmean) hx.k_mean = Tensor();
  Options copts = opts;
  copts.backend = Backend::cpu;
  GPU_OK(quantize(hq, hk, hv, hcq, hckv, copts, hx));

  // GPU.
  const size_t in_bytes_q = in.q.size() * 2, in_bytes_kv = in.k.size() * 2;
  DevBuf dq(in_bytes_q), dk(in_bytes_kv), dv(in_bytes_kv), dout(bytes);
  DevBuf dcq(in.cu_q.size() * 4 + 4), dckv(in.cu_kv.size() * 4 + 4);
  ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr && dout.ptr && dcq.ptr && dckv.ptr);
  GPU_OK(gpu_copy_to_device(dq.ptr, in.q.data(), in_bytes_q));
  GPU_OK(gpu_copy_to_device(dk.ptr, in.k.data(), in_bytes_kv));
  GPU_OK(gpu_copy_to_device(dv.ptr, in.v.data(), in_bytes_kv));
  Tensor gq = strided(dq.ptr, c.dtype, in.shape_q, in.stride_q, true);
  Tensor gk = strided(dk.ptr, c.dtype, in.shape_kv, in.stride_kv, true);
  Tensor gv = strided(dv.ptr, c.dtype, in.shape_kv, in.stride_kv, true);
  Tensor gcq, gckv;
  if (c.varlen()) {
    GPU_OK(gpu_copy_to_device(dcq.ptr, in.cu_q.data(), in.cu_q.size() * 4));
    GPU_OK(gpu_copy_to_device(dckv.ptr, in.cu_kv.data(), in.cu_kv.size() * 4));
    gcq = make_tensor(dcq.ptr, DType::i32, {static_cast<int64_t>(in.cu_q.size())}, true);
    gckv = make_tensor(dckv.ptr, DType::i32, {static_cast<int64_t>(in.cu_kv.size())}, true);
  }
  GPU_OK(gpu_memset(dout.ptr, 0x7f, bytes));
  QuantizedQKV gx;
  GPU_OK(alloc_quantized(shape, c.scheme, c.layout, dout.ptr, bytes, true, 0, &gx));
  if (c.scheme == Scheme::half) gx.v = gv;
  if (!c.with_lse) gx.lse_offset = Tensor();
  if (!c.with_kmean) gx.k_mean = Tensor();
  const Status st = quantize(gq, gk, gv, gcq, gckv, opts, gx);
  if (c.scheme == Scheme::half && st.code() == StatusCode::not_available) {
    // The API rejects scheme half on the GPU in this build (the kernels support it).
    std::printf("[ note ] %s: %s\n", c.name().c_str(), st.message().c_str());
    return;
  }
  ASSERT_TRUE(st.ok()) << st.message();
  GPU_OK(gpu_synchronize());
  AlignedBuf got(bytes);
  GPU_OK(gpu_copy_to_host(got.ptr, dout.ptr, bytes));

  // The two buffers have the same layout: compare each tensor at its offset.
  auto host_of = [&](const Tensor& t) { return href.ptr + (static_cast<uint8_t*>(t.data) - static_cast<uint8_t*>(dout.ptr)); };
  auto gpu_of = [&](const Tensor& t) { return got.ptr + (static_cast<uint8_t*>(t.data) - static_cast<uint8_t*>(dout.ptr)); };
  auto bytes_cmp = [&](const char* what, const Tensor& t) {
    EXPECT_TRUE(same_bytes(what, reinterpret_cast<const int8_t*>(host_of(t)),
                           reinterpret_cast<const int8_t*>(gpu_of(t)), t.numel()));
  };
  auto floats_cmp = [&](const char* what, const Tensor& t) {
    EXPECT_TRUE(same_floats(what, reinterpret_cast<const float*>(host_of(t)),
                            reinterpret_cast<const float*>(gpu_of(t)), t.numel()));
  };
  bytes_cmp("q8", gx.q8);
  floats_cmp("q_scale", gx.q_scale);
  bytes_cmp("k8", gx.k8);
  floats_cmp("k_scale", gx.k_scale);
  if (c.with_kmean) floats_cmp("k_mean", gx.k_mean);
  if (c.scheme != Scheme::half) {
    floats_cmp("v_scale", gx.v_scale);
    // vt8 rows [b][h][d] hold columns [0, seqlen_kv); varlen rows [h][d] hold sequence b at
    // columns [round_up(cu_kv[b], 16) + 16 b, + its length). Other columns are padding.
    const Tensor& vt = gx.vt8;
    const int64_t row_stride = vt.stride[vt.ndim - 2];
    const int8_t* want = reinterpret_cast<const int8_t*>(host_of(vt));
    const int8_t* have = reinterpret_cast<const int8_t*>(gpu_of(vt));
    std::vector<std::pair<int64_t, int64_t>> spans;  // (first column, count) within a row
    if (c.varlen()) {
      for (size_t b = 0; b + 1 < in.cu_kv.size(); ++b)
        spans.push_back({((in.cu_kv[b] + 15) / 16) * 16 + 16 * static_cast<int64_t>(b), in.cu_kv[b + 1] - in.cu_kv[b]});
    } else {
      spans.push_back({0, c.skv});
    }
    const int64_t rows = c.varlen() ? vt.shape[0] * vt.shape[1] : vt.shape[0] * vt.shape[1] * vt.shape[2];
    bool ok = true;
    for (int64_t r = 0; r < rows && ok; ++r)
      for (const auto& [col, n] : spans) {
        const auto res = same_bytes("vt8", want + r * row_stride + col, have + r * row_stride + col, n,
                                    r * row_stride + col);
        EXPECT_TRUE(res) << " (row " << r << ")";
        if (!(ok = res)) break;
      }
  }
  if (c.with_lse) {
    // lse_offset = scale * q . kmean: the GPU sums in fp32, the CPU in fp64. Bound per row:
    // |error| <= 4 * d * 2^-24 * scale * sum_c |q_c * kmean_c|.
    const float* want = reinterpret_cast<const float*>(host_of(gx.lse_offset));
    const float* have = reinterpret_cast<const float*>(gpu_of(gx.lse_offset));
    const float* kmean = c.with_kmean ? reinterpret_cast<const float*>(host_of(gx.k_mean)) : nullptr;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    const int nb = shape.batch;
    int bad = 0;
    for (int b = 0; b < nb && bad < 5; ++b) {
      const int len = c.varlen() ? c.seq_q[b] : c.sq;
      const int mq = in.x.seqlen_q;
      for (int h = 0; h < c.hq && bad < 5; ++h) {
        const int hkv = h / (c.hq / c.hkv);
        for (int t = 0; t < len && bad < 5; ++t) {
          const int64_t idx = c.varlen() ? static_cast<int64_t>(h) * in.total_q + in.cu_q[b] + t
                                         : (static_cast<int64_t>(b) * c.hq + h) * c.sq + t;
          double mag = 0.0;
          for (int ch = 0; ch < c.d; ++ch) {
            const double qv = tools::to_float(in.x.q[((static_cast<size_t>(b) * c.hq + h) * mq + t) * c.d + ch], c.dtype);
            const double mv = kmean ? kmean[(static_cast<size_t>(b) * c.hkv + hkv) * c.d + ch] : 1e4;
            mag += std::fabs(qv * mv);
          }
          const double tol = (c.scheme == Scheme::paper ? 0.0 : 4.0 * c.d * std::ldexp(1.0, -24) * scale * mag) + 1e-30;
          if (!(std::fabs(static_cast<double>(have[idx]) - want[idx]) <= tol)) {
            ADD_FAILURE() << "lse_offset[" << idx << "]: cpu " << want[idx] << " gpu " << have[idx]
                          << " (tolerance " << tol << ")";
            ++bad;
          }
        }
      }
    }
  }
}

const Dist kDists[] = {Dist::normal, Dist::uniform, Dist::llm};

TEST(QuantGpu, TinyRowsBf16) {
  REQUIRE_GPU();
  int i = 0;
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    Case c;
    c.scheme = s; c.dtype = DType::bf16; c.d = 64; c.batch = 2; c.hq = 4; c.hkv = 2;
    c.sq = 100; c.skv = 300; c.tiny = true;
    c.seed = 50 + i++;
    run_case(c);
    c.seq_q = {3, 50, 0};
    c.seq_kv = {40, 1, 250};
    c.seed = 50 + i++;
    run_case(c);
  }
}

TEST(QuantGpu, SchemesDtypesLayouts) {
  REQUIRE_GPU();
  int i = 0;
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
    for (DType dt : {DType::f16, DType::bf16})
      for (Layout l : {Layout::BHSD, Layout::BSHD})
        for (int d : {64, 128, 256}) {
          Case c;
          c.scheme = s; c.dtype = dt; c.layout = l; c.d = d;
          c.batch = 2; c.hq = 8; c.hkv = 2;  // GQA
          c.sq = 127; c.skv = 1000;
          c.dist = kDists[i % 3];
          c.seed = 100 + i++;
          run_case(c);
        }
}

TEST(QuantGpu, OddLengths) {
  REQUIRE_GPU();
  const int lens[][2] = {{1, 1}, {17, 17}, {127, 127}, {1000, 1000}, {1, 1000}, {1000, 17}, {600, 4097}};
  int i = 0;
  for (const auto& l : lens) {
    for (int variant = 0; variant < 2; ++variant) {
      Case c;
      c.scheme = variant ? Scheme::paper : Scheme::accurate;
      c.dtype = variant ? DType::f16 : DType::bf16;
      c.layout = variant ? Layout::BHSD : Layout::BSHD;
      c.d = variant ? 64 : 128;
      c.batch = 3; c.hq = 4; c.hkv = variant ? 4 : 1;  // MHA and MQA
      c.sq = l[0]; c.skv = l[1];
      c.dist = kDists[i % 3];
      c.seed = 200 + i++;
      run_case(c);
    }
  }
}

TEST(QuantGpu, Varlen) {
  REQUIRE_GPU();
  int i = 0;
  for (Scheme s : {Scheme::paper, Scheme::accurate, Scheme::half})
    for (DType dt : {DType::f16, DType::bf16})
      for (int d : {64, 128, 256}) {
        Case c;
        c.scheme = s; c.dtype = dt; c.d = d;
        c.hq = 8; c.hkv = 2;
        c.seq_q = {1, 17, 127, 1000};
        c.seq_kv = {1000, 1, 127, 17};
        c.dist = kDists[i % 3];
        c.seed = 300 + i++;
        run_case(c);
      }
}

TEST(QuantGpu, VarlenEmptyAndTinySequences) {
  REQUIRE_GPU();
  int i = 0;
  for (Scheme s : {Scheme::paper, Scheme::accurate}) {
    Case c;
    c.scheme = s; c.dtype = DType::bf16; c.d = 128; c.hq = 4; c.hkv = 2;
    // Empty kv and q sequences, runs of length-1 sequences (many per 256-token chunk).
    c.seq_q = {5, 0, 300, 1, 1, 1, 2, 0, 3, 700};
    c.seq_kv = {0, 7, 300, 1, 1, 1, 0, 2, 3, 513};
    c.dist = Dist::llm;
    c.seed = 400 + i++;
    run_case(c);
    std::vector<int> many(300, 1);
    for (int j = 0; j < 300; j += 7) many[j] = 3;
    c.seq_q = many;
    c.seq_kv = many;
    c.d = 64;
    c.seed = 400 + i++;
    run_case(c);
  }
}

TEST(QuantGpu, StridedInputs) {
  REQUIRE_GPU();
  int i = 0;
  for (Layout l : {Layout::BHSD, Layout::BSHD}) {
    Case c;
    c.scheme = Scheme::accurate; c.layout = l; c.dtype = DType::f16; c.d = 64;
    c.batch = 2; c.hq = 6; c.hkv = 3; c.sq = 130; c.skv = 257; c.pad = 24;
    c.dist = kDists[i % 3];
    c.seed = 500 + i++;
    run_case(c);
  }
  Case c;
  c.scheme = Scheme::paper; c.dtype = DType::bf16; c.d = 128; c.hq = 4; c.hkv = 4; c.pad = 8;
  c.seq_q = {33, 200};
  c.seq_kv = {90, 260};
  c.seed = 510;
  run_case(c);
}

TEST(QuantGpu, OptionalOutputsAbsent) {
  REQUIRE_GPU();
  int i = 0;
  for (Scheme s : {Scheme::paper, Scheme::accurate})
    for (int mask = 0; mask < 3; ++mask) {
      Case c;
      c.scheme = s; c.d = 128; c.batch = 2; c.hq = 4; c.hkv = 2; c.sq = 300; c.skv = 300;
      c.with_lse = mask != 0;
      c.with_kmean = mask != 1;
      c.dist = Dist::llm;
      c.seed = 600 + i++;
      run_case(c);
    }
}

// Sequences of many chunks: cross-CTA reductions and their completion counts.
TEST(QuantGpu, LongSequences) {
  REQUIRE_GPU();
  Case c;
  c.scheme = Scheme::accurate; c.dtype = DType::bf16; c.d = 128;
  c.batch = 1; c.hq = 2; c.hkv = 1; c.sq = 1000; c.skv = 70001;
  c.dist = Dist::llm;
  c.seed = 700;
  run_case(c);
  c.scheme = Scheme::paper; c.dtype = DType::f16; c.d = 64; c.layout = Layout::BSHD;
  c.batch = 2; c.hq = 4; c.hkv = 2; c.sq = 9000; c.skv = 33000;
  c.seed = 701;
  run_case(c);
  Case v;
  v.scheme = Scheme::accurate; v.dtype = DType::f16; v.d = 64; v.hq = 2; v.hkv = 2;
  v.seq_q = {40000, 3, 25000};
  v.seq_kv = {40000, 5, 25000};
  v.dist = Dist::normal;
  v.seed = 702;
  run_case(v);
}

TEST(QuantGpu, ManyHeads) {
  REQUIRE_GPU();
  Case c;
  c.scheme = Scheme::accurate; c.dtype = DType::bf16; c.d = 128;
  c.batch = 2; c.hq = 16; c.hkv = 4; c.sq = 4096; c.skv = 4096;
  c.dist = Dist::llm;
  c.seed = 800;
  run_case(c);
}

// The two-launch order (INTFA_QUANT_ORDER=split; the default is the fused single launch) must
// give the same bytes.
TEST(QuantGpu, SplitOrder) {
  REQUIRE_GPU();
  setenv("INTFA_QUANT_ORDER", "split", 1);
  Case c;
  c.scheme = Scheme::accurate; c.dtype = DType::bf16; c.d = 128;
  c.batch = 2; c.hq = 8; c.hkv = 2; c.sq = 1000; c.skv = 5000;
  c.dist = Dist::llm;
  c.seed = 900;
  run_case(c);
  c.scheme = Scheme::paper; c.d = 64; c.seed = 901;
  run_case(c);
  Case v;
  v.scheme = Scheme::accurate; v.dtype = DType::f16; v.d = 128; v.hq = 4; v.hkv = 2;
  v.seq_q = {1, 17, 127, 1000, 0};
  v.seq_kv = {1000, 0, 127, 17, 3000};
  v.seed = 902;
  run_case(v);
  Case l;  // many chunks per sequence (the fused order's lag when run by default)
  l.scheme = Scheme::accurate; l.dtype = DType::f16; l.d = 64; l.hq = 2; l.hkv = 2;
  l.seq_q = {40000, 3, 25000};
  l.seq_kv = {40000, 5, 25000};
  l.seed = 903;
  run_case(l);
  unsetenv("INTFA_QUANT_ORDER");
}

// Throughput of quantize() for B=4, H=32, N=4096, D=128 bf16 next to a device-to-device copy of
// the inputs, counting bytes read plus bytes written. Prints; asserts nothing about time.
struct BenchCtx {
  Tensor q, k, v, none;
  Options opts;
  QuantizedQKV x;
  int calls = 10;
  void* dst = nullptr;
  const void* src = nullptr;
  size_t copy_bytes = 0;
};

Status run_quantize(void* p) {
  auto* c = static_cast<BenchCtx*>(p);
  for (int i = 0; i < c->calls; ++i) {
    Status st = quantize(c->q, c->k, c->v, c->none, c->none, c->opts, c->x);
    if (!st.ok()) return st;
  }
  return Status::OK();
}

Status run_copy(void* p) {
  auto* c = static_cast<BenchCtx*>(p);
  for (int i = 0; i < c->calls; ++i) {
    const int err = cudaMemcpyAsync(c->dst, c->src, c->copy_bytes, 3, nullptr);
    if (err != 0) return Status(StatusCode::device_error, "cudaMemcpyAsync failed: " + std::to_string(err));
  }
  return Status::OK();
}

// Median GPU time (ms) of one run(ctx) (which makes ctx->calls calls). Copies queued first keep
// the GPU busy while the host enqueues, so host-side overhead between calls stays off the
// timeline (the printed host time per call shows it is well under the GPU time).
struct Timing {
  double gpu_ms = 0, host_ms = 0;
};
Timing time_gpu(BenchCtx& busy, Status (*run)(void*), void* ctx, int reps) {
  void *start = nullptr, *stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> gpu, host;
  for (int r = 0; r < reps + 1; ++r) {
    for (int i = 0; i < 40; ++i) cudaMemcpyAsync(busy.dst, busy.src, busy.copy_bytes, 3, nullptr);
    cudaEventRecord(start, nullptr);
    const auto t0 = std::chrono::steady_clock::now();
    const Status st = run(ctx);
    const auto t1 = std::chrono::steady_clock::now();
    cudaEventRecord(stop, nullptr);
    cudaEventSynchronize(stop);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    EXPECT_TRUE(st.ok()) << st.message();
    if (r == 0) continue;  // warm-up
    gpu.push_back(ms);
    host.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(gpu.begin(), gpu.end());
  std::sort(host.begin(), host.end());
  return {gpu[gpu.size() / 2], host[host.size() / 2]};
}

TEST(QuantGpu, Bandwidth) {
  REQUIRE_GPU();
  const int B = 4, H = 32, N = 4096, D = 128;
  const size_t elems = static_cast<size_t>(B) * H * N * D;
  DevBuf dq(elems * 2), dk(elems * 2), dv(elems * 2);
  ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr);
  {  // random inputs (timing zeros would flatter the kernel)
    const tools::HostQKV x = tools::make_inputs(Dist::llm, 1, H, H, N, N, D, DType::bf16, 7);
    for (int b = 0; b < B; ++b) {
      const size_t off = static_cast<size_t>(b) * H * N * D * 2, n = x.q.size() * 2;
      GPU_OK(gpu_copy_to_device(static_cast<char*>(dq.ptr) + off, x.q.data(), n));
      GPU_OK(gpu_copy_to_device(static_cast<char*>(dk.ptr) + off, x.k.data(), n));
      GPU_OK(gpu_copy_to_device(static_cast<char*>(dv.ptr) + off, x.v.data(), n));
    }
  }
  ProblemShape shape;
  shape.batch = B; shape.heads_q = H; shape.heads_kv = H; shape.seqlen_q = N; shape.seqlen_kv = N;
  shape.head_dim = D;
  const std::string card = device_info(0).name;

  // Copy baseline: as many bytes as the three inputs.
  BenchCtx cc;
  cc.copy_bytes = 3 * elems * 2;
  DevBuf dst(cc.copy_bytes), src(cc.copy_bytes);
  ASSERT_TRUE(dst.ptr && src.ptr);
  GPU_OK(gpu_memset(src.ptr, 0x3c, cc.copy_bytes));
  cc.dst = dst.ptr;
  cc.src = src.ptr;
  const Timing ct = time_gpu(cc, run_copy, &cc, 7);
  const double copy_gbs = 2.0 * cc.copy_bytes * cc.calls / (ct.gpu_ms * 1e-3) / 1e9;
  std::printf("[ bench ] %s: device-to-device copy of %.0f MiB: %.3f ms, %.0f GB/s (read + write)\n",
              card.c_str(), cc.copy_bytes / 1048576.0, ct.gpu_ms / cc.calls, copy_gbs);

  for (Scheme s : {Scheme::accurate, Scheme::paper}) {
    const size_t bytes = quantized_bytes(shape, s);
    DevBuf out(bytes);
    ASSERT_TRUE(out.ptr);
    BenchCtx c;
    c.q = make_tensor(dq.ptr, DType::bf16, {B, H, N, D}, true);
    c.k = make_tensor(dk.ptr, DType::bf16, {B, H, N, D}, true);
    c.v = make_tensor(dv.ptr, DType::bf16, {B, H, N, D}, true);
    c.opts.scheme = s;
    GPU_OK(alloc_quantized(shape, s, Layout::BHSD, out.ptr, bytes, true, 0, &c.x));
    // Bytes that must move: q, k, v read once; q8, k8, vt8 and the fp32 side tensors written.
    const double moved = 3.0 * elems * 2 + 3.0 * elems + 4.0 * B * H * N * 3 + 8.0 * B * H * D;
    for (const char* order : {"fused", "split"}) {
      setenv("INTFA_QUANT_ORDER", order, 1);
      const Timing t = time_gpu(cc, run_quantize, &c, 7);
      const double gbs = moved * c.calls / (t.gpu_ms * 1e-3) / 1e9;
      std::printf("[ bench ] %s: quantize %s (%s order) B=%d H=%d N=%d D=%d bf16: %.3f ms, %.0f GB/s"
                  " = %.0f%% of copy (host enqueue %.3f ms per call)\n",
                  card.c_str(), to_string(s), order, B, H, N, D, t.gpu_ms / c.calls, gbs,
                  100.0 * gbs / copy_gbs, t.host_ms / c.calls);
    }
    unsetenv("INTFA_QUANT_ORDER");
  }
}

// intfa::gpu_graph_time_ms (what `intfa bench --graph` times with): a replayed graph writes what
// the eager call writes, and a run that fails, eagerly or while the graph is captured, comes back
// as its own error with the capture ended (the next call on the legacy stream works).
struct GraphRun {
  BenchCtx* c = nullptr;
  int calls = 0, fail_at = -1;
};
Status graph_run(void* p, void* stream) {
  auto* g = static_cast<GraphRun*>(p);
  if (g->calls++ == g->fail_at) return Status(StatusCode::invalid_argument, "graph_run: failing on purpose");
  Options o = g->c->opts;
  o.stream = stream;
  return quantize(g->c->q, g->c->k, g->c->v, g->c->none, g->c->none, o, g->c->x);
}

TEST(QuantGpu, GraphTimerReplaysAndReportsErrors) {
  REQUIRE_GPU();
  const int H = 2, N = 300, D = 64;
  const tools::HostQKV in = tools::make_inputs(Dist::llm, 1, H, H, N, N, D, DType::bf16, 41);
  const size_t n = in.q.size() * 2;
  DevBuf dq(n), dk(n), dv(n);
  ASSERT_TRUE(dq.ptr && dk.ptr && dv.ptr);
  GPU_OK(gpu_copy_to_device(dq.ptr, in.q.data(), n));
  GPU_OK(gpu_copy_to_device(dk.ptr, in.k.data(), n));
  GPU_OK(gpu_copy_to_device(dv.ptr, in.v.data(), n));
  ProblemShape shape;
  shape.batch = 1; shape.heads_q = H; shape.heads_kv = H; shape.seqlen_q = N; shape.seqlen_kv = N;
  shape.head_dim = D;
  const size_t bytes = quantized_bytes(shape, Scheme::accurate);
  DevBuf eager(bytes), graphed(bytes);
  ASSERT_TRUE(eager.ptr && graphed.ptr);
  BenchCtx c;
  c.q = make_tensor(dq.ptr, DType::bf16, {1, H, N, D}, true);
  c.k = make_tensor(dk.ptr, DType::bf16, {1, H, N, D}, true);
  c.v = make_tensor(dv.ptr, DType::bf16, {1, H, N, D}, true);
  // Both buffers poisoned alike: the parts' alignment gaps, which nothing writes, then match.
  GPU_OK(gpu_memset(eager.ptr, 0xa5, bytes));
  GPU_OK(gpu_memset(graphed.ptr, 0xa5, bytes));
  GPU_OK(alloc_quantized(shape, Scheme::accurate, Layout::BHSD, eager.ptr, bytes, true, 0, &c.x));
  GPU_OK(quantize(c.q, c.k, c.v, c.none, c.none, c.opts, c.x));
  GPU_OK(gpu_synchronize());
  std::vector<uint8_t> want(bytes), got(bytes);
  GPU_OK(gpu_copy_to_host(want.data(), eager.ptr, bytes));

  GPU_OK(alloc_quantized(shape, Scheme::accurate, Layout::BHSD, graphed.ptr, bytes, true, 0, &c.x));
  GraphRun g;
  g.c = &c;
  double ms = 0;
  GPU_OK(gpu_graph_time_ms(graph_run, &g, 3, 4, &ms));
  EXPECT_EQ(g.calls, 1 + 3);  // one eager call, three captured; the replays call nothing on the host
  EXPECT_GT(ms, 0.0);
  GPU_OK(gpu_copy_to_host(got.data(), graphed.ptr, bytes));
  const auto diff = std::mismatch(want.begin(), want.end(), got.begin());
  EXPECT_TRUE(diff.first == want.end()) << "graph replay wrote other bytes, first at byte "
                                        << (diff.first - want.begin()) << " of " << bytes;

  for (int fail_at : {0, 2}) {  // the eager call; the second captured call
    GraphRun bad;
    bad.c = &c;
    bad.fail_at = fail_at;
    const Status st = gpu_graph_time_ms(graph_run, &bad, 3, 4, &ms);
    EXPECT_EQ(st.code(), StatusCode::invalid_argument) << "fail_at " << fail_at << ": " << st.message();
    EXPECT_NE(st.message().find("failing on purpose"), std::string::npos) << st.message();
    GPU_OK(quantize(c.q, c.k, c.v, c.none, c.none, c.opts, c.x));  // no capture left open
    GPU_OK(gpu_synchronize());
  }
}

}  // namespace
