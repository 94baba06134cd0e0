// Argument validation: one test per error of the entry points, checking the Status code and that
// the message names the argument (and what was expected / what came, where that applies).
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace intfa::testing {
namespace {

// True when `st` has `code` and its message contains every one of `parts`.
::testing::AssertionResult has_error(const Status& st, StatusCode code,
                                     std::initializer_list<const char*> parts) {
  if (st.code() != code)
    return ::testing::AssertionFailure() << "code " << int(st.code()) << " (want " << int(code)
                                         << "), message: '" << st.message() << "'";
  for (const char* p : parts)
    if (st.message().find(p) == std::string::npos)
      return ::testing::AssertionFailure() << "message '" << st.message() << "' lacks '" << p << "'";
  return ::testing::AssertionSuccess() << st.message();
}

constexpr StatusCode kInvalid = StatusCode::invalid_argument;
constexpr StatusCode kType = StatusCode::unsupported_type;

// A valid dense problem (B=2, Hq=4, Hkv=2, Sq=8, Skv=12, D=64, fp16, BHSD) that each test breaks
// in one way. Buffers are 16-byte aligned and oversized, so nothing a test does can reach memory
// outside them even if validation let it through.
class Validation : public ::testing::Test {
 protected:
  static constexpr int B = 2, Hq = 4, Hkv = 2, Sq = 8, Skv = 12, D = 64;
  AlignedBuffer qb{4 * B * Hq * Sq * D * 2}, kb{4 * B * Hkv * Skv * D * 2},
      vb{4 * B * Hkv * Skv * D * 2}, ob{4 * B * Hq * Sq * D * 4}, lb{4 * B * Hq * Sq * 8};
  Tensor q, k, v, out, lse;
  Options opts;

  void SetUp() override {
    q = make_tensor(qb.data(), DType::f16, {B, Hq, Sq, D});
    k = make_tensor(kb.data(), DType::f16, {B, Hkv, Skv, D});
    v = make_tensor(vb.data(), DType::f16, {B, Hkv, Skv, D});
    out = make_tensor(ob.data(), DType::f16, {B, Hq, Sq, D});
    lse = make_tensor(lb.data(), DType::f32, {B, Hq, Sq});
  }
  Status run() { return attention(q, k, v, out, &lse, opts); }
  static void* offset_ptr(void* p, int bytes) { return static_cast<char*>(p) + bytes; }
};

TEST_F(Validation, BaselineIsValid) {
  Status st = run();
  EXPECT_TRUE(st.ok()) << st.message();
  st = attention(q, k, v, out, nullptr, opts);
  EXPECT_TRUE(st.ok()) << st.message();
}

TEST_F(Validation, NullData) {
  q.data = nullptr;
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "null"}));
  SetUp();
  v.data = nullptr;
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "null"}));
  SetUp();
  out.data = nullptr;
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "null"}));
}

TEST_F(Validation, WrongRank) {
  q = make_tensor(qb.data(), DType::f16, {B * Hq, Sq, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "expected 4 dims", "got 3"}));
  SetUp();
  k = make_tensor(kb.data(), DType::f16, {1, B, Hkv, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "expected 4 dims", "got 5"}));
  SetUp();
  out = make_tensor(ob.data(), DType::f16, {B, Hq, Sq * D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "4 dims", "got 3"}));
}

// Batch and sequence lengths may be 0 (EmptyCalls in attention_test.cpp); heads and head_dim may
// not, and no size may be negative.
TEST_F(Validation, ZeroOrNegativeSize) {
  q.shape[1] = -2;
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "heads", "got -2"}));
  SetUp();
  k = make_tensor(kb.data(), DType::f16, {B, 0, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "heads", ">= 1", "got 0"}));
  SetUp();
  q = make_tensor(qb.data(), DType::f16, {B, Hq, Sq, 0});
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "head_dim", ">= 1", "got 0"}));
  SetUp();
  opts.layout = Layout::BSHD;
  q = make_tensor(qb.data(), DType::f16, {B, -1, Hq, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "seqlen", ">= 0", "got -1"}));
  SetUp();
  opts.layout = Layout::BSHD;
  q = make_tensor(qb.data(), DType::f16, {B, Sq, 0, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "heads", ">= 1", "got 0"}));
}

TEST_F(Validation, UnsupportedDtype) {
  q.dtype = DType::f32;
  EXPECT_TRUE(has_error(run(), kType, {"q:", "float16", "bfloat16", "got float32"}));
  SetUp();
  v.dtype = DType::i8;
  EXPECT_TRUE(has_error(run(), kType, {"v:", "got int8"}));
}

TEST_F(Validation, KvDtypeMismatch) {
  k.dtype = DType::bf16;
  EXPECT_TRUE(has_error(run(), kType, {"k:", "float16", "got bfloat16"}));
  SetUp();
  v.dtype = DType::bf16;
  EXPECT_TRUE(has_error(run(), kType, {"v:", "float16", "got bfloat16"}));
}

TEST_F(Validation, HeadDimMismatch) {
  k = make_tensor(kb.data(), DType::f16, {B, Hkv, Skv, 32});
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "head_dim", "64", "got 32"}));
  SetUp();
  v = make_tensor(vb.data(), DType::f16, {B, Hkv, Skv, 128});
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "head_dim", "64", "got 128"}));
}

TEST_F(Validation, UnsupportedHeadDimOnCpu) {
  for (int d : {24, 8, 272}) {
    q = make_tensor(qb.data(), DType::f16, {B, Hq, 2, d});
    k = make_tensor(kb.data(), DType::f16, {B, Hkv, 2, d});
    v = make_tensor(vb.data(), DType::f16, {B, Hkv, 2, d});
    out = make_tensor(ob.data(), DType::f16, {B, Hq, 2, d});
    lse = make_tensor(lb.data(), DType::f32, {B, Hq, 2});
    EXPECT_TRUE(has_error(run(), kInvalid, {"head_dim", ("got " + std::to_string(d)).c_str()})) << d;
  }
}

TEST_F(Validation, BatchMismatch) {
  k = make_tensor(kb.data(), DType::f16, {1, Hkv, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "batch", "expected 2", "got 1"}));
  SetUp();
  v = make_tensor(vb.data(), DType::f16, {3, Hkv, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "batch", "expected 2", "got 3"}));
}

TEST_F(Validation, KvSeqlenMismatch) {
  v = make_tensor(vb.data(), DType::f16, {B, Hkv, Skv - 1, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "seqlen", "expected 12", "got 11"}));
}

TEST_F(Validation, KvHeadsMismatch) {
  v = make_tensor(vb.data(), DType::f16, {B, 1, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "heads", "expected 2", "got 1"}));
}

TEST_F(Validation, HeadsQNotMultipleOfHeadsKv) {
  k = make_tensor(kb.data(), DType::f16, {B, 3, Skv, D});
  v = make_tensor(vb.data(), DType::f16, {B, 3, Skv, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"heads_kv", "3", "heads_q", "4"}));
  // More kv heads than q heads cannot be grouped either.
  k = make_tensor(kb.data(), DType::f16, {1, 8, Skv, D});
  v = make_tensor(vb.data(), DType::f16, {1, 8, Skv, D});
  q = make_tensor(qb.data(), DType::f16, {1, 4, Sq, D});
  out = make_tensor(ob.data(), DType::f16, {1, 4, Sq, D});
  lse = make_tensor(lb.data(), DType::f32, {1, 4, Sq});
  EXPECT_TRUE(has_error(run(), kInvalid, {"heads_kv", "8"}));
}

TEST_F(Validation, NonContiguousLastDim) {
  q.stride[3] = 2;
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "contiguous", "stride 2"}));
  SetUp();
  out.stride[3] = 0;
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "contiguous", "stride 0"}));
}

TEST_F(Validation, NegativeStride) {
  k.stride[1] = -k.stride[1];
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "stride", "dim 1"}));
}

TEST_F(Validation, MisalignedPointer) {
  q.data = offset_ptr(qb.data(), 1);  // odd byte offset for fp16
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "2-byte aligned", "offset 1"}));
  SetUp();
  out = make_tensor(offset_ptr(ob.data(), 2), DType::f32, {B, Hq, Sq, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "4-byte aligned"}));
  SetUp();
  lse.data = offset_ptr(lb.data(), 1);
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "aligned"}));
}

TEST_F(Validation, DeviceMismatch) {
  k.on_device = true;
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "host memory", "GPU memory"}));
  SetUp();
  v.on_device = true;
  v.device_index = 1;
  EXPECT_TRUE(has_error(run(), kInvalid, {"v:", "host memory", "GPU memory of device 1"}));
  SetUp();
  out.on_device = true;
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "host memory", "GPU memory"}));
  SetUp();
  lse.on_device = true;
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "host memory", "GPU memory"}));
  SetUp();
  // q on the GPU, k on the host: the message is about k (the first operand that differs).
  q.on_device = true;
  EXPECT_TRUE(has_error(run(), kInvalid, {"k:", "GPU memory of device 0", "got host memory"}));
}

TEST_F(Validation, BackendCpuWithDeviceTensors) {
  opts.backend = Backend::cpu;
  for (Tensor* t : {&q, &k, &v, &out}) t->on_device = true;
  EXPECT_TRUE(has_error(run(), kInvalid, {"backend", "cpu", "GPU memory"}));
}

TEST_F(Validation, UnknownEnumOptions) {
  opts.scheme = static_cast<Scheme>(7);
  EXPECT_TRUE(has_error(run(), kInvalid, {"scheme", "7"}));
  opts = Options();
  opts.layout = static_cast<Layout>(5);
  EXPECT_TRUE(has_error(run(), kInvalid, {"layout", "5"}));
  opts = Options();
  opts.backend = static_cast<Backend>(-1);
  EXPECT_TRUE(has_error(run(), kInvalid, {"backend", "-1"}));
  opts = Options();
  opts.path = static_cast<GpuPath>(9);
  EXPECT_TRUE(has_error(run(), kInvalid, {"path", "9"}));
}

TEST_F(Validation, BadBlockN) {
  for (int bn : {0, 8, 17, 100, 528, 1024, -16}) {
    opts.block_n = bn;
    EXPECT_TRUE(has_error(run(), kInvalid, {"block_n", ("got " + std::to_string(bn)).c_str()}));
  }
  for (int bn : {16, 48, 512}) {
    opts.block_n = bn;
    EXPECT_TRUE(run().ok()) << bn;
  }
}

TEST_F(Validation, NonFiniteScale) {
  for (float s : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    opts.scale = s;
    EXPECT_TRUE(has_error(run(), kInvalid, {"scale", "finite"})) << s;
  }
}

TEST_F(Validation, OutShapeMismatch) {
  out = make_tensor(ob.data(), DType::f16, {B, Hq, Sq - 1, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "shape of q", "[2, 4, 7, 64]"}));
  SetUp();
  out = make_tensor(ob.data(), DType::f16, {B, Hkv, Sq, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"out:", "shape of q"}));
}

TEST_F(Validation, OutDtype) {
  out.dtype = DType::bf16;  // q is fp16: out must be fp16 or f32
  EXPECT_TRUE(has_error(run(), kType, {"out:", "float16", "got bfloat16"}));
  SetUp();
  out.dtype = DType::f64;  // only the reference writes float64
  EXPECT_TRUE(has_error(run(), kType, {"out:", "got float64"}));
  SetUp();
  out = make_tensor(ob.data(), DType::f32, {B, Hq, Sq, D});
  EXPECT_TRUE(run().ok());
}

TEST_F(Validation, LseShapeMismatch) {
  lse = make_tensor(lb.data(), DType::f32, {B, Hq, Sq + 1});
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "[batch, heads_q, seqlen_q]", "[2, 4, 8]", "got [2, 4, 9]"}));
  SetUp();
  lse = make_tensor(lb.data(), DType::f32, {B * Hq * Sq});
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "[2, 4, 8]"}));
  SetUp();
  lse.dtype = DType::f64;
  EXPECT_TRUE(has_error(run(), kType, {"lse:", "float32", "got float64"}));
  SetUp();
  lse.stride[0] = 64;  // padded rows: the LSE must be dense
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "contiguous"}));
}

TEST_F(Validation, LseNullDataWhenGivenIsIgnored) {
  // An undefined LSE tensor (data == nullptr) means "no LSE", as documented by `defined()`.
  Tensor none;
  EXPECT_TRUE(attention(q, k, v, out, &none, opts).ok());
}

// A GPU request in a build without CUDA: not_available, never a silent CPU fallback.
TEST_F(Validation, GpuNotAvailableInCpuBuild) {
  if (build_info().cuda_built) GTEST_SKIP() << "CUDA build";
  for (Tensor* t : {&q, &k, &v, &out, &lse}) t->on_device = true;
  for (Backend b : {Backend::automatic, Backend::gpu}) {
    opts.backend = b;
    Status st = run();
    EXPECT_EQ(st.code(), StatusCode::not_available) << st.message();
    EXPECT_NE(st.message().find("GPU"), std::string::npos) << st.message();
  }
  void* p = nullptr;
  EXPECT_EQ(gpu_malloc(&p, 16).code(), StatusCode::not_available);
  EXPECT_EQ(gpu_synchronize().code(), StatusCode::not_available);
  GpuPath resolved;
  EXPECT_EQ(resolve_gpu_path(GpuPath::automatic, 0, &resolved).code(), StatusCode::not_available);
  EXPECT_FALSE(device_info(0).present);
}

// Asking for the GPU backend with host tensors in a build without CUDA should say the GPU
// backend is not built (not_available), rather than asking for device tensors the user cannot
// make.
TEST_F(Validation, GpuBackendRequestedInCpuBuildWithHostTensors) {
  if (build_info().cuda_built) GTEST_SKIP() << "CUDA build";
  opts.backend = Backend::gpu;
  Status st = run();
  EXPECT_EQ(st.code(), StatusCode::not_available) << st.message();
  EXPECT_NE(st.message().find("GPU"), std::string::npos) << st.message();
}

// The GPU kernels' key blocks, for block-exact CPU emulation: 128, the sm80 kernel's 64 at head
// dim 256 and the sm90 kernel's 128 there (where built); 0 for a head dim no kernel takes and in
// builds without CUDA. Options::ran is left as it is by CPU calls.
TEST_F(Validation, GpuBlockNAndRan) {
  const BuildInfo b = build_info();
  const bool sm90 = b.cuda_archs.find("sm90 kernel") != std::string::npos;
  for (GpuPath path : {GpuPath::automatic, GpuPath::sm80, GpuPath::sm90, GpuPath::decode}) {
    EXPECT_EQ(gpu_block_n(64, path), b.cuda_built ? 128 : 0) << to_string(path);
    EXPECT_EQ(gpu_block_n(96, path), 0) << to_string(path);
  }
  EXPECT_EQ(gpu_block_n(128), b.cuda_built ? 128 : 0);
  EXPECT_EQ(gpu_block_n(256), b.cuda_built ? 64 : 0);
  EXPECT_EQ(gpu_block_n(256, GpuPath::automatic), b.cuda_built ? 64 : 0);
  EXPECT_EQ(gpu_block_n(256, GpuPath::sm80), b.cuda_built ? 64 : 0);
  EXPECT_EQ(gpu_block_n(256, GpuPath::sm90), sm90 ? 128 : 0);
  EXPECT_EQ(gpu_block_n(256, GpuPath::decode), b.cuda_built ? 128 : 0);
  GpuPath ran = GpuPath::decode;
  opts.ran = &ran;
  opts.backend = Backend::cpu;
  ASSERT_TRUE(run().ok());
  EXPECT_EQ(ran, GpuPath::decode);
}

// ---------------------------------------------------------------------------------------------
// Varlen: cu_seqlens and max_seqlen checks.
// ---------------------------------------------------------------------------------------------
class VarlenValidation : public ::testing::Test {
 protected:
  static constexpr int Hq = 4, Hkv = 2, Tq = 10, Tk = 14, D = 64;
  AlignedBuffer qb{Tq * Hq * D * 2}, kb{Tk * Hkv * D * 2}, vb{Tk * Hkv * D * 2},
      ob{Tq * Hq * D * 2}, lb{Hq * Tq * 4};
  std::vector<int32_t> cq{0, 4, 10}, ck{0, 6, 14};
  int max_q = 6, max_k = 8;
  Tensor q, k, v, out, lse;
  Options opts;

  void SetUp() override {
    q = make_tensor(qb.data(), DType::bf16, {Tq, Hq, D});
    k = make_tensor(kb.data(), DType::bf16, {Tk, Hkv, D});
    v = make_tensor(vb.data(), DType::bf16, {Tk, Hkv, D});
    out = make_tensor(ob.data(), DType::bf16, {Tq, Hq, D});
    lse = make_tensor(lb.data(), DType::f32, {Hq, Tq});
  }
  Tensor tcq() { return make_tensor(cq.data(), DType::i32, {int64_t(cq.size())}); }
  Tensor tck() { return make_tensor(ck.data(), DType::i32, {int64_t(ck.size())}); }
  Status run() { return attention_varlen(q, k, v, tcq(), tck(), max_q, max_k, out, &lse, opts); }
};

TEST_F(VarlenValidation, BaselineIsValid) {
  Status st = run();
  EXPECT_TRUE(st.ok()) << st.message();
}

TEST_F(VarlenValidation, WrongRank) {
  q = make_tensor(qb.data(), DType::bf16, {1, Tq, Hq, D});
  EXPECT_TRUE(has_error(run(), kInvalid, {"q:", "3 dims", "total_tokens", "got 4"}));
}

TEST_F(VarlenValidation, CuSeqlensNotStartingAtZero) {
  cq = {1, 4, 10};
  EXPECT_TRUE(has_error(run(), kInvalid, {"cu_seqlens_q", "first value 0", "got 1"}));
}

TEST_F(VarlenValidation, CuSeqlensDecreasing) {
  ck = {0, 15, 14};
  max_k = 20;
  EXPECT_TRUE(has_error(run(), kInvalid, {"cu_seqlens_kv", "non-decreasing", "15", "14"}));
}

TEST_F(VarlenValidation, CuSeqlensLastNotTotal) {
  cq = {0, 4, 9};
  EXPECT_TRUE(has_error(run(), kInvalid, {"cu_seqlens_q", "last value 10", "got 9"}));
  cq = {0, 4, 10};
  ck = {0, 6, 15};
  EXPECT_TRUE(has_error(run(), kInvalid, {"cu_seqlens_kv", "last value 14", "got 15"}));
}

TEST_F(VarlenValidation, MaxSeqlenTooSmall) {
  max_q = 5;  // the longest q sequence has 6 tokens
  EXPECT_TRUE(has_error(run(), kInvalid, {"max_seqlen_q", "longest", "6", "got 5"}));
  max_q = 6;
  max_k = 0;
  EXPECT_TRUE(has_error(run(), kInvalid, {"max_seqlen_kv", "got 0"}));
}

TEST_F(VarlenValidation, CuSeqlensCountsDiffer) {
  ck = {0, 6, 10, 14};
  max_k = 8;
  EXPECT_TRUE(has_error(run(), kInvalid, {"cu_seqlens_kv", "3 entries", "got 4"}));
}

TEST_F(VarlenValidation, CuSeqlensShapeDtypeDevice) {
  Tensor bad = make_tensor(cq.data(), DType::f32, {3});
  EXPECT_TRUE(has_error(attention_varlen(q, k, v, bad, tck(), max_q, max_k, out, &lse, opts), kType,
                        {"cu_seqlens_q", "int32", "float32"}));
  bad = make_tensor(cq.data(), DType::i32, {1});
  EXPECT_TRUE(has_error(attention_varlen(q, k, v, bad, tck(), max_q, max_k, out, &lse, opts), kInvalid,
                        {"cu_seqlens_q", "at least 2"}));
  bad = tck();
  bad.on_device = true;
  EXPECT_TRUE(has_error(attention_varlen(q, k, v, tcq(), bad, max_q, max_k, out, &lse, opts), kInvalid,
                        {"cu_seqlens_kv", "host memory", "GPU memory"}));
  EXPECT_TRUE(has_error(attention_varlen(q, k, v, Tensor(), tck(), max_q, max_k, out, &lse, opts),
                        kInvalid, {"cu_seqlens_q", "null"}));
}

TEST_F(VarlenValidation, LseShape) {
  lse = make_tensor(lb.data(), DType::f32, {Tq, Hq});  // transposed: must be [heads_q, total_q]
  EXPECT_TRUE(has_error(run(), kInvalid, {"lse:", "[heads_q, total_q]", "[4, 10]", "got [10, 4]"}));
}

// ---------------------------------------------------------------------------------------------
// quantize(), attention_int8(), attention_reference(), alloc_quantized().
// ---------------------------------------------------------------------------------------------
TEST_F(Validation, QuantizeOutputShapeMismatch) {
  ProblemShape s{B, Hq, Hkv, Sq, Skv, D};
  AlignedBuffer buf(quantized_bytes(s, Scheme::accurate));
  QuantizedQKV x;
  ASSERT_TRUE(alloc_quantized(s, Scheme::accurate, Layout::BHSD, buf.data(), buf.size(), false, 0, &x).ok());
  EXPECT_TRUE(quantize(q, k, v, Tensor(), Tensor(), opts, x).ok());
  QuantizedQKV bad = x;
  bad.q8.shape[2] = Sq - 1;
  EXPECT_TRUE(has_error(quantize(q, k, v, Tensor(), Tensor(), opts, bad), kInvalid, {"q8", "shape of q"}));
  bad = x;
  bad.k_scale = make_tensor(x.k_scale.data, DType::f32, {B, Hkv, Skv + 1});
  EXPECT_TRUE(has_error(quantize(q, k, v, Tensor(), Tensor(), opts, bad), kInvalid, {"k_scale", "[2, 2, 12]"}));
  bad = x;
  bad.v_scale.dtype = DType::f16;
  EXPECT_TRUE(has_error(quantize(q, k, v, Tensor(), Tensor(), opts, bad), kType, {"v_scale", "float32"}));
}

TEST_F(Validation, AttentionInt8Checks) {
  ProblemShape s{B, Hq, Hkv, Sq, Skv, D};
  AlignedBuffer buf(quantized_bytes(s, Scheme::paper));
  QuantizedQKV x;
  ASSERT_TRUE(alloc_quantized(s, Scheme::paper, Layout::BHSD, buf.data(), buf.size(), false, 0, &x).ok());
  opts.scheme = Scheme::paper;
  ASSERT_TRUE(quantize(q, k, v, Tensor(), Tensor(), opts, x).ok());
  Status st = attention_int8(x, Tensor(), Tensor(), 0, 0, out, &lse, opts);
  EXPECT_TRUE(st.ok()) << st.message();
  QuantizedQKV bad = x;
  bad.scheme = static_cast<Scheme>(4);
  EXPECT_TRUE(has_error(attention_int8(bad, Tensor(), Tensor(), 0, 0, out, &lse, opts), kInvalid, {"scheme"}));
  bad = x;
  bad.k8.shape[0] = 1;
  EXPECT_TRUE(has_error(attention_int8(bad, Tensor(), Tensor(), 0, 0, out, &lse, opts), kInvalid, {"k8", "batch"}));
  bad = x;
  bad.vt8.shape[3] = Skv - 1;
  EXPECT_TRUE(has_error(attention_int8(bad, Tensor(), Tensor(), 0, 0, out, &lse, opts), kInvalid, {"vt8", "seqlen_kv"}));
  Tensor bad_out = make_tensor(ob.data(), DType::f16, {B, Hq, Sq, D / 2});
  EXPECT_TRUE(has_error(attention_int8(x, Tensor(), Tensor(), 0, 0, bad_out, &lse, opts), kInvalid, {"out", "shape of q8"}));
}

TEST_F(Validation, ReferenceChecks) {
  std::vector<double> o(size_t(B) * Hq * Sq * D);
  Tensor o64 = make_tensor(o.data(), DType::f64, {B, Hq, Sq, D});
  EXPECT_TRUE(attention_reference(q, k, v, o64, nullptr, opts).ok());
  Tensor dev = q;
  dev.on_device = true;
  EXPECT_TRUE(has_error(attention_reference(dev, k, v, o64, nullptr, opts), kInvalid, {"host"}));
  Tensor k2 = make_tensor(kb.data(), DType::f16, {B, Hkv, Skv, 32});
  EXPECT_TRUE(has_error(attention_reference(q, k2, v, o64, nullptr, opts), kInvalid, {"k/v", "head_dim"}));
  Tensor kbf = k;
  kbf.dtype = DType::bf16;
  EXPECT_TRUE(has_error(attention_reference(q, kbf, v, o64, nullptr, opts), kType, {"k:"}));
  Tensor o16 = make_tensor(o.data(), DType::f16, {B, Hq, Sq, D});
  EXPECT_TRUE(has_error(attention_reference(q, k, v, o16, nullptr, opts), kType, {"out:"}));
}

TEST(AllocQuantized, RejectsBadShapes) {
  AlignedBuffer buf(1 << 16);
  QuantizedQKV x;
  ProblemShape s{1, 2, 2, 0, 8, 64};
  EXPECT_TRUE(has_error(alloc_quantized(s, Scheme::accurate, Layout::BHSD, buf.data(), buf.size(), false, 0, &x),
                        kInvalid, {">= 1"}));
  ProblemShape v{2, 2, 2, 0, 0, 64};
  v.varlen = true;
  v.total_q = 0;
  v.total_kv = 5;
  EXPECT_TRUE(has_error(alloc_quantized(v, Scheme::accurate, Layout::BHSD, buf.data(), buf.size(), false, 0, &x),
                        kInvalid, {">= 1"}));
}

}  // namespace
}  // namespace intfa::testing
