// quantize_q() and append_kv() on the GPU: token rows quantized with statistics given rather than
// measured (an INT8 KV cache whose K mean and V scales were fixed by quantize() on the prompt).
// Bit-identical to ref::quantize_cache (the rule in intfa.h, numerics.h), except lse_offset,
// whose fp64 dot product sums in another order.
//
// A decode step quantizes a few rows: one warp per row (lane c holds channels c, c + 32, ...),
// and for V a block per (batch, kv head) that grows scales where new values would clamp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/numerics.h"
#include "cuda/launchers.h"

namespace intfa::quant {

constexpr int kWarps = 8;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

namespace {

// Whether a place is in the cache: always for a contiguous one; for a paged one, where the table
// entry names a page of the pool (the host cannot check a device table).
__device__ __forceinline__ bool in_pool(const CacheQuantParams& p, CachePlace w) {
  return !p.block_table || (w.sb >= 0 && w.sb < p.num_pages);
}

__device__ __forceinline__ float load_in(const void* base, DType dt, int64_t i) {
  return dt == DType::bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i])
                           : __half2float(static_cast<const __half*>(base)[i]);
}

__global__ void __launch_bounds__(32 * kWarps) cache_rows_kernel(const CacheQuantParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= int64_t(p.batch) * p.heads * p.tokens) return;
  const int t = static_cast<int>(row % p.tokens);
  const int h = static_cast<int>((row / p.tokens) % p.heads);
  const int b = static_cast<int>(row / (int64_t(p.tokens) * p.heads));
  const float* mean = p.mean ? p.mean + b * p.mean_st.bs + (h / (p.heads / p.heads_kv)) * p.mean_st.hs : nullptr;
  const int64_t base = offset(p.x_st, b, h, t);
  float x[kMaxPerLane];
  float amax = 0.f;
  double dot = 0.0;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int c = lane + 32 * i;
    x[i] = 0.f;
    if (c >= p.head_dim) continue;
    const float v = load_in(p.x, p.in_dtype, base + c);
    if (mean) dot = __fma_rn(static_cast<double>(v), static_cast<double>(mean[c]), dot);
    x[i] = p.subtract_mean && mean ? __fsub_rn(v, mean[c]) : v;
    amax = fmaxf(amax, fabsf(x[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    dot += __shfl_xor_sync(0xffffffffu, dot, o);
  }
  const int64_t at = cache_pos(p, cache_pos0(p, b), t);
  if (at < 0) return;
  const CachePlace w = cache_place(p, b, at);
  if (!in_pool(p, w)) return;
  const float inv = quant_inv_scale(amax);
  int8_t* out = p.x8 + offset(p.x8_st, w.sb, h, w.tok);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < p.head_dim) out[c] = quantize_s8(x[i], inv);
  }
  if (lane == 0) {
    const int64_t s = offset(p.s_st, w.sb, h, w.tok);
    p.scale[s] = quant_scale(amax);
    if (p.lse_offset) p.lse_offset[s] = mean ? static_cast<float>(p.softmax_scale * dot) : 0.f;
  }
}

// 16 V^T bytes (one vector) requantized from scale so to sn.
__device__ __forceinline__ int4 requantize16(int4 x, float so, float sn) {
  int8_t* b8 = reinterpret_cast<int8_t*>(&x);
#pragma unroll
  for (int e = 0; e < 16; ++e) b8[e] = requantize_s8(b8[e], so, sn);
  return x;
}

// The contiguous cache's grown V^T rows of one (batch, kv head) starting at `rows`: every column.
__device__ void sweep_rows(const CacheQuantParams& p, int8_t* rows, int64_t pos0, const int* grown, int count,
                           const float* s_old, const float* s_new) {
  const bool vec = (reinterpret_cast<uintptr_t>(rows) | (p.vt_st.ts | p.vt_cols)) % 16 == 0;
  for (int i = 0; i < count; ++i) {
    const int c = grown[i];
    int8_t* row = rows + c * p.vt_st.ts;
    const float so = s_old[c], sn = s_new[c];
    if (vec) {
      for (int64_t ch = threadIdx.x; ch < p.vt_cols / 16; ch += blockDim.x)
        reinterpret_cast<int4*>(row)[ch] = requantize16(reinterpret_cast<const int4*>(row)[ch], so, sn);
    } else {
      for (int64_t col = threadIdx.x; col < p.vt_cols; col += blockDim.x)
        if (!cache_writes(p, pos0, col)) row[col] = requantize_s8(row[col], so, sn);  // dropped tokens' too
    }
  }
}

// The paged cache's grown V^T rows of (b, h): the sequence's columns before the new tokens,
// page by page through the table. A 16-column chunk wholly before pos0 is one 16-byte vector
// (pages are multiples of 16 columns, so a chunk never straddles two), the chunk holding pos0
// is done byte by byte: the columns from pos0 on are the new tokens' or not the sequence's yet,
// and the CPU backend leaves them alone.
__device__ void sweep_pages(const CacheQuantParams& p, int b, int h, int64_t pos0, const int* grown, int count,
                            const float* s_old, const float* s_new) {
  const int64_t held = min(max(pos0, int64_t(0)), p.cap);
  const bool vec = (reinterpret_cast<uintptr_t>(p.vt8) | p.vt_st.bs | p.vt_st.hs | p.vt_st.ts) % 16 == 0;
  const int64_t chunks = (held + 15) / 16;
  for (int i = 0; i < count; ++i) {
    const int c = grown[i];
    const float so = s_old[c], sn = s_new[c];
    for (int64_t ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
      const CachePlace w = cache_place(p, b, 16 * ch);
      if (!in_pool(p, w)) continue;
      int8_t* at = p.vt8 + cache_vt_offset(p, w, h, c);
      const int n = static_cast<int>(min(int64_t(16), held - 16 * ch));
      if (vec && n == 16)
        *reinterpret_cast<int4*>(at) = requantize16(*reinterpret_cast<const int4*>(at), so, sn);
      else
        for (int e = 0; e < n; ++e) at[e] = requantize_s8(at[e], so, sn);
    }
  }
}

// One block per (batch, kv head), a thread per channel (two at head_dim 256): the new tokens'
// range, the scales that grow (paper: one for the head, a block-wide max), the columns already
// in the cache requantized for them (the block sweeps each grown row, coalesced), then the new
// tokens' bytes of every V^T row.
constexpr int kVThreads = 128;
__global__ void __launch_bounds__(kVThreads) cache_v_kernel(const CacheQuantParams p) {
  const int b = blockIdx.x / p.heads_kv, h = blockIdx.x % p.heads_kv;
  __shared__ float s_old[2 * kVThreads], s_new[2 * kVThreads], s_red[kVThreads / 32];
  __shared__ int s_grown[2 * kVThreads], s_count;
  float* vs = p.v_scale + b * p.vs_st.bs + h * p.vs_st.hs;
  const int64_t pos0 = cache_pos0(p, b);
  auto v_at = [&](int t, int c) { return load_in(p.v, p.in_dtype, offset(p.v_st, b, h, t) + c); };
  if (threadIdx.x == 0) s_count = 0;
  // The new tokens' |v| range (fixed scales never grow: not read for it).
  float amax[2] = {0.f, 0.f}, head = 0.f;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = threadIdx.x + k * kVThreads;
    if (c >= p.head_dim || p.fixed_v_scale) continue;
    for (int t = 0; t < p.tokens; ++t) amax[k] = fmaxf(amax[k], fabsf(v_at(t, c)));
    head = fmaxf(head, amax[k]);
  }
  if (p.v_per_tensor && !p.fixed_v_scale) {  // uniform over the block (its barrier)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) head = fmaxf(head, __shfl_xor_sync(0xffffffffu, head, o));
    if (threadIdx.x % 32 == 0) s_red[threadIdx.x / 32] = head;
    __syncthreads();
    head = s_red[0];
    for (int w = 1; w < kVThreads / 32; ++w) head = fmaxf(head, s_red[w]);
  }
  __syncthreads();  // s_count and s_red settled
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = threadIdx.x + k * kVThreads;
    if (c >= p.head_dim) continue;
    const float a = p.v_per_tensor ? head : amax[k], s = vs[c];
    s_old[c] = s;
    s_new[c] = !p.fixed_v_scale && v_needs_growth(a, s) ? grown_v_scale(a) : s;
    if (s_new[c] != s) s_grown[atomicAdd(&s_count, 1)] = c;
  }
  __syncthreads();
  // Requantize the grown rows (any order of rows: each byte depends on its own row's scales),
  // 16 bytes per thread and step where the rows allow (a byte loop had one dependent global
  // round trip per step: ~26 us per decode step at 8k tokens on an H200). The new tokens' own
  // columns are rewritten below, after the barrier, whatever this writes there.
  if (p.block_table)
    sweep_pages(p, b, h, pos0, s_grown, s_count, s_old, s_new);
  else
    sweep_rows(p, p.vt8 + b * p.vt_st.bs + h * p.vt_st.hs, pos0, s_grown, s_count, s_old, s_new);
  __syncthreads();  // the sweeps' writes before the new tokens' bytes
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = threadIdx.x + k * kVThreads;
    if (c >= p.head_dim) continue;
    if (!p.fixed_v_scale) vs[c] = s_new[c];  // fixed: only read (maybe shared by the batch)
    const float inv = inv_of_scale(s_new[c]);
    for (int t = 0; t < p.tokens; ++t) {
      const int64_t at = cache_pos(p, pos0, t);
      if (at < 0) continue;
      const CachePlace w = cache_place(p, b, at);
      if (in_pool(p, w)) p.vt8[cache_vt_offset(p, w, h, c)] = quantize_s8(v_at(t, c), inv);
    }
  }
}

}  // namespace
}  // namespace intfa::quant

namespace intfa::cuda {

using quant::kMaxPerLane;
using quant::kWarps;

Status launch_quantize_cache(const CacheQuantParams& p, cudaStream_t stream) {
  if (p.head_dim > 32 * kMaxPerLane)
    return Status(StatusCode::invalid_argument, "head_dim: expected <= 256 for the cache quantizer");
  const int64_t rows = int64_t(p.batch) * p.heads * p.tokens;
  if (rows > 0) {
    quant::cache_rows_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), 32 * kWarps, 0, stream>>>(p);
    Status st = check_cuda(cudaGetLastError(), "cache quantizer: rows kernel launch");
    if (!st.ok()) return st;
  }
  if (p.v && p.tokens > 0) {
    quant::cache_v_kernel<<<static_cast<unsigned>(p.batch * p.heads_kv), quant::kVThreads, 0, stream>>>(p);
    return check_cuda(cudaGetLastError(), "cache quantizer: V kernel launch");
  }
  return Status::OK();
}

}  // namespace intfa::cuda
