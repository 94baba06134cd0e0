// Random attention / attention_varlen calls on device tensors, each against the CPU backend on
// the same inputs (the CPU API fuzz's generator, tests/fuzz_util.h): odd and empty shapes, GQA,
// ragged varlen batches with empty sequences, padded strides (in 16-byte steps, and sometimes
// not), both layouts and dtypes, schemes, paths, causal / window / soft-capping / sinks / scale /
// LSE, a few percent invalid. A call either fails with a message (never a device error), or the
// CPU took it too and the GPU wrote every element of its NaN-poisoned output, within the bound
// below of the CPU's. The quantizers match bit for bit; what differs is exp2, summation order and
// the kernels' rounding of M s_k (up to 3/4 of an integer score unit: b = 0.75 s_q s_k scale in
// a score), so a row's LSE may move by b and its weights by a factor up to e^(2b).
// INTFA_FUZZ_SEED and INTFA_FUZZ_ITERS change the run (default: a fixed seed, 250 calls).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "gpu_test_util.h"
#include "intfa/intfa.h"

namespace intfa {
namespace {

using testing::DeviceBuffer;
using testing::env_or;
using testing::Fuzz;
using testing::HostTensor;

// A host tensor's bytes on the device, same shape and strides.
struct DeviceCopy {
  DeviceBuffer buf;
  Tensor t;
  explicit DeviceCopy(const HostTensor& h) : buf(std::max<size_t>(h.mem.size(), 16)) {
    if (!h.mem.empty()) (void)gpu_copy_to_device(buf.ptr, h.mem.data(), h.mem.size());
    t = testing::on_device(h.t, buf.ptr);
  }
  // The device bytes as a host tensor like h (HostTensor::at reads them).
  HostTensor back(const HostTensor& h) const {
    HostTensor r = h;
    r.mem = buf.to_host<uint8_t>();
    r.t.data = r.mem.data();
    return r;
  }
};

// Element (b, h, s, c) of an attention operand (dense BHSD / BSHD, or varlen [T, H, D] with b = 0
// and s the packed token), as the byte offset HostTensor::at takes.
int64_t byte_of(const Tensor& t, bool varlen, Layout layout, int64_t b, int64_t h, int64_t s, int64_t c) {
  int64_t e;
  if (varlen) e = s * t.stride[0] + h * t.stride[1] + c;
  else if (layout == Layout::BHSD) e = b * t.stride[0] + h * t.stride[1] + s * t.stride[2] + c;
  else e = b * t.stride[0] + s * t.stride[1] + h * t.stride[2] + c;
  return e * static_cast<int64_t>(testing::elem_bytes(t.dtype));
}

TEST(ApiFuzzGpu, RandomCallsMatchTheCpuBackendOrFailWithAMessage) {
  INTFA_REQUIRE_GPU();
  const uint64_t seed = env_or("INTFA_FUZZ_SEED", 20261129);
  const int iters = static_cast<int>(env_or("INTFA_FUZZ_ITERS", 250));
  Fuzz f(seed);
  int ok = 0, refused = 0;
  for (int it = 0; it < iters; ++it) {
    SCOPED_TRACE("INTFA_FUZZ_SEED=" + std::to_string(seed) + ", call " + std::to_string(it));
    const bool varlen = f.coin(0.3);
    const DType dt = f.coin(0.97) ? (f.coin() ? DType::f16 : DType::bf16) : DType::f32;
    const int B = f.range(f.coin(0.03) ? 0 : 1, 3), hkv = f.range(1, 3);
    const int hq = hkv * f.range(1, 4) + (f.coin(0.02) ? 1 : 0);
    const int sq = f.range(f.coin(0.03) ? 0 : 1, f.coin(0.2) ? 300 : 70);
    const int skv = f.range(f.coin(0.03) ? 0 : 1, f.coin(0.2) ? 700 : 150);
    static const int kDims[] = {64, 128, 256, 64, 128, 80};  // 80: the CPU's only
    const int D = kDims[f.range(0, f.coin(0.97) ? 4 : 5)];
    Options o;
    o.causal = f.coin(0.4);
    o.layout = f.coin() ? Layout::BHSD : Layout::BSHD;
    o.scheme = f.coin(0.03) ? Scheme::half : (f.coin() ? Scheme::paper : Scheme::accurate);
    static const GpuPath kPaths[] = {GpuPath::automatic, GpuPath::automatic, GpuPath::automatic,
                                     GpuPath::sm80, GpuPath::sm90, GpuPath::decode};
    o.path = kPaths[f.range(0, 5)];
    if (f.coin(0.2)) o.window_left = f.range(-1, 200);
    if (f.coin(0.2)) o.window_right = o.causal ? f.range(-1, 0) : f.range(-1, 200);
    if (f.coin(0.15)) o.softcap = f.coin(0.95) ? static_cast<float>(f.range(1, 60)) : -1.f;
    if (f.coin(0.2)) o.scale = f.coin(0.95) ? 0.02f * f.range(1, 10) : -1.f;
    HostTensor sinks;
    if (f.coin(0.15)) sinks = testing::random_sinks(f, hq);
    const bool pad = f.coin(), want_lse = f.coin(0.7);
    const int unit = f.coin(0.9) ? 8 : 1;  // 16-byte steps, or strides the GPU refuses
    const DType out_dt = f.coin(0.8) ? dt : DType::f32;
    HostTensor q, k, v, out, lse;
    std::vector<int32_t> cu_q, cu_k;
    int max_q = sq, max_k = skv;
    if (!varlen) {
      const bool bshd = o.layout == Layout::BSHD;
      const std::vector<int64_t> qs = bshd ? std::vector<int64_t>{B, sq, hq, D} : std::vector<int64_t>{B, hq, sq, D};
      const std::vector<int64_t> ks = bshd ? std::vector<int64_t>{B, skv, hkv, D} : std::vector<int64_t>{B, hkv, skv, D};
      q = HostTensor(f, dt, qs, pad, false, unit), k = HostTensor(f, dt, ks, pad, false, unit);
      v = HostTensor(f, dt, ks, pad, false, unit), out = HostTensor(f, out_dt, qs, pad, false, unit);
      lse = HostTensor(f, DType::f32, {B, hq, sq}, false);
    } else {
      const int nseq = std::max(B, 1);
      cu_q.assign(nseq + 1, 0), cu_k.assign(nseq + 1, 0);
      max_q = max_k = 0;
      for (int b = 0; b < nseq; ++b) {
        const int lq = f.coin(0.15) ? 0 : f.range(1, 140), lk = f.coin(0.1) ? 0 : f.range(1, 300);
        cu_q[b + 1] = cu_q[b] + lq, cu_k[b + 1] = cu_k[b] + lk;
        max_q = std::max(max_q, lq), max_k = std::max(max_k, lk);
      }
      if (f.coin(0.03)) max_q = std::max(0, max_q - f.range(1, 5));  // too small: refused
      q = HostTensor(f, dt, {cu_q[nseq], hq, D}, pad, false, unit), k = HostTensor(f, dt, {cu_k[nseq], hkv, D}, pad, false, unit);
      v = HostTensor(f, dt, {cu_k[nseq], hkv, D}, pad, false, unit), out = HostTensor(f, out_dt, {cu_q[nseq], hq, D}, pad, false, unit);
      lse = HostTensor(f, DType::f32, {hq, cu_q[nseq]}, false);
    }
    q.fill(f), k.fill(f), v.fill(f);
    const int nseq = static_cast<int>(cu_q.size()) - 1;

    // The call on the device.
    DeviceCopy dq(q), dk(k), dv(v), dout(out), dlse(lse), dsinks(sinks);
    DeviceBuffer dcq((cu_q.size() + 1) * 4), dck((cu_k.size() + 1) * 4);
    Options og = o;
    og.backend = Backend::gpu;
    GpuPath ran = GpuPath::automatic;  // path auto runs head dim 256 on sm80 or sm90 (Options::ran)
    og.ran = &ran;
    if (sinks.t.data) og.sinks = dsinks.t;
    Tensor tcq, tck, gcq, gck;
    if (varlen) {
      tcq = make_tensor(cu_q.data(), DType::i32, {nseq + 1});
      tck = make_tensor(cu_k.data(), DType::i32, {nseq + 1});
      ASSERT_TRUE(gpu_copy_to_device(dcq.ptr, cu_q.data(), cu_q.size() * 4).ok());
      ASSERT_TRUE(gpu_copy_to_device(dck.ptr, cu_k.data(), cu_k.size() * 4).ok());
      gcq = testing::on_device(tcq, dcq.ptr);
      gck = testing::on_device(tck, dck.ptr);
    }
    Status st = varlen ? attention_varlen(dq.t, dk.t, dv.t, gcq, gck, max_q, max_k, dout.t,
                                          want_lse ? &dlse.t : nullptr, og)
                       : attention(dq.t, dk.t, dv.t, dout.t, want_lse ? &dlse.t : nullptr, og);
    if (st.ok()) st = gpu_synchronize();
    // The same call on the CPU backend (host tensors).
    HostTensor out_cpu = out, lse_cpu = lse;
    out_cpu.t.data = out_cpu.mem.data(), lse_cpu.t.data = lse_cpu.mem.data();
    Options oc = o;
    oc.backend = Backend::cpu;
    oc.block_n = gpu_block_n(D, ran);  // the CPU emulation's key block: that of the kernel that ran
    if (sinks.t.data) oc.sinks = sinks.t;
    const Status st_cpu = varlen ? attention_varlen(q.t, k.t, v.t, tcq, tck, max_q, max_k, out_cpu.t,
                                                    want_lse ? &lse_cpu.t : nullptr, oc)
                                 : attention(q.t, k.t, v.t, out_cpu.t, want_lse ? &lse_cpu.t : nullptr, oc);

    if (!st.ok()) {
      ++refused;
      ASSERT_FALSE(st.message().empty()) << "an error without a message";
      ASSERT_NE(st.code(), StatusCode::device_error) << st.message();
      continue;
    }
    ASSERT_TRUE(st_cpu.ok()) << "the GPU took a call the CPU refused: " << st_cpu.message();
    ++ok;

    // Bounds per row: b = 0.75 s_q s_k scale with s_q from the row, s_k from twice the head's
    // largest |k| (smoothed K is within it); v_max the head's largest |v|.
    const bool vl = varlen;
    const Layout lay = vl ? Layout::BHSD : o.layout;
    const float scale = o.scale > 0.f ? o.scale : 1.f / std::sqrt(static_cast<float>(D));
    const int64_t nb = vl ? 1 : B, n_kv = vl ? k.t.shape[0] : skv, n_q = vl ? q.t.shape[0] : sq;
    std::vector<float> kmax(nb * hkv, 0.f), vmax(nb * hkv, 0.f);
    for (int64_t b = 0; b < nb; ++b)
      for (int h = 0; h < hkv; ++h)
        for (int64_t s = 0; s < n_kv; ++s)
          for (int c = 0; c < D; ++c) {
            kmax[b * hkv + h] = std::max(kmax[b * hkv + h], std::fabs(k.at(byte_of(k.t, vl, lay, b, h, s, c))));
            vmax[b * hkv + h] = std::max(vmax[b * hkv + h], std::fabs(v.at(byte_of(v.t, vl, lay, b, h, s, c))));
          }
    const HostTensor got = dout.back(out), got_lse = dlse.back(lse);
    int bad = 0;
    for (int64_t b = 0; b < nb && bad < 3; ++b)
      for (int h = 0; h < hq && bad < 3; ++h) {
        const int hk = h / (hq / hkv);
        for (int64_t s = 0; s < n_q && bad < 3; ++s) {
          float qrow = 0.f;
          for (int c = 0; c < D; ++c) qrow = std::max(qrow, std::fabs(q.at(byte_of(q.t, vl, lay, b, h, s, c))));
          const float bound = 0.75f * (qrow / 127.f) * (2.f * kmax[b * hkv + hk] / 127.f) * scale;
          const float tol = vmax[b * hkv + hk] * (2e-2f + 2.5f * bound) + 1e-6f;
          for (int c = 0; c < D; ++c) {
            const int64_t e = byte_of(out.t, vl, lay, b, h, s, c);
            const float g = got.at(e), r = out_cpu.at(e);
            if (!std::isfinite(g) || !(std::fabs(g - r) <= tol)) {
              ADD_FAILURE() << "out (" << b << ", " << h << ", " << s << ", " << c << "): gpu " << g << " cpu " << r
                            << " (tolerance " << tol << ")";
              ++bad;
              break;
            }
          }
          if (!want_lse) continue;
          const int64_t li = vl ? h * n_q + s : (b * hq + h) * n_q + s;
          const float gl = got_lse.at(4 * li), rl = lse_cpu.at(4 * li);
          const bool both_neg_inf = gl == -INFINITY && rl == -INFINITY;
          if (!both_neg_inf && !(std::fabs(gl - rl) <= 2e-2f * (1.f + std::fabs(rl)) + bound)) {
            ADD_FAILURE() << "LSE (" << b << ", " << h << ", " << s << "): gpu " << gl << " cpu " << rl
                          << " (bound " << bound << ")";
            ++bad;
          }
        }
      }
    ASSERT_EQ(bad, 0) << "scheme " << to_string(o.scheme) << " D " << D << " causal " << o.causal << " window ("
                      << o.window_left << ", " << o.window_right << ") softcap " << o.softcap << " path "
                      << to_string(o.path) << (varlen ? " varlen" : "");
  }
  // Both outcomes must come up (a generator that made every call invalid would test nothing).
  EXPECT_GT(ok, iters / 3);
  EXPECT_GT(refused, iters / 20);
}

}  // namespace
}  // namespace intfa
