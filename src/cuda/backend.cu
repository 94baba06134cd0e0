// CUDA backend entry: device queries, path resolution, scratch memory, and dispatch to the
// kernel families (quantization, sm80). The API layer reaches it only through backend.h.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "cuda/fwd_common.cuh"
#include "cuda/launchers.h"
#include "cuda/tile_order.h"

namespace intfa::cuda {

Status check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  std::string msg = std::string(what) + ": CUDA error " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  // A card this build has no code for (e.g. compute capability 10.x or 12.x with an arch list
  // such as "80-real;90-real" that ships no PTX to compile): say what the build has and how to
  // add it.
  // (The runtime reports it at the first launch or function-attribute call, as one of the two.)
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess) {
      std::string archs = INTFA_SM80_ARCHS;  // space-joined CMake list
      std::replace(archs.begin(), archs.end(), ' ', ';');
      msg += "; this build has " + std::string(compiled_archs()) + ", none for compute capability " +
             std::to_string(major) + "." + std::to_string(minor) + ": rebuild with -DINTFA_SM80_ARCHS=\"" + archs +
             ";" + std::to_string(major * 10 + minor) + "-real\"";
    }
  }
  return Status(StatusCode::device_error, msg);
}

Status check_paged(const FwdParams& p, const char* path, int block_n, bool* small) {
  const bool is_small = p.block_table && (p.page_size == 16 || p.page_size == 32 || p.page_size == 64);
  *small = is_small;
  if (!p.block_table || p.page_size % block_n == 0 || is_small) return Status::OK();
  return Status(StatusCode::not_available, std::string("block_table: the GPU ") + path +
                                               " path takes pages of a multiple of " + std::to_string(block_n) +
                                               " tokens or of 16, 32 or 64 tokens, got page_size " +
                                               std::to_string(p.page_size) + " (the CPU backend takes multiples of 16)");
}

Status check_head_dim(const FwdParams& p, const char* path) {
  if (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) return Status::OK();
  return Status(StatusCode::invalid_argument, std::string("head_dim: expected 64, 128 or 256 on the ") + path +
                                                  " path, got " + std::to_string(p.head_dim));
}

cudaError_t device_sm_count(int* sms) {
  static PerDevice cache;
  return once_per_device(cache, [](int dev, int* n) {
    return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, dev);
  }, sms);
}

namespace {
std::atomic<long long> g_programmatic_launches{0};
}
void count_programmatic_launch() { g_programmatic_launches.fetch_add(1, std::memory_order_relaxed); }
Status debug_programmatic_launches(long long* count) {
  *count = g_programmatic_launches.load(std::memory_order_relaxed);
  return Status::OK();
}

Status debug_check_cuda(int err, const char* what) { return check_cuda(static_cast<cudaError_t>(err), what); }

namespace {
// A feature switch read from the environment: on unless the variable is "0".
bool env_not_zero(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}
}  // namespace

bool pdl_enabled() {
  static const bool on = env_not_zero("INTFA_PDL");
  return on;
}

bool built() { return true; }
// The sm90 and decode kernels take 128-key blocks, the sm80 kernel's at head dims 64 and 128
// (decode::kSameBlocksAsSm80; the sm90 launcher's check_paged), so one value per head dim;
// at head dim 256 the sm80 kernel takes 64, the sm90 and decode kernels 128.

#ifndef INTFA_HAVE_SM90
#define INTFA_HAVE_SM90 0
#endif
int kernel_block_n(int head_dim, GpuPath path) {
  if (head_dim == 256 && path == GpuPath::sm90) return INTFA_HAVE_SM90 ? 128 : 0;
  if (head_dim == 256 && path == GpuPath::decode) return decode_block_n();
  return sm80_block_n(head_dim);
}
constexpr bool kHaveSm90 = INTFA_HAVE_SM90 != 0;

const char* compiled_archs() {
  // CMake's arch list for the portable kernels, e.g. "80-real 90-real 90-virtual".
  return kHaveSm90 ? "sm80 kernels for " INTFA_SM80_ARCHS "; sm90 kernel for 90a"
                   : "sm80 kernels for " INTFA_SM80_ARCHS;
}

DeviceInfo device_info(int device_index) {
  DeviceInfo info;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    info.error = err != cudaSuccess ? std::string("no CUDA device: ") + cudaGetErrorString(err)
                                    : "no CUDA device";
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return info;
  }
  if (device_index < 0 || device_index >= count) {
    info.error = "device index " + std::to_string(device_index) + " out of range (have " +
                 std::to_string(count) + ")";
    return info;
  }
  cudaDeviceProp prop;
  err = cudaGetDeviceProperties(&prop, device_index);
  if (err != cudaSuccess) {
    info.error = cudaGetErrorString(err);
    return info;
  }
  info.present = true;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.sm_count = prop.multiProcessorCount;
  info.memory_bytes = prop.totalGlobalMem;
  return info;
}

// The path a device of compute capability cc runs; name() (slow) only for error messages.
template <typename Name>
Status pick_path(GpuPath requested, int cc, Name&& name, GpuPath* resolved) {
  const std::string version = std::to_string(cc / 10) + "." + std::to_string(cc % 10);
  if (cc < 80)
    return Status(StatusCode::not_available,
                  "GPU backend: needs compute capability 8.0 or newer (integer mma.sync m16n8k32), "
                  "device " + name() + " has " + version);
  // sm_90a code runs on compute capability 9.0 only (H100, H200, GH200).
  const bool hopper = cc == 90;
  switch (requested) {
    case GpuPath::automatic:
      *resolved = hopper && kHaveSm90 ? GpuPath::sm90 : GpuPath::sm80;
      return Status::OK();
    case GpuPath::sm80:
    case GpuPath::decode:
      *resolved = requested;
      return Status::OK();
    case GpuPath::sm90:
      if (!kHaveSm90)
        return Status(StatusCode::not_available,
                      "path: sm90 (Hopper wgmma kernel) is not available in this build "
                      "(configured with -DINTFA_SM90=OFF); use path sm80 or auto");
      if (!hopper)
        return Status(StatusCode::not_available, "path: sm90 needs compute capability 9.0 (sm_90a), device " +
                                                     name() + " has " + version + "; use path sm80 or auto");
      *resolved = GpuPath::sm90;
      return Status::OK();
  }
  return Status(StatusCode::invalid_argument, "path: unknown value");
}

Status resolve_path(GpuPath requested, int device_index, GpuPath* resolved) {
  // Runs before every GPU call, so the compute capability comes from two attribute queries made
  // once per device; device_info (cudaGetDeviceProperties, tens of microseconds) only serves
  // error messages.
  static PerDevice cc_cache;
  int count = 0, cc = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && device_index >= 0 && device_index < count &&
                  once_for_device(cc_cache, device_index, [](int dev, int* out) {
                    int major = 0, minor = 0;
                    cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
                    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
                    *out = major * 10 + minor;
                    return e;
                  }, &cc) == cudaSuccess;
  if (!ok) {
    cudaGetLastError();  // device_info reports what went wrong
    const DeviceInfo info = device_info(device_index);
    return Status(StatusCode::not_available,
                  "GPU backend: " + (info.present ? std::string("compute capability query failed") : info.error));
  }
  return pick_path(requested, cc, [&] { return device_info(device_index).name; }, resolved);
}

Status quantize(const QuantParams& p, void* stream) {
  return launch_quantize(p, static_cast<cudaStream_t>(stream));
}

Status quantize_cache(const CacheQuantParams& p, void* stream) {
  return launch_quantize_cache(p, static_cast<cudaStream_t>(stream));
}

namespace {

// attention_int8 on parameters whose GQA rows are packed (fwd::pack_gqa_rows) and `decode`,
// whether the decode kernel takes them on path auto (decode_takes). *ran: the kernel family
// that took the call.
Status attend_packed(const FwdParams& p, GpuPath path, bool fallback, bool decode, cudaStream_t s, GpuPath* ran) {
  auto done = [&](const Status& st, GpuPath took) {
    if (ran && st.ok()) *ran = took;
    return st;
  };
  // At most 16 rows per (batch, head) left: the decode kernel, unless a path was named. Every
  // path reads paged caches (FwdParams::block_table) too.
  if (path == GpuPath::decode || (fallback && decode)) {
    Status st = launch_fwd_decode(p, s);
    if (st.code() != StatusCode::not_available || !fallback) return done(st, GpuPath::decode);
  }
  if (path == GpuPath::sm90) {
#if INTFA_HAVE_SM90
    // Operands TMA cannot describe, and on path auto the head-dim-256 calls sm80 runs faster:
    // the automatic path takes them to the portable kernel (not a call whose Q only the sm90
    // kernel quantizes; cuda::attention checked it launches).
    Status st = launch_fwd_sm90(p, s, fallback);
    if (st.code() != StatusCode::not_available || !fallback || p.q_in) return done(st, GpuPath::sm90);
#else
    if (!fallback) return Status(StatusCode::not_available, "path: sm90 is not available in this build");
#endif
  }
  return done(launch_fwd_sm80(p, s), GpuPath::sm80);
}

std::atomic<long long> g_fused_q_calls{0};

}  // namespace

Status attention_int8(const FwdParams& params, GpuPath path, bool fallback, void* stream, GpuPath* ran) {
  FwdParams p = params;
  fwd::pack_gqa_rows(p);  // GQA heads as rows where the rows see the same keys (tile_order.h)
  return attend_packed(p, path, fallback, fallback && decode_takes(p), static_cast<cudaStream_t>(stream), ran);
}

Status attention(const QuantParams& qp, const FwdParams& fp, GpuPath path, bool fallback, void* stream,
                 GpuPath* ran) {
  QuantParams q = qp;
  FwdParams f = fp;
  // The sm90 kernel quantizes Q itself when it runs the call (attention_int8's choice: not the
  // decode kernel) and Q rows need no lse_offset (which the quantizer computes from Q and the K
  // means; run_fp_attention keeps it for the LSE, sinks and soft-capping, whose score_offset it
  // becomes): a third of the quantizer's traffic (Q read, Q8 written) goes, and the kernel reads
  // Q at 2 bytes per element instead of 1 (H200, PERF_LOG q22: e2e 0-2% faster).
  // INTFA_SM90_FUSED_Q=0 turns it off (same-run comparisons in the bench).
  // GQA rows are packed here once, as attention_int8 packs them (with q_in when fused: its strides
  // must pack too); the quantizer keeps qp's unpacked strides.
  static const bool enabled = env_not_zero("INTFA_SM90_FUSED_Q");
  bool fuse = false;
#if INTFA_HAVE_SM90
  if (f.q_in && path == GpuPath::sm90 && !q.lse_offset && enabled) {
    FwdParams packed = f;
    fwd::pack_gqa_rows(packed);
    fuse = !(fallback && decode_takes(packed)) && check_fwd_sm90(packed).ok();
    if (fuse) f = packed;
  }
#endif
  if (fuse) {
    g_fused_q_calls.fetch_add(1, std::memory_order_relaxed);
    q.q8 = nullptr;
    q.q_scale = nullptr;
    f.q8 = nullptr;
    f.q_scale = nullptr;
  } else {
    f.q_in = nullptr;
    fwd::pack_gqa_rows(f);
  }
  const bool decode = !fuse && fallback && decode_takes(f);  // fused calls are not decode-sized
  Status st = quantize(q, stream);
  if (st.ok()) st = attend_packed(f, path, fallback, decode, static_cast<cudaStream_t>(stream), ran);
  return st;
}

namespace {
// One thread per 16-byte piece of an output row (rows are 16-byte aligned on the GPU); the
// row's first piece also writes its LSE.
__global__ void no_key_rows_kernel(const NoKeyRows r) {
  const int64_t pieces = r.head_dim * r.elem_bytes / 16, rows = r.batch * r.heads * r.tokens;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * pieces;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / pieces, piece = i % pieces, t = row % r.tokens, bh = row / r.tokens;
    const int h = static_cast<int>(bh % r.heads), b = static_cast<int>(bh / r.heads);
    char* o = static_cast<char*>(r.out) + offset(r.o_st, b, h, t) * r.elem_bytes + piece * 16;
    *reinterpret_cast<uint4*>(o) = make_uint4(0u, 0u, 0u, 0u);
    if (piece == 0 && r.lse) r.lse[offset(r.lse_st, b, h, t)] = r.sinks ? r.sinks[h] : fwd::neg_inf();
  }
}
}  // namespace

Status fill_no_key_rows(const NoKeyRows& r, void* stream) {
  const int64_t n = r.batch * r.heads * r.tokens * (r.head_dim * r.elem_bytes / 16);
  if (n == 0) return Status::OK();
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  no_key_rows_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(r);
  return check_cuda(cudaGetLastError(), "no-key rows kernel launch");
}

Status debug_fused_q_calls(long long* count) {
  *count = g_fused_q_calls.load(std::memory_order_relaxed);
  return Status::OK();
}

Status debug_qk_block_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s) {
  Status st = launch_qk_block_test_sm80(head_dim, q8, k8, s, nullptr);
  if (!st.ok()) return st;
  return check_cuda(cudaDeviceSynchronize(), "qk block test kernel");
}

Status debug_qk_block_sm90(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s) {
#if INTFA_HAVE_SM90
  Status st = launch_qk_block_test_sm90(head_dim, q8, k8, s, nullptr);
  if (!st.ok()) return st;
  return check_cuda(cudaDeviceSynchronize(), "sm90 qk block test kernel");
#else
  (void)head_dim; (void)q8; (void)k8; (void)s;
  return Status(StatusCode::not_available, "sm90 path not built");
#endif
}

namespace {
__global__ void exp2_poly_test_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = fwd::exp2_poly(x[i]);
}
}  // namespace

Status debug_exp2_poly(const float* x, float* y, int n) {
  if (n <= 0) return Status();
  exp2_poly_test_kernel<<<(n + 255) / 256, 256>>>(x, y, n);
  Status st = check_cuda(cudaGetLastError(), "exp2_poly test kernel launch");
  if (!st.ok()) return st;
  return check_cuda(cudaDeviceSynchronize(), "exp2_poly test kernel");
}

namespace {
// The backend's pool per device (launchers.h, scratch_alloc); nullptr (use the default pool) if
// the device has no pool support.
cudaMemPool_t scratch_pool() {
  static std::mutex mu;
  static cudaMemPool_t pools[kMaxCachedDevices] = {};
  static bool tried[kMaxCachedDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxCachedDevices) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (!tried[dev]) {
    tried[dev] = true;
    int supported = 0;
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t pool = nullptr;
    if (cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, dev) == cudaSuccess && supported &&
        cudaMemPoolCreate(&pool, &props) == cudaSuccess) {
      uint64_t keep = ~uint64_t(0);
      if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) == cudaSuccess) pools[dev] = pool;
      else cudaMemPoolDestroy(pool);
    }
    cudaGetLastError();  // a device without pools falls back; leave no sticky error behind
  }
  return pools[dev];
}
}  // namespace

Status scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream, const char* what) {
  const cudaMemPool_t pool = scratch_pool();
  const cudaError_t err =
      pool ? cudaMallocFromPoolAsync(ptr, bytes, pool, stream) : cudaMallocAsync(ptr, bytes, stream);
  if (err == cudaSuccess) return Status::OK();
  return check_cuda(err, (std::string(what) + " (stream-ordered allocation)").c_str());
}

Status scratch_free(void* ptr, cudaStream_t stream, const char* what) {
  const cudaError_t err = cudaFreeAsync(ptr, stream);
  if (err == cudaSuccess) return Status::OK();
  return check_cuda(err, (std::string(what) + " (cudaFreeAsync)").c_str());
}

Status malloc_async(void** ptr, size_t bytes, void* stream) {
  return check_cuda(cudaMallocAsync(ptr, bytes, static_cast<cudaStream_t>(stream)),
                    "workspace allocation (cudaMallocAsync)");
}

Status free_async(void* ptr, void* stream) {
  return check_cuda(cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream)), "cudaFreeAsync");
}

Status copy_to_host_sync(void* dst, const void* src, size_t bytes, void* stream,
                         bool* capturing) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  Status st = check_cuda(cudaStreamIsCapturing(s, &cap), "cudaStreamIsCapturing");
  if (!st.ok()) return st;
  *capturing = cap != cudaStreamCaptureStatusNone;
  if (*capturing) return Status::OK();
  st = check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s), "cu_seqlens copy");
  if (!st.ok()) return st;
  return check_cuda(cudaStreamSynchronize(s), "cu_seqlens copy");
}

Status gpu_malloc(void** ptr, size_t bytes, int device_index) {
  Status st = check_cuda(cudaSetDevice(device_index), "cudaSetDevice");
  if (!st.ok()) return st;
  return check_cuda(cudaMalloc(ptr, bytes), "cudaMalloc");
}
Status gpu_free(void* ptr) { return check_cuda(cudaFree(ptr), "cudaFree"); }
Status gpu_copy(void* dst, const void* src, size_t bytes, bool to_device) {
  return check_cuda(cudaMemcpy(dst, src, bytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost),
                    "cudaMemcpy");
}
Status gpu_memset(void* ptr, int byte, size_t bytes) {
  Status st = check_cuda(cudaMemset(ptr, byte, bytes), "cudaMemset");
  if (!st.ok()) return st;
  return check_cuda(cudaDeviceSynchronize(), "cudaMemset");
}
Status gpu_synchronize() { return check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

namespace {
// Owners of the timers' CUDA objects, so every early return releases them.
struct StreamOwner {
  cudaStream_t s = nullptr;
  ~StreamOwner() { if (s) cudaStreamDestroy(s); }
};
struct GraphOwner {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphOwner() {
    if (exec) cudaGraphExecDestroy(exec);
    if (g) cudaGraphDestroy(g);
  }
};
struct EventPair {
  cudaEvent_t start = nullptr, stop = nullptr;
  ~EventPair() {
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
  }
};

// Median over `reps` samples of the time of what enqueue() puts on `s` (between two events),
// each divided by `per` (the calls one sample holds). enqueue() failing stops with its error.
template <typename Enqueue>
Status median_event_ms(cudaStream_t s, int reps, int per, Enqueue&& enqueue, double* median_ms) {
  EventPair ev;
  Status st = check_cuda(cudaEventCreate(&ev.start), "cudaEventCreate");
  if (st.ok()) st = check_cuda(cudaEventCreate(&ev.stop), "cudaEventCreate");
  std::vector<float> times;
  for (int i = 0; st.ok() && i < reps; ++i) {
    cudaEventRecord(ev.start, s);
    st = enqueue();
    if (!st.ok()) break;
    cudaEventRecord(ev.stop, s);
    st = check_cuda(cudaEventSynchronize(ev.stop), "timing");
    float ms = 0.f;
    if (st.ok()) st = check_cuda(cudaEventElapsedTime(&ms, ev.start, ev.stop), "cudaEventElapsedTime");
    times.push_back(ms / static_cast<float>(per));
  }
  if (!st.ok()) return st;
  std::sort(times.begin(), times.end());
  *median_ms = times[times.size() / 2];
  return Status::OK();
}
}  // namespace

Status gpu_time_ms(Status (*run)(void* ctx), void* ctx, int warmup, int reps, void* stream,
                   double* median_ms) {
  for (int i = 0; i < warmup; ++i) {
    Status st = run(ctx);
    if (!st.ok()) return st;
  }
  return median_event_ms(static_cast<cudaStream_t>(stream), reps, 1, [&] { return run(ctx); }, median_ms);
}

Status gpu_graph_time_ms(Status (*run)(void* ctx, void* stream), void* ctx, int calls, int reps,
                         double* median_ms) {
  StreamOwner so;
  GraphOwner go;
  Status st = check_cuda(cudaStreamCreateWithFlags(&so.s, cudaStreamNonBlocking), "graph timing: cudaStreamCreate");
  // One eager call first: one-time set-up (function attributes, the scratch pool) is not
  // something a capture may do, and a failing call is reported as itself, not as a capture error.
  if (st.ok()) st = run(ctx, so.s);
  if (st.ok()) st = check_cuda(cudaStreamSynchronize(so.s), "graph timing: eager call");
  if (!st.ok()) return st;
  st = check_cuda(cudaStreamBeginCapture(so.s, cudaStreamCaptureModeThreadLocal), "graph timing: begin capture");
  if (!st.ok()) return st;
  for (int i = 0; st.ok() && i < calls; ++i) st = run(ctx, so.s);
  // The capture ends whatever happened, or the stream would stay in capture mode.
  const cudaError_t end = cudaStreamEndCapture(so.s, &go.g);
  if (st.ok()) st = check_cuda(end, "graph timing: end capture");
  if (st.ok()) st = check_cuda(cudaGraphInstantiate(&go.exec, go.g, 0), "graph timing: instantiate");
  for (int i = 0; st.ok() && i < 2; ++i)  // warm-up: the first launch uploads the graph
    st = check_cuda(cudaGraphLaunch(go.exec, so.s), "graph timing: launch");
  if (st.ok()) st = check_cuda(cudaStreamSynchronize(so.s), "graph timing: warm-up");
  if (!st.ok()) return st;
  return median_event_ms(so.s, reps, calls, [&] {
    return check_cuda(cudaGraphLaunch(go.exec, so.s), "graph timing: launch");
  }, median_ms);
}

}  // namespace intfa::cuda
