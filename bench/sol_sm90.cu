// Speed of light on a Hopper card (sm_90a), measured rather than taken from a datasheet:
//   int8 wgmma   m64n256k32 s8.s8 -> s32 from shared memory, 2 warpgroups per SM, 4 groups in
//                flight (the tensor cores' integer peak the attention kernels are held to)
//   int8 mma.sync m16n8k32 from registers (the sm80 path's ceiling)
//   MUFU ex2     ex2.approx.ftz.f32, 8 independent chains per thread
//   copy         device-to-device cudaMemcpy, bytes read + written
// Usage: intfa_sol [--json FILE]. bench/compare.py --sol FILE prints each row's % of these.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/ptx/ptx_sm90.cuh"

namespace {

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

constexpr int kWgmmaIters = 4096;

// m64n256k32 through the n128 wrapper twice per step (A 64x32, B two 128x32 halves): the same
// operand bytes as one n256 instruction. Operands are uninitialised smem (timing only).
__global__ void __launch_bounds__(256, 1) wgmma_peak_kernel(int* sink) {
  __shared__ __align__(1024) uint8_t smem[64 * 128 + 256 * 128];
  const uint32_t a = intfa::ptx::smem_u32(smem), b = a + 64 * 128;
  int d0[64], d1[64];
  for (int i = 0; i < 64; ++i) d0[i] = d1[i] = 0;
  for (int it = 0; it < kWgmmaIters; ++it) {
    intfa::ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      intfa::ptx::wgmma_m64n128k32_s8s8_ss(d0, intfa::ptx::wgmma_desc(a + 32 * kk, 128),
                                           intfa::ptx::wgmma_desc(b + 32 * kk, 128));
      intfa::ptx::wgmma_m64n128k32_s8s8_ss(d1, intfa::ptx::wgmma_desc(a + 32 * kk, 128),
                                           intfa::ptx::wgmma_desc(b + 128 * 128 + 32 * kk, 128));
    }
    intfa::ptx::wgmma_commit();
    intfa::ptx::wgmma_wait<1>();
  }
  intfa::ptx::wgmma_wait<0>();
  int acc = 0;
  for (int i = 0; i < 64; ++i) acc += d0[i] ^ d1[i];
  if (acc == 0x12345) sink[threadIdx.x] = acc;  // keeps the loop alive
}

// The attention kernel's own forms: m64n128k32, 4 k steps per group. RS = u8 A fragments from
// registers (the PV product), SS = both operands from shared memory (QK^T). `kWait` 0 keeps two
// groups in flight (throughput), 1 waits for each group (latency of one 64x128x128 product).
template <bool kRs, int kWait>
__global__ void __launch_bounds__(256, 1) wgmma_form_kernel(int* sink, long long* cycles) {
  __shared__ __align__(1024) uint8_t smem[64 * 128 + 128 * 128];
  const uint32_t a = intfa::ptx::smem_u32(smem), b = a + 64 * 128;
  int d[64];
  uint32_t af[4] = {threadIdx.x, threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u};
  for (int i = 0; i < 64; ++i) d[i] = 0;
  const long long t0 = clock64();
  for (int it = 0; it < kWgmmaIters; ++it) {
    intfa::ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kRs) intfa::ptx::wgmma_m64n128k32_u8s8_rs(d, af, intfa::ptx::wgmma_desc(b + 32 * kk, 128));
      else intfa::ptx::wgmma_m64n128k32_s8s8_ss(d, intfa::ptx::wgmma_desc(a + 32 * kk, 128),
                                                intfa::ptx::wgmma_desc(b + 32 * kk, 128));
    }
    intfa::ptx::wgmma_commit();
    if (kWait) intfa::ptx::wgmma_wait<0>();
    else intfa::ptx::wgmma_wait<1>();
  }
  intfa::ptx::wgmma_wait<0>();
  const long long t1 = clock64();
  if (threadIdx.x == 0 && blockIdx.x == 0) cycles[kRs * 2 + kWait] = (t1 - t0) / kWgmmaIters;
  int acc = 0;
  for (int i = 0; i < 64; ++i) acc += d[i];
  if (acc == 0x12345) sink[threadIdx.x] = acc;
}

constexpr int kMmaIters = 8192;
__global__ void __launch_bounds__(256) mma_sync_peak_kernel(int* sink, uint32_t seed) {
  uint32_t a[4] = {seed, seed * 3, seed * 5, seed * 7}, b[2] = {seed * 11, seed * 13};
  int d[8][4] = {};
  for (int it = 0; it < kMmaIters; ++it)
#pragma unroll
    for (int j = 0; j < 8; ++j) intfa::ptx::mma_m16n8k32_s8s8(d[j], a, b);
  int acc = 0;
  for (int j = 0; j < 8; ++j) acc += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (acc == 0x12345) sink[threadIdx.x] = acc;
}

constexpr int kEx2Iters = 4096;
__global__ void __launch_bounds__(256) ex2_rate_kernel(float* sink, float seed) {
  float x[8];
  for (int i = 0; i < 8; ++i) x[i] = seed * (i + 1) * 1e-3f;
  for (int it = 0; it < kEx2Iters; ++it)
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = intfa::ptx::ex2_approx(x[i]) - 1.0f;
  float acc = 0.f;
  for (int i = 0; i < 8; ++i) acc += x[i];
  if (acc == 1234.5f) sink[threadIdx.x] = acc;
}

template <typename F>
float time_ms(F&& launch, int reps) {
  cudaEvent_t s, e;
  CHECK(cudaEventCreate(&s));
  CHECK(cudaEventCreate(&e));
  launch();  // warm-up
  CHECK(cudaEventRecord(s));
  for (int i = 0; i < reps; ++i) launch();
  CHECK(cudaEventRecord(e));
  CHECK(cudaEventSynchronize(e));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, s, e));
  cudaEventDestroy(s);
  cudaEventDestroy(e);
  return ms / reps;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else {
      std::fprintf(stderr, "usage: intfa_sol [--json FILE]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9 || prop.minor != 0) {
    std::fprintf(stderr, "intfa_sol: needs compute capability 9.0 (sm_90a), %s has %d.%d\n", prop.name,
                 prop.major, prop.minor);
    return 1;
  }
  const int sms = prop.multiProcessorCount;
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  int* sink = nullptr;
  CHECK(cudaMalloc(&sink, 1 << 20));

  const double wg_ms = time_ms([&] { wgmma_peak_kernel<<<sms, 256>>>(sink); }, 5);
  CHECK(cudaGetLastError());
  const double wg_ops = double(sms) * 2 /*warpgroups*/ * kWgmmaIters * 4 * 2 * (2.0 * 64 * 128 * 32);
  const double wgmma_tops = wg_ops / (wg_ms * 1e-3) / 1e12;

  // The kernel's forms: throughput with 2 warpgroups per SM, latency with 1.
  long long* cyc = nullptr;
  CHECK(cudaMalloc(&cyc, 4 * sizeof(long long)));
  const double form_ops = double(sms) * 2 * kWgmmaIters * 4 * (2.0 * 64 * 128 * 32);
  const double ss_tops = form_ops / (time_ms([&] { wgmma_form_kernel<false, 0><<<sms, 256>>>(sink, cyc); }, 5) * 1e-3) / 1e12;
  const double rs_tops = form_ops / (time_ms([&] { wgmma_form_kernel<true, 0><<<sms, 256>>>(sink, cyc); }, 5) * 1e-3) / 1e12;
  wgmma_form_kernel<false, 1><<<sms, 128>>>(sink, cyc);
  wgmma_form_kernel<true, 1><<<sms, 128>>>(sink, cyc);
  CHECK(cudaDeviceSynchronize());
  long long cyc_h[4];
  CHECK(cudaMemcpy(cyc_h, cyc, sizeof(cyc_h), cudaMemcpyDeviceToHost));
  cudaFree(cyc);

  const int mma_blocks = sms * 8;
  const double mma_ms = time_ms([&] { mma_sync_peak_kernel<<<mma_blocks, 256>>>(sink, 7); }, 5);
  CHECK(cudaGetLastError());
  const double mma_ops = double(mma_blocks) * 8 /*warps*/ * kMmaIters * 8 * (2.0 * 16 * 8 * 32);
  const double mma_tops = mma_ops / (mma_ms * 1e-3) / 1e12;

  const int ex_blocks = sms * 8;
  const double ex_ms = time_ms([&] { ex2_rate_kernel<<<ex_blocks, 256>>>(reinterpret_cast<float*>(sink), 0.5f); }, 5);
  CHECK(cudaGetLastError());
  const double ex2_per_s = double(ex_blocks) * 256 * kEx2Iters * 8 / (ex_ms * 1e-3);

  const size_t bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  CHECK(cudaMemset(src, 1, bytes));
  const double cp_ms = time_ms([&] { CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * bytes / (cp_ms * 1e-3) / 1e9;

  std::printf("speed of light on %s (%d SMs)\n", prop.name, sms);
  std::printf("  int8 wgmma (m64n256k32 s8.s8, smem operands)   %8.1f TOP/s\n", wgmma_tops);
  std::printf("  int8 mma.sync (m16n8k32, register operands)    %8.1f TOP/s\n", mma_tops);
  std::printf("  wgmma m64n128k32 x4, 2 WGs/SM: SS s8 %.1f TOP/s, RS u8 %.1f TOP/s\n", ss_tops, rs_tops);
  std::printf("  one 64x128x128 product issued and waited (1 WG/SM): SS %lld cycles, RS %lld cycles\n", cyc_h[1],
              cyc_h[3]);
  std::printf("  MUFU ex2.approx.f32                            %8.1f G/s (%.1f per SM per clock at %d MHz)\n",
              ex2_per_s / 1e9, ex2_per_s / sms / (clock_khz * 1e3), clock_khz / 1000);
  std::printf("  device-to-device copy (read + write)           %8.1f GB/s\n", copy_gbs);
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "--json: cannot write %s\n", json.c_str());
      return 1;
    }
    std::fprintf(f,
                 "{\"card\": \"%s\", \"sms\": %d, \"int8_wgmma_tops\": %.1f, \"int8_mma_sync_tops\": %.1f, "
                 "\"ex2_per_s\": %.4g, \"copy_gbs\": %.1f, \"wgmma_ss_n128_tops\": %.1f, \"wgmma_rs_n128_tops\": %.1f, "
                 "\"wgmma_ss_group_cycles\": %lld, \"wgmma_rs_group_cycles\": %lld}\n",
                 prop.name, sms, wgmma_tops, mma_tops, ex2_per_s, copy_gbs, ss_tops, rs_tops, cyc_h[1], cyc_h[3]);
    std::fclose(f);
  }
  cudaFree(src);
  cudaFree(dst);
  cudaFree(sink);
  return 0;
}
