// Fused fp16/bf16 -> INT8 quantization of Q, K and V (device code), bit-identical to
// ref::quantize: a persistent kernel takes work items in ticket order (quantize_schedule.h),
// launched twice (stats, then quantization) or once for the fused order.
//
// Geometry: a CTA of 8 warps handles one chunk of kChunk rows (tokens) of one head and tensor.
// Each lane moves 16-byte vectors (8 channels); kTpr = D/8 lanes hold one row, a warp covers
// kGroups rows per instruction and every lane owns kLaneRows consecutive tokens of the chunk,
// so it can write V transposed as one 8-byte vector per channel without a shared-memory tile.
// Pipelining: while a CTA computes one item, cp.async brings the next item's rows into shared
// memory (each thread copies exactly the vectors it will read, so no barrier guards the data),
// and a ninth warp, the scheduler, takes the tickets, decodes each item once and waits for the
// statistics the next item reads; the CTA meets once per item (twice for a stats item).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/numerics.h"
#include "common/params.h"
#include "cuda/launchers.h"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/quant/quantize_internal.h"
#include "cuda/quant/quantize_schedule.h"
#include "cuda/quant/row_quant.cuh"

namespace intfa::quant {

constexpr int kThreads = 256;  // the warps that move rows
constexpr int kWarps = kThreads / 32;
// Plus one scheduler warp: it takes the tickets, decodes each item once for the CTA and waits
// for an item's statistics before handing it out, while the other warps run the item before.
constexpr int kBlockThreads = kThreads + 32;
constexpr int kLaneRows = 8;   // tokens per lane and item
constexpr int kStages = 2;     // item buffers: one being computed, one being loaded
constexpr int kMinCtas = 3;    // CTAs per SM the register budget is set for
constexpr int kOutSeqs = 8;    // sequences per outputs item
constexpr unsigned kFull = 0xffffffffu;
// Shared memory of the item buffers: kLaneRows 16-byte vectors per thread and stage.
constexpr int kStageVecs = kLaneRows * kThreads;
constexpr size_t kStageBytes = sizeof(uint4) * kStageVecs * kStages;

template <int D>
struct Geometry {
  static_assert(D % 8 == 0 && 32 % (D / 8) == 0, "head_dim must be 8 * a power of two <= 256");
  static constexpr int kTpr = D / 8;           // lanes per row
  static constexpr int kGroups = 32 / kTpr;    // rows per warp instruction
  static constexpr int kWarpTokens = kGroups * kLaneRows;
  static constexpr int kChunk = kWarps * kWarpTokens;  // 32 KiB of fp16/bf16 per item
};

// Q and K quantization items read rows, not columns: a lane holds kRowVecs vectors of one row
// (channel groups cg, cg + kTpr, ..: each copy and store of a row's lanes stays contiguous), so
// a row spans half as many lanes (one shuffle round fewer) and every per-row step (the lane
// reduction, the IEEE division of the scale) is shared by twice the elements; a lane then owns
// kRowRows rows, and a warp still covers kWarpTokens tokens (the same chunks and stage buffers).
constexpr int kRowVecs = 2;
constexpr int kRowRows = kLaneRows / kRowVecs;
template <int D>
struct RowGeometry {
  static constexpr int kTpr = D / 8 / kRowVecs;  // lanes per row
  static constexpr int kGroups = 32 / kTpr;      // rows per warp instruction
  static_assert(kGroups * kRowRows == Geometry<D>::kWarpTokens, "row items cover a warp's tokens");
};

// ---------------------------------------------------------------------------------------------
// Arithmetic of the rounding rule (intfa.h): quant_scale / quant_inv_scale from numerics.h,
// q8_bits and to_float8 from row_quant.cuh.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Memory primitives
// ---------------------------------------------------------------------------------------------
// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes zeros and reads nothing (gmem
// is then never dereferenced, so it may point past the tensor).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes)
               : "memory");
}
// The same with an L2 eviction policy (for rows read for the last time).
__device__ __forceinline__ void cp_async_16_hint(void* smem, const void* gmem, int src_bytes, uint64_t policy) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes), "l"(policy)
               : "memory");
}
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Adds and returns the old value; release publishes this CTA's earlier writes (ordered before
// by a barrier), acquire makes the other CTAs' published writes visible to the reads after it.
__device__ __forceinline__ unsigned atom_add_acq_rel(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// ---------------------------------------------------------------------------------------------
// Token spaces and chunks
// ---------------------------------------------------------------------------------------------
// The rows of one side (q or kv), indexed by a "column" c. Dense: `batch` sequences of `len`
// tokens, c = token index t. Varlen q: c = packed token index g, sequence b = [cu[b], cu[b+1]).
// Varlen kv ("padded"): c = the V^T column, sequence b = [vt_seq_start(cu, b), + its length), so
// 8 consecutive columns never hold two sequences and every vt8 store is aligned; the columns
// between sequences hold no token. Rows are addressed by token (token()), vt8 by column.
struct Space {
  const int32_t* cu;  // sanitized (monotonic, cu[0] = 0) or nullptr
  int batch;
  int len;
  bool padded;
  int64_t total;  // varlen: columns of the space
  int64_t cps;    // dense: chunks per sequence
  int64_t chunks;
  FastDiv cps_div, chunks_div;

  __device__ int64_t seq_begin(int b) const {
    return cu ? (padded ? vt_seq_start(cu, b) : static_cast<int64_t>(cu[b])) : 0;
  }
  __device__ int seq_len(int b) const { return cu ? cu[b + 1] - cu[b] : len; }
  __device__ int64_t seq_end(int b) const { return seq_begin(b) + seq_len(b); }
  // Memory token index of column c of sequence b.
  __device__ int64_t token(int b, int64_t c) const { return cu ? cu[b] + (c - seq_begin(b)) : c; }
  // Largest b in [lo, hi] whose sequence begins at or before column c.
  __device__ int find(int64_t c, int lo, int hi) const {
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (seq_begin(mid) <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

// The space as an item sees it: without cu_seqlens (kVar false) the null `cu` is a compile-time
// constant, so the dense launches carry none of the varlen arithmetic.
template <bool kVar>
__device__ __forceinline__ Space item_space(const Space& s) {
  Space r = s;
  if (!kVar) {
    r.cu = nullptr;
    r.padded = false;
  }
  return r;
}

__device__ inline Space make_space(const int32_t* cu, bool padded, int batch, int len, int chunk) {
  Space s;
  s.cu = cu;
  s.batch = batch;
  s.len = len;
  s.padded = padded && cu;
  if (cu) {
    s.total = s.padded ? vt_varlen_columns(cu[batch], batch) : cu[batch];
    s.cps = 0;
    s.chunks = (s.total + chunk - 1) / chunk;
  } else {
    s.total = static_cast<int64_t>(batch) * len;
    s.cps = (len + chunk - 1) / chunk;
    s.chunks = batch * s.cps;
  }
  s.cps_div = FastDiv(static_cast<uint32_t>(max(s.cps, int64_t(1))));
  s.chunks_div = FastDiv(static_cast<uint32_t>(max(s.chunks, int64_t(1))));
  return s;
}

// n / d for a divisor d of the plan: the fast path below 2^31, a division above (huge problems).
__device__ __forceinline__ int64_t div_by(int64_t n, const FastDiv& f) {
  return n < (int64_t(1) << 31) ? static_cast<int64_t>(f.div(static_cast<uint32_t>(n)))
                                : n / static_cast<int64_t>(f.d);
}

struct Chunk {
  int64_t begin, end;   // columns [begin, end)
  int b_first, b_last;  // sequences that may have rows in it
  int b_addr;           // batch index for addressing (varlen strides have bs = 0)
};

__device__ inline Chunk chunk_info(const Space& s, int64_t c, int chunk) {
  Chunk k;
  if (!s.cu) {
    const int b = static_cast<int>(div_by(c, s.cps_div));
    k.begin = (c - b * s.cps) * chunk;
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

// The kRows rows a lane owns (kTpr lanes per row), and the sequence of the row being processed.
template <int D, int kTpr = Geometry<D>::kTpr, int kRows = kLaneRows>
struct LaneRows {
  int64_t first;  // column of the lane's row 0
  int64_t tok0;   // its memory token index (the lane's rows are consecutive tokens)
  int nvalid;     // rows [0, nvalid) exist
  int b;          // sequence of the current row
  int b_end;      // lane-relative row where sequence b ends (dense, padded: never)

  __device__ LaneRows(const Space& s, const Chunk& k) {
    using G = Geometry<D>;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    first = k.begin + w * G::kWarpTokens + (lane / kTpr) * kRows;
    int64_t end = k.end;
    b = k.b_first;
    if (s.cu && k.b_last != k.b_first) b = first < end ? s.find(first, k.b_first, k.b_last) : k.b_last;
    if (s.padded) end = min(end, s.seq_end(b));  // one sequence per lane
    nvalid = static_cast<int>(min(max(end - first, int64_t(0)), int64_t(kRows)));
    tok0 = s.token(b, first);
    b_end = (s.cu && !s.padded) ? rel_end(s) : kRows;
  }
  __device__ int rel_end(const Space& s) const {
    return static_cast<int>(min(s.seq_end(b) - first, int64_t(kRows)));
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

// Waits (one thread) until the tables of every non-empty sequence in [b_first, b_last] are final.
__device__ inline void wait_ready(const Space& kv, int b_first, int b_last, const unsigned* ready_h,
                                  int heads) {
  for (int b = b_first; b <= b_last; ++b) {
    if (kv.seq_len(b) <= 0) continue;
    const unsigned* p = ready_h + static_cast<int64_t>(b) * heads;
    while (ld_acquire(p) == 0u) __nanosleep(64);
  }
}

// Address of the lane's row 0 (channel group cg) in a [b, h, token, d] tensor.
template <typename E>
__device__ __forceinline__ const char* lane_row0(const void* base, const Strides3& st, int b_addr,
                                                 int h, int64_t tok, int cg) {
  return reinterpret_cast<const char*>(static_cast<const E*>(base) + offset(st, b_addr, h, tok) + cg * 8);
}

// ---------------------------------------------------------------------------------------------
// Per-launch plan and item decoding
// ---------------------------------------------------------------------------------------------
// Per-launch constants, computed once per CTA and kept in shared memory.
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
  pl.kv = make_space(s.cu_kv, true, p.batch, p.seqlen_kv, G::kChunk);
  pl.qs = make_space(s.cu_q, false, p.batch, p.seqlen_q, G::kChunk);
  const bool smooth = p.scheme != Scheme::paper, has_v = p.scheme != Scheme::half;
  pl.nso = (smooth ? 1 : 0) + (has_v ? 1 : 0);
  pl.out_blocks = (p.batch + kOutSeqs - 1) / kOutSeqs;
  Schedule& sc = pl.sc;
  sc.ns = static_cast<int64_t>(pl.nso) * p.heads_kv * pl.kv.chunks;
  sc.nkf = smooth ? 0 : static_cast<int64_t>(p.heads_kv) * pl.kv.chunks;
  sc.nq = p.q8 ? static_cast<int64_t>(p.heads_q) * pl.qs.chunks : 0;  // no Q8: Q left out
  sc.no = static_cast<int64_t>(p.heads_kv) * pl.out_blocks;
  // Chunks one sequence can touch (varlen: its columns start 16-aligned, up to 15 late).
  const int64_t span = pl.kv.cu ? (*s.max_len_kv + 15 + G::kChunk - 1) / G::kChunk + 1 : pl.kv.cps;
  // Slack of 1.5-2 grids' worth of tickets (s.slack_pct, per device: launch_quantize): the
  // scheduler warp waits for a dep item's statistics one item before the item runs, and a stats
  // item finishes about one item after it starts, so a dep item must trail its last stats item
  // by one to two items per CTA; more slack keeps the rows in L2 longer. B=4 H=32 N=4096 D=128
  // accurate, 1 / 1.5 / 2 grids (q8): H100 0.303 / 0.281 / 0.297 ms, H200 0.286 / 0.252 /
  // 0.248 ms.
  sc.lag = fused_lag(sc.ns, pl.nso, span, static_cast<int64_t>(gridDim.x) * s.slack_pct / 100);
  pl.ntickets = phase == 0 ? sc.fused_tickets()
                : phase == 1 ? sc.split_stats_tickets()
                             : sc.split_quant_tickets();
  return pl;
}

__device__ __forceinline__ Item item_of(const Schedule& sc, int phase, int64_t t) {
  return phase == 0 ? fused_item(sc, t) : phase == 1 ? Item{ItemKind::stats, t} : split_quant_item(sc, t);
}

enum class Tensor3 : int { k, v, q, none };

// An item as every thread of the CTA needs it, decoded once by the scheduler warp and handed
// to the CTA in shared memory (the ticket walk, the head and chunk divisions and the sequence
// search were a third of the kernel's instructions when every warp decoded each item twice,
// once to issue its copies and once to run it). outputs items keep their head in h and their
// first sequence in k.b_first.
struct ItemDesc {
  ItemKind kind;
  Tensor3 tensor;
  int h;
  Chunk k;
};

template <int D, bool kVar>
__device__ ItemDesc decode_item(const QuantParams& p, const Plan& pl, int phase, int64_t t) {
  using G = Geometry<D>;
  ItemDesc d{ItemKind::none, Tensor3::none, 0, Chunk{0, 0, 0, 0, 0}};
  if (t >= pl.ntickets) return d;
  const Item it = item_of(pl.sc, phase, t);
  d.kind = it.kind;
  // Index h * chunks + c of a space: the head into d.h, the chunk returned.
  auto head_and_chunk = [&d](int64_t index, const Space& sp) {
    const int64_t h = div_by(index, sp.chunks_div);
    d.h = static_cast<int>(h);
    return index - h * sp.chunks;
  };
  int64_t chunk = 0;
  switch (it.kind) {
    case ItemKind::stats:
    case ItemKind::dep: {  // index = (h * chunks + c) * nso + op, nso = 1 or 2
      const bool is_k = p.scheme != Scheme::paper && (it.index & (pl.nso - 1)) == 0;
      d.tensor = is_k ? Tensor3::k : Tensor3::v;
      chunk = head_and_chunk(it.index >> (pl.nso - 1), pl.kv);
      break;
    }
    case ItemKind::kfree:
      d.tensor = Tensor3::k;
      chunk = head_and_chunk(it.index, pl.kv);
      break;
    case ItemKind::q:
      d.tensor = Tensor3::q;
      chunk = head_and_chunk(it.index, pl.qs);
      break;
    case ItemKind::outputs:
      d.h = static_cast<int>(it.index / pl.out_blocks);
      d.k.b_first = static_cast<int>(it.index % pl.out_blocks) * kOutSeqs;
      return d;
    default:
      return d;
  }
  d.k = chunk_info(item_space<kVar>(d.tensor == Tensor3::q ? pl.qs : pl.kv), chunk, G::kChunk);
  return d;
}

// Starts the copies of an item's rows into stage buffer `st` (this thread's vectors only).
template <int D, typename T, bool kVar>
__device__ void issue_item(const QuantParams& p, const Plan& pl, const ItemDesc& it, uint4* st) {
  using G = Geometry<D>;
  if (it.tensor == Tensor3::none) return;
  const Space sp = item_space<kVar>(it.tensor == Tensor3::q ? pl.qs : pl.kv);
  const void* base = it.tensor == Tensor3::q ? p.q : it.tensor == Tensor3::k ? p.k : p.v;
  const Strides3 ss = it.tensor == Tensor3::q ? p.q_st : it.tensor == Tensor3::k ? p.k_st : p.v_st;
  const int64_t ts = ss.ts * static_cast<int64_t>(sizeof(T));
  if (it.tensor == Tensor3::q || (it.tensor == Tensor3::k && it.kind != ItemKind::stats)) {
    // rows_item's layout (RowGeometry): vector v of the lane's row i at st[(i * kRowVecs + v) * kThreads];
    // it holds channel group v * kTpr + cg, so the row's lanes read 128 contiguous bytes per copy.
    using RG = RowGeometry<D>;
    const LaneRows<D, RG::kTpr, kRowRows> r(sp, it.k);
    const char* row0 = lane_row0<T>(base, ss, it.k.b_addr, it.h, r.tok0, (threadIdx.x & 31) % RG::kTpr);
    // Last read of these rows. (A first version of this loop, with each lane's two vectors
    // adjacent in the row, came out of ptxas 13.0 as LDGSTS [R + UR0], desc[UR1] with UR0 / UR1
    // never written, an illegal instruction on the H200; scripts/sass-check now flags that.)
    const uint64_t policy = l2_evict_first_policy();
#pragma unroll
    for (int row = 0; row < kRowRows; ++row) {
      const bool ok = row < r.nvalid;
      const char* src = row0 + row * ts;
#pragma unroll
      for (int v = 0; v < kRowVecs; ++v)
        cp_async_16_hint(st + threadIdx.x + (row * kRowVecs + v) * kThreads, src + v * RG::kTpr * 16, ok ? 16 : 0, policy);
    }
    return;
  }
  const LaneRows<D> r(sp, it.k);
  const char* row0 = lane_row0<T>(base, ss, it.k.b_addr, it.h, r.tok0, (threadIdx.x & 31) % G::kTpr);
  if (it.kind == ItemKind::stats) {  // K / V read again by the dep item: keep them in L2
#pragma unroll
    for (int row = 0; row < kLaneRows; ++row) {
      const bool ok = row < r.nvalid;
      cp_async_16(st + row * kThreads + threadIdx.x, row0 + row * ts, ok ? 16 : 0);
    }
  } else {  // last read of these rows
    const uint64_t policy = l2_evict_first_policy();
#pragma unroll
    for (int row = 0; row < kLaneRows; ++row) {
      const bool ok = row < r.nvalid;
      cp_async_16_hint(st + row * kThreads + threadIdx.x, row0 + row * ts, ok ? 16 : 0, policy);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Items (each reads its rows from this thread's vectors of stage buffer `st`)
// ---------------------------------------------------------------------------------------------
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
                          int heads_kv, const uint4* st) {
  using RG = RowGeometry<D>;
  constexpr int kE = 8 * kRowVecs;  // elements of a row per lane
  const int lane = threadIdx.x & 31, cg = lane % RG::kTpr;
  LaneRows<D, RG::kTpr, kRowRows> r(s, k);
  float mean[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e) mean[e] = 0.f;
  const bool use_mean = j.kmean != nullptr;
  auto load_mean = [&](int b) {  // an empty kv sequence has mean 0 (and no table entry)
    const float4* m = reinterpret_cast<const float4*>(j.kmean + (static_cast<int64_t>(b) * heads_kv + j.hkv) * D + cg * 8);
    const bool has = kv.seq_len(b) > 0;
#pragma unroll
    for (int i = 0; i < kE / 4; ++i) {  // vector v = i / 2 holds channel group v * kTpr + cg
      const float4 f = has ? __ldcg(m + (i / 2) * RG::kTpr * 2 + i % 2) : make_float4(0.f, 0.f, 0.f, 0.f);
      mean[4 * i] = f.x; mean[4 * i + 1] = f.y; mean[4 * i + 2] = f.z; mean[4 * i + 3] = f.w;
    }
  };
  if (use_mean) load_mean(r.b);

  // The row's output address advances by the row stride; the empty asm keeps it a live value,
  // else ptxas rebuilds offset() with 64-bit multiplies for every row (~15 instructions each).
  int8_t* dst = j.dst + offset(j.dst_st, k.b_addr, h, r.tok0) + cg * 8;
  const int64_t dst_ts = j.dst_st.ts;
  // Row `cg` of the lane's rows keeps its amax (and lse dot): the per-row scale division and
  // side-tensor stores happen once per lane after the loop, not once per row in every lane.
  static_assert(RG::kTpr >= kRowRows, "a row group needs a lane per row for the side stores");
  float keep_amax = 0.f, keep_dot = 0.f;
#pragma unroll
  for (int row = 0; row < kRowRows; ++row) {
    const bool valid = row < r.nvalid;
    if (valid && r.advance(s, row) && use_mean) load_mean(r.b);
    float x[kRowVecs][8];
#pragma unroll
    for (int v = 0; v < kRowVecs; ++v) to_float8<T>(st[(row * kRowVecs + v) * kThreads + threadIdx.x], x[v]);
    float amax = 0.f, dot = 0.f;
#pragma unroll
    for (int v = 0; v < kRowVecs; ++v)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (j.lse) dot = __fmaf_rn(x[v][e], mean[8 * v + e], dot);
        if (j.subtract) x[v][e] = __fsub_rn(x[v][e], mean[8 * v + e]);
        amax = fmaxf(amax, fabsf(x[v][e]));
      }
    amax = row_max<RG::kTpr>(amax);
    const float inv = quant_inv_scale(amax);
    uint2 packed[kRowVecs];
#pragma unroll
    for (int v = 0; v < kRowVecs; ++v) {
      uint32_t qb[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) qb[e] = q8_bits(x[v][e], inv);
      packed[v] = make_uint2(ptx::pack_low_bytes(qb[0], qb[1], qb[2], qb[3]), ptx::pack_low_bytes(qb[4], qb[5], qb[6], qb[7]));
    }
    if (j.lse) dot = row_sum<RG::kTpr>(dot);
    if (cg == row) {
      keep_amax = amax;
      keep_dot = dot;
    }
    if (valid)
#pragma unroll
      for (int v = 0; v < kRowVecs; ++v) __stcs(reinterpret_cast<uint2*>(dst) + v * RG::kTpr, packed[v]);
    dst += dst_ts;
    asm volatile("" : "+l"(dst));
  }
  if (cg < r.nvalid) {
    const int64_t sc = offset(j.sc_st, k.b_addr, h, r.tok0 + cg);
    j.scale[sc] = quant_scale(keep_amax);
    if (j.lse) j.lse[sc] = use_mean ? __fmul_rn(j.softmax_scale, keep_dot) : 0.f;
  }
}

// V of a chunk, quantized with the inverse scales of its sequence (per channel for accurate, all
// equal for paper) and written transposed: vt8[b, h, d, column], 8 tokens (bytes) per channel.
// The lanes of one row group write adjacent 8-byte pieces of each vt8 row, which L2 merges.
template <int D, typename T>
__device__ void vt_item(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                        const float* vinv, const uint4* st) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, cg = lane % G::kTpr;
  const LaneRows<D> r(kv, k);  // padded space: one sequence per lane
  if (r.nvalid == 0) return;
  float inv[8];
  {
    const float4* m = reinterpret_cast<const float4*>(vinv + (static_cast<int64_t>(r.b) * p.heads_kv + h) * D + cg * 8);
    const float4 lo = __ldcg(m), hi = __ldcg(m + 1);
    inv[0] = lo.x; inv[1] = lo.y; inv[2] = lo.z; inv[3] = lo.w;
    inv[4] = hi.x; inv[5] = hi.y; inv[6] = hi.z; inv[7] = hi.w;
  }
  uint32_t pk[8][2];  // pk[e][w]: channel cg*8+e, tokens 4w..4w+3 of the lane's 8
#pragma unroll
  for (int e = 0; e < 8; ++e) pk[e][0] = pk[e][1] = 0u;
#pragma unroll
  for (int row = 0; row < kLaneRows; ++row) {
    float x[8];
    to_float8<T>(st[row * kThreads + threadIdx.x], x);
    // Insert byte 0 of each q8_bits word at byte (row % 4) of pk[e][row / 4].
    const uint32_t sel = (0x3210u & ~(0xfu << (4 * (row % 4)))) | (0x4u << (4 * (row % 4)));
#pragma unroll
    for (int e = 0; e < 8; ++e) pk[e][row / 4] = __byte_perm(pk[e][row / 4], q8_bits(x[e], inv[e]), sel);
  }
  int8_t* dst = p.vt8 + k.b_addr * p.vt_st.bs + h * p.vt_st.hs + (cg * 8) * p.vt_st.ts + r.first;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    int8_t* d = dst + e * p.vt_st.ts;
    if (r.nvalid == kLaneRows) {
      __stcs(reinterpret_cast<uint2*>(d), make_uint2(pk[e][0], pk[e][1]));
    } else {  // the end of a sequence: bytes, never past it (vt8 may be a view)
#pragma unroll
      for (int t = 0; t < kLaneRows; ++t)
        if (t < r.nvalid) d[t] = static_cast<int8_t>(pk[e][t / 4] >> (8 * (t % 4)));
    }
  }
}

// Ends a stats item, run by warp 0 after a barrier that orders all of the CTA's accumulator
// atomics before it: adds the chunk's token counts to done[b] of each sequence it covers. The
// CTA that completes a sequence turns its accumulators into the fp32 tables (K mean, V inverse
// scale) and the k_mean / v_scale outputs, then raises ready[b].
template <int D>
struct FinishSmem {
  int count;
  // Sequences completed by one item: kv sequences start 16-aligned in the padded space.
  int list[Geometry<D>::kChunk / 16 + 1];
};

template <int D, typename T>
__device__ void finish_stats_warp(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                                  const QuantScratch& s, bool is_k, FinishSmem<D>& fin) {
  const int lane = threadIdx.x & 31;
  const int64_t off = (is_k ? 0 : static_cast<int64_t>(p.batch) * p.heads_kv) + h;
  __syncwarp();  // warp 0's own accumulator atomics come before lane 0's release
  if (lane == 0) {
    int n = 0;
    for (int b = k.b_first; b <= k.b_last; ++b) {
      const int64_t lo = max(kv.seq_begin(b), k.begin), hi = min(kv.seq_end(b), k.end);
      if (hi <= lo) continue;
      const unsigned add = static_cast<unsigned>(hi - lo);
      if (atom_add_acq_rel(s.done + off + static_cast<int64_t>(b) * p.heads_kv, add) + add ==
          static_cast<unsigned>(kv.seq_len(b)))
        fin.list[n++] = b;
    }
    fin.count = n;
  }
  __syncwarp();
  const int n = fin.count;
  if (n == 0) return;
  for (int i = 0; i < n; ++i) {
    const int b = fin.list[i];
    const int64_t tab = (static_cast<int64_t>(b) * p.heads_kv + h) * D;
    for (int c = lane; c < D; c += 32) {
      if (is_k) {
        const float m = kmean_of<T>(__ldcg(s.ksum + tab + c), kv.seq_len(b));
        s.kmean[tab + c] = m;
        if (p.k_mean) p.k_mean[b * p.km_st.bs + h * p.km_st.hs + c] = m;
      } else {
        const float amax = __uint_as_float(__ldcg(s.vmax + tab + (p.scheme == Scheme::accurate ? c : 0)));
        s.vinv[tab + c] = quant_inv_scale(amax);
        if (p.v_scale) p.v_scale[b * p.vs_st.bs + h * p.vs_st.hs + c] = quant_scale(amax);
      }
    }
  }
  __syncwarp();  // the tables come before the releases
  if (lane == 0)
    for (int i = 0; i < n; ++i) st_release(s.ready + off + static_cast<int64_t>(fin.list[i]) * p.heads_kv, 1u);
}

// A stats item runs in two halves around one CTA barrier in the kernel loop, which the
// scheduler warp meets too: every row warp reduces its rows and leaves its partial results in
// `red` (one sequence) or adds them to the global accumulators itself (several sequences);
// after the barrier warp 0 combines the partials, makes the D accumulator atomics and finishes
// (stats_finish_warp).

// fp64 channel sums of K over a chunk, for ksum[b, h, :] of each sequence in it; `red` holds
// kWarps * D doubles.
template <int D, typename T>
__device__ void k_stats_partial(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                                const QuantScratch& s, const uint4* st, double* red) {
  using G = Geometry<D>;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tg = lane / G::kTpr, cg = lane % G::kTpr;
  const LaneRows<D> r(kv, k);  // padded or dense space: one sequence per lane
  double acc[8] = {0., 0., 0., 0., 0., 0., 0., 0.};
  // Rows past nvalid were copied as zeros (issue_item), which add nothing: no per-row test.
#pragma unroll
  for (int row = 0; row < kLaneRows; ++row) {
    float x[8];
    to_float8<T>(st[row * kThreads + threadIdx.x], x);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = __dadd_rn(acc[e], static_cast<double>(x[e]));
  }
  if (k.b_first != k.b_last) {  // several sequences (varlen): each lane adds its own rows
    if (r.nvalid > 0) {
      double* sum = s.ksum + (static_cast<int64_t>(r.b) * p.heads_kv + h) * D + cg * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) atomicAdd(sum + e, acc[e]);
    }
  } else {  // one sequence: the warp's sums, reduced in the CTA after the barrier
#pragma unroll
    for (int o = G::kTpr; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = __dadd_rn(acc[e], __shfl_xor_sync(kFull, acc[e], o));
    if (tg == 0)
#pragma unroll
      for (int e = 0; e < 8; ++e) red[w * D + cg * 8 + e] = acc[e];
  }
}

// V amax over a chunk, per channel (accurate) or over all channels (paper), for vmax[b, h, :]
// (float bits: non-negative floats order like their bit patterns).
template <int D, typename T>
__device__ void v_stats_partial(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                                const QuantScratch& s, const uint4* st, float* red) {
  using G = Geometry<D>;
  const bool per_channel = p.scheme == Scheme::accurate;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, tg = lane / G::kTpr, cg = lane % G::kTpr;
  const LaneRows<D> r(kv, k);
  // |x| maxima on the packed 16-bit pairs (exact: a maximum of representable values; NaN is
  // skipped as fmaxf does), converted once; rows past nvalid were copied as zeros.
  uint32_t m2[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int row = 0; row < kLaneRows; ++row) absmax_pairs<T>(st[row * kThreads + threadIdx.x], m2);
  float m[8];
  to_float8<T>(make_uint4(m2[0], m2[1], m2[2], m2[3]), m);
  float all = m[0];
#pragma unroll
  for (int e = 1; e < 8; ++e) all = fmaxf(all, m[e]);
  if (k.b_first != k.b_last) {  // several sequences (varlen): each lane maxes its own rows
    if (r.nvalid > 0) {
      unsigned* d = s.vmax + (static_cast<int64_t>(r.b) * p.heads_kv + h) * D;
      if (per_channel) {
#pragma unroll
        for (int e = 0; e < 8; ++e) atomicMax(d + cg * 8 + e, __float_as_uint(m[e]));
      } else {
        atomicMax(d, __float_as_uint(all));
      }
    }
  } else if (per_channel) {  // one sequence: the warp's maxima, reduced in the CTA after the barrier
#pragma unroll
    for (int o = G::kTpr; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 8; ++e) m[e] = fmaxf(m[e], __shfl_xor_sync(kFull, m[e], o));
    if (tg == 0)
#pragma unroll
      for (int e = 0; e < 8; ++e) red[w * D + cg * 8 + e] = m[e];
  } else {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) all = fmaxf(all, __shfl_xor_sync(kFull, all, o));
    if (lane == 0) red[w] = all;
  }
}

// Warp 0, after the barrier: the CTA's accumulator atomics of a one-sequence chunk, then the
// done counts and, for sequences this chunk completes, their tables.
template <int D, typename T>
__device__ void stats_finish_warp(const QuantParams& p, const Space& kv, const Chunk& k, int h,
                                  const QuantScratch& s, bool is_k, const double* red, FinishSmem<D>& fin) {
  const int lane = threadIdx.x & 31;
  if (k.b_first == k.b_last) {
    const int64_t tab = (static_cast<int64_t>(k.b_first) * p.heads_kv + h) * D;
    if (is_k) {
      for (int c = lane; c < D; c += 32) {
        double t = 0.;
#pragma unroll
        for (int ww = 0; ww < kWarps; ++ww) t = __dadd_rn(t, red[ww * D + c]);
        atomicAdd(s.ksum + tab + c, t);
      }
    } else if (p.scheme == Scheme::accurate) {
      const float* rf = reinterpret_cast<const float*>(red);
      for (int c = lane; c < D; c += 32) {
        float t = 0.f;
#pragma unroll
        for (int ww = 0; ww < kWarps; ++ww) t = fmaxf(t, rf[ww * D + c]);
        atomicMax(s.vmax + tab + c, __float_as_uint(t));
      }
    } else if (lane == 0) {
      const float* rf = reinterpret_cast<const float*>(red);
      float t = 0.f;
#pragma unroll
      for (int ww = 0; ww < kWarps; ++ww) t = fmaxf(t, rf[ww]);
      atomicMax(s.vmax + tab, __float_as_uint(t));
    }
  }
  finish_stats_warp<D, T>(p, kv, k, h, s, is_k, fin);
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

// Shared memory of the kernel besides the stage buffers.
template <int D>
struct Smem {
  double red[kWarps * D];  // CTA reductions of the stats items
  Plan plan;
  // Items i, i + 1 and i + 2 of this CTA in slots i % 3 ..: while the CTA runs item i and
  // loads item i + 1, the scheduler writes item i + 2 into the slot item i - 1 left, so one
  // barrier per item suffices.
  ItemDesc desc[3];
  FinishSmem<D> fin;
};

// Runs one item whose rows are (being) copied into stage buffer `st`. Its statistics, if it
// needs any, are final (the scheduler warp waited for them before handing the item out).
template <int D, typename T, bool kVar>
__device__ __forceinline__ void run_item(const QuantParams& p, const QuantScratch& s, Smem<D>& sm,
                                         const ItemDesc& it, uint4* st) {
  const Plan& pl = sm.plan;
  const Space kv = item_space<kVar>(pl.kv);
  const Chunk& k = it.k;
  if (it.kind == ItemKind::outputs) {
    cp_async_wait<1>();
    outputs_item(p, kv, it.h, k.b_first, D);
    return;
  }
  if (it.tensor == Tensor3::q) {
    const Space qs = item_space<kVar>(pl.qs);
    const int hkv = it.h / (p.heads_q / p.heads_kv);
    const bool mean = p.scheme != Scheme::paper && p.lse_offset;
    const RowsJob j{p.q, p.q_st, p.q8, p.q8_st, p.q_scale, p.qs_st, p.lse_offset,
                    p.softmax_scale, mean ? s.kmean : nullptr, hkv, false};
    cp_async_wait<1>();  // this thread's rows of the item have landed
    rows_item<D, T>(j, qs, kv, k, it.h, p.heads_kv, st);
    return;
  }
  const bool is_k = it.tensor == Tensor3::k;
  cp_async_wait<1>();
  if (it.kind == ItemKind::stats) {
    // The first half; stats_finish_warp runs after the kernel loop's stats barrier.
    if (is_k) k_stats_partial<D, T>(p, kv, k, it.h, s, st, sm.red);
    else v_stats_partial<D, T>(p, kv, k, it.h, s, st, reinterpret_cast<float*>(sm.red));
  } else if (is_k) {  // dep or kfree
    const bool smooth = it.kind == ItemKind::dep;
    const RowsJob j{p.k, p.k_st, p.k8, p.k8_st, p.k_scale, p.ks_st, nullptr, 0.f,
                    smooth ? s.kmean : nullptr, it.h, smooth};
    rows_item<D, T>(j, kv, kv, k, it.h, p.heads_kv, st);
  } else {
    vt_item<D, T>(p, kv, k, it.h, s.vinv, st);
  }
}

// The scheduler's wait for the statistics an item reads (fused order only; in the split order
// the second launch starts after every table is final): K rows the K mean, V rows the V scales,
// Q rows the K mean for lse_offset.
template <bool kVar>
__device__ void wait_item(const QuantParams& p, const QuantScratch& s, const Plan& pl, const ItemDesc& it) {
  const Space kv = item_space<kVar>(pl.kv);
  const int64_t bh = static_cast<int64_t>(p.batch) * p.heads_kv;
  if (it.tensor == Tensor3::q) {
    if (p.scheme != Scheme::paper && p.lse_offset)
      wait_ready(kv, it.k.b_first, it.k.b_last, s.ready + it.h / (p.heads_q / p.heads_kv), p.heads_kv);
  } else if (it.kind == ItemKind::dep) {
    wait_ready(kv, it.k.b_first, it.k.b_last, s.ready + (it.tensor == Tensor3::k ? 0 : bh) + it.h, p.heads_kv);
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: phase 0 runs the fused order, phase 1 / 2 the two launches of the split order.
// Dynamic shared memory: kStageBytes (the stage buffers).
// ---------------------------------------------------------------------------------------------
// Item i of a CTA runs between its barriers i - 1 and i. The scheduler warp's lane 0 meanwhile
// decodes item i + 2 (its ticket was taken during item i - 1, so the atomic's latency is long
// hidden), takes the ticket of item i + 3 and waits for the statistics of item i + 1, whose
// rows the other warps are loading. The row warps never take a ticket, decode or poll a table
// themselves. A stats item has one more barrier, after which warp 0 finishes it.
template <int D, typename T, bool kVar>
__global__ void __launch_bounds__(kBlockThreads, kMinCtas)
    quantize_kernel(const QuantParams p, const QuantScratch s, int phase) {
  extern __shared__ uint4 stage[];  // [kStages][kLaneRows][kThreads]
  __shared__ Smem<D> sm;
  unsigned long long* counter = s.tickets + phase;
  const bool scheduler = threadIdx.x >= kThreads;
  const bool waits = phase == 0;
  int64_t pending = 0;  // scheduler lane 0: the ticket of item i + 2
  if (threadIdx.x == kThreads) {
    sm.plan = make_plan<D>(p, s, phase);
    const int64_t t0 = static_cast<int64_t>(atomicAdd(counter, 1ull));
    const int64_t t1 = static_cast<int64_t>(atomicAdd(counter, 1ull));
    pending = static_cast<int64_t>(atomicAdd(counter, 1ull));
    sm.desc[0] = decode_item<D, kVar>(p, sm.plan, phase, t0);
    sm.desc[1] = decode_item<D, kVar>(p, sm.plan, phase, t1);
    if (waits) wait_item<kVar>(p, s, sm.plan, sm.desc[0]);
  }
  __syncthreads();
  if (!scheduler) {
    issue_item<D, T, kVar>(p, sm.plan, sm.desc[0], stage);
    cp_async_commit();
  }
  for (int i = 0, slot = 0; sm.desc[slot].kind != ItemKind::none; ++i) {
    const int slot1 = slot == 2 ? 0 : slot + 1, slot2 = slot1 == 2 ? 0 : slot1 + 1;
    if (!scheduler) {
      // Prefetch the next item's rows while this item runs.
      issue_item<D, T, kVar>(p, sm.plan, sm.desc[slot1], stage + ((i + 1) & 1) * kStageVecs);
      cp_async_commit();
      run_item<D, T, kVar>(p, s, sm, sm.desc[slot], stage + (i & 1) * kStageVecs);
    } else if (threadIdx.x == kThreads) {
      // slot2 held item i - 1, which every row warp left at barrier i - 1.
      sm.desc[slot2] = decode_item<D, kVar>(p, sm.plan, phase, pending);
      if (sm.desc[slot2].kind != ItemKind::none) pending = static_cast<int64_t>(atomicAdd(counter, 1ull));
    }
    if (sm.desc[slot].kind == ItemKind::stats) {  // the second half of a stats item
      __syncthreads();
      if (threadIdx.x < 32) {
        const ItemDesc& it = sm.desc[slot];
        stats_finish_warp<D, T>(p, item_space<kVar>(sm.plan.kv), it.k, it.h, s, it.tensor == Tensor3::k, sm.red, sm.fin);
      }
    }
    if (threadIdx.x == kThreads && waits) wait_item<kVar>(p, s, sm.plan, sm.desc[slot1]);
    __syncthreads();
    slot = slot1;
  }
  cp_async_wait<0>();
}

// Upper bound of the tickets of one launch, from host-known sizes (varlen: batch * seqlen
// bounds the packed token count), to size the persistent grid.
template <int D>
int64_t ticket_bound(const QuantParams& p) {
  constexpr int C = Geometry<D>::kChunk;
  auto chunks = [&](const int32_t* cu, int len) {  // varlen: kv columns include 16 per sequence
    return cu ? (static_cast<int64_t>(p.batch) * (len + 16) + 16 + C - 1) / C
              : static_cast<int64_t>(p.batch) * ((len + C - 1) / C);
  };
  const int64_t kvc = chunks(p.cu_kv, p.seqlen_kv), qc = chunks(p.cu_q, p.seqlen_q);
  return 2 * 2 * p.heads_kv * kvc + p.heads_q * qc + p.heads_kv * ((p.batch + kOutSeqs - 1) / kOutSeqs);
}

template <int D, typename T>
Status launch_typed(const QuantParams& p, const QuantScratch& s, Order order, cudaStream_t stream) {
  const bool var = p.cu_q || p.cu_kv;
  auto kernel = var ? quantize_kernel<D, T, true> : quantize_kernel<D, T, false>;
  // Attributes and occupancy once per device and kernel (host time here delays every call).
  static cuda::PerDevice setup[2];
  int sms = 1, per_sm = 0;
  Status st = cuda::check_cuda(cuda::device_sm_count(&sms), "quantize: multiprocessor count");
  if (st.ok())
    st = cuda::check_cuda(cuda::once_per_device(setup[var], [&](int, int* n) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kStageBytes));
      if (e == cudaSuccess)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 cudaSharedmemCarveoutMaxShared);
      if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, kBlockThreads, kStageBytes);
      return e;
    }, &per_sm), "quantize: kernel attributes and occupancy");
  if (!st.ok()) return st;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min(resident, ticket_bound<D>(p))));
  if (order == Order::fused) {
    kernel<<<grid, kBlockThreads, kStageBytes, stream>>>(p, s, 0);
    return cuda::check_cuda(cudaGetLastError(), "quantize kernel (fused)");
  }
  kernel<<<grid, kBlockThreads, kStageBytes, stream>>>(p, s, 1);
  st = cuda::check_cuda(cudaGetLastError(), "quantize kernel (stats)");
  if (!st.ok()) return st;
  kernel<<<grid, kBlockThreads, kStageBytes, stream>>>(p, s, 2);
  return cuda::check_cuda(cudaGetLastError(), "quantize kernel (quantize)");
}

template <int D>
Status launch_main(const QuantParams& p, const QuantScratch& s, Order order, cudaStream_t stream) {
  if (p.in_dtype == DType::bf16) return launch_typed<D, __nv_bfloat16>(p, s, order, stream);
  return launch_typed<D, __half>(p, s, order, stream);
}

}  // namespace intfa::quant
