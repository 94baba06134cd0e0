// INT8 flash-attention forward for sm_80 and newer (mma.sync m16n8k32, ldmatrix, cp.async).
//
// One CTA = 64 query rows of one (batch, head), 4 warps x 16 rows, two CTAs per SM. Per key
// block of 128 (64 at head dim 256, kBlockNFor; 2-stage cp.async ring):
//   S = Q8 K8^T (s8.s8 -> s32) -> scores in log2 units t = S * s_k[j] * (s_q[i] * scale * log2 e)
//   -> online softmax -> P8 (u8) -> O += (P8 V8) * c (u8.s8 -> s32, folded in per block).
// Both mma products accumulate from the bits of 1.5 * 2^23, so their int32 results read directly
// as fp32 values offset by that constant (exact below 2^22), which the following FFMA removes.
// (For QK^T that FFMA is (M + S) s_k - M s_k with M s_k rounded to fp32: a score is off by up to
// 3/4 of one integer unit of S, two orders of magnitude below its int8 rounding noise at D = 128
// (~100-200 units); the CPU emulation multiplies S exactly, so the GPU tests allow for it.)
// Design history and measurements: docs/PERF_LOG.md.
// Scheme paper / accurate differ only in run-time values: which max P is taken against (running
// or block-local), the levels (127 or 255) and whether l sums p or the quantized P8.
//
// Register-layout trick: the s32 accumulator of QK^T holds, per thread, the key columns
// {2t, 2t+1} of each 8-wide n-tile, while the u8 A operand of the PV mma wants keys
// {4t..4t+3, 16+4t..16+4t+3} of each 32-key step. Instead of shuffling P between threads we
// permute which K rows feed each n-tile (ldmatrix takes per-lane row addresses, so this is free):
// n-tile j, column n reads key pi(8j+n) = 32(j/4) + {0,2,16,18}[j%4] + 4(n/2) + n%2. The QK^T
// accumulators then land exactly in the PV A-fragment layout, with keys in natural order, so V
// (stored transposed, D x keys) feeds the PV mma straight from ldmatrix.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/numerics.h"
#include "common/params.h"
#include "cuda/fwd_common.cuh"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/sm80/tile_layout.h"

namespace intfa::sm80 {

// Query rows per CTA (16 per warp). 64 rows in 4 warps let two CTAs share an SM: their
// per-block barriers are independent, so one CTA's softmax overlaps the other's mma work.
#ifndef INTFA_SM80_BLOCK_M
#define INTFA_SM80_BLOCK_M 64
#endif
// Deferred PV (INTFA_SM80_DEFER_PV=1): the PV mma of key block n-1 is issued inside the softmax
// of block n (make_p's interleave hook), so one warp keeps the tensor pipe and the ALUs busy at
// once. Only the previous block's packed P (16 registers at 128 keys) stays live, and V of block
// n-1 must survive one more iteration: a 3-stage K/V ring.
#ifndef INTFA_SM80_DEFER_PV
#define INTFA_SM80_DEFER_PV 0
#endif
// Of the 16 exponentials per thread and 32-key step, how many run on the FMA pipe
// (fwd::exp2_poly) instead of MUFU.EX2. H200, D=128, same run: 0 / 2 / 4 give 403 / 410 / 400
// TOPS at 4k and 428 / 433 / 423 at 16k.
#ifndef INTFA_SM80_EXP_POLY
#define INTFA_SM80_EXP_POLY 2
#endif
#ifndef INTFA_SM80_BLOCK_N
#define INTFA_SM80_BLOCK_N 128
#endif
#ifndef INTFA_SM80_CTAS_PER_SM
#define INTFA_SM80_CTAS_PER_SM (INTFA_SM80_BLOCK_M == 64 ? 2 : 1)
#endif
constexpr int kBlockM = INTFA_SM80_BLOCK_M;
// Keys per block (64 or 128): 255*127*128 < 2^22 keeps the PV block product exact via kMagic.
constexpr int kBlockN = INTFA_SM80_BLOCK_N;
constexpr int kWarps = kBlockM / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kCtasPerSm = INTFA_SM80_CTAS_PER_SM;
constexpr bool kDeferPv = INTFA_SM80_DEFER_PV != 0;
// At D = 128 the Q fragments are re-read from shared memory every block (4 ldmatrix per warp):
// the 16 registers this frees remove the spills (44 -> 4 bytes) and measured +2.3% on an H200;
// at D = 64 keeping them in registers is 2.7% faster (docs/PERF_LOG.md). D = 256 reads each
// k step's fragment just before its mma (qk_block_streamed_q).
template <int D>
constexpr bool reload_q() { return D == 128; }
static_assert(kBlockN == 64 || kBlockN == 128, "key block");
// The key block at head dim D. D = 256 takes 64 keys: O alone holds 128 registers per thread
// there (16 rows x 256 channels per warp), and 128-key scores (64 more) spilled ~0.3 KB even with
// Q streamed; at 64 keys two CTAs (80.5 KB of shared memory each) share an SM, as at D <= 128.
template <int D>
constexpr int kBlockNFor = D > 128 ? 64 : kBlockN;

// Key-range splits (D = 256). A launch with fewer query tiles than CTA slots (a decode step: one
// 64-row tile per (batch, K/V head) holding its packed GQA rows; few heads over a long prompt)
// cuts each tile's key blocks into ranges that run as CTAs of their own (fwd::split_count,
// `accurate` only: `paper` quantizes P8 against the running max, which a range would restart);
// combine_kernel merges their partial rows (fwd::merge_split_row, as the sm90 and decode
// kernels' splits). A template axis (`Split`, its own instantiations): as a run-time branch it
// cost the whole-tile D = 256 kernel 2.5% (H200, B=4 H=32 N=4k, 397 -> 388 TOPS, same call), as
// it had cost sm90 (PERF_LOG s25). Built at D = 256, where this kernel is the only one: at
// D <= 128 the decode kernel takes short queries and sm90's splits few tiles on Hopper.
template <int D>
constexpr bool kSplitsBuilt = D > 128;

// Split kernels' parameters: the call's, plus the key-range split.
struct Params {
  FwdParams p;
  int num_splits = 1;  // key ranges per query tile; unit = tile * num_splits + split
  int num_tiles = 0;   // query tiles: ceil(seqlen_q / kBlockM) x heads_q x batch
  // Each unit's rows leave O * v_scale (not divided by l) and (m, l) here, [split][tile][kBlockM]
  // [D] and [split][tile][kBlockM], tile = (b * heads_q + h) * m tiles + m.
  float* part_o = nullptr;
  float2* part_ml = nullptr;
};

// The kernel's parameter: Params where it splits, the call's FwdParams alone elsewhere.
template <bool Split>
using KernelParams = std::conditional_t<Split, Params, FwdParams>;
__device__ __forceinline__ const FwdParams& fwd_params(const Params& P) { return P.p; }
__device__ __forceinline__ const FwdParams& fwd_params(const FwdParams& p) { return p; }

__device__ __forceinline__ int64_t part_row0(const Params& P, int split, int tile) {
  return (int64_t(split) * P.num_tiles + tile) * kBlockM;
}

template <int D>
struct Smem {
  static constexpr int kQ = kBlockM * D;         // int8 Q tile
  static constexpr int kK = kBlockNFor<D> * D;   // int8 K tile (rows = keys)
  static constexpr int kV = D * kBlockNFor<D>;   // int8 V^T tile (rows = channels)
  static constexpr int kKs = kBlockNFor<D> * 4;  // fp32 k_scale of the block
  static constexpr int kStage = kK + kV + kKs;
  static constexpr int kStages = kDeferPv ? 3 : 2;
  static constexpr int kBytes = kQ + kStages * kStage;
};

// One key block's copies over pages smaller than it (fwd::SmallPages: 16, 32 or 64 tokens), for
// both kernels that feed sm80's fragment code (sm80, decode). The block is BlockN / 16 pieces of
// 16 keys, each inside one page, and every thread copies bytes of one piece only (its K rows'
// chunks, its channels' 16-key V^T chunks, one K scale), so it needs one table entry per block
// (the loaders of pages >= BlockN give a thread one K row of eight pieces). A warp's copy still
// reads whole lines: two pieces' K rows (2 x 128 bytes each at D = 128) or V^T rows (16 channels
// x 16 bytes, contiguous in a page's V^T), as many lines per copy as the contiguous loader; over
// 16-token pages the V^T tile is in core-matrix order so that those lines cost one L2 read each.
template <int D, int Threads, int BlockN>
struct SmallPageTile {
  static constexpr int kPieces = BlockN / 16;
  static constexpr int kTpp = Threads / kPieces;  // threads per piece
  static constexpr int kKChunks = D / 16;         // 16-byte chunks per K row
  static constexpr int kKStep = kTpp / kKChunks;  // a piece's rows per pass
  static constexpr int kKPasses = 16 / kKStep;
  static constexpr int kVPasses = D / kTpp;  // a piece's channels per pass: kTpp
  static_assert(kTpp % 16 == 0 && kKStep >= 1 && 16 % kKStep == 0 && kVPasses >= 1, "a piece's copies split evenly");
  int piece, lane;          // the thread's piece and its place among the piece's threads
  int k_row;                // its first K row within the piece (then every kKStep-th)
  int k_dst0, v_dst0;       // its first K / V^T chunk's offset in a stage's K / V^T tile
  // cm: the V^T tile in core-matrix order (vt_chunk_offset; pages of 16 tokens).
  __device__ __forceinline__ SmallPageTile(int tid, bool cm)
      : piece(tid / kTpp), lane(tid % kTpp), k_row(lane / kKChunks),
        k_dst0(k_tile_offset<D>(16 * piece + k_row, lane % kKChunks)), v_dst0(vt_chunk_offset<BlockN>(lane, piece, cm)) {}
  __device__ __forceinline__ int first_key() const { return 16 * piece; }  // within the block
  // Copies the thread's bytes of a block. k_src / v_src / ks_src: the piece's first K row, V^T
  // column and K scale in its page; keys_left: the sequence's keys from the piece's first on;
  // page_ok: the piece's page is in the pool. K rows and K scales past the sequence are zero-
  // filled (the scores' mask adds -inf to them), a V^T chunk is copied if its first key is in it
  // (P is 0 past the sequence).
  __device__ __forceinline__ void copy(uint32_t k_tile, uint32_t v_tile, uint32_t ks_tile, const int8_t* k_src,
                                       int64_t k_ts, const int8_t* v_src, int64_t v_ts, const float* ks_src,
                                       bool page_ok, int keys_left) const {
    auto opaque = [](const int8_t* ptr) {  // as load_paged: keeps each pass's address from being hoisted
      asm volatile("" : "+l"(ptr));
      return ptr;
    };
    const int k_left = page_ok ? keys_left - k_row : 0;
    k_src += k_row * k_ts + 16 * (lane % kKChunks);
#pragma unroll
    for (int it = 0; it < kKPasses; ++it, k_src = opaque(k_src + kKStep * k_ts)) {
      const int dst = k_pass_offset<D>(k_dst0, kKStep, it);  // row k_row + kKStep * it
      ptx::cp_async_16B(k_tile + dst, k_src, it * kKStep < k_left);
    }
    const bool v_ok = page_ok && keys_left > 0;
    v_src += lane * v_ts;
#pragma unroll
    for (int it = 0; it < kVPasses; ++it, v_src = opaque(v_src + kTpp * v_ts))
      ptx::cp_async_16B(v_tile + v_dst0 + it * kTpp * BlockN, v_src, v_ok);
    if (lane < 16) ptx::cp_async_4B(ks_tile + 4 * (16 * piece + lane), ks_src + lane, page_ok && lane < keys_left);
  }
};

// The A fragment of this warp's 16 Q rows for 32-wide k step kk of D.
template <int D>
__device__ __forceinline__ void load_q_frag(const uint8_t* sQ, int warp, int lane, int kk, uint32_t (&a)[4]) {
  const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = 2 * kk + (lane >> 4);
  ptx::ldmatrix_x4(a, ptx::smem_u32(sQ + q_tile_offset<D>(r, c)));
}

// A fragments of this warp's 16 Q rows for every 32-wide k step of D (kept in registers).
template <int D>
__device__ __forceinline__ void load_q_frags(const uint8_t* sQ, int warp, int lane,
                                             uint32_t (&qf)[D / 32][4]) {
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) load_q_frag<D>(sQ, warp, lane, kk, qf[kk]);
}

// Lane offsets of the K^T ldmatrix reads: n-tile pair jj reads keys key0 + 16 jj (the key
// permutation keeps bits 0-3 of the key, so the swizzle is fixed per k step).
template <int D>
__device__ __forceinline__ void k_lane_offsets(int lane, int (&off)[D / 32]) {
  const int mi = lane >> 3;
  const int key0 = permuted_key(mi >> 1, lane & 7);
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) off[kk] = k_tile_offset<D>(key0, 2 * kk + (mi & 1));
}

// One 32-wide k step of S (16 rows x the block's keys, int32) += Q8 K8^T, K rows permuted per
// permuted_key(). a: the Q fragment of step kk; sK: the shared-memory address of the K tile.
template <int D>
__device__ __forceinline__ void qk_kstep(const uint32_t (&a)[4], uint32_t sK, const int (&k_lane_off)[D / 32],
                                         int kk, int (&s)[kBlockNFor<D> / 8][4]) {
#pragma unroll
  for (int jj = 0; jj < kBlockNFor<D> / 16; ++jj) {
    uint32_t bf[4];
    ptx::ldmatrix_x4(bf, sK + k_lane_off[kk] + jj * 16 * D);
    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    ptx::mma_m16n8k32_s8s8(s[2 * jj], a, b0);
    ptx::mma_m16n8k32_s8s8(s[2 * jj + 1], a, b1);
  }
}

template <int N>
__device__ __forceinline__ void fill_scores(int init, int (&s)[N / 8][4]) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) s[j][e] = init;
}

// The whole block: S = init + Q8 K8^T.
template <int D>
__device__ __forceinline__ void qk_block(const uint32_t (&qf)[D / 32][4], uint32_t sK,
                                         const int (&k_lane_off)[D / 32], int init,
                                         int (&s)[kBlockNFor<D> / 8][4]) {
  fill_scores<kBlockNFor<D>>(init, s);
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) qk_kstep<D>(qf[kk], sK, k_lane_off, kk, s);
}

// The same with each step's Q fragment read from shared memory just before its mma (D = 256: a
// whole Q row set is 32 registers, next to O's 128; with it the 128-key version spilled ~0.5 KB).
template <int D>
__device__ __forceinline__ void qk_block_streamed_q(const uint8_t* sQ, int warp, int lane, uint32_t sK,
                                                    const int (&k_lane_off)[D / 32], int init,
                                                    int (&s)[kBlockNFor<D> / 8][4]) {
  fill_scores<kBlockNFor<D>>(init, s);
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) {
    uint32_t a[4];
    load_q_frag<D>(sQ, warp, lane, kk, a);
    qk_kstep<D>(a, sK, k_lane_off, kk, s);
  }
}

// u = S * s_k for N keys (whole 32-key steps of the permuted layout) starting at key0, with one
// FFMA on the magic-biased int32 S; keys at or past skv get an offset of -inf (per key, not per
// score). sKs: their K scales in shared memory (natural key order; the permutation picks them).
template <int N>
__device__ __forceinline__ void scale_scores(const int (&s)[N / 8][4], const float* sKs, int key0, int skv, int t,
                                             float (&u)[N / 8][4]) {
  const float kNegInf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int c = 0; c < N / 32; ++c) {
    const float4 ka = *reinterpret_cast<const float4*>(sKs + 32 * c + 4 * t);
    const float4 kb = *reinterpret_cast<const float4*>(sKs + 32 * c + 16 + 4 * t);
    const float ks[4][2] = {{ka.x, ka.y}, {ka.z, ka.w}, {kb.x, kb.y}, {kb.z, kb.w}};
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * c + jj;
      float nks[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = key0 + permuted_key(j, 2 * t + e);
        nks[e] = key < skv ? -ptx::kMagic * ks[jj][e] : kNegInf;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) u[j][e] = __fmaf_rn(__int_as_float(s[j][e]), ks[jj][e & 1], nks[e & 1]);
    }
  }
}

// Per-thread cp.async assignments of one key block, fixed for the whole kernel: only the block
// index moves them, so the address math happens once instead of every block.
template <int D>
struct KvLoader {
  static constexpr int kBN = kBlockNFor<D>;
  static constexpr int kKChunks = D / 16;                  // 16-byte chunks per K row
  static constexpr int kKRowsPerPass = kThreads / kKChunks;
  static constexpr int kKPasses = kBN / kKRowsPerPass;
  static constexpr int kVChunks = kBN / 16;                // per V^T row
  static constexpr int kVRowsPerPass = kThreads / kVChunks;
  static constexpr int kVPasses = D / kVRowsPerPass;

  // Where pass it's K chunk goes (row k_row0 + kKRowsPerPass * it).
  __device__ __forceinline__ int k_dst(int it) const { return k_pass_offset<D>(k_smem0, kKRowsPerPass, it); }

  const int8_t* k_ptr;  // this thread's first K chunk of block 0
  const int8_t* v_ptr;  // this thread's first V^T chunk of block 0
  const float* ks_ptr;
  int64_t k_row_stride, v_row_stride;
  int k_row0, v_col0, k_smem0, v_smem0;

  __device__ void load(int n, int skv, uint32_t stage_base, int tid) const {
    const int64_t key0 = int64_t(n) * kBN;
#pragma unroll
    for (int it = 0; it < kKPasses; ++it) {
      const int r = k_row0 + it * kKRowsPerPass;
      const bool valid = key0 + r < skv;  // rows past the end load as zeros
      const int8_t* src = k_ptr + (key0 + it * kKRowsPerPass) * k_row_stride;
      ptx::cp_async_16B(stage_base + k_dst(it), valid ? src : k_ptr, valid);
    }
    // A V^T chunk that starts before skv may run into the row's padding: P is 0 there.
    const bool v_valid = key0 + v_col0 < skv;
#pragma unroll
    for (int it = 0; it < kVPasses; ++it) {
      const int8_t* src = v_ptr + key0 + it * kVRowsPerPass * v_row_stride;
      ptx::cp_async_16B(stage_base + Smem<D>::kK + v_smem0 + it * kVRowsPerPass * kBN,
                        v_valid ? src : v_ptr, v_valid);
    }
    if (tid < kBN) {
      const bool valid = key0 + tid < skv;
      ptx::cp_async_4B(stage_base + Smem<D>::kK + Smem<D>::kV + 4 * tid,
                       valid ? ks_ptr + key0 + tid : ks_ptr, valid);
    }
  }
  // Paged KV: the pointers are the thread's first bytes in page 0; block n lies in `page` (-1:
  // outside the pool, nothing copied) from token `tok` on (fwd::PageWalk). Kept apart from
  // load() so the contiguous kernels' code stays as it was.
  __device__ void load_paged(int n, int page, int tok, int skv, const FwdParams& p, uint32_t stage_base,
                             int tid) const {
    const int key0 = n * kBN, pg = max(page, 0);
    const int k_left = page < 0 ? 0 : skv - key0 - k_row0;
    // The sources step by a fixed stride through an empty asm, which keeps ptxas from hoisting
    // every pass's 64-bit address (the decode kernel's loads do the same).
    auto opaque = [](const int8_t* ptr) {
      asm volatile("" : "+l"(ptr));
      return ptr;
    };
    const int8_t* src = k_ptr + pg * p.k_st.bs + int64_t(tok) * k_row_stride;
    const int64_t k_step = kKRowsPerPass * k_row_stride, v_step = kVRowsPerPass * v_row_stride;
#pragma unroll
    for (int it = 0; it < kKPasses; ++it, src = opaque(src + k_step)) {
      const bool valid = it * kKRowsPerPass < k_left;
      ptx::cp_async_16B(stage_base + k_dst(it), valid ? src : k_ptr, valid);
    }
    const bool v_valid = page >= 0 && key0 + v_col0 < skv;
    src = v_ptr + pg * p.vt_st.bs + tok;
#pragma unroll
    for (int it = 0; it < kVPasses; ++it, src = opaque(src + v_step))
      ptx::cp_async_16B(stage_base + Smem<D>::kK + v_smem0 + it * kVRowsPerPass * kBN, v_valid ? src : v_ptr,
                        v_valid);
    if (tid < kBN) {
      const bool valid = page >= 0 && key0 + tid < skv;
      ptx::cp_async_4B(stage_base + Smem<D>::kK + Smem<D>::kV + 4 * tid,
                       valid ? ks_ptr + pg * p.ks_st.bs + tok + tid : ks_ptr, valid);
    }
  }
  // Pages smaller than the block (fwd::SmallPages): the thread's piece of block n through its
  // page (SmallPageTile); key_base is where the block indices' keys start in the sequence (rows
  // and skv count from it); k_head / v_head / ks_head: the head's bytes in page 0.
  __device__ void load_small(int n, int key_base, int skv, const fwd::SmallPages& sp, const FwdParams& p,
                             const SmallPageTile<D, kThreads, kBN>& tile, const int8_t* k_head,
                             const int8_t* v_head, const float* ks_head, uint32_t stage_base) const {
    const int key = n * kBN + tile.first_key(), pg = sp.page(key_base + key, key < skv), tok = sp.tok(key_base + key);
    const int64_t page = max(pg, 0);
    tile.copy(stage_base, stage_base + Smem<D>::kK, stage_base + Smem<D>::kK + Smem<D>::kV,
              k_head + page * p.k_st.bs + int64_t(tok) * k_row_stride, k_row_stride, v_head + page * p.vt_st.bs + tok,
              v_row_stride, ks_head + page * p.ks_st.bs + tok, pg >= 0, skv - key);
  }
};

// Paged (FwdParams::block_table, dense queries, pages a multiple of 128 keys): K, V^T and the K
// scales of each key block are read through the block's table entry, read one block ahead.
// SmallPages (with Paged; pages of 16, 32 or 64 tokens): each thread's 16-key piece of a block
// through the piece's page (SmallPageTile, KvLoader::load_small).
// Split: the unit's key range of its tile, partial rows out (Params above).
template <int D, bool Causal, bool Paged, bool SmallPages = false, bool Split = false, bool Softcap = false>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) fwd_kernel(const __grid_constant__ KernelParams<Split> P) {
  const FwdParams& p = fwd_params(P);
  using S = Smem<D>;
  using L = KvLoader<D>;
  constexpr int kBN = kBlockNFor<D>;
  const float kNegInf = -__int_as_float(0x7f800000);
  // Accumulators start at the bits of 1.5 * 2^23: the int32 mma result then reads directly as
  // the fp32 value 1.5 * 2^23 + sum (exact for |sum| < 2^22), so no conversion instruction.
  constexpr int kMagicBits = 0x4B400000;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const sQ = smem;

  // Causal: a 1-D grid in fwd::causal_tile's order (longest rows first over groups of heads);
  // otherwise (row tile, head, batch).
  // Split kernels: blockIdx.x / num_splits is that index of the tile, the rest its key range.
  int m_block, h, b, split = 0;
  int tile_x = blockIdx.x;
  if constexpr (Split) {
    tile_x = blockIdx.x / P.num_splits;
    split = blockIdx.x - tile_x * P.num_splits;
    // combine_kernel (a programmatic dependent) may take its SM slots while this grid runs; it
    // waits for the grid's end there, so its launch latency overlaps this grid.
    ptx::griddepcontrol_launch_dependents();
  }
  if constexpr (Causal) {
    const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM, bh_count = p.batch * p.heads_q;
    int bh, mi;
    fwd::causal_tile(tile_x, num_m, bh_count, fwd::causal_head_group(p.batch, p.heads_q, p.seqlen_kv, D), bh, mi);
    m_block = num_m - 1 - mi;
    b = bh / p.heads_q;
    h = bh - b * p.heads_q;
  } else {
    m_block = tile_x;
    h = blockIdx.y;
    b = blockIdx.z;
  }
  const int sq = seq_len(p.cu_q, b, p.seqlen_q);
  const int kv_count = kv_len(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sq) return;
  const int hkv = h / (p.heads_q / p.heads_kv);
  // Bottom-right causal, per query position (packed GQA rows: tile_order.h). The causal kernels
  // also run sliding windows (non-causal ones with the diagonal past every key, last_key): the
  // blocks left of the tile's window are skipped by starting every key index at key_base, so
  // below skv, diag and the loads count keys from there.
  const int period = p.row_period;
  int skv = kv_count, diag = fwd::causal_diag(skv, sq, period), key_base = 0;
  int pos_lo = 0, pos_hi = 0;
  if constexpr (Causal) {
    fwd::row_positions(m0, min(m0 + kBlockM, sq) - 1, period, pos_lo, pos_hi);
    key_base = max(0, first_key(p, pos_lo, diag)) / kBN * kBN;
    skv -= key_base;
    diag -= key_base;
  }
  const int kv_end = Causal ? min(skv, last_key(p, pos_hi, diag) + 1) : skv;
  const int n_blocks = kv_end > 0 ? (kv_end + kBN - 1) / kBN : 0;
  // The CTA's key blocks kb0 .. kb_end - 1: all of the tile's, or its split's range (which may be
  // empty: its partial rows then say so, m = -inf and l = 0).
  int kb0 = 0, kb_end = n_blocks;
  if constexpr (Split) {
    int count = 0;
    fwd::split_range(n_blocks, P.num_splits, split, kb0, count);
    kb_end = kb0 + count;
  }

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  const int64_t q0 = seq_start(p.cu_q, b), k0 = seq_start(p.cu_kv, b) + key_base;
  const int8_t* const q_base = p.q8 + b * p.q_st.bs + h * p.q_st.hs + (q0 + m0) * p.q_st.ts;

  L loader;
  {
    const int kr = tid / L::kKChunks, kc = tid % L::kKChunks;
    const int vd = tid / L::kVChunks, vc = tid % L::kVChunks;
    // Paged: page 0's bytes (paged calls have dense queries, k0 = 0; fwd::PageWalk adds the
    // pages). The statements keep the contiguous kernels' order (their code stays as it was).
    loader.k_row0 = kr;
    loader.k_row_stride = p.k_st.ts;
    loader.k_ptr = Paged ? p.k8 + hkv * p.k_st.hs + kr * p.k_st.ts + kc * 16
                         : p.k8 + b * p.k_st.bs + hkv * p.k_st.hs + (k0 + kr) * p.k_st.ts + kc * 16;
    loader.k_smem0 = k_tile_offset<D>(kr, kc);
    loader.v_col0 = vc * 16;
    loader.v_row_stride = p.vt_st.ts;
    loader.v_ptr = Paged ? p.vt8 + hkv * p.vt_st.hs + vd * p.vt_st.ts + vc * 16
                         : p.vt8 + b * p.vt_st.bs + hkv * p.vt_st.hs + vt_seq_start(p.cu_kv, b) + key_base +
                               vd * p.vt_st.ts + vc * 16;
    loader.v_smem0 = swz128(vd * kBN + vc * 16);
    loader.ks_ptr = Paged ? p.k_scale + hkv * p.ks_st.hs : p.k_scale + offset(p.ks_st, b, hkv, k0);
  }
  // Paged: the walk over sequence b's table and the page of the next block to load.
  fwd::PageWalk<kBN> walk;
  int next_page = -1;
  fwd::SmallPages small_pages;
  if constexpr (SmallPages) small_pages.start(p, b);
  // SmallPages: the thread's piece of each block (over 16-token pages with the V^T tile in
  // core-matrix order, vt_chunk_offset) and the head's bytes in page 0.
  const bool vt_cm = SmallPages && p.page_size == 16;
  const SmallPageTile<D, kThreads, kBN> small_tile(tid, vt_cm);
  const int8_t* const k_head = p.k8 + hkv * p.k_st.hs;
  const int8_t* const v_head = p.vt8 + hkv * p.vt_st.hs;
  const float* const ks_head = p.k_scale + hkv * p.ks_st.hs;
  const uint32_t smem_base = ptx::smem_u32(smem);
  auto stage_base = [&](int stage) { return smem_base + S::kQ + stage * S::kStage; };

  // Lane offsets of the ldmatrix reads. PV: channel tile dn reads V^T rows 8 dn + lane % 8.
  // With 64-byte V^T rows (kBN = 64) an 8-row tile spans 4 swizzle lines, so the lane
  // offset differs between even and odd channel tiles.
  constexpr int kVPar = kBN == 64 ? 2 : 1;
  int k_lane_off[D / 32], v_lane_off[kVPar][kBN / 64];
  {
    const int mi = lane >> 3;
    k_lane_offsets<D>(lane, k_lane_off);
#pragma unroll
    for (int par = 0; par < kVPar; ++par)
#pragma unroll
      for (int cc = 0; cc < kBN / 64; ++cc)
        v_lane_off[par][cc] = vt_chunk_offset<kBN>(par * 8 + (lane & 7), 4 * cc + mi, vt_cm) - par * 8 * kBN;
  }

  // ---- per-thread row state: rows g and g+8 of this warp's 16 ----
  const bool block_local = p.scheme == Scheme::accurate;
  const float levels = block_local ? 255.f : 127.f;
  const float inv_levels = block_local ? 1.f / 255.f : 1.f / 127.f;
  // The last and first key each row sees (first: a sliding window's left edge); blocks past the
  // warp's lowest last key or before its highest first key need the per-score mask.
  int row[2], key_last[2], key_first[2];
  float rowf[2], m_run[2], l_part[2];
  int warp_pos_lo, warp_pos_hi;
  fwd::row_positions(m0 + warp * 16, m0 + warp * 16 + 15, period, warp_pos_lo, warp_pos_hi);
  const int warp_key_last = last_key(p, warp_pos_lo, diag), warp_key_first = first_key(p, warp_pos_hi, diag);
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + g + 8 * r;
    key_last[r] = last_key(p, fwd::row_position(row[r], period), diag);
    key_first[r] = first_key(p, fwd::row_position(row[r], period), diag);
    rowf[r] = row[r] < sq
                  ? p.q_scale[offset(p.qs_st, b, h, q0 + row[r])] * p.softmax_scale * kLog2e
                  : 1.f;
    m_run[r] = kNegInf;
    l_part[r] = 0.f;
  }
  // Soft-capping (Softcap kernels, fwd::softcap_scores): u then holds tanh of the row's scaled
  // score plus its K-mean term over softcap, and rowf becomes softcap log2 e.
  float cap_a[2], cap_b[2];
  if constexpr (Softcap)
    for (int r = 0; r < 2; ++r) fwd::softcap_row(p, b, h, q0 + row[r], row[r] < sq, rowf[r], cap_a[r], cap_b[r]);
  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
    for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;
  uint32_t qf[D / 32][4];

  if (kb_end > kb0) {
    constexpr int kChunks = D / 16;
    for (int i = tid; i < kBlockM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const bool valid = m0 + r < sq;
      ptx::cp_async_16B(smem_base + q_tile_offset<D>(r, c),
                        valid ? q_base + r * p.q_st.ts + c * 16 : q_base, valid);
    }
    if constexpr (SmallPages) {
      loader.load_small(kb0, key_base, skv, small_pages, p, small_tile, k_head, v_head, ks_head, stage_base(0));
    } else if constexpr (Paged) {
      walk.start(p, b, key_base / kBN + kb0);
      const int page0 = walk.read(p);  // causal kernels and key ranges may start mid-page
      loader.load_paged(kb0, page0, Causal || Split ? walk.last_tok(p) : 0, skv, p, stage_base(0), tid);
      if (kb_end - kb0 > 1) next_page = walk.read(p);
    } else {
      loader.load(kb0, skv, stage_base(0), tid);
    }
    ptx::cp_async_commit();
  }

  // O = O * alpha + (P8 V8) * c for channel tiles [dn0, dn1): the magic-biased mma result x
  // gives (x - M) c + O alpha as FFMA(x, c, FFMA(O, alpha, -M c)), two instructions per output.
  auto pv_tiles = [&](const uint32_t (&pf)[kBN / 32][4], uint32_t sV, const float (&alpha)[2],
                      const float (&cfac)[2], int dn0, int dn1) {
    const float nmc[2] = {-ptx::kMagic * cfac[0], -ptx::kMagic * cfac[1]};
#pragma unroll
    for (int dn = dn0; dn < dn1; ++dn) {
      int acc[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};
#pragma unroll
      for (int cc = 0; cc < kBN / 64; ++cc) {
        uint32_t vf[4];
        ptx::ldmatrix_x4(vf, sV + v_lane_off[dn & (kVPar - 1)][cc] + dn * 8 * kBN);
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        ptx::mma_m16n8k32_u8s8(acc, pf[2 * cc], b0);
        ptx::mma_m16n8k32_u8s8(acc, pf[2 * cc + 1], b1);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        o[dn][e] = __fmaf_rn(__int_as_float(acc[e]), cfac[r], __fmaf_rn(o[dn][e], alpha[r], nmc[r]));
      }
    }
  };
  // Deferred PV state: the previous block's P, factors and V stage. Before the first block they
  // make an exact no-op (P = 0, c = 0, alpha = 1; the stage holds finite int8 of any value).
  uint32_t pf_prev[kBN / 32][4] = {};
  float alpha_prev[2] = {1.f, 1.f}, cfac_prev[2] = {0.f, 0.f};
  uint32_t sV_prev = stage_base(S::kStages - 1) + S::kK;

  // Everything of key block n after its scores: softmax, P, l and the PV product (or, deferred,
  // the previous block's PV in slices).
  auto softmax_pv = [&](int n, const int (&s_cur)[kBN / 8][4]) {
    const int stage = (n - kb0) % S::kStages;
    const uint32_t sV = stage_base(stage) + S::kK;
    const float* sKs = reinterpret_cast<const float*>(smem + S::kQ + stage * S::kStage + S::kK + S::kV);


    // ---- u = S * s_k; the causal diagonal a per-score mask ----
    float u[kBN / 8][4];
    scale_scores<kBN>(s_cur, sKs, n * kBN, skv, t, u);
    if constexpr (Softcap) fwd::softcap_scores<kBN>(u, cap_a, cap_b);
    if (Causal && ((n + 1) * kBN - 1 > warp_key_last || n * kBN < warp_key_first)) {  // edge blocks
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n * kBN + permuted_key(j, 2 * t + (e & 1));
          if (key > key_last[e >> 1] || key < key_first[e >> 1]) u[j][e] = kNegInf;
        }
    }

    float alpha[2], cfac[2], neg_ref[2];
    fwd::row_update<kBN>(u, rowf, block_local, inv_levels, m_run, alpha, cfac, neg_ref);

    // ---- P = round(levels * exp2(t - ref)) packed into PV A fragments; when deferred, the
    // previous block's PV runs in slices between these exponentials ----
    auto prev_pv = [&](int c) {
      if (!kDeferPv) return;
      constexpr int kTiles = D / 8, kChunks = kBN / 32;
      pv_tiles(pf_prev, sV_prev, alpha_prev, cfac_prev, c * kTiles / kChunks, (c + 1) * kTiles / kChunks);
    };
    uint32_t pf[kBN / 32][4];
    fwd::make_p_and_l<kBN, INTFA_SM80_EXP_POLY>(u, rowf, neg_ref, alpha, cfac, block_local, levels, pf, l_part, prev_pv);

    if (kDeferPv) {
#pragma unroll
      for (int c = 0; c < kBN / 32; ++c)
        for (int e = 0; e < 4; ++e) pf_prev[c][e] = pf[c][e];
      alpha_prev[0] = alpha[0]; alpha_prev[1] = alpha[1];
      cfac_prev[0] = cfac[0]; cfac_prev[1] = cfac[1];
      sV_prev = sV;
    } else {
      pv_tiles(pf, sV, alpha, cfac, 0, D / 8);
    }
  };

  int s_cur[kBN / 8][4];
  for (int n = kb0; n < kb_end; ++n) {
    const int stage = (n - kb0) % S::kStages;
    ptx::cp_async_wait<0>();
    __syncthreads();  // block n landed for everyone; everyone finished with the stage refilled next
    if (n + 1 < kb_end) {
      if constexpr (SmallPages) {
        loader.load_small(n + 1, key_base, skv, small_pages, p, small_tile, k_head, v_head, ks_head,
                          stage_base((n + 1 - kb0) % S::kStages));
      } else if constexpr (Paged) {
        loader.load_paged(n + 1, next_page, walk.last_tok(p), skv, p, stage_base((n + 1 - kb0) % S::kStages), tid);
        if (n + 2 < kb_end) next_page = walk.read(p);
      } else {
        loader.load(n + 1, skv, stage_base((n + 1 - kb0) % S::kStages), tid);
      }
      ptx::cp_async_commit();
    }
    // ---- S = Q K^T (keys permuted so S is already in PV A-fragment order) ----
    if constexpr (D > 128) {
      qk_block_streamed_q<D>(sQ, warp, lane, stage_base(stage), k_lane_off, kMagicBits, s_cur);
    } else {
      if (n == 0 || reload_q<D>()) load_q_frags<D>(sQ, warp, lane, qf);
      qk_block<D>(qf, stage_base(stage), k_lane_off, kMagicBits, s_cur);
    }
    softmax_pv(n, s_cur);
  }
  if (kDeferPv && kb_end > kb0) pv_tiles(pf_prev, sV_prev, alpha_prev, cfac_prev, 0, D / 8);

  // ---- epilogue: O * v_scale / l, LSE; fully masked rows give 0 and -inf ----
  float2 v2[D / 8];
  fwd::load_v_scale<D>(p, b, hkv, t, v2);
  if constexpr (Split) {
    // A key range: its partial rows (sinks and the LSE join in the merge).
    float inv_l[2], l_full[2];
    fwd::row_sums(l_part, l_full, inv_l);
    const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
    const int64_t prow0 = part_row0(P, split, (b * p.heads_q + h) * num_m + m_block) - m0;
    fwd::write_partial_rows<D>(P.part_o, P.part_ml, prow0, sq, row, o, l_full, m_run, t, v2);
  } else {
    fwd::epilogue<D, Causal>(p, b, h, q0, sq, row, o, l_part, m_run, t, v2);
  }
}

// Merges the key ranges of every row of the split kernels (fwd::merge_split_row). One warp per
// row, 4 rows per block of 128 threads; block = tile * (kBlockM / 4) + row / 4.
template <int D>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ Params P) {
  ptx::griddepcontrol_wait();  // the partial rows of fwd_kernel (a programmatic dependent launch)
  const FwdParams& p = P.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = blockIdx.x / (kBlockM / 4), r = (blockIdx.x % (kBlockM / 4)) * 4 + warp;
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM, bh = tile / num_m, m0 = (tile - bh * num_m) * kBlockM;
  const int b = bh / p.heads_q, h = bh - b * p.heads_q;
  if (m0 + r >= seq_len(p.cu_q, b, p.seqlen_q)) return;
  const int64_t prow = part_row0(P, 0, tile) + r;
  fwd::merge_split_row<D>(p, P.part_ml + prow, P.part_o + prow * D, int64_t(P.num_tiles) * kBlockM, P.num_splits,
                          lane, b, h, seq_start(p.cu_q, b) + m0 + r);
}

// Test hook: a 128 x 128 block of int32 scores through the kernel's own smem layouts and
// fragment code (q8: 128 x D, k8: 128 x D, row-major, device memory; s: 128 x 128 int32 in
// natural key order), so the key permutation and swizzles are checked bit for bit. Launched
// with 128 / kBlockM CTAs, each taking kBlockM query rows.
template <int D>
__global__ void __launch_bounds__(kThreads) qk_block_test_kernel(const int8_t* q8, const int8_t* k8,
                                                                  int32_t* s_out) {
  constexpr int kBN = kBlockNFor<D>;
  __shared__ __align__(128) uint8_t sQ[kBlockM * D];
  __shared__ __align__(128) uint8_t sK[kBN * D];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  q8 += blockIdx.x * kBlockM * D;
  s_out += blockIdx.x * kBlockM * 128;
  for (int i = tid; i < kBlockM * D / 16; i += kThreads) {
    const int r = i / (D / 16), c = i % (D / 16);
    *reinterpret_cast<int4*>(sQ + q_tile_offset<D>(r, c)) = reinterpret_cast<const int4*>(q8 + r * D)[c];
  }
  uint32_t qf[D / 32][4];
  for (int kb = 0; kb < 128 / kBN; ++kb) {
    __syncthreads();
    for (int i = tid; i < kBN * D / 16; i += kThreads) {
      const int r = i / (D / 16), c = i % (D / 16);
      *reinterpret_cast<int4*>(sK + k_tile_offset<D>(r, c)) =
          reinterpret_cast<const int4*>(k8 + (kb * kBN + r) * D)[c];
    }
    __syncthreads();
    if (kb == 0) load_q_frags<D>(sQ, warp, lane, qf);
    int k_lane_off[D / 32];
    k_lane_offsets<D>(lane, k_lane_off);
    int s[kBN / 8][4];
    qk_block<D>(qf, ptx::smem_u32(sK), k_lane_off, 0, s);
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < kBN / 8; ++j)
      for (int e = 0; e < 4; ++e)
        s_out[(warp * 16 + g + 8 * (e >> 1)) * 128 + kb * kBN + permuted_key(j, 2 * t + (e & 1))] = s[j][e];
  }
}

// Host launchers for one (head dim, causal, paged, small pages) instantiation, defined in
// fwd_sm80_launch.cuh: launch_fwd picks the key-range split and runs the whole-tile kernel or
// hands over to launch_fwd_split (the split kernel and the merge; its own .cu files).
template <int D, bool Causal, bool Paged, bool SmallPages = false, bool Softcap = false>
Status launch_fwd(const FwdParams& p, cudaStream_t stream);
template <int D, bool Causal, bool Paged, bool SmallPages = false, bool Softcap = false>
Status launch_fwd_split(const FwdParams& p, int num_splits, cudaStream_t stream);

}  // namespace intfa::sm80
