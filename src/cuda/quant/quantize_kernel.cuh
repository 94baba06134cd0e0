// Fused fp16/bf16 -> INT8 quantization of Q, K and V (device code), bit-identical to
// ref::quantize: one persistent kernel takes work items in ticket order (quantize_schedule.h).
//
// Geometry: a CTA of 8 warps handles one chunk of kChunk tokens of one head. Each lane moves
// 16-byte vectors (8 channels); kTpr = D/8 lanes hold one row, so a warp loads kGroups rows per
// instruction and every lane owns 16 tokens of the warp's block. Owning 16 consecutive tokens
// lets a lane write V transposed as one 16-byte vector per channel, with no shared-memory tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/numerics.h"
#include "common/params.h"
#include "cuda/launchers.h"
#include "cuda/quant/quantize_internal.h"
#include "cuda/quant/quantize_schedule.h"

namespace intfa::quant {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLaneRows = 16;  // tokens per lane: one 16-byte vt8 vector per channel
constexpr int kBatch = 8;      // rows a lane loads before using any (loads in flight)
constexpr int kOutSeqs = 8;    // sequences per outputs item
constexpr unsigned kFull = 0xffffffffu;

template <int D>
struct Geometry {
  static_assert(D % 8 == 0 && 32 % (D / 8) == 0, "head_dim must be 8 * a power of two <= 256");
  static constexpr int kTpr = D / 8;           // lanes per row
  static constexpr int kGroups = 32 / kTpr;    // rows per warp load instruction
  static constexpr int kWarpTokens = kGroups * kLaneRows;
  static constexpr int kChunk = kWarps * kWarpTokens;  // 64 KiB of fp16/bf16 per chunk
};

// ---------------------------------------------------------------------------------------------
// Arithmetic of the rounding rule (intfa.h), with explicit _rn intrinsics so that no compiler
// flag (contraction, fast-math) can change a rounding. Same values as numerics.h.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float scale_rn(float amax) {
  return amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
}
__device__ __forceinline__ float inv_scale_rn(float amax) {
  return amax > 0.f ? __fdiv_rn(127.f, amax) : 1.f;
}

template <typename T> __device__ float round_to(float x);
template <> __device__ __forceinline__ float round_to<__half>(float x) {
  return __half2float(__float2half_rn(x));
}
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

// K smoothing mean: fp32(fp64 sum / n), rounded to the input dtype; 0 for an empty sequence.
template <typename T>
__device__ __forceinline__ float kmean_of(double sum, int n) {
  return n > 0 ? round_to<T>(__double2float_rn(__ddiv_rn(sum, static_cast<double>(n)))) : 0.f;
}

// 8 fp16/bf16 values (one 16-byte vector) -> fp32, exactly.
template <typename T> __device__ void to_float8(const uint4& v, float (&x)[8]);
template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint32_t byte_of(int8_t q, int pos) {
  return (static_cast<uint32_t>(static_cast<uint8_t>(q))) << (8 * pos);
}

__device__ __forceinline__ uint2 quantize8(const float (&x)[8], float inv) {
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e) w[e / 4] |= byte_of(quantize_s8(x[e], inv), e % 4);
  return make_uint2(w[0], w[1]);
}

// Reductions over the kWidth lanes of one row (lanes are grouped contiguously).
template <int kWidth>
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <int kWidth>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// ---------------------------------------------------------------------------------------------
// Token spaces and chunks
// ---------------------------------------------------------------------------------------------
// The tokens of one side (q or kv). Dense: `batch` sequences of `len` tokens, token index t in
// [0, len). Varlen: packed token index g in [0, total), sequence b = [cu[b], cu[b+1]). In both
// cases a row's address is offset(st, b_addr, h, token) and its vt8 column is the token index.
struct Space {
  const int32_t* cu;  // sanitized (monotonic, cu[0] = 0) or nullptr
  int batch;
  int len;
  int64_t total;
  int64_t cps;  // dense: chunks per sequence
  int64_t chunks;

  __device__ int64_t seq_begin(int b) const { return cu ? cu[b] : 0; }
  __device__ int64_t seq_end(int b) const { return cu ? cu[b + 1] : len; }
  __device__ int seq_len(int b) const { return static_cast<int>(seq_end(b) - seq_begin(b)); }
  // Largest b in [lo, hi] with cu[b] <= g: the (non-empty) sequence holding packed token g.
  __device__ int find(int64_t g, int lo, int hi) const {
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (cu[mid] <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

__device__ inline Space make_space(const int32_t* cu, int batch, int len, int chunk) {
  Space s;
  s.cu = cu;
  s.batch = batch;
  s.len = len;
  if (cu) {
    s.total = cu[batch];
    s.cps = 0;
    s.chunks = (s.total + chunk - 1) / chunk;
  } else {
    s.total = static_cast<int64_t>(batch) * len;
    s.cps = (len + chunk - 1) / chunk;
    s.chunks = batch * s.cps;
  }
  return s;
}

struct Chunk {
  int64_t begin, end;   // valid tokens [begin, end)
  int b_first, b_last;  // sequences it covers
  int b_addr;           // batch index for addressing (varlen strides have bs = 0)
};

__device__ inline Chunk chunk_info(const Space& s, int64_t c, int chunk) {
  Chunk k;
  if (!s.cu) {
    const int b = static_cast<int>(c / s.cps);
    k.begin = (c % s.cps) * chunk;
    k.end = min(k.begin + chunk, static_cast<int64_t>(s.len));
    k.b_first = k.b_last = k.b_addr = b;
  } else {
    k.begin = c * chunk;
    k.end = min(k.begin + chunk, s.total);
    k.b_first = s.find(k.begin, 0, s.batch - 1);
    k.b_last = s.find(k.end - 1, k.b_first, s.batch - 1);
    k.b_addr = 0;
  }
  return k;
}

// The 16 rows a lane owns, and the sequence of the row being processed. Row indices are
// lane-relative 32-bit values to keep the per-row bookkeeping in few registers.
template <int D>
struct LaneRows {
  int64_t first;  // token of the lane's row 0
  int nvalid;     // rows [0, nvalid) exist
  int b;          // sequence of the current row
  int b_end;      // lane-relative row where sequence b ends (dense: never)

  __device__ LaneRows(const Space& s, const Chunk& k) {
    using G = Geometry<D>;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    first = k.begin + w * G::kWarpTokens + (lane / G::kTpr) * kLaneRows;
    nvalid = static_cast<int>(min(max(k.end - first, int64_t(0)), int64_t(kLaneRows)));
    b = k.b_first;
    if (s.cu && k.b_last != k.b_first) b = nvalid > 0 ? s.find(first, k.b_first, k.b_last) : k.b_last;
    b_end = rel_end(s);
  }
  __device__ int rel_end(const Space& s) const {
    return s.cu ? static_cast<int>(min(s.seq_end(b) - first, int64_t(kLaneRows))) : kLaneRows;
  }
  // Moves to the sequence of valid row `row` if that is past b's end; true if it moved.
  __device__ bool advance(const Space& s, int row) {
    if (row < b_end) return false;
    do {
      ++b;
      b_end = rel_end(s);
    } while (row >= b_end);
    return true;
  }
};

// Waits until the tables of every non-empty sequence in [b_first, b_last] are final.
__device__ inline void wait_ready(const Space& kv, int b_first, int b_last, const unsigned* ready_h,
                                  int heads) {
  if (threadIdx.x == 0) {
    for (int b = b_first; b <= b_last; ++b) {
      if (kv.seq_len(b) <= 0) continue;
      const unsigned* p = ready_h + static_cast<int64_t>(b) * heads;
      while (ld_acquire(p) == 0u) __nanosleep(128);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Items
// ---------------------------------------------------------------------------------------------
// Loads the lane's rows [half * kBatch, half * kBatch + kBatch) (zeros for missing rows).
template <bool kStreaming>
__device__ __forceinline__ void load_rows(uint4 (&raw)[kBatch], const char* lane_src, int64_t ts_bytes,
                                          int half, int nvalid) {
#pragma unroll
  for (int i = 0; i < kBatch; ++i) {
    const int row = half * kBatch + i;
    const uint4* p = reinterpret_cast<const uint4*>(lane_src + row * ts_bytes);
    if (row < nvalid) raw[i] = kStreaming ? __ldcs(p) : __ldcg(p);
    else raw[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Address of the lane's row 0 (channel group cg) in a [b, h, token, d] tensor.
template <typename E>
__device__ __forceinline__ const char* lane_row0(const void* base, const Strides3& st, int b_addr, int h,
                                                 int64_t first, int cg) {
  return reinterpret_cast<const char*>(static_cast<const E*>(base) + offset(st, b_addr, h, first) + cg * 8);
}

// Per-token quantization of Q or K rows: x' = x - mean (K, smoothed), amax over the row,
// round(x' * 127/amax). Q rows also get lse_offset = scale * (q . mean).
struct RowsJob {
  const void* src; Strides3 src_st;
  int8_t* dst; Strides3 dst_st;
  float* scale; Strides3 sc_st;
  float* lse;           // Q rows: lse_offset (may be null)
  float softmax_scale;
  const float* kmean;   // K mean table (final); nullptr: mean 0
  int hkv;              // kv head of that mean
  bool subtract;        // K rows subtract the mean; Q rows only use it for lse
};

template <int D, typename T>
__device__ void rows_item(const RowsJob& j, const Space& s, const Space& kv, const Chunk& k, int h,
                          int heads_kv) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, cg = lane % G::kTpr;
  LaneRows<D> r(s, k);
  float mean[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const bool use_mean = j.kmean != nullptr;
  auto load_mean = [&](int b) {  // an empty kv sequence has mean 0 (and no table entry)
    float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
    if (kv.seq_len(b) > 0) {
      const float4* m = reinterpret_cast<const float4*>(j.kmean + (static_cast<int64_t>(b) * heads_kv + j.hkv) * D + cg * 8);
      lo = __ldcg(m);
      hi = __ldcg(m + 1);
    }
    mean[0] = lo.x; mean[1] = lo.y; mean[2] = lo.z; mean[3] = lo.w;
    mean[4] = hi.x; mean[5] = hi.y; mean[6] = hi.z; mean[7] = hi.w;
  };
  if (use_mean) load_mean(r.b);

  const char* src = lane_row0<T>(j.src, j.src_st, k.b_addr, h, r.first, cg);
  const int64_t src_ts = j.src_st.ts * static_cast<int64_t>(sizeof(T));
  int8_t* dst = j.dst + offset(j.dst_st, k.b_addr, h, r.first) + cg * 8;
  const int64_t sc = offset(j.sc_st, k.b_addr, h, r.first);
#pragma unroll
  for (int half = 0; half < kLaneRows / kBatch; ++half) {
    uint4 raw[kBatch];
    load_rows<true>(raw, src, src_ts, half, r.nvalid);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = half * kBatch + i;
      const bool valid = row < r.nvalid;
      if (valid && r.advance(s, row) && use_mean) load_mean(r.b);
      float x[8];
      to_float8<T>(raw[i], x);
      float amax = 0.f, dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (j.lse) dot = __fmaf_rn(x[e], mean[e], dot);
        if (j.subtract) x[e] = __fsub_rn(x[e], mean[e]);
        amax = fmaxf(amax, fabsf(x[e]));
      }
      amax = row_max<G::kTpr>(amax);
      const uint2 q = quantize8(x, inv_scale_rn(amax));
      if (j.lse) dot = row_sum<G::kTpr>(dot);
      if (valid) {
        __stcs(reinterpret_cast<uint2*>(dst + row * j.dst_st.ts), q);
        if (cg == 0) {
          j.scale[sc + row * j.sc_st.ts] = scale_rn(amax);
          if (j.lse) j.lse[sc + row * j.sc_st.ts] = use_mean ? __fmul_rn(j.softmax_scale, dot) : 0.f;
        }
      }
    }
  }
}

// V of a chunk, quantized with the inverse scales of its sequence (per channel for accurate,
// all equal for paper) and written transposed: vt8[b, h, d, token], one 16-byte vector of 16 tokens per channel.
template <int D, typename T>
__device__ void vt_item(const QuantParams& p, const Space& kv, const Chunk& k, int h, const float* vinv) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, cg = lane % G::kTpr;
  LaneRows<D> r(kv, k);
  float inv[8];
  auto load_inv = [&](int b) {
    const float4* m = reinterpret_cast<const float4*>(vinv + (static_cast<int64_t>(b) * p.heads_kv + h) * D + cg * 8);
    const float4 lo = __ldcg(m), hi = __ldcg(m + 1);
    inv[0] = lo.x; inv[1] = lo.y; inv[2] = lo.z; inv[3] = lo.w;
    inv[4] = hi.x; inv[5] = hi.y; inv[6] = hi.z; inv[7] = hi.w;
  };
  load_inv(r.b);

  const char* src = lane_row0<T>(p.v, p.v_st, k.b_addr, h, r.first, cg);
  const int64_t src_ts = p.v_st.ts * static_cast<int64_t>(sizeof(T));
  uint32_t pk[8][4];  // pk[e][w]: channel cg*8+e, tokens 4w..4w+3 of the lane's 16
#pragma unroll
  for (int e = 0; e < 8; ++e) pk[e][0] = pk[e][1] = pk[e][2] = pk[e][3] = 0u;
#pragma unroll
  for (int half = 0; half < kLaneRows / kBatch; ++half) {
    uint4 raw[kBatch];
    load_rows<true>(raw, src, src_ts, half, r.nvalid);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = half * kBatch + i;
      if (row < r.nvalid && r.advance(kv, row)) load_inv(r.b);
      float x[8];
      to_float8<T>(raw[i], x);
#pragma unroll
      for (int e = 0; e < 8; ++e) pk[e][row / 4] |= byte_of(quantize_s8(x[e], inv[e]), row % 4);
    }
  }
  if (r.nvalid == 0) return;
  int8_t* dst = p.vt8 + k.b_addr * p.vt_st.bs + h * p.vt_st.hs + (cg * 8) * p.vt_st.ts + r.first;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    int8_t* d = dst + e * p.vt_st.ts;
    if (r.nvalid == kLaneRows) {
      __stcs(reinterpret_cast<uint4*>(d), make_uint4(pk[e][0], pk[e][1], pk[e][2], pk[e][3]));
    } else {  // the end of the tokens: bytes, never past it (vt8 may be a view)
#pragma unroll
      for (int t = 0; t < kLaneRows; ++t)
        if (t < r.nvalid) d[t] = static_cast<int8_t>(pk[e][t / 4] >> (8 * (t % 4)));
    }
  }
}

// Ends a stats item: adds the chunk's token counts to done[b] of each sequence it covers. The
// CTA that completes a sequence turns its accumulators into the fp32 tables (K mean, V inverse
// scale) and the k_mean / v_scale outputs, then raises ready[b]. `s_list` holds kChunk ints.
template <int D, typename T>
__device__ void finish_stats(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                             const QuantScratch& s, bool is_k, int* s_list, int* s_count) {
  const int64_t off = (is_k ? 0 : static_cast<int64_t>(p.batch) * p.heads_kv) + h;
  __threadfence();  // this CTA's accumulator atomics before its count
  __syncthreads();
  if (threadIdx.x == 0) {
    int n = 0;
    for (int b = k.b_first; b <= k.b_last; ++b) {
      const int64_t lo = max(kv.seq_begin(b), k.begin), hi = min(kv.seq_end(b), k.end);
      if (hi <= lo) continue;
      const unsigned add = static_cast<unsigned>(hi - lo);
      if (atomicAdd(s.done + off + static_cast<int64_t>(b) * p.heads_kv, add) + add ==
          static_cast<unsigned>(kv.seq_len(b)))
        s_list[n++] = b;
    }
    __threadfence();  // every other CTA's accumulator atomics before the reads below
    *s_count = n;
  }
  __syncthreads();
  const int n = *s_count;
  if (n == 0) return;
  for (int i = 0; i < n; ++i) {
    const int b = s_list[i];
    const int64_t tab = (static_cast<int64_t>(b) * p.heads_kv + h) * D;
    for (int c = threadIdx.x; c < D; c += kThreads) {
      if (is_k) {
        const float m = kmean_of<T>(__ldcg(s.ksum + tab + c), kv.seq_len(b));
        s.kmean[tab + c] = m;
        if (p.k_mean) p.k_mean[b * p.km_st.bs + h * p.km_st.hs + c] = m;
      } else {
        const unsigned bits = __ldcg(s.vmax + tab + (p.scheme == Scheme::accurate ? c : 0));
        s.vinv[tab + c] = inv_scale_rn(__uint_as_float(bits));
        if (p.v_scale) p.v_scale[b * p.vs_st.bs + h * p.vs_st.hs + c] = scale_rn(__uint_as_float(bits));
      }
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 0; i < n; ++i) atomicExch(s.ready + off + static_cast<int64_t>(s_list[i]) * p.heads_kv, 1u);
}

// fp64 channel sums of K over a chunk, added to ksum[b, h, :] of each sequence in it.
template <int D, typename T>
__device__ void k_stats_item(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                             const QuantScratch& s, double* s_red, int* s_list, int* s_count) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tg = lane / G::kTpr, cg = lane % G::kTpr;
  LaneRows<D> r(kv, k);
  double acc[8] = {0., 0., 0., 0., 0., 0., 0., 0.};
  bool any = false;
  auto flush = [&](int b) {
    double* sum = s.ksum + (static_cast<int64_t>(b) * p.heads_kv + h) * D + cg * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      atomicAdd(sum + e, acc[e]);
      acc[e] = 0.;
    }
  };
  const char* src = lane_row0<T>(p.k, p.k_st, k.b_addr, h, r.first, cg);
  const int64_t src_ts = p.k_st.ts * static_cast<int64_t>(sizeof(T));
#pragma unroll
  for (int half = 0; half < kLaneRows / kBatch; ++half) {
    uint4 raw[kBatch];
    load_rows<false>(raw, src, src_ts, half, r.nvalid);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = half * kBatch + i;
      if (row >= r.nvalid) continue;
      if (row >= r.b_end) {  // varlen: the previous sequence ends here
        if (any) flush(r.b);
        any = false;
        r.advance(kv, row);
      }
      float x[8];
      to_float8<T>(raw[i], x);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = __dadd_rn(acc[e], static_cast<double>(x[e]));
      any = true;
    }
  }
  if (k.b_first != k.b_last) {
    if (any) flush(r.b);
  } else {  // one sequence: reduce in the CTA, then D atomics
#pragma unroll
    for (int o = G::kTpr; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = __dadd_rn(acc[e], __shfl_xor_sync(kFull, acc[e], o));
    if (tg == 0)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_red[w * D + cg * 8 + e] = acc[e];
    __syncthreads();
    double* sum = s.ksum + (static_cast<int64_t>(k.b_first) * p.heads_kv + h) * D;
    for (int c = threadIdx.x; c < D; c += kThreads) {
      double t = 0.;
#pragma unroll
      for (int ww = 0; ww < kWarps; ++ww) t = __dadd_rn(t, s_red[ww * D + c]);
      atomicAdd(sum + c, t);
    }
  }
  finish_stats<D, T>(p, kv, k, h, s, true, s_list, s_count);
}

// V amax over a chunk, per channel (accurate) or over all channels (paper), max-ed into
// vmax[b, h, :] (float bits: non-negative floats order like their bit patterns).
template <int D, typename T>
__device__ void v_stats_item(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                             const QuantScratch& s, float* s_red, bool per_channel, int* s_list,
                             int* s_count) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tg = lane / G::kTpr, cg = lane % G::kTpr;
  LaneRows<D> r(kv, k);
  float m[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  bool any = false;
  auto all8 = [&] {
    float a = m[0];
#pragma unroll
    for (int e = 1; e < 8; ++e) a = fmaxf(a, m[e]);
    return a;
  };
  auto flush = [&](int b) {
    unsigned* dst = s.vmax + (static_cast<int64_t>(b) * p.heads_kv + h) * D;
    if (per_channel) {
#pragma unroll
      for (int e = 0; e < 8; ++e) atomicMax(dst + cg * 8 + e, __float_as_uint(m[e]));
    } else {
      atomicMax(dst, __float_as_uint(all8()));
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) m[e] = 0.f;
  };
  const char* src = lane_row0<T>(p.v, p.v_st, k.b_addr, h, r.first, cg);
  const int64_t src_ts = p.v_st.ts * static_cast<int64_t>(sizeof(T));
#pragma unroll
  for (int half = 0; half < kLaneRows / kBatch; ++half) {
    uint4 raw[kBatch];
    load_rows<false>(raw, src, src_ts, half, r.nvalid);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = half * kBatch + i;
      if (row >= r.nvalid) continue;
      if (row >= r.b_end) {
        if (any) flush(r.b);
        any = false;
        r.advance(kv, row);
      }
      float x[8];
      to_float8<T>(raw[i], x);
#pragma unroll
      for (int e = 0; e < 8; ++e) m[e] = fmaxf(m[e], fabsf(x[e]));
      any = true;
    }
  }
  unsigned* dst = s.vmax + (static_cast<int64_t>(k.b_first) * p.heads_kv + h) * D;
  if (k.b_first != k.b_last) {
    if (any) flush(r.b);
  } else if (per_channel) {
#pragma unroll
    for (int o = G::kTpr; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 8; ++e) m[e] = fmaxf(m[e], __shfl_xor_sync(kFull, m[e], o));
    if (tg == 0)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_red[w * D + cg * 8 + e] = m[e];
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += kThreads) {
      float t = 0.f;
#pragma unroll
      for (int ww = 0; ww < kWarps; ++ww) t = fmaxf(t, s_red[ww * D + c]);
      atomicMax(dst + c, __float_as_uint(t));
    }
  } else {
    float a = all8();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(kFull, a, o));
    if (lane == 0) s_red[w] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
#pragma unroll
      for (int ww = 0; ww < kWarps; ++ww) t = fmaxf(t, s_red[ww]);
      atomicMax(dst, __float_as_uint(t));
    }
  }
  finish_stats<D, T>(p, kv, k, h, s, false, s_list, s_count);
}

// The k_mean / v_scale entries no finalizer writes: paper's k_mean (zeros) and those of empty
// sequences (mean 0, scale 1), for sequences [b0, b0 + kOutSeqs) of kv head h.
__device__ inline void outputs_item(const QuantParams& p, const Space& kv, int h, int b0, int D) {
  const bool smooth = p.scheme != Scheme::paper, has_v = p.scheme != Scheme::half;
  const int b1 = min(b0 + kOutSeqs, p.batch);
  for (int i = threadIdx.x; i < (b1 - b0) * D; i += kThreads) {
    const int b = b0 + i / D, c = i % D;
    const bool empty = kv.seq_len(b) <= 0;
    if (p.k_mean && (!smooth || empty)) p.k_mean[b * p.km_st.bs + h * p.km_st.hs + c] = 0.f;
    if (has_v && p.v_scale && empty) p.v_scale[b * p.vs_st.bs + h * p.vs_st.hs + c] = 1.f;
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: phase 0 runs the fused order, phase 1 / 2 the two launches of the split order.
// ---------------------------------------------------------------------------------------------
// Per-launch constants, computed once per CTA and kept in shared memory so that the registers
// go to the items (the barriers in the ticket loop keep the compiler from hoisting them).
struct Plan {
  Space kv, qs;
  Schedule sc;
  int64_t ntickets;
  int nso, out_blocks;
};

template <int D>
__device__ Plan make_plan(const QuantParams& p, const QuantScratch& s, int phase) {
  using G = Geometry<D>;
  Plan pl;
  pl.kv = make_space(s.cu_kv, p.batch, p.seqlen_kv, G::kChunk);
  pl.qs = make_space(s.cu_q, p.batch, p.seqlen_q, G::kChunk);
  const bool smooth = p.scheme != Scheme::paper, has_v = p.scheme != Scheme::half;
  pl.nso = (smooth ? 1 : 0) + (has_v ? 1 : 0);
  pl.out_blocks = (p.batch + kOutSeqs - 1) / kOutSeqs;
  Schedule& sc = pl.sc;
  sc.ns = static_cast<int64_t>(pl.nso) * p.heads_kv * pl.kv.chunks;
  sc.nkf = smooth ? 0 : static_cast<int64_t>(p.heads_kv) * pl.kv.chunks;
  sc.nq = static_cast<int64_t>(p.heads_q) * pl.qs.chunks;
  sc.no = static_cast<int64_t>(p.heads_kv) * pl.out_blocks;
  const int64_t span = pl.kv.cu ? (*s.max_len_kv + G::kChunk - 1) / G::kChunk + 1 : pl.kv.cps;
  sc.lag = fused_lag(sc.ns, pl.nso, span, gridDim.x / 2);
  pl.ntickets = phase == 0 ? sc.fused_tickets()
                : phase == 1 ? sc.split_stats_tickets()
                             : sc.split_quant_tickets();
  return pl;
}

// Shared memory of the kernel.
template <int D>
struct Smem {
  double red[kWarps * D];        // CTA reductions of the stats items
  int fin[Geometry<D>::kChunk];  // sequences a stats item finalizes
  int fin_count;
  unsigned long long ticket;
  Plan plan;
};

// Runs one item (stats, dep, kfree, q or outputs).
template <int D, typename T>
__device__ __forceinline__ void run_item(const QuantParams& p, const QuantScratch& s, Smem<D>& sm,
                                         const Item it) {
  using G = Geometry<D>;
  const Plan& pl = sm.plan;
  const Space kv = pl.kv;
  const bool smooth = p.scheme != Scheme::paper;
  const int64_t bh = static_cast<int64_t>(p.batch) * p.heads_kv;
  if (it.kind == ItemKind::stats || it.kind == ItemKind::dep) {
    const int64_t hc = it.index / pl.nso;
    const bool is_k = smooth && it.index % pl.nso == 0;
    const int h = static_cast<int>(hc / kv.chunks);
    const Chunk k = chunk_info(kv, hc % kv.chunks, G::kChunk);
    if (it.kind == ItemKind::stats) {
      if (is_k) k_stats_item<D, T>(p, kv, k, h, s, sm.red, sm.fin, &sm.fin_count);
      else v_stats_item<D, T>(p, kv, k, h, s, reinterpret_cast<float*>(sm.red),
                              p.scheme == Scheme::accurate, sm.fin, &sm.fin_count);
    } else if (is_k) {
      wait_ready(kv, k.b_first, k.b_last, s.ready + h, p.heads_kv);
      const RowsJob j{p.k, p.k_st, p.k8, p.k8_st, p.k_scale, p.ks_st, nullptr, 0.f, s.kmean, h, true};
      rows_item<D, T>(j, kv, kv, k, h, p.heads_kv);
    } else {
      wait_ready(kv, k.b_first, k.b_last, s.ready + bh + h, p.heads_kv);
      vt_item<D, T>(p, kv, k, h, s.vinv);
    }
  } else if (it.kind == ItemKind::kfree) {
    const int h = static_cast<int>(it.index / kv.chunks);
    const Chunk k = chunk_info(kv, it.index % kv.chunks, G::kChunk);
    const RowsJob j{p.k, p.k_st, p.k8, p.k8_st, p.k_scale, p.ks_st, nullptr, 0.f, nullptr, h, false};
    rows_item<D, T>(j, kv, kv, k, h, p.heads_kv);
  } else if (it.kind == ItemKind::q) {
    const Space qs = pl.qs;
    const int h = static_cast<int>(it.index / qs.chunks);
    const int hkv = h / (p.heads_q / p.heads_kv);
    const Chunk k = chunk_info(qs, it.index % qs.chunks, G::kChunk);
    const bool mean = smooth && p.lse_offset;
    if (mean) wait_ready(kv, k.b_first, k.b_last, s.ready + hkv, p.heads_kv);
    const RowsJob j{p.q, p.q_st, p.q8, p.q8_st, p.q_scale, p.qs_st, p.lse_offset,
                    p.softmax_scale, mean ? s.kmean : nullptr, hkv, false};
    rows_item<D, T>(j, qs, kv, k, h, p.heads_kv);
  } else if (it.kind == ItemKind::outputs) {
    outputs_item(p, kv, static_cast<int>(it.index / pl.out_blocks),
                 static_cast<int>(it.index % pl.out_blocks) * kOutSeqs, D);
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: phase 0 runs the fused order, phase 1 / 2 the two launches of the split order.
// ---------------------------------------------------------------------------------------------
template <int D, typename T>
__global__ void __launch_bounds__(kThreads, 2)
    quantize_kernel(const QuantParams p, const QuantScratch s, int phase) {
  __shared__ Smem<D> sm;
  unsigned long long* counter = s.tickets + phase;
  if (threadIdx.x == 0) {
    sm.plan = make_plan<D>(p, s, phase);
    sm.ticket = atomicAdd(counter, 1ull);
  }
  __syncthreads();
  for (;;) {
    const int64_t t = static_cast<int64_t>(sm.ticket);
    if (t >= sm.plan.ntickets) break;
    __syncthreads();  // everyone has read the ticket
    // Take the next ticket now so its latency hides behind this item.
    unsigned long long next = 0;
    if (threadIdx.x == 0) next = atomicAdd(counter, 1ull);
    const Item it = phase == 0   ? fused_item(sm.plan.sc, t)
                    : phase == 1 ? Item{ItemKind::stats, t}
                                 : split_quant_item(sm.plan.sc, t);
    run_item<D, T>(p, s, sm, it);
    if (threadIdx.x == 0) sm.ticket = next;
    __syncthreads();
  }
}

// Upper bound of the tickets of one launch, from host-known sizes (varlen: batch * seqlen
// bounds the packed token count), to size the persistent grid.
template <int D>
int64_t ticket_bound(const QuantParams& p) {
  constexpr int C = Geometry<D>::kChunk;
  auto chunks = [&](const int32_t* cu, int len) {
    return cu ? (static_cast<int64_t>(p.batch) * len + C - 1) / C
              : static_cast<int64_t>(p.batch) * ((len + C - 1) / C);
  };
  const int64_t kvc = chunks(p.cu_kv, p.seqlen_kv), qc = chunks(p.cu_q, p.seqlen_q);
  return 2 * 2 * p.heads_kv * kvc + p.heads_q * qc + p.heads_kv * ((p.batch + kOutSeqs - 1) / kOutSeqs);
}

template <int D, typename T>
Status launch_typed(const QuantParams& p, const QuantScratch& s, Order order, cudaStream_t stream) {
  auto kernel = quantize_kernel<D, T>;
  int dev = 0, sms = 0, per_sm = 0;
  Status st = cuda::check_cuda(cudaGetDevice(&dev), "quantize: cudaGetDevice");
  if (st.ok()) st = cuda::check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                                     "quantize: multiprocessor count");
  if (st.ok())
    st = cuda::check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
                          "quantize: occupancy");
  if (!st.ok()) return st;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min(resident, ticket_bound<D>(p))));
  if (order == Order::fused) {
    kernel<<<grid, kThreads, 0, stream>>>(p, s, 0);
    return cuda::check_cuda(cudaGetLastError(), "quantize kernel (fused)");
  }
  kernel<<<grid, kThreads, 0, stream>>>(p, s, 1);
  st = cuda::check_cuda(cudaGetLastError(), "quantize kernel (stats)");
  if (!st.ok()) return st;
  kernel<<<grid, kThreads, 0, stream>>>(p, s, 2);
  return cuda::check_cuda(cudaGetLastError(), "quantize kernel (quantize)");
}

template <int D>
Status launch_main(const QuantParams& p, const QuantScratch& s, Order order, cudaStream_t stream) {
  if (p.in_dtype == DType::bf16) return launch_typed<D, __nv_bfloat16>(p, s, order, stream);
  return launch_typed<D, __half>(p, s, order, stream);
}

}  // namespace intfa::quant
