// INT8 flash-attention forward for Hopper (sm_90a): wgmma, TMA, warp specialization.
//
// A persistent CTA of three warpgroups takes 128-row query tiles in turn (non-causal: tile
// blockIdx.x, then every gridDim.x-th; causal and varlen: longest rows first, the next tile from
// a counter as the CTA frees up, passed to all roles through the tile ring). With fewer tiles than SMs
// (Split), each tile's key blocks are cut into ranges that run as units of their own, and
// combine_kernel merges their partial rows; the split kernels also read per-sequence key counts
// and (Paged) K / V^T from the pages of a paged cache:
//   WG 0, producer (24 registers): warp 0 issues the TMA loads of Q and of each key block's K
//     and V^T tiles into a kStages-deep ring completed on mbarriers; warps 1-3 load the block's
//     per-key K scales and permute V^T's key columns (below), then release the stage.
//   WG 1, 2, consumers (240 registers), 64 query rows each:
//     S = Q8 K8^T       wgmma m64n128k32 s8.s8 -> s32, both operands from shared memory
//     u = S * s_k       the int32 S read as fp32 via 1.5 * 2^23 (one IADD + one FFMA)
//     online softmax    exp2 of u * (s_q scale log2 e) - ref, P8 = round(levels * p) (u8);
//                       2 of every 16 exp2 on the FMA pipe (fwd::exp2_poly), the rest on MUFU
//     O += (P8 V8) c    wgmma m64nDk32 u8.s8 -> s32 with P from registers, folded into fp32
//                       O with two FFMAs per element (the same numerics as the sm80 path).
//   The two consumer warpgroups take turns on the tensor cores (named barriers 1 and 2): one
//   issues PV(n) and QK(n+1) while the other runs its softmax, so the exp2 / ALU work of one
//   overlaps the other's matrix products.
//   Fused Q (attention() calls without lse_offset, FwdParams::q_in): TMA brings the tile's
//     fp16 / bf16 rows instead, and each consumer warpgroup quantizes its 64 rows (per-token,
//     bit-identical to the quantizer) into the int8 tile at the tile's start (quantize_q_rows).
//   Head dim 256 (every kernel): each tile (or key range) runs as two units
//     of 128 value channels (kVPasses), which share QK^T and P8 and each write half of O.
//   Softcap (on the window kernels: contiguous, paged, small pages): the scores go through
//     softcap * tanh(s / softcap) before the softmax (fwd::softcap_scores, as on sm80).
//   Epilogue: each consumer warpgroup writes O * v_scale / l into its shared-memory slice and
//   one thread per row sends the row out with a bulk copy (named barriers 3 and 4), then goes
//   on to its next tile, whose row scales were loaded before the epilogue.
//
// P in registers without shuffles: the s32 accumulator gives a thread keys {2t, 2t+1} of every
// 8-key tile, while the u8 A fragment of the PV wgmma wants k indices {4t..4t+3, 16+4t..+3}
// of each 32-key step. Any order of keys is fine for a sum over keys as long as P and V agree,
// so V^T's columns are permuted instead: within every 16 keys, k index 4t+i holds key
// 2t + (i & 1) + 8 (i >> 1). That is a byte permutation inside each 16-byte chunk (swizzling
// moves whole chunks, so it is layout-independent), done in shared memory by the producer's
// spare warps: four PRMTs per chunk.
#pragma once

#include <cuda.h>

#include <climits>
#include <cstdint>

#include "common/numerics.h"
#include "common/params.h"
#include "cuda/fwd_common.cuh"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/ptx/ptx_sm90.cuh"
#include "cuda/quant/row_quant.cuh"

namespace intfa::sm90 {

#ifndef INTFA_SM90_STAGES
#define INTFA_SM90_STAGES 2
#endif
// The two consumer warpgroups take turns issuing their GEMMs (1) or issue whenever ready (0,
// 4% slower on an H200; turns on the exp2 phase instead measured the same: docs/PERF_LOG.md).
#ifndef INTFA_SM90_PINGPONG
#define INTFA_SM90_PINGPONG 1
#endif
// Of the 16 exponentials per thread and 32-key step, how many run on the FMA pipe (exp2_poly)
// instead of MUFU.EX2, whose queue the two consumer warpgroups' exp2 phases share (ncu: the
// exp2 phase is 31% of consumer samples at D=128, 30% of them MIO-throttle stalls). H200,
// same run, 4k / 16k TOPS: 0 572 / 639, 2 581 / 647, 4 575 / 637, 6 549 / 607 (D=64 16k:
// 361 / 378 / 369 / 363); with LAZY_RESCALE 8: 1 574 / 648, 2 596 / 658, 3 595 / 656.
#ifndef INTFA_SM90_EXP_POLY
#define INTFA_SM90_EXP_POLY 2
#endif
// Conditional rescaling for `accurate` (fwd::row_max): the running max moves only when a block
// max exceeds it by more than this many log2 units (0: always).
#ifndef INTFA_SM90_LAZY_RESCALE
#define INTFA_SM90_LAZY_RESCALE 8
#endif
// Look at the next block's K and V-ready phases early (mbarrier_test: K after the row maxima, V
// after the GEMM turn) and skip the blocking wait where they had already completed: the wait's
// SYNCS round trip sat inside the turn (K) and at the head of the scores phase (V); ncu put ~6%
// of consumer samples in the two ring waits. H200, same call, 0 -> 1: 4k 595 -> 596, 16k 656 ->
// 663, D=64 16k 377 -> 389, causal 4k 486 -> 493, causal 16k 567 -> 574 TOPS.
#ifndef INTFA_SM90_EARLY_TEST
#define INTFA_SM90_EARLY_TEST 1
#endif
constexpr int kBlockM = 128;  // two consumer warpgroups x 64 rows
// Keys per block: 255 * 127 * 128 < 2^22 keeps the PV block product exact through kMagic.
constexpr int kBlockN = 128;
// Head dim 256 (Gemma 2 / 3): a consumer thread cannot hold O (128 fp32), the PV product (128
// int32) and a block of scores (64) in 240 registers, so each 128-row tile runs as kVPasses = 2
// units, each for kDV = 128 of the value channels: both compute the same QK^T over all 256
// channels and the same P8 (the same code on the same data, so the same l and LSE), and each
// folds and writes its half of O. The QK work and the softmax are done twice, the PV work once;
// per score that is about as many consumer instructions as one pass with 64-key blocks, whose
// per-block overhead and fold would weigh twice as much (PERF_LOG, session 33). Q and K tiles of
// 256-byte rows are stored as two 128-byte-row halves (TMA's 128-byte swizzle spans 128 bytes),
// kQKRow the row bytes of one half.
template <int D>
constexpr int kDV = D == 256 ? 128 : D;
template <int D>
constexpr int kVPasses = D / kDV<D>;
template <int D>
constexpr int kQKRow = D == 256 ? 128 : D;
// The units per tile (or key range) at a run-time head dim: kVPasses<head_dim>.
inline int value_passes(int head_dim) { return head_dim == 256 ? kVPasses<256> : 1; }
constexpr int kStages = INTFA_SM90_STAGES;
constexpr int kThreads = 384;
constexpr int kConsumerThreads = 256;
constexpr int kPermuteThreads = 96;  // producer warps 1-3
constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128*24 + 256*240 <= 64K registers
// Slots of the tile ring. The producer publishes tile i + 1 while tile i's loads go out, so the
// consumers find their next tile (needed before the epilogue) without waiting; four slots keep
// the producer from waiting on a slot whose tile a permute warp has not read yet (short tiles).
constexpr int kTileSlots = 4;
constexpr int kTileReaders = kConsumerThreads + kPermuteThreads;

// Phase timeline for tuning (-DINTFA_SM90_TRACE=1): lane 0 of each consumer warpgroup's first
// warp in CTA 0 records globaltimer-free SM clocks at each phase of its first kTraceIters
// blocks, and at a tile's end the steps of the epilogue; the launcher prints them for the
// launch INTFA_SM90_TRACE_AT (default 3, the fourth) names.
#ifndef INTFA_SM90_TRACE
#define INTFA_SM90_TRACE 0
#endif
constexpr int kTraceIters = 48, kTracePhases = 12;
#if INTFA_SM90_TRACE
__device__ long long g_trace[2][kTraceIters][kTracePhases];
#endif

// Causal tiles differ in length, so the causal kernels take their tiles from a counter through
// the tile ring (dynamic scheduling); so do varlen launches, causal or not (their tiles differ with
// the sequences' lengths), which run the causal kernels with the diagonal moved past every key
// when not causal (Params::diag_shift). Dense non-causal launches keep the static stride: their
// tiles are equal, and their hot loop stays as it was (a dynamic variant of it measured 1% slower).
template <bool Causal>
constexpr bool kDynamic = Causal;

// Everything the kernel needs: the problem plus the TMA descriptors of Q, K and V^T.
struct Params {
  FwdParams p;
  CUtensorMap tm_q, tm_k, tm_v;
  // Work units: num_tiles query tiles x num_splits key ranges (unit = tile * num_splits + split).
  int num_m_blocks = 0, num_tiles = 0, num_splits = 1, num_units = 0;
  // Split key ranges (num_splits > 1, `accurate` only): each unit leaves its rows' O * v_scale
  // (not divided by l) and (m, l) here, [split][tile][row][D] and [split][tile][row][2], and
  // combine_kernel merges the splits into the output and the LSE.
  float* part_o = nullptr;
  float2* part_ml = nullptr;
  // Causal tile order (fwd::causal_tile): heads per group.
  int head_group = 1;
  // Varlen launches (built by varlen_order_kernel before the launch): entry_count[0] query tiles
  // {sequence, row block} of all sequences, most key blocks first; each runs for every head.
  const int2* entries = nullptr;
  const int* entry_count = nullptr;
  // Added to every tile's diagonal: a window's right edge, or kNoEdge (params.h) when a causal
  // kernel runs a non-causal launch.
  int diag_shift = 0;
  // Dynamic tile scheduling (kDynamic): a zeroed counter that the CTAs take their next tile
  // from after their first (blockIdx.x).
  int* tile_counter = nullptr;
};

// Shared-memory plan. Tiles 1024-byte aligned (the swizzle pattern repeats every 1024 bytes, so
// TMA and the wgmma descriptors agree with base offset 0).
template <int D>
struct Smem {
  static constexpr int kQBytes = kBlockM * D;
  static constexpr int kKBytes = kBlockN * D;
  static constexpr int kVBytes = kDV<D> * kBlockN;  // V^T rows of this unit's channels
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kKBytes;
  // Per key pair {s_k[2i], s_k[2i+1], o[2i], o[2i+1]}: the K scales and the FFMA offset
  // -1.5 * 2^23 s_k (or -inf past the sequence end), one 16-byte load per consumer thread.
  static constexpr int kKsBytes = kBlockN * 8;
  static constexpr int kKs = kV + kStages * kVBytes;
  static constexpr int kBars = kKs + kStages * kKsBytes;
  // q_full, q_empty, then per stage k_full, k_empty, v_full, v_ready, v_empty, then per slot of
  // the tile ring tile_full, tile_empty, then qs_empty (fused Q's staging rows read).
  static constexpr int kNumBars = 3 + 5 * kStages + 2 * kTileSlots;
  // The tile ring: the tile index of each slot (the producer's warp 0 publishes, the permute
  // warps and the consumers read).
  static constexpr int kTiles = kBars + 8 * kNumBars;
  // Output staging, one 64-row slice per consumer warpgroup (fp32 at most), rows padded by 16
  // bytes so the accumulator-layout writes of 8 rows fall in different banks; each row leaves
  // by one bulk copy.
  static constexpr int kORowMax = kDV<D> * 4 + 16;
  static constexpr int kOSliceBytes = 64 * kORowMax;
  static constexpr int kO = (kTiles + 4 * kTileSlots + 127) / 128 * 128;
  static constexpr int kBytes = kO + 2 * kOSliceBytes;
  static constexpr int kAlloc = kBytes + 1024;  // room to align the base
  // Fused Q (FwdParams::q_in): the tile's fp16 / bf16 rows as TMA lands them (row-major, 2 D
  // bytes a row, no swizzle), which the consumers quantize into kQ. Only such launches take it.
  static constexpr int kQs = kBytes;
  static constexpr int kQsBytes = kBlockM * D * 2;
  // Head dim 256 takes no fused Q: its staging rows (64 KB) do not fit beside the ring.
  static constexpr int kAllocFusedQ = D == 256 ? kAlloc : kAlloc + kQsBytes;
};

struct Bars {
  uint32_t base;
  __device__ uint32_t q_full() const { return base; }
  __device__ uint32_t q_empty() const { return base + 8; }
  __device__ uint32_t k_full(int s) const { return base + 16 + 40 * s; }
  __device__ uint32_t k_empty(int s) const { return base + 24 + 40 * s; }
  __device__ uint32_t v_full(int s) const { return base + 32 + 40 * s; }
  __device__ uint32_t v_ready(int s) const { return base + 40 + 40 * s; }  // permuted, scales in
  __device__ uint32_t v_empty(int s) const { return base + 48 + 40 * s; }
  __device__ uint32_t tile_full(int i) const { return base + 16 + 40 * kStages + 16 * i; }
  __device__ uint32_t tile_empty(int i) const { return base + 24 + 40 * kStages + 16 * i; }
  __device__ uint32_t qs_empty() const { return base + 16 + 40 * kStages + 16 * kTileSlots; }
};

// Row 0 of a split unit's block of kBlockM partial rows in P.part_o / P.part_ml: the layout is
// [split][tile][row], so combine_kernel finds a tile's splits kBlockM * num_tiles rows apart.
__device__ __forceinline__ int64_t part_row0(const Params& P, int split, int tile) {
  return (int64_t(split) * P.num_tiles + tile) * kBlockM;
}

// One 128-row query tile of one (batch, head). Tiles are numbered head-major (tile = bh * num_m
// + row block), so that static-stride CTAs running at one time share K/V in L2; dynamic kernels
// hand the tiles out in another order (scheduled_unit), but name them by the same numbers.
// A unit of a Split kernel covers key blocks kb0 .. kb0 + n_blocks - 1 of its tile:
// k0, vcol0, skv and diag are then taken relative to key kb0 * kBlockN, so the loads, the tail
// test and the causal mask read the same as for a whole tile.
struct Tile {
  int b, h, hkv, m0, sq, skv, diag, n_blocks;
  int vc0;    // the unit's first value channel (head dim 256's kVPasses; else 0)
  int first;  // Window kernels only: position + first is a row's first key
  int64_t q0, k0, vcol0;
  int bc;  // batch coordinate of the TMA maps (0 for packed varlen tensors)
};

// Passes (kVPasses, head dim 256): unit = (tile * num_splits + split) * Passes + pass, so
// both passes of a tile (or of a key range) come one after the other.
template <bool Causal, bool Split, bool Window = false, int Passes = 1>
__device__ __forceinline__ bool decode_tile(const Params& P, int unit, Tile& T) {
  const FwdParams& p = P.p;
  const int num_m = P.num_m_blocks;
  T.vc0 = 0;
  if constexpr (Passes > 1) {
    const int u = unit / Passes;
    T.vc0 = (unit - u * Passes) * (p.head_dim / Passes);
    unit = u;
  }
  int tile = unit, split = 0;
  if constexpr (Split) {
    tile = unit / P.num_splits;
    split = unit - tile * P.num_splits;
  }
  const int bh = tile / num_m;  // head-major
  const int m_block = tile % num_m;
  T.b = bh / p.heads_q;
  T.h = bh % p.heads_q;
  T.hkv = T.h / (p.heads_q / p.heads_kv);
  T.m0 = m_block * kBlockM;
  T.sq = seq_len(p.cu_q, T.b, p.seqlen_q);
  if (T.m0 >= T.sq) return false;
  // Per-sequence key counts (seqused_kv) are read by the split kernels only: reading them here
  // in the whole-tile kernels rescheduled their consumer loops (-0.8% at 16k, PERF_LOG s31), so
  // launches with counts run the split kernels, with one range where the rule gives one
  // (launch_fwd_sm90).
  T.skv = Split ? kv_len(p, T.b) : seq_len(p.cu_kv, T.b, p.seqlen_kv);
  // Bottom-right causal, per query position (packed GQA rows: tile_order.h).
  T.diag = fwd::causal_diag(T.skv, T.sq, p.row_period) + (Causal ? P.diag_shift : 0);
  const int kv_end =
      Causal ? fwd::causal_key_end(T.m0, min(T.m0 + kBlockM, T.sq) - 1, p.row_period, T.diag, T.skv) : T.skv;
  T.n_blocks = kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0;
  T.q0 = seq_start(p.cu_q, T.b);
  T.k0 = seq_start(p.cu_kv, T.b);
  T.vcol0 = vt_seq_start(p.cu_kv, T.b);
  if constexpr (Split) {
    // Window kernels (a sliding window's left edge, FwdParams::window_left): the blocks left of
    // the tile's lowest row's window are skipped, the ranges cut from the rest.
    int kb_first = 0;
    if constexpr (Window) {
      const int pos_lo = fwd::lowest_position(T.m0, min(T.m0 + kBlockM, T.sq) - 1, p.row_period);
      T.first = first_key(p, 0, fwd::causal_diag(T.skv, T.sq, p.row_period));
      kb_first = min(max(0, pos_lo + T.first) / kBlockN, T.n_blocks);
    }
    int kb0;
    fwd::split_range(T.n_blocks - kb_first, P.num_splits, split, kb0, T.n_blocks);
    const int key0 = (kb_first + kb0) * kBlockN;
    T.k0 += key0;
    T.vcol0 += key0;
    T.skv -= key0;
    T.diag -= key0;
    if constexpr (Window) T.first -= key0;
  }
  T.bc = p.cu_q ? 0 : T.b;
  return true;
}

// Dynamic kernels: the unit (tile, or tile * num_splits + split) that the c-th draw from the counter
// names, or P.num_units past the last. Longest rows first, rank by rank over groups of heads
// (fwd::causal_tile): dense launches rank a head's row blocks by their place (the last rows see
// the most keys), varlen launches by P.entries (nt of them, sorted by key blocks).
template <bool Split, int Passes = 1>
__device__ __forceinline__ int scheduled_unit(const Params& P, int c, int nt) {
  const FwdParams& p = P.p;
  // Head dim 256: both passes of a unit are drawn one after the other (Q and K shared in L2).
  int pass = 0;
  if constexpr (Passes > 1) {
    pass = c % Passes;
    c /= Passes;
  }
  int tile = c, split = 0;
  if constexpr (Split) {
    tile = c / P.num_splits;
    split = c - tile * P.num_splits;
  }
  int bh, m_block;
  if (P.entries) {
    if (tile >= nt * p.heads_q) return P.num_units;
    int h, rank;
    fwd::causal_tile(tile, nt, p.heads_q, P.head_group, h, rank);
    const int2 e = P.entries[rank];  // {sequence, row block}
    bh = e.x * p.heads_q + h;
    m_block = e.y;
  } else {
    if (tile >= P.num_tiles) return P.num_units;
    int rank;
    fwd::causal_tile(tile, P.num_m_blocks, p.batch * p.heads_q, P.head_group, bh, rank);
    m_block = P.num_m_blocks - 1 - rank;
  }
  const int canonical = bh * P.num_m_blocks + m_block;
  const int unit = Split ? canonical * P.num_splits + split : canonical;
  return Passes > 1 ? unit * Passes + pass : unit;
}

// The CTA's sequence of work units (tiles, or tile key ranges in Split kernels) in the dynamic
// kernels, from the producer's warp 0 (which takes the indices from the tile counter) to the
// permute warps and the consumers, through kTileSlots shared-memory slots on mbarriers. Entry k
// is read once by every reader; the sequence ends with an index >= num_units.
struct TileRing {
  Bars bars;
  volatile int* slots;
  __device__ void publish(uint32_t k, int tile) const {
    const uint32_t i = k % kTileSlots;
    ptx::mbarrier_wait(bars.tile_empty(i), ((k / kTileSlots) & 1) ^ 1);
    slots[i] = tile;
    ptx::mbarrier_arrive(bars.tile_full(i));  // release: the slot's store is seen after the wait
  }
  __device__ int pop(uint32_t k) const {
    const uint32_t i = k % kTileSlots;
    ptx::mbarrier_wait(bars.tile_full(i), (k / kTileSlots) & 1);
    const int tile = slots[i];
    ptx::mbarrier_arrive(bars.tile_empty(i));
    return tile;
  }
};

// S (64 x 128 keys, this warpgroup's rows) = Q8 K8^T, D/32 k steps of 32 bytes. The k steps'
// descriptors advance one built descriptor per tile (building one per step put ~7 uniform
// instructions per wgmma into the turn). Head dim 256: steps 4-7 read the tiles' second
// 128-byte half, kHalf bytes on (the Q and K tiles both have 128 rows per half).
template <int D>
__device__ __forceinline__ void issue_qk(int (&s)[kBlockN / 2], uint32_t sQ, uint32_t sK) {
  static_assert(kBlockM == kBlockN, "one half offset for the Q and K tiles");
  constexpr uint32_t kHalf = kBlockN * kQKRow<D>;
  const uint64_t dq = ptx::wgmma_desc(sQ, kQKRow<D>), dk = ptx::wgmma_desc(sK, kQKRow<D>);
  auto at = [](int kk) { return (kk / 4) * kHalf + 32 * (kk % 4); };
  ptx::wgmma_fence();
  ptx::wgmma_m64n128k32_s8s8_ss_init(s, dq, dk);
#pragma unroll
  for (int kk = 1; kk < D / 32; ++kk)
    ptx::wgmma_m64n128k32_s8s8_ss(s, ptx::wgmma_desc_advance(dq, at(kk)), ptx::wgmma_desc_advance(dk, at(kk)));
  ptx::wgmma_commit();
}

// acc (64 x D) = P8 V8 over the block's 128 keys (V^T columns permuted, see the top).
template <int D>
__device__ __forceinline__ void issue_pv(int (&acc)[D / 2], const uint32_t (&pf)[kBlockN / 32][4],
                                         uint32_t sV) {
  const uint64_t dv = ptx::wgmma_desc(sV, kBlockN);
  ptx::wgmma_fence();
#pragma unroll
  for (int c = 0; c < kBlockN / 32; ++c) {
    const uint64_t desc = ptx::wgmma_desc_advance(dv, 32 * c);
    if constexpr (D == 128) {
      if (c == 0) ptx::wgmma_m64n128k32_u8s8_rs_init(acc, pf[c], desc);
      else ptx::wgmma_m64n128k32_u8s8_rs(acc, pf[c], desc);
    } else {
      if (c == 0) ptx::wgmma_m64n64k32_u8s8_rs_init(acc, pf[c], desc);
      else ptx::wgmma_m64n64k32_u8s8_rs(acc, pf[c], desc);
    }
  }
  ptx::wgmma_commit();
}

// k index 4t+i of every 16 holds key 2t + (i & 1) + 8 (i >> 1): word t of the output takes the
// byte pairs {2t, 2t+1} and {8+2t, 9+2t} of the input chunk.
__device__ __forceinline__ uint4 permute_chunk(uint4 x) {
  return make_uint4(__byte_perm(x.x, x.z, 0x5410), __byte_perm(x.x, x.z, 0x7632),
                    __byte_perm(x.y, x.w, 0x5410), __byte_perm(x.y, x.w, 0x7632));
}

// Epilogue of one consumer warpgroup's 64 rows through its shared-memory slice `so` (address
// so_addr): O * v_scale / l converted to the output type and written in the accumulator layout,
// then one thread per row sends the row to global memory with an asynchronous bulk copy, and
// the warpgroup goes on to its next tile while the copies drain (stores from registers move 8
// rows x 16 bytes per warp instruction; H200, D=128, N=4k: 519 -> 527-535 TOPS). Before the
// slice is rewritten, the copies of the previous tile must have read it (bulk_wait_read by the
// issuing threads, then this warpgroup's named barrier `bar`).
// A split unit (Split) takes the same path with other destinations: its rows' O * v_scale in
// fp32, not divided by l, to P.part_o, and (m_run, l) to P.part_ml, for combine_kernel.
// DFull: the head dim, the row length of P.part_o (head dim 256: D = kDV channels per pass,
// written at T.vc0).
template <int D, bool Split, int DFull = D, typename Mark>
__device__ __forceinline__ void store_rows(const Params& P, const Tile& T, int unit, int cw, int ctid, int bar,
                                           uint8_t* so, uint32_t so_addr, const int (&row)[2],
                                           const float (&o)[D / 8][4], const float (&l_part)[2],
                                           const float (&m_run)[2], const float2 (&v2)[D / 8],
                                           const float (&z2)[2], Mark&& mark) {
  const FwdParams& p = P.p;
  // Split kernels with one range (launches with key counts that do not split) write final rows.
  const bool partial = Split && P.num_splits > 1;
  const int lane = ctid % 32, t = lane % 4, wr = ctid % 128;
  // Who issues the 64 row copies. cp.async.bulk takes uniform operands, so a warp issues its
  // lanes' copies one after another. D = 128: lanes 0-15 of each of the four warps, which
  // finish sooner than two warps of 32 (H200: +1-2% at N=1k and causal, equal at 16k).
  // D = 64 keeps threads 0-63: there the change rescheduled ptxas's hot loop, measured 2%
  // slower at N=16k (docs/PERF_LOG.md, s18).
  constexpr bool kSpread = D == 128;
  const bool copier = kSpread ? (wr & 16) == 0 : wr < 64;
  const int crow = kSpread ? ((wr >> 5) << 4) | (wr & 15) : wr;
  // The output type is tested per element pair below; read from the parameter there, ptxas
  // rematerializes it as a constant load per pair (32 LDC per tile at D=128). A register copy
  // removes those loads and leaves the hot loop's instruction order as it was (sass-loop-diff:
  // all four loops, registers renamed only); H200: causal 1k +4%, 1k +1%, the rest equal (s19).
  const uint32_t odt = ptx::opaque_uniform(static_cast<uint32_t>(partial ? DType::f32 : p.out_dtype));
  const int es = odt == static_cast<uint32_t>(DType::f32) ? 4 : 2;
  const int row_bytes = D * es, stride = row_bytes + 16;
  float inv_l[2], l_full[2], lse2[2];
  fwd::row_sums(l_part, l_full, inv_l);
  int64_t prow0 = 0;  // row 0 of this unit's block of partial rows
  if (partial) {
    const int ptile = unit / P.num_splits;
    prow0 = part_row0(P, unit - ptile * P.num_splits, ptile);
    inv_l[0] = inv_l[1] = 1.f;
  }
  // Sinks run the split kernels (a sink in the whole-tile kernels' epilogue would move their
  // hot loop, s14 / s15): final rows fold them in here (z2: load_sinks, with v_scale), partial
  // rows in combine_kernel.
  const bool sinks = Split && !partial && p.sinks != nullptr;
  if (sinks) fwd::fold_sinks(l_full, m_run, z2, inv_l, lse2);
  if (copier) ptx::bulk_wait_read();  // the previous tile's rows have left the slice
  ptx::named_bar_sync(bar, 128);
  mark(8);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    uint8_t* srow = so + (row[r] - T.m0 - cw * 64) * stride;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int d = dn * 8 + 2 * t;
      const float a = o[dn][2 * r] * v2[dn].x * inv_l[r], b = o[dn][2 * r + 1] * v2[dn].y * inv_l[r];
      if (es == 4) *reinterpret_cast<float2*>(srow + d * 4) = make_float2(a, b);
      else if (odt == static_cast<uint32_t>(DType::bf16)) *reinterpret_cast<__nv_bfloat162*>(srow + d * 2) = __floats2bfloat162_rn(a, b);
      else *reinterpret_cast<__half2*>(srow + d * 2) = __floats2half2_rn(a, b);
    }
  }
  mark(9);
  ptx::fence_proxy_async_shared();  // the bulk copies read the slice through the async proxy
  ptx::named_bar_sync(bar, 128);
  mark(10);
  if (copier && T.m0 + cw * 64 + crow < T.sq) {  // rows inside the sequence
    const int64_t idx = offset(p.o_st, T.b, T.h, T.q0 + T.m0 + cw * 64 + crow);
    char* dst = static_cast<char*>(p.out) + (idx + T.vc0) * es;  // head dim 256: the pass's channels
    if (partial) dst = reinterpret_cast<char*>(P.part_o + (prow0 + cw * 64 + crow) * DFull + T.vc0);
    ptx::bulk_store(dst, so_addr + crow * stride, row_bytes);
    ptx::bulk_commit();
  }
  if (T.vc0 != 0) {
    // Head dim 256: the other pass of the tile writes the LSE (its P8 and l are the same).
  } else if (sinks) {
    fwd::write_lse2(p, T.b, T.h, T.q0, T.sq, row, lse2, t);
  } else if (!partial) {
    fwd::write_lse(p, T.b, T.h, T.q0, T.sq, row, l_full, m_run, t);
  } else if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row[r] < T.sq) P.part_ml[prow0 + row[r] - T.m0] = make_float2(m_run[r], l_full[r]);
  }
}

// Merges the key-range splits of every row (fwd::merge_split_row). One warp per row, 4 rows per
// block of 128 threads.
template <int D, bool Causal>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ Params P) {
  ptx::griddepcontrol_wait();  // fwd_kernel's partial rows (a programmatic dependent launch)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = blockIdx.x / (kBlockM / 4), lr = (blockIdx.x % (kBlockM / 4)) * 4 + warp;
  Tile T;
  if (!decode_tile<Causal, true>(P, tile * P.num_splits, T) || T.m0 + lr >= T.sq) return;
  const int64_t prow = part_row0(P, 0, tile) + lr;
  fwd::merge_split_row<D>(P.p, P.part_ml + prow, P.part_o + prow * D, int64_t(P.num_tiles) * kBlockM,
                          P.num_splits, lane, T.b, T.h, T.q0 + T.m0 + lr);
}

// The permute warps' work for one tile's key blocks over pages of 16, 32 or 64 tokens
// (SmallPages, see fwd_kernel): thread pt takes 16-key piece pt % 8 of every block and rows
// (channels) pt / 8, + 12, ... of its V^T: it waits until the consumers free the stage, copies
// those chunks from the piece's page into the places a whole-block TMA box would have put them
// (the 128-byte swizzle: chunk c of row r at c ^ (r % 8)), meanwhile loads the K scales of the
// piece's keys pt / 8 and (pt / 8 < 4) 12 + pt / 8, then permutes its own chunks and releases
// the stage as the TMA path does. `it` counts the CTA's key blocks (the ring position).
// These warps share each scheduler with two consumer warps, whose loop is bound by issue and
// latency (PERF_LOG s36 / s37): every instruction here is taken from them, so both loops are
// unrolled over the thread's fixed rows (the swizzle of row r0 + 12 i alternates between two
// chunk columns) and everything but the page's address is computed once per tile.
// The copies allocate in L1 (.ca): over 16-token pages channels c and c + 1 share a 32-byte
// sector but land a tile row apart, and an L2 read per half doubled the sectors (ncu, H200:
// L2 sectors 94.8M -> 66.3M for a prompt chunk; kernel time 1-3% better, PERF_LOG s38).
template <int D>
__device__ __forceinline__ void permute_small_pages(const Params& P, const Tile& T, uint8_t* smem, uint32_t base,
                                                 const Bars& bars, int pt, int& it) {
  using S = Smem<D>;
  constexpr int DV = kDV<D>;  // V^T rows of the unit (head dim 256: its pass's 128 channels)
  constexpr int kPieces = kBlockN / 16, kRowStep = kPermuteThreads / kPieces;
  constexpr int kRows = (DV + kRowStep - 1) / kRowStep;  // the most rows a thread copies
  static_assert(kPermuteThreads % kPieces == 0 && kRowStep >= 16 - kRowStep, "two K scales per thread cover a piece");
  static_assert(kRowStep % 8 == 4, "rows r0 + kRowStep i alternate between two swizzle columns");
  const FwdParams& p = P.p;
  fwd::SmallPages small_pages;
  small_pages.start(p, T.b);
  const int piece = pt % kPieces, r0 = pt / kPieces;
  const bool last_row = r0 + (kRows - 1) * kRowStep < DV;  // the thread has a kRows-th row
  // Blocks start at multiples of 128 keys (T.k0 too), so the piece's first key sits at the same
  // place of its page in every block.
  const int tok = small_pages.tok(16 * piece);
  const int8_t* const v_thread = p.vt8 + T.hkv * p.vt_st.hs + tok + (T.vc0 + r0) * p.vt_st.ts;
  const int64_t v_step = kRowStep * p.vt_st.ts;
  const float* const ks_head = p.k_scale + T.hkv * p.ks_st.hs + tok;
  // Row r0 + 12 i of the thread: whether it has it, and its chunk's byte offset in a stage's V^T
  // tile (the even and odd rows' offsets, plus 12 rows per i).
  const int off_even = r0 * kBlockN + ((piece ^ (r0 & 7)) << 4), off_odd = off_even ^ (4 << 4);
  auto has_row = [&](int i) { return i < kRows - 1 || last_row; };
  auto row_off = [&](int i) { return ((i & 1) ? off_odd : off_even) + i * kRowStep * kBlockN; };
  for (int n = 0; n < T.n_blocks; ++n, ++it) {
    const int st = it % kStages;
    const uint32_t ph = (it / kStages) & 1;
    // The piece's first key, from the unit's first (T.k0; T.skv counts from there too).
    const int key = n * kBlockN + 16 * piece;
    const int pg = small_pages.page(int(T.k0) + key, key < T.skv);
    const int64_t page = max(pg, 0);
    ptx::mbarrier_wait(bars.v_empty(st), ph ^ 1);  // the consumers are done with the stage
    const uint32_t v_tile = base + S::kV + st * S::kVBytes;
    const int8_t* src = v_thread + page * p.vt_st.bs;
#pragma unroll
    for (int i = 0; i < kRows; ++i, src += v_step)
      if (has_row(i)) ptx::cp_async_16B_ca(v_tile + row_off(i), src, pg >= 0);
    ptx::cp_async_commit();
    float ks[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = r0 + j * kRowStep;  // key of the piece
      ks[j] = pg >= 0 && i < 16 && key + i < T.skv ? __ldg(ks_head + page * p.ks_st.bs + i) : 0.f;
    }
    float* sKs = reinterpret_cast<float*>(smem + S::kKs + st * S::kKsBytes);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = r0 + j * kRowStep, kb = 16 * piece + i;  // key within the block
      if (i >= 16) continue;
      sKs[4 * (kb / 2) + (kb & 1)] = ks[j];
      sKs[4 * (kb / 2) + 2 + (kb & 1)] = key + i < T.skv ? -ptx::kMagic * ks[j] : fwd::neg_inf();
    }
    ptx::cp_async_wait<0>();
    uint8_t* const v = smem + S::kV + st * S::kVBytes;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (has_row(i)) {
        uint4* c = reinterpret_cast<uint4*>(v + row_off(i));
        *c = permute_chunk(*c);
      }
    }
    ptx::fence_proxy_async_shared();  // the wgmma reads V^T through the async proxy
    ptx::mbarrier_arrive(bars.v_ready(st));
  }
}

// TMA's 128-byte (D = 128) or 64-byte (D = 64) swizzle of byte o of a dense tile of D-byte
// rows, as the wgmma descriptors read it: 16-byte chunk bits 4-6 (4-5) ^= line bits 7-9 (7-8).
template <int D>
__device__ __forceinline__ int tma_swizzle(int o) {
  return D == 128 ? o ^ (((o >> 7) & 7) << 4) : o ^ (((o >> 7) & 3) << 4);
}

// Fused Q (FwdParams::q_in): per-token INT8 of this thread's two rows (wq * 16 + g + 8 r) of its
// warpgroup's 64-row slice, from their fp16 / bf16 copy `rows` (row-major, as TMA lands them)
// into `q8` (the slice of the Q tile, swizzled as TMA writes q8 tiles), with the quantizer's
// rounding (numerics.h, row_quant.cuh): Q8 and scale are the bits quantize() gives. The row's
// four lanes t hold channel groups t, t + 4, .. (8 channels each, so the row max takes two
// shuffles, as the softmax's do); lanes of odd g take them in the other order, so that the
// 16-byte loads of a quarter warp (rows g and g + 1, 2 D bytes apart) hit eight distinct
// bank groups.
template <int D, typename T>
__device__ __forceinline__ void quantize_q_rows(const uint8_t* rows, uint8_t* q8, int wq, int g, int t,
                                                float (&scale)[2]) {
  constexpr int kGroups = D / 32;  // channel groups per lane
  // D=128 reads each row once: its D / 4 values per lane stay packed in registers (D / 8 of
  // them; O and the scores are not live before the tile's first QK) between the max, taken on
  // packed pairs (quant::absmax_pairs: exact, NaN-skipping as fmaxf), and the rounding (PERF_LOG
  // q26: e2e 4k -1.3%, 16k -1%). D=64 keeps two passes over shared memory (the max, then the
  // rounding): the one-pass code re-rolled its consumer loop, 0.7-1.4% slower (same call).
  constexpr bool kOnePass = D == 128;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wq * 16 + g + 8 * r;
    auto vec = [&](int k) {
      return *reinterpret_cast<const uint4*>(rows + row * D * 2 + 16 * (t + 4 * (k ^ (g & 1))));
    };
    uint4 v[kOnePass ? kGroups : 1];
    float amax = 0.f;
    if constexpr (kOnePass) {
#pragma unroll
      for (int k = 0; k < kGroups; ++k) v[k] = vec(k);
      uint32_t m2[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int k = 0; k < kGroups; ++k) quant::absmax_pairs<T>(v[k], m2);
      float m[8];
      quant::to_float8<T>(make_uint4(m2[0], m2[1], m2[2], m2[3]), m);
      amax = m[0];
#pragma unroll
      for (int e = 1; e < 8; ++e) amax = fmaxf(amax, m[e]);
    } else {
#pragma unroll
      for (int k = 0; k < kGroups; ++k) {
        float x[8];
        quant::to_float8<T>(vec(k), x);
#pragma unroll
        for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x[e]));
      }
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float inv = quant_inv_scale(amax);
    scale[r] = quant_scale(amax);
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
      float x[8];
      quant::to_float8<T>(kOnePass ? v[k] : vec(k), x);
      uint32_t qb[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) qb[e] = quant::q8_bits(x[e], inv);
      *reinterpret_cast<uint2*>(q8 + tma_swizzle<D>(row * D + 8 * (t + 4 * (k ^ (g & 1))))) =
          make_uint2(ptx::pack_low_bytes(qb[0], qb[1], qb[2], qb[3]), ptx::pack_low_bytes(qb[4], qb[5], qb[6], qb[7]));
    }
  }
}

// Split: the tiles' key blocks are split into P.num_splits ranges (work units), whose partial
// results combine_kernel merges (launches with fewer tiles than SMs, fwd_sm90_launch.cu).
// Paged (FwdParams::block_table; split kernels only, which read per-sequence key counts): the TMA
// maps describe the page pools, and each key block's K and V^T boxes and K scales are taken
// from the block's page (fwd::PageWalk, each table entry read a block ahead). A page outside
// the pool becomes a box past the map's last page, which TMA fills with zeros.
// SmallPages (with Paged; pages of 16, 32 or 64 tokens, vLLM's block sizes): a key block spans
// 128 / page_size pages, each a whole page (blocks start at multiples of 128 keys). Warp 0 loads
// K as one box per page (the map's box is a page; boxes at page-sized offsets of the stage keep
// the swizzle of one whole-block box, which follows the shared-memory address). V^T cannot come
// by TMA: a page's 16-64 keys are a fraction of the tile's 128-byte rows (boxes into a staging
// slot, moved by the permute warps, were slower: 16- or 32-byte TMA rows). The permute warps copy
// it instead (cp.async, zero-filled outside the pool), each thread the chunks of one 16-key piece
// it then permutes, so one table entry per thread and block serves its V^T chunks and K scales.
// Only the producer warpgroup's code differs; the consumers' is the paged kernels'.
// Window (causal split kernels only): sliding windows (FwdParams::window_left), each tile's
// key blocks starting at its lowest row's window and a per-score mask on the left edge's
// blocks. An axis of its own: in the causal split kernels the left edge moved their loops
// (sass-loop-diff order similarity 0.67) and cost a prompt chunk 3.6% (H200, PERF_LOG s33).
template <int D, bool Causal, bool Split, bool Paged, bool Window, bool SmallPages = false, bool Softcap = false>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const __grid_constant__ Params P) {
  static_assert(!SmallPages || Paged, "small pages are paged");
  static_assert(!Softcap || (Causal && Split && Window), "soft-capping runs the window kernels");
  constexpr int DV = kDV<D>, kPasses = kVPasses<D>;
  // Split launches: the combine kernel (a programmatic dependent, cuda::launch_dependent) may
  // start on the SMs this grid leaves free and wait for its end there (PERF_LOG d13).
  if constexpr (Split) ptx::griddepcontrol_launch_dependents();
  using S = Smem<D>;
  const FwdParams& p = P.p;
  constexpr int kMagicBits = 0x4B400000;  // 1.5 * 2^23: int32 x + these bits read as 1.5*2^23 + x
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = ptx::smem_u32(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  uint8_t* const smem = smem_raw + (base - raw);
  const Bars bars{base + S::kBars};
  const int wg = threadIdx.x / 128;
  // Fused Q: TMA brings the fp16 / bf16 rows, the consumers quantize them (quantize_q_rows).
  const bool fused_q = D != 256 && p.q_in != nullptr;
  const TileRing ring{bars, reinterpret_cast<volatile int*>(smem + S::kTiles)};

  if (threadIdx.x == 0) {
    ptx::mbarrier_init(bars.q_full(), 1);
    ptx::mbarrier_init(bars.q_empty(), kConsumerThreads);
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(bars.k_full(s), 1);
      ptx::mbarrier_init(bars.k_empty(s), kConsumerThreads);
      ptx::mbarrier_init(bars.v_full(s), 1);
      ptx::mbarrier_init(bars.v_ready(s), kPermuteThreads);
      ptx::mbarrier_init(bars.v_empty(s), kConsumerThreads);
    }
    for (int i = 0; i < kTileSlots; ++i) {
      ptx::mbarrier_init(bars.tile_full(i), 1);
      ptx::mbarrier_init(bars.tile_empty(i), kTileReaders);
    }
    ptx::mbarrier_init(bars.qs_empty(), kConsumerThreads);
    ptx::fence_barrier_init();
  }
  // A programmatic dependent launch (cuda::launch_dependent): the set-up above overlapped the
  // previous kernel's end; its writes are visible past this wait.
  ptx::griddepcontrol_wait();
  __syncthreads();

  if (wg == 0) {
    // ======================= producer warpgroup =======================
    ptx::setmaxnreg_dec<kProducerRegs>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp == 0) {
      if (lane != 0) return;
      ptx::prefetch_tensormap(&P.tm_q);
      ptx::prefetch_tensormap(&P.tm_k);
      if constexpr (!SmallPages) ptx::prefetch_tensormap(&P.tm_v);  // small pages: no V^T map
      // The loads of one tile: Q once the consumers are done with the previous tile's, then K and
      // V^T of each key block into the ring. Fused Q: the fp16 / bf16 rows go to their staging
      // area, free again once the consumers have quantized them at the previous tile's start
      // (qs_empty), so they land during that tile; q_empty then has no waiter.
      // Q or K rows into a tile of `rows` rows: one box, or at head dim 256 one per 128-byte half
      // (kQKRow), the halves rows * kQKRow bytes apart.
      auto load_rows = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int rows, int c1, int c2, int c3) {
#pragma unroll
        for (int h = 0; h < D / kQKRow<D>; ++h)
          ptx::tma_load_4d(dst + h * rows * kQKRow<D>, map, bar, h * kQKRow<D>, c1, c2, c3);
      };
      auto load_tile = [&](const Tile& T, int& it, int& tc) {
        ptx::mbarrier_wait(fused_q ? bars.qs_empty() : bars.q_empty(), (tc & 1) ^ 1);
        ptx::mbarrier_arrive_expect_tx(bars.q_full(), fused_q ? S::kQsBytes : S::kQBytes);
        load_rows(base + (fused_q ? S::kQs : S::kQ), &P.tm_q, bars.q_full(), kBlockM, int(T.q0 + T.m0), T.h, T.bc);
        ++tc;
        // Paged: the boxes' coordinates are the block's first token in its page and the page (an
        // entry outside the pool: the page past the last one).
        fwd::PageWalk<kBlockN> walk;
        int tok = 0, pg = 0;
        fwd::SmallPages small_pages;
        if constexpr (SmallPages) {
          small_pages.start(p, T.b);
        } else if constexpr (Paged) {
          walk.start(p, T.b, int(T.k0 / kBlockN));
          tok = walk.rd_tok;
          pg = walk.read(p);
        }
        for (int n = 0; n < T.n_blocks; ++n, ++it) {
          const int st = it % kStages;
          const uint32_t ph = (it / kStages) & 1;
          if constexpr (SmallPages) {
            // One K box per page, the entries read before the wait (which hides their latency);
            // a page outside the pool or past the sequence: the box past the last page (zeros).
            constexpr int kMaxBoxes = kBlockN / 16;
            const int rows = p.page_size, first = n * kBlockN;  // keys from the unit's first (T.k0)
            int pages[kMaxBoxes];
#pragma unroll
            for (int j = 0; j < kMaxBoxes; ++j) {
              const int key = first + j * rows;
              const int e = j * rows < kBlockN ? small_pages.page(int(T.k0) + key, key < T.skv) : -1;
              pages[j] = e < 0 ? int(p.num_pages) : e;
            }
            ptx::mbarrier_wait(bars.k_empty(st), ph ^ 1);
            ptx::mbarrier_arrive_expect_tx(bars.k_full(st), S::kKBytes);
#pragma unroll
            for (int j = 0; j < kMaxBoxes; ++j)
              if (j * rows < kBlockN)
                load_rows(base + S::kK + st * S::kKBytes + j * rows * kQKRow<D>, &P.tm_k, bars.k_full(st), kBlockN, 0,
                          T.hkv, pages[j]);
            continue;
          }
          const int key = tok, page = pg < 0 ? int(p.num_pages) : pg;
          if constexpr (Paged) {
            if (n + 1 < T.n_blocks) {
              tok = walk.rd_tok;
              pg = walk.read(p);
            }
          }
          ptx::mbarrier_wait(bars.k_empty(st), ph ^ 1);
          ptx::mbarrier_arrive_expect_tx(bars.k_full(st), S::kKBytes);
          load_rows(base + S::kK + st * S::kKBytes, &P.tm_k, bars.k_full(st), kBlockN,
                    Paged ? key : int(T.k0 + n * kBlockN), T.hkv, Paged ? page : T.bc);
          ptx::mbarrier_wait(bars.v_empty(st), ph ^ 1);
          ptx::mbarrier_arrive_expect_tx(bars.v_full(st), S::kVBytes);
          ptx::tma_load_4d(base + S::kV + st * S::kVBytes, &P.tm_v, bars.v_full(st),
                           Paged ? key : int(T.vcol0 + n * kBlockN), T.vc0, T.hkv,
                           Paged ? page : T.bc);
        }
      };
      // Dynamic: each tile index is taken from the counter a tile ahead of its publication, so
      // the atomic's round trip hides behind a tile's loads. Static: tile, tile + gridDim.x, ...
      int it = 0, tc = 0;
      if constexpr (kDynamic<Causal>) {
        const int nt = P.entries ? *P.entry_count : 0;
        auto fetch = [&] {
          return scheduled_unit<Split, kPasses>(P, static_cast<int>(gridDim.x) + atomicAdd(P.tile_counter, 1), nt);
        };
        int cur = scheduled_unit<Split, kPasses>(P, blockIdx.x, nt);
        int nxt = cur < P.num_units ? fetch() : P.num_units;
        ring.publish(0, cur);
        ring.publish(1, nxt);
        for (uint32_t k = 0; cur < P.num_units; ++k) {
          const int nxt2 = nxt < P.num_units ? fetch() : P.num_units;
          Tile T;
          if (decode_tile<Causal, Split, Window, kPasses>(P, cur, T) && T.n_blocks > 0) load_tile(T, it, tc);
          ring.publish(k + 2, nxt2);
          cur = nxt;
          nxt = nxt2;
        }
      } else {
        for (int tile = blockIdx.x; tile < P.num_units; tile += gridDim.x) {
          Tile T;
          if (decode_tile<Causal, Split, Window, kPasses>(P, tile, T) && T.n_blocks > 0) load_tile(T, it, tc);
        }
      }
    } else {
      // Warps 1-3: per-key K scales (plain loads, issued before the wait so their latency
      // hides behind it) and the V^T column permutation, then release the stage to consumers.
      const int pt = threadIdx.x - 32;
      int it = 0, tile = blockIdx.x;
      for (uint32_t k = 0;; ++k) {
        if constexpr (kDynamic<Causal>) tile = ring.pop(k);
        else if (k > 0) tile += gridDim.x;
        if (tile >= P.num_units) break;
        Tile T;
        if (!decode_tile<Causal, Split, Window, kPasses>(P, tile, T) || T.n_blocks == 0) continue;
        const float* ks_g = p.k_scale + offset(p.ks_st, T.b, T.hkv, T.k0);
        // Paged: the K scales of the next block's page (walked as warp 0 walks it), and whether
        // that page is in the pool (else its keys' scales are 0, as its K and V^T are).
        fwd::PageWalk<kBlockN> walk;
        const float* ks_next = nullptr;
        bool in_pool = true;
        auto next_scales = [&] {
          const int tok = walk.rd_tok, pg = walk.read(p);
          in_pool = pg >= 0;
          ks_next = p.k_scale + T.hkv * p.ks_st.hs + max(pg, 0) * p.ks_st.bs + tok;
        };
        if constexpr (SmallPages) {
          permute_small_pages<D>(P, T, smem, base, bars, pt, it);
          continue;
        }
        if constexpr (Paged) {
          walk.start(p, T.b, int(T.k0 / kBlockN));
          next_scales();
        }
        for (int n = 0; n < T.n_blocks; ++n, ++it) {
          const int st = it % kStages;
          const uint32_t ph = (it / kStages) & 1;
          // Key i of block n: ks_g[key] (paged: ks_b[i] of the block's page, where in the pool).
          const float* const ks_b = ks_next;
          const bool ok = in_pool;
          if constexpr (Paged)
            if (n + 1 < T.n_blocks) next_scales();
          float ks[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = pt + r * kPermuteThreads, key = n * kBlockN + i;
            ks[r] = (ok && i < kBlockN && key < T.skv) ? (Paged ? ks_b[i] : ks_g[key]) : 0.f;
          }
          ptx::mbarrier_wait(bars.v_full(st), ph);
          float* sKs = reinterpret_cast<float*>(smem + S::kKs + st * S::kKsBytes);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = pt + r * kPermuteThreads;
            if (i >= kBlockN) continue;
            sKs[4 * (i / 2) + (i & 1)] = ks[r];
            sKs[4 * (i / 2) + 2 + (i & 1)] = n * kBlockN + i < T.skv ? -ptx::kMagic * ks[r] : fwd::neg_inf();
          }
          uint4* v = reinterpret_cast<uint4*>(smem + S::kV + st * S::kVBytes);
#pragma unroll 2
          for (int c = pt; c < S::kVBytes / 16; c += kPermuteThreads) v[c] = permute_chunk(v[c]);
          ptx::fence_proxy_async_shared();  // the wgmma reads V^T through the async proxy
          ptx::mbarrier_arrive(bars.v_ready(st));
        }
      }
    }
    return;
  }

  // ======================= consumer warpgroups =======================
  ptx::setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;  // rows 64 cw .. 64 cw + 63 of the tile
  const int ctid = threadIdx.x - 128;
  const int wq = (ctid / 32) & 3, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // Turns: each warpgroup waits on its own named barrier and opens the other's.
  const int my_bar = static_cast<int>(ptx::opaque_uniform(1 + cw)), other_bar = 3 - my_bar;
  auto turn_begin = [&] { if (INTFA_SM90_PINGPONG) ptx::named_bar_sync(my_bar, kConsumerThreads); };
  auto turn_end = [&] { if (INTFA_SM90_PINGPONG) ptx::named_bar_arrive(other_bar, kConsumerThreads); };
  const float kNegInf = fwd::neg_inf();
  const bool block_local = p.scheme == Scheme::accurate;
  const float levels = block_local ? 255.f : 127.f;
  const float inv_levels = block_local ? 1.f / 255.f : 1.f / 127.f;
  const uint32_t sQw = base + S::kQ + cw * 64 * kQKRow<D>;
  if (INTFA_SM90_PINGPONG && cw == 1) ptx::named_bar_arrive(1, kConsumerThreads);  // WG 0 first

  int s[kBlockN / 2];  // scores of the current block (accumulator layout)
  int acc[DV / 2];     // P8 V8 of the current block (this unit's value channels)
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) s[i] = 0;

#if INTFA_SM90_TRACE
  auto trace_at = [&](int i, int ph) {
    if (blockIdx.x == 0 && (ctid & 127) == 0 && i >= 0 && i < kTraceIters) g_trace[cw][i][ph] = clock64();
  };
#else
  auto trace_at = [](int, int) {};
#endif
  // The CTA's next tile with rows (an index >= P.num_units at the end): from the tile ring, or
  // from `from` on in the static stride. Tiles without keys come here too: their rows get zeros
  // and LSE -inf.
  uint32_t tk = 0;
  auto next_tile = [&](int from, Tile& T) {
    if constexpr (kDynamic<Causal>) {
      for (;;) {
        const int tile = ring.pop(tk++);
        if (tile >= P.num_units || decode_tile<Causal, Split, Window, kPasses>(P, tile, T)) return tile;
      }
    } else {
      for (int tile = from; tile < P.num_units; tile += gridDim.x)
        if (decode_tile<Causal, Split, Window, kPasses>(P, tile, T)) return tile;
      return P.num_units;
    }
  };
  // q_scale of this thread's rows of tile T (1 past the end): global loads issued before the
  // previous tile's epilogue and used (times softmax scale * log2 e) after the first QK issue,
  // so their latency hides behind both.
  auto load_rowf = [&](const Tile& T, float (&rowf)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = T.m0 + cw * 64 + wq * 16 + g + 8 * r;
      rowf[r] = row < T.sq ? p.q_scale[offset(p.qs_st, T.b, T.h, T.q0 + row)] : 1.f;
    }
  };
  int it = 0, tc = 0;
  Tile T;
  float rowf[2];
  int tile = next_tile(blockIdx.x, T);
  if (tile < P.num_units && !fused_q) load_rowf(T, rowf);
  while (tile < P.num_units) {
    // Causal: key_last[r] is the last key row r sees, warp_key_last the lowest of the warp's 16
    // rows (blocks past it need the mask). Both are fixed per tile, so the loop keeps one compare
    // per score as with row + diag.
    // Window kernels: key_first[r] is the first key row r sees (a sliding window's left edge),
    // warp_key_first the highest of the warp's rows (blocks before it need the mask too).
    int row[2], key_last[2], key_first[2] = {0, 0}, warp_key_first = 0;
    float m_run[2], l_part[2];
    // Soft-capping at D=64: keys past the sequence (-inf from the producer's offsets, which the
    // tanh then turns into -1) are masked here too, by a diagonal no later than the last key, so
    // softcap_scores drops its compare and select per score. H200, same call: D=64 4k +9.5%;
    // at D=128 the same change grew the spills (196 -> 280 B) and cost 3% (PERF_LOG s42).
    constexpr bool kTailByDiag = Softcap && D == 64;
    const int key_end = kTailByDiag ? T.skv - 1 : INT_MAX;
    const int warp_key_last = min(
        fwd::lowest_position(T.m0 + cw * 64 + wq * 16, T.m0 + cw * 64 + wq * 16 + 15, p.row_period) + T.diag, key_end);
    if constexpr (Window) {
      int lo, hi;
      fwd::row_positions(T.m0 + cw * 64 + wq * 16, T.m0 + cw * 64 + wq * 16 + 15, p.row_period, lo, hi);
      warp_key_first = hi + T.first;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[r] = T.m0 + cw * 64 + wq * 16 + g + 8 * r;
      key_last[r] = min(fwd::row_position(row[r], p.row_period) + T.diag, key_end);
      if constexpr (Window) key_first[r] = fwd::row_position(row[r], p.row_period) + T.first;
      m_run[r] = kNegInf;
      l_part[r] = 0.f;
    }
    float cap_a[2], cap_b[2];  // Softcap: the rows' factors (fwd::softcap_row)
    float2 v2[DV / 8];  // v_scale of the thread's channels
    float o[DV / 8][4];
#pragma unroll
    for (int dn = 0; dn < DV / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;

    const int nb = T.n_blocks;
    // Unsigned: the ring position of block n is then a mask and a shift for kStages = 2.
    auto stage = [&](int n) { return static_cast<int>(static_cast<uint32_t>(it + n) % kStages); };
    auto phase = [&](int n) { return (static_cast<uint32_t>(it + n) / kStages) & 1u; };
    auto mark = [&](int n, int ph) { trace_at(it + n, ph); };
    // QK of block n into s (K stage n must have landed), and its retirement: K stage n, and after
    // the last block Q, go back to the producer.
    auto issue_qk_block = [&](int n, bool k_ok) {
      if (!k_ok) ptx::mbarrier_wait(bars.k_full(stage(n)), phase(n));
      issue_qk<D>(s, sQw, base + S::kK + stage(n) * S::kKBytes);
    };
    auto qk_done = [&](int n) {
      ptx::fence_regs(s);
      ptx::mbarrier_arrive(bars.k_empty(stage(n)));
      if (n == nb - 1) ptx::mbarrier_arrive(bars.q_empty());
    };
    // Softmax of block n from its scores in s: P8 fragments, the block's factors, and l. v_ok:
    // V-ready of block n was already seen complete (EARLY_TEST); k_next_ok receives the early look
    // at block n + 1's K, taken after the row maxima so that its round trip hides in the exp2 phase.
    auto softmax = [&](int n, bool v_ok, bool& k_next_ok, uint32_t (&pf)[kBlockN / 32][4], float (&alpha)[2],
                       float (&cfac)[2]) {
      mark(n, 0);
      if (!v_ok) ptx::mbarrier_wait(bars.v_ready(stage(n)), phase(n));
      mark(n, 1);
      const uint32_t sKs = base + S::kKs + stage(n) * S::kKsBytes + 16 * t;
      // ---- u = S * s_k (one IADD + one FFMA; keys past the end get an offset of -inf from
      // the producer), the causal diagonal a per-score mask ----
      float u[kBlockN / 8][4];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const float4 k4 = ptx::ld_shared_f32x4(sKs + 64 * j);
        u[j][0] = __fmaf_rn(__int_as_float(s[4 * j + 0] + kMagicBits), k4.x, k4.z);
        u[j][1] = __fmaf_rn(__int_as_float(s[4 * j + 1] + kMagicBits), k4.y, k4.w);
        u[j][2] = __fmaf_rn(__int_as_float(s[4 * j + 2] + kMagicBits), k4.x, k4.z);
        u[j][3] = __fmaf_rn(__int_as_float(s[4 * j + 3] + kMagicBits), k4.y, k4.w);
      }
      if constexpr (Softcap) fwd::softcap_scores<kBlockN, !kTailByDiag>(u, cap_a, cap_b);
      if (Causal && ((n + 1) * kBlockN - 1 > warp_key_last || (Window && n * kBlockN < warp_key_first))) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n * kBlockN + 8 * j + 2 * t + (e & 1);
            if (key > key_last[e >> 1] || (Window && key < key_first[e >> 1])) u[j][e] = kNegInf;
          }
      }
      // The row maxima first; the MUFU work for alpha and cfac waits until after this block's
      // exponentials, off the path from the maxima to the exp2 phase.
      float m_old[2], ref[2], neg_ref[2];
      fwd::row_max<kBlockN, INTFA_SM90_LAZY_RESCALE>(u, rowf, block_local, m_run, m_old, ref, neg_ref);
      k_next_ok = INTFA_SM90_EARLY_TEST && n + 1 < nb && ptx::mbarrier_test(bars.k_full(stage(n + 1)), phase(n + 1));
      mark(n, 2);
      float psum[2];
      if (block_local) fwd::make_p<kBlockN, false, INTFA_SM90_EXP_POLY>(u, rowf, neg_ref, levels, pf, psum, [](int) {});
      else fwd::make_p<kBlockN, true, INTFA_SM90_EXP_POLY>(u, rowf, neg_ref, levels, pf, psum, [](int) {});
      mark(n, 3);
      fwd::row_factors(m_old, m_run, ref, inv_levels, alpha, cfac);
      fwd::block_l<kBlockN>(pf, psum, alpha, cfac, block_local, l_part);
    };
    // PV of block n retired: its V stage goes back; the in-flight A fragments are free again.
    auto pv_done = [&](int n, uint32_t (&pf)[kBlockN / 32][4]) {
      ptx::fence_regs(acc);
#pragma unroll
      for (int c = 0; c < kBlockN / 32; ++c) ptx::fence_regs(pf[c]);
      ptx::mbarrier_arrive(bars.v_empty(stage(n)));
    };
    // O = O alpha + acc c. acc converts exactly (|acc| < 2^22) with I2FP, a full-rate ALU
    // instruction on sm_90. Once the running maxima settle, alpha is 1 for the whole warp and
    // the rescale drops out: two instructions per element instead of three.
    auto fold = [&](const float (&alpha)[2], const float (&cfac)[2]) {
      if (__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
        for (int dn = 0; dn < DV / 8; ++dn)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[dn][e] = __fmaf_rn(__int2float_rn(acc[4 * dn + e]), cfac[e >> 1], o[dn][e]);
      } else {
#pragma unroll
        for (int dn = 0; dn < DV / 8; ++dn)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            o[dn][e] = __fmaf_rn(__int2float_rn(acc[4 * dn + e]), cfac[r], o[dn][e] * alpha[r]);
          }
      }
    };

    if (nb > 0) {
      ptx::mbarrier_wait(bars.q_full(), tc & 1);
      trace_at(it - 1, 7);
      ++tc;
      if (fused_q) {
        // This warpgroup's 64 rows into its slice of the Q tile; the staging rows go back to the
        // producer, and the int8 rows must reach the async proxy (the wgmma's reads) from every
        // thread of the warpgroup before one of them issues QK.
        float scale[2];
        const uint8_t* rows = smem + S::kQs + cw * 64 * D * 2;
        uint8_t* q8 = smem + S::kQ + cw * 64 * D;
        if (p.q_in_dtype == DType::bf16) quantize_q_rows<D, __nv_bfloat16>(rows, q8, wq, g, t, scale);
        else quantize_q_rows<D, __half>(rows, q8, wq, g, t, scale);
        ptx::mbarrier_arrive(bars.qs_empty());
        ptx::fence_proxy_async_shared();
        ptx::named_bar_sync(5 + cw, kConsumerThreads / 2);
#pragma unroll
        for (int r = 0; r < 2; ++r) rowf[r] = row[r] < T.sq ? scale[r] : 1.f;
      }
      turn_begin();  // QK of the first block
      issue_qk_block(0, false);
      turn_end();
      rowf[0] *= p.softmax_scale * kLog2e;
      rowf[1] *= p.softmax_scale * kLog2e;
      // Soft-capping (fwd::softcap_scores): the scores become tanh of the row's scaled score plus
      // its K-mean term over softcap, and rowf softcap log2 e (the sm80 kernel's numerics).
      if constexpr (Softcap)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          fwd::softcap_row(p, T.b, T.h, T.q0 + row[r], row[r] < T.sq, rowf[r], cap_a[r], cap_b[r]);
      ptx::wgmma_wait<0>();
      qk_done(0);
      // PV(n) and QK(n+1) go out together after the softmax of n; PV(n) is folded while QK(n+1)
      // runs. Each branch ends with every wgmma group retired, so the compiler sees no
      // accumulator read while a group is in flight (it serializes the products otherwise).
      uint32_t pf[kBlockN / 32][4];
      float alpha[2], cfac[2];
      bool v_ok = false, k_ok = false;
      for (int n = 0; n < nb; ++n) {
        softmax(n, v_ok, k_ok, pf, alpha, cfac);
        turn_begin();
        issue_pv<DV>(acc, pf, base + S::kV + stage(n) * S::kVBytes);
        if (n + 1 < nb) {
          issue_qk_block(n + 1, k_ok);
          turn_end();
          v_ok = INTFA_SM90_EARLY_TEST && ptx::mbarrier_test(bars.v_ready(stage(n + 1)), phase(n + 1));
          ptx::wgmma_wait<1>();  // PV retired, QK of the next block still running
          mark(n, 4);
          pv_done(n, pf);
          fold(alpha, cfac);
          ptx::wgmma_wait<0>();
          mark(n, 5);
          qk_done(n + 1);
        } else {
          turn_end();
          ptx::wgmma_wait<0>();
          pv_done(n, pf);
          fold(alpha, cfac);
          mark(n, 4);
        }
      }
      it += nb;
    }
    fwd::load_v_scale<DV>(p, T.b, T.hkv, t, v2, T.vc0);
    // Split kernels: the rows' sinks, loaded with v_scale so their latency overlaps its.
    float z2[2] = {kNegInf, kNegInf};
    if constexpr (Split) fwd::load_sinks(p, T.b, T.h, T.q0, T.sq, row, z2);
    // The next tile and its row scales: the loads fly during the epilogue and the next tile's
    // first QK (a tile ahead, they cost the inner loop registers and spills).
    Tile Tn;
    float rowf_n[2] = {1.f, 1.f};
    const int tile_n = next_tile(tile + gridDim.x, Tn);
    if (tile_n < P.num_units && !fused_q) load_rowf(Tn, rowf_n);
    trace_at(it - 1, 6);
    store_rows<DV, Split, D>(P, T, tile / kPasses, cw, ctid, 3 + cw, smem + S::kO + cw * S::kOSliceBytes, base + S::kO + cw * S::kOSliceBytes,
                  row, o, l_part, m_run, v2, z2, [&](int ph) { trace_at(it - 1, ph); });
    trace_at(it - 1, 5);
    tile = tile_n;
    T = Tn;
    rowf[0] = rowf_n[0];
    rowf[1] = rowf_n[1];
  }
  ptx::bulk_wait();  // shared memory must outlive the last tile's row copies
}

// Test hook: a 128 x 128 block of int32 scores through the kernel's own shared-memory layout
// (the TMA swizzle, written here by plain stores), wgmma descriptors and accumulator layout.
// q8, k8: 128 x D row-major in device memory; s: 128 x 128 int32. One warpgroup per 64 rows.
template <int D>
__global__ void __launch_bounds__(128) qk_block_test_kernel(const int8_t* q8, const int8_t* k8, int32_t* s_out) {
  __shared__ __align__(1024) uint8_t sQ[64 * D];
  __shared__ __align__(1024) uint8_t sK[kBlockN * D];
  q8 += blockIdx.x * 64 * D;
  s_out += blockIdx.x * 64 * 128;
  for (int i = threadIdx.x; i < 64 * D / 16; i += 128)
    *reinterpret_cast<int4*>(sQ + tma_swizzle<D>(16 * i)) = reinterpret_cast<const int4*>(q8)[i];
  for (int i = threadIdx.x; i < kBlockN * D / 16; i += 128)
    *reinterpret_cast<int4*>(sK + tma_swizzle<D>(16 * i)) = reinterpret_cast<const int4*>(k8)[i];
  ptx::fence_proxy_async_shared();
  __syncthreads();
  int s[kBlockN / 2];
  issue_qk<D>(s, ptx::smem_u32(sQ), ptx::smem_u32(sK));
  ptx::wgmma_wait<0>();
  ptx::fence_regs(s);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s_out[(16 * w + g + 8 * (e >> 1)) * 128 + 8 * j + 2 * t + (e & 1)] = s[4 * j + e];
}

int choose_splits(const FwdParams& p, int num_tiles, int sms);  // fwd_sm90_launch.cu

// Host launcher for one (head dim, causal, split, paged, window, small pages, soft-capping)
// instantiation; defined in fwd_sm90_launch.cuh.
template <int D, bool Causal, bool Split, bool Paged, bool Window = false, bool SmallPages = false,
          bool Softcap = false>
Status launch_fwd(const Params& prm, cudaStream_t stream);

}  // namespace intfa::sm90
