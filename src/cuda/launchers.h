// Kernel-family launchers the CUDA backend dispatches to. Host-side; the kernels behind them
// never see the API layer.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "common/params.h"

namespace intfa::cuda {

// One-time launch setup per device (function attributes, occupancy, SM count). Function
// attributes belong to the device's context, so "once per process" is wrong with several GPUs,
// and redoing the queries on every call puts host time in front of each kernel.
constexpr int kMaxCachedDevices = 64;
struct PerDevice {
  std::atomic<int> value[kMaxCachedDevices] = {};  // 0: not yet, else the result + 1
};
// *out = init(dev) for device `dev`, computed once per device and cache; init is
// `cudaError_t(int device, int* result)` with result >= 0. Errors are not cached.
template <typename Init>
cudaError_t once_for_device(PerDevice& cache, int dev, Init&& init, int* out) {
  const bool cached = dev >= 0 && dev < kMaxCachedDevices;
  if (cached) {
    const int v = cache.value[dev].load(std::memory_order_acquire);
    if (v > 0) {
      *out = v - 1;
      return cudaSuccess;
    }
  }
  int r = 0;
  const cudaError_t err = init(dev, &r);
  if (err != cudaSuccess) return err;
  if (cached) cache.value[dev].store(r + 1, std::memory_order_release);
  *out = r;
  return cudaSuccess;
}
// The same for the current device.
template <typename Init>
cudaError_t once_per_device(PerDevice& cache, Init&& init, int* out) {
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  return once_for_device(cache, dev, static_cast<Init&&>(init), out);
}

// Streaming multiprocessors of the current device (cached).
cudaError_t device_sm_count(int* sms);

// Launches `kernel` (grid x block threads, `smem` bytes of dynamic shared memory) after the
// stream's previous kernel as its programmatic dependent where the card has them (sm_90 on): its
// CTAs may start once every CTA of that kernel has run ptx::griddepcontrol_launch_dependents()
// (or exited), which hides the launch latency and the CTAs' set-up behind the end of that
// kernel. So `kernel` must call ptx::griddepcontrol_wait() before it touches global memory the
// previous kernel may read or write. That wait exists only in code compiled for sm_90 or later
// (ptx_sm80.cuh): a kernel the driver compiled from older PTX (a build with compute_80 PTX run
// on a Hopper card) has none, so the launch is programmatic only where the loaded kernel's PTX
// target is 9.0 or later; `cache` (one per launch site, so per kernel) holds that answer per
// device. Elsewhere, or with INTFA_PDL=0 in the environment (same-build A/B timing), a plain
// launch.
bool pdl_enabled();
void count_programmatic_launch();  // for debug_programmatic_launches (backend.h)
template <typename... Args>
cudaError_t launch_dependent(PerDevice& cache, void (*kernel)(Args...), dim3 grid, unsigned block, size_t smem,
                             cudaStream_t stream, const Args&... args) {
  int dependent = 0;
  if (pdl_enabled()) {
    const cudaError_t e = once_per_device(cache, [&](int dev, int* ok) {
      int major = 0;
      cudaFuncAttributes fa = {};
      cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
      if (err == cudaSuccess) err = cudaFuncGetAttributes(&fa, kernel);
      *ok = major >= 9 && fa.ptxVersion >= 90;
      return err;
    }, &dependent);
    if (e != cudaSuccess) return e;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = dependent ? 1 : 0;
  if (dependent) count_programmatic_launch();
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Opts `kernel` in to `bytes` of dynamic shared memory (needed above 48 KB), once per device.
template <typename Kernel>
cudaError_t opt_in_smem_once(PerDevice& cache, Kernel kernel, int bytes) {
  int unused = 0;
  return once_per_device(cache, [&](int, int*) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  }, &unused);
}

// Stream-ordered scratch for one launch (graph-capturable) from the backend's own pool per
// device, which keeps its memory across synchronizations (the default pool's release threshold
// 0 unmaps it at each one: ~40 us per call at N=1k on an H200) and leaves the application's
// default-pool settings alone. `what` names the caller in errors.
Status scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream, const char* what);
Status scratch_free(void* ptr, cudaStream_t stream, const char* what);

// src/cuda/quant: fp16/bf16 -> int8 tensors and scales (bit-identical to ref::quantize).
Status launch_quantize(const QuantParams& p, cudaStream_t stream);
// ... rows quantized with given statistics (quantize_q, append_kv; bit-identical to ref::quantize_cache).
Status launch_quantize_cache(const CacheQuantParams& p, cudaStream_t stream);

// src/cuda/sm80: mma.sync INT8 flash attention (runs on sm_80 and newer).
Status launch_fwd_sm80(const FwdParams& p, cudaStream_t stream);
int sm80_block_n(int head_dim);  // keys per block of the sm80 kernel at head_dim (0: not built)

// src/cuda/decode: at most 16 query rows per (batch, head) after GQA packing, one CTA of four
// warps per (batch, head, key range); mma.sync, so sm_80 and newer. decode_takes: the shapes it
// runs, a cheap test for the automatic path (the launcher says why for the others).
bool decode_takes(const FwdParams& p);
// Keys per block of the decode kernel (128; 0 in builds whose sm80 blocks differ, which it
// refuses).
int decode_block_n();
Status launch_fwd_decode(const FwdParams& p, cudaStream_t stream);

// src/cuda/sm90: wgmma / TMA / warp-specialized INT8 flash attention (sm_90a only). Returns
// not_available for operands TMA cannot describe (16-byte aligned bases and strides).
// automatic (path auto): also refuses the head-dim-256 calls the sm80 kernel runs faster
// (soft-capping, calls the split rule cuts into key ranges; docs/PERF_LOG.md s44, s45).
Status launch_fwd_sm90(const FwdParams& p, cudaStream_t stream, bool automatic = false);
// OK when launch_fwd_sm90(p) would launch p (after GQA packing), else what it would refuse.
Status check_fwd_sm90(const FwdParams& p);
// Test hook: the same 128x128 int32 score block through the sm90 smem layout and wgmma.
Status launch_qk_block_test_sm90(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream);

// Test hook: one 128x128 int32 score block through the sm80 QK^T fragment code.
Status launch_qk_block_test_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream);

// Turns the last CUDA error into a Status naming `what`.
Status check_cuda(cudaError_t err, const char* what);

// A paged call (FwdParams::block_table) as the kernels of `path` take it: pages of a multiple of
// their key block `block_n` (one table entry per block) or of 16, 32 or 64 tokens (every path's
// SmallPages kernels), which *small then reports; else not_available. OK for a contiguous call
// (*small false). (Paged calls have dense queries: attention_int8's validation refuses
// cu_seqlens.)
Status check_paged(const FwdParams& p, const char* path, int block_n, bool* small);
// The GPU kernels' head dims (64, 128, 256); any other is invalid_argument.
Status check_head_dim(const FwdParams& p, const char* path);

}  // namespace intfa::cuda
