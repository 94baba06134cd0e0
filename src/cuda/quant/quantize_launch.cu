// launch_quantize: checks, stream-ordered scratch, the prep kernel (zeroes the accumulators,
// sanitizes cu_seqlens) and the per-head-dim main kernel (quantize_kernel.cuh).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/launchers.h"
#include "cuda/quant/quantize_internal.h"

namespace intfa::quant {
namespace {

constexpr int kPrepThreads = 256;

// cu'[0] = 0, cu'[i] = max(cu'[i-1], cu[i]): monotonic whatever the input (on a capturing
// stream cu_seqlens are not checked on the host), so the token counts that the main kernel
// waits for always add up and it cannot hang. Also stores the longest sequence.
__device__ void sanitize_cu(const int32_t* in, int32_t* out, int batch, int* max_len) {
  __shared__ int s_warp[kPrepThreads / 32];
  __shared__ int s_carry;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int carry = 0;
  for (int base = 0; base <= batch; base += kPrepThreads) {
    const int i = base + threadIdx.x;
    int v = (i == 0 || i > batch) ? 0 : max(in[i], 0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v = max(v, n);
    }
    if (lane == 31) s_warp[w] = v;
    __syncthreads();
    for (int k = 0; k < w; ++k) v = max(v, s_warp[k]);
    v = max(v, carry);
    if (i <= batch) out[i] = v;
    if (threadIdx.x == kPrepThreads - 1) s_carry = v;
    __syncthreads();
    carry = s_carry;
    __syncthreads();
  }
  if (!max_len) return;
  int longest = 0;
  for (int b = threadIdx.x; b < batch; b += kPrepThreads) longest = max(longest, out[b + 1] - out[b]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, o));
  if (lane == 0) s_warp[w] = longest;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < kPrepThreads / 32; ++k) longest = max(longest, s_warp[k]);
    *max_len = longest;
  }
}

__global__ void __launch_bounds__(kPrepThreads)
    quant_prep_kernel(QuantScratch s, const int32_t* cu_q, const int32_t* cu_kv, int batch) {
  uint4* z = reinterpret_cast<uint4*>(s.ksum);  // the zeroed prefix starts at ksum
  const size_t n = s.zero_bytes / sizeof(uint4);
  for (size_t i = blockIdx.x * size_t(kPrepThreads) + threadIdx.x; i < n; i += size_t(gridDim.x) * kPrepThreads)
    z[i] = make_uint4(0u, 0u, 0u, 0u);
  if (blockIdx.x == 0 && cu_q) sanitize_cu(cu_q, s.cu_q, batch, nullptr);
  if (blockIdx.x == 0 && cu_kv) {
    __syncthreads();  // sanitize_cu reuses its shared memory
    sanitize_cu(cu_kv, s.cu_kv, batch, s.max_len_kv);
  }
}

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Scratch layout: [ksum | vmax | done | ready | tickets] (zeroed), [kmean | vinv | max_len | cu_q | cu_kv].
size_t scratch_layout(const QuantParams& p, char* base, QuantScratch* s) {
  const size_t bh = static_cast<size_t>(p.batch) * p.heads_kv;
  const size_t table = bh * p.head_dim;
  const bool smooth = p.scheme != Scheme::paper, has_v = p.scheme != Scheme::half;
  size_t off = 0;
  auto take = [&](size_t bytes, size_t align) {
    off = align_up(off, align);
    char* ptr = base ? base + off : nullptr;
    off += bytes;
    return ptr;
  };
  // ksum is first even when empty (paper): the prep kernel zeroes from s->ksum on.
  s->ksum = reinterpret_cast<double*>(take(smooth ? table * 8 : 0, 16));
  s->vmax = reinterpret_cast<unsigned*>(take(has_v ? table * 4 : 0, 16));
  s->done = reinterpret_cast<unsigned*>(take(2 * bh * 4, 16));
  s->ready = reinterpret_cast<unsigned*>(take(2 * bh * 4, 16));
  s->tickets = reinterpret_cast<unsigned long long*>(take(3 * 8, 16));
  off = align_up(off, 16);
  s->zero_bytes = off;
  s->kmean = reinterpret_cast<float*>(take(smooth ? table * 4 : 0, 16));
  s->vinv = reinterpret_cast<float*>(take(has_v ? table * 4 : 0, 16));
  s->max_len_kv = reinterpret_cast<int*>(take(4, 16));
  const size_t cu_bytes = (static_cast<size_t>(p.batch) + 1) * 4;
  s->cu_q = p.cu_q ? reinterpret_cast<int32_t*>(take(cu_bytes, 16)) : nullptr;
  s->cu_kv = p.cu_kv ? reinterpret_cast<int32_t*>(take(cu_bytes, 16)) : nullptr;
  return align_up(off, 256);
}

Status invalid(const std::string& msg) { return Status(StatusCode::invalid_argument, "quantize: " + msg); }

bool aligned(const void* ptr, int64_t bytes_multiple) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes_multiple == 0;
}
bool strides_multiple(const Strides3& st, int64_t elems) {
  return st.bs % elems == 0 && st.hs % elems == 0 && st.ts % elems == 0;
}

// What the kernels' vector accesses need (the API already guarantees it for its own calls).
Status check(const QuantParams& p) {
  if (p.in_dtype != DType::f16 && p.in_dtype != DType::bf16)
    return Status(StatusCode::unsupported_type, std::string("quantize: expected fp16 or bf16 input, got ") +
                                                    to_string(p.in_dtype));
  if (p.batch < 1 || p.heads_q < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0 ||
      p.seqlen_q < 0 || p.seqlen_kv < 0)
    return invalid("bad sizes (batch, heads_q a multiple of heads_kv, sequence lengths)");
  // q8 and q_scale both null: Q is left out (cuda::attention, when the sm90 kernel quantizes it).
  const bool has_q = p.q8 != nullptr;
  if (!p.k || !p.k8 || !p.k_scale || (has_q && (!p.q || !p.q_scale)) || (!has_q && (p.q_scale || p.lse_offset)))
    return invalid("k, k8 and k_scale must be given, and q, q8 and q_scale unless q8, q_scale and lse_offset are null");
  const bool has_v = p.scheme != Scheme::half;
  if (has_v && (!p.v || !p.vt8 || !p.v_scale)) return invalid("v, vt8 and v_scale must be given");
  if ((has_q && !aligned(p.q, 16)) || !aligned(p.k, 16) || (has_v && !aligned(p.v, 16)) ||
      (has_q && !strides_multiple(p.q_st, 8)) || !strides_multiple(p.k_st, 8) ||
      (has_v && !strides_multiple(p.v_st, 8)))
    return invalid("q, k, v need 16-byte aligned rows (pointer and strides)");
  if ((has_q && (!aligned(p.q8, 8) || !strides_multiple(p.q8_st, 8))) || !aligned(p.k8, 8) ||
      !strides_multiple(p.k8_st, 8))
    return invalid("q8 and k8 need 8-byte aligned rows (pointer and strides)");
  if (has_v && (!aligned(p.vt8, 16) || !strides_multiple(p.vt_st, 16)))
    return invalid("vt8 needs a 16-byte aligned pointer and strides that are multiples of 16");
  return Status::OK();
}

}  // namespace
}  // namespace intfa::quant

namespace intfa::cuda {

Status launch_quantize(const QuantParams& p, cudaStream_t stream) {
  using namespace intfa::quant;
  Status st = check(p);
  if (!st.ok()) return st;

  QuantScratch s;
  const size_t bytes = scratch_layout(p, nullptr, &s);
  void* base = nullptr;
  // Stream-ordered (and graph-capturable): a few bytes per (sequence, kv head, channel).
  st = scratch_alloc(&base, bytes, stream, "quantize: scratch");
  if (!st.ok()) return st;
  scratch_layout(p, static_cast<char*>(base), &s);

  // One launch in the fused order by default: the quantization of a chunk follows its statistics
  // while the rows are still in L2, so K and V come from DRAM about once instead of twice (H100,
  // B=4 H=32 N=4096 D=128 bf16, accurate: 0.296 ms fused vs 0.355 ms as two launches).
  // INTFA_QUANT_ORDER=split selects the two launches (stats, then quantization) for comparisons.
  const char* env = std::getenv("INTFA_QUANT_ORDER");
  const Order order = env && std::strcmp(env, "split") == 0 ? Order::split : Order::fused;
  // How far dep items trail their statistics, in percent of a grid (INTFA_QUANT_SLACK overrides).
  // Measured at B=4 H=32 N=4k D=128 accurate (session 8): H100 150 / 200: 0.278 / 0.294 ms,
  // H200 150 / 200 / 250: 0.240 / 0.234 / 0.237 ms. The faster DRAM finishes the statistics
  // sooner and affords the longer lag before the rows leave L2, so cards with >= 4 TB/s peak
  // DRAM bandwidth get 200, the others (and a device that cannot report its memory clock or
  // bus width) 150.
  static PerDevice slack_cache;
  int slack = 150;
  const cudaError_t slack_err = once_per_device(slack_cache, [](int dev, int* out) {
    int khz = 0, bits = 0;
    const bool known = cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, dev) == cudaSuccess &&
                       cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, dev) == cudaSuccess;
    if (!known) cudaGetLastError();  // a failed query leaves no error behind
    *out = known && 2.0 * khz * 1e3 * bits / 8.0 >= 4e12 ? 200 : 150;  // double data rate, bytes/s
    return cudaSuccess;
  }, &slack);
  s.slack_pct = slack_err == cudaSuccess ? slack : 150;
  if (const char* sl = std::getenv("INTFA_QUANT_SLACK")) s.slack_pct = std::max(0, std::atoi(sl));

  const size_t zero_vecs = s.zero_bytes / 16;
  const int prep_grid = static_cast<int>(std::min<size_t>(64, std::max<size_t>(1, (zero_vecs + kPrepThreads - 1) / kPrepThreads)));
  quant_prep_kernel<<<prep_grid, kPrepThreads, 0, stream>>>(s, p.cu_q, p.cu_kv, p.batch);
  st = check_cuda(cudaGetLastError(), "quantize prep kernel");
  if (st.ok()) {
    switch (p.head_dim) {
      case 64: st = launch_main<64>(p, s, order, stream); break;
      case 128: st = launch_main<128>(p, s, order, stream); break;
      case 256: st = launch_main<256>(p, s, order, stream); break;
      default:
        st = Status(StatusCode::not_available, "quantize: head_dim " + std::to_string(p.head_dim) +
                                                   " has no GPU kernel (64, 128, 256)");
    }
  }
  const Status fst = scratch_free(base, stream, "quantize: scratch");
  return st.ok() ? fst : st;
}

}  // namespace intfa::cuda
