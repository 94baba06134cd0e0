// INT8 attention for calls with at most 16 query rows per (batch, head) after GQA packing
// (fwd::pack_gqa_rows): decode steps, speculative-decoding steps, short chunks over a long KV.
//
// Why a kernel of its own: the prefill kernels' 64- or 128-row tiles hold at most 16 real rows
// here, so per key byte they spend 4-8x the tensor, exp2 and fold work a 16-row tile needs, and
// read the int8 KV at about half the copy bandwidth (H200, docs/PERF_LOG.md s28). A decode step
// is a stream over K and V. One CTA takes a unit = (batch, head, key range) with its 16 rows in
// one m16 tile and streams the range's 128-key blocks through a cp.async ring; its four warps
// split every block's keys (32 each), so a block costs each warp a quarter of the QK, exp2 and
// PV work and the CTA keeps up with the copy. The block max (which `accurate` quantizes P8
// against) is exchanged through shared memory, so all warps keep the same running max and their
// partial O and l add up at the end. `accurate` cuts each head's key blocks into ranges so the
// units fill the GPU (fwd::decode_split_count), and combine_kernel merges them
// (fwd::merge_split_row, as the sm90 splits; launched as this kernel's programmatic dependent,
// cuda::launch_dependent). `paper` keeps one range per head: its P8 is
// quantized against the running max, which a range would restart.
//
// Per block the warps run the sm80 path's fragment code (mma.sync m16n8k32, ldmatrix, the K rows
// permuted so S lands in the PV A-fragment order, fwd::make_p_and_l, the magic-biased fold), so
// the numerics are the sm80 kernel's: 128-key blocks, the same P8. At head dim 256, where the
// sm80 kernel takes 64-key blocks, they are the sm90 kernel's (128).
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cuda/fwd_common.cuh"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::decode {

constexpr int kRows = 16;  // query rows per unit: one mma m16 tile
// 128-key blocks, the sm80 kernel's default: `accurate` quantizes P8 against the block max, so
// the block size is part of the numerics. Builds with another sm80 block size (a tuning knob)
// leave decode shapes to the prefill kernels (launch_fwd_decode: not_available).
constexpr int kBlockN = 128;
constexpr bool kSameBlocksAsSm80 = sm80::kBlockN == kBlockN;
constexpr int kWarps = 4;  // each takes 32 keys of every block
constexpr int kThreads = 32 * kWarps;
static_assert(kBlockN == 32 * kWarps, "a warp per 32-key step of the block");
// K/V ring depth (Stages - 1 blocks load while one is computed), chosen per launch: 3, or 4 for
// D = 128 launches of at most one wave (launch_fwd_decode; docs/PERF_LOG.md d4). At D = 128 a
// stage is 32 KB, so 3 stages let two CTAs share an SM and 4 stages take one. D = 256 runs 2 (64
// KB stages, one CTA per SM; sm_80's shared memory takes them, 3 would need sm_90's and measured
// slower there).
template <int D, int Stages>
struct Smem {
  static constexpr int kQ = kRows * D;     // int8 Q rows (swizzled like sm80's Q tile)
  static constexpr int kK = kBlockN * D;   // int8 K tile (rows = keys, sm80::k_tile_offset)
  static constexpr int kV = D * kBlockN;   // int8 V^T tile (rows = channels)
  static constexpr int kKs = kBlockN * 4;  // fp32 k_scale of the block
  static constexpr int kStage = kK + kV + kKs;
  static constexpr int kMax = kWarps * kRows * 4;  // the warps' partial row maxima of a block
  static constexpr int kBytes = kQ + Stages * kStage + kMax;
  static_assert(kQ % 128 == 0 && kStage % 128 == 0, "stages stay 128-byte aligned");
};

struct Params {
  FwdParams p;
  int num_splits = 1;  // key ranges per (batch, head)
  int num_units = 0;   // batch * heads_q * num_splits; unit = bh * num_splits + split
  // num_splits > 1: each unit's rows leave O * v_scale (not divided by l) and (m, l) here,
  // [split][bh][kRows][D] and [split][bh][kRows], for combine_kernel.
  float* part_o = nullptr;
  float2* part_ml = nullptr;
};

__device__ __forceinline__ int64_t part_row0(const Params& P, int split, int bh) {
  return (int64_t(split) * P.p.batch * P.p.heads_q + bh) * kRows;
}

// At D = 64 four CTAs share an SM (shared memory allows them) if a thread takes at most 128
// registers: the contiguous kernel does by itself (127), the paged one is held to it (it took
// 130 unbounded). 0: no bound, which keeps the contiguous kernels' code as it was.
template <int D, bool Paged>
constexpr int kMinCtas = Paged && D == 64 ? 4 : 0;

// Paged (FwdParams::block_table, pages a multiple of kBlockN keys, so a block lies in one page):
// each block's K rows, V^T columns and K scales are found through the block's table entry,
// which is read one block ahead of its copies so the table's round trip overlaps a block's
// compute. The contiguous kernels' load code is kept apart (if constexpr) rather than shared:
// sharing it changed the D = 64 kernel's schedule.
// SmallPages (with Paged; pages of 16, 32 or 64 tokens): a block spans several pages; each
// thread copies one 16-key piece of it through that piece's page (sm80::SmallPageTile).
template <int D, int Stages, bool Paged, bool SmallPages = false, bool Softcap = false>
__global__ void __launch_bounds__(kThreads, kMinCtas<D, Paged>) fwd_kernel(const __grid_constant__ Params P) {
  // Launched as a programmatic dependent (cuda::launch_dependent): nothing global is touched
  // before the previous kernel's writes are visible.
  ptx::griddepcontrol_wait();
  // The combine kernel's CTAs may take their SM slots while this grid runs (they wait for its
  // end there): its launch latency then overlaps this grid instead of following it.
  ptx::griddepcontrol_launch_dependents();
  using S = Smem<D, Stages>;
  constexpr int kStages = Stages;
  const FwdParams& p = P.p;
  const float kNegInf = fwd::neg_inf();
  constexpr int kMagicBits = 0x4B400000;  // accumulators start at 1.5 * 2^23 (sm80 header)
  extern __shared__ __align__(128) uint8_t smem[];
  float* const s_max = reinterpret_cast<float*>(smem + S::kQ + kStages * S::kStage);  // [warp][row]

  const int unit = blockIdx.x, bh = unit / P.num_splits, split = unit - bh * P.num_splits;
  const int b = bh / p.heads_q, h = bh - b * p.heads_q;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int sq = min(seq_len(p.cu_q, b, p.seqlen_q), p.seqlen_q);  // <= kRows (launcher)
  if (sq <= 0) return;
  const int skv = kv_len(p, b);
  const int64_t q0 = seq_start(p.cu_q, b), k0 = seq_start(p.cu_kv, b);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;

  // Bottom-right causal, per query position (packed GQA rows: tile_order.h). key_last / key_first:
  // the last and first key each of the thread's rows sees (first: a sliding window's left edge).
  const int period = p.row_period;
  const int diag = fwd::causal_diag(skv, sq, period);
  int pos_lo, pos_hi;  // the query positions the unit's rows span
  fwd::row_positions(0, sq - 1, period, pos_lo, pos_hi);
  const int kv_end = min(skv, last_key(p, pos_hi, diag) + 1);
  const int kb_first = max(0, first_key(p, pos_lo, diag)) / kBlockN;  // blocks left of the window skipped
  const int kb_end = kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0;
  int kb0 = 0, count = 0;
  fwd::split_range(max(0, kb_end - kb_first), P.num_splits, split, kb0, count);
  kb0 += kb_first;
  // Paged: the table walked a block at a time (fwd::PageWalk). The first kStages blocks' entries
  // are read first thing, before the setup below (H200: no change in time against reading them
  // in the prologue, PERF_LOG d7, but the D = 64 kernel then needs less spill).
  fwd::PageWalk<kBlockN> walk;
  int tok0 = 0;
  if constexpr (Paged && !SmallPages) {
    walk.start(p, b, kb0);
    tok0 = walk.rd_tok;
  }
  int first_pages[kStages];
#pragma unroll
  for (int s = 0; s < kStages; ++s) first_pages[s] = Paged && !SmallPages && s < count ? walk.read(p) : -1;
  fwd::SmallPages small_pages;
  if constexpr (SmallPages) small_pages.start(p, b);

  int row[2], key_last[2], key_first[2];
  float rowf[2], m_run[2], l_part[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = g + 8 * r;
    key_last[r] = last_key(p, fwd::row_position(row[r], period), diag);
    key_first[r] = first_key(p, fwd::row_position(row[r], period), diag);
    rowf[r] = row[r] < sq ? p.q_scale[offset(p.qs_st, b, h, q0 + row[r])] * p.softmax_scale * kLog2e : 1.f;
    m_run[r] = kNegInf;
    l_part[r] = 0.f;
  }
  // Soft-capping (Softcap kernels): u then holds tanh of the capped argument (fwd::softcap_scores).
  float cap_a[2], cap_b[2];
  if constexpr (Softcap)
    for (int r = 0; r < 2; ++r) fwd::softcap_row(p, b, h, q0 + row[r], row[r] < sq, rowf[r], cap_a[r], cap_b[r]);
  // Blocks past key_last_lo need the diagonal mask, blocks before key_first_hi the window's.
  const int key_last_lo = last_key(p, pos_lo, diag), key_first_hi = first_key(p, pos_hi, diag);

  // Loads of one key block by all 128 threads: K rows (zero past skv), V^T chunks that start
  // before skv (a chunk may run into the row's padding, where P is 0), the K scales. A thread
  // copies 16-byte chunk tid % chunks-per-row of rows tid / chunks-per-row + i * rows-per-pass;
  // a pass moves a multiple of 16 rows, which leaves the swizzle's row bits alone, so each
  // destination is the thread's first offset plus a constant. The sources step by a fixed
  // stride through `opaque` (an empty asm), which keeps ptxas from hoisting every pass's 64-bit
  // address out of the block loop (the one-warp version, d1, spilled at D = 128 without it).
  const uint32_t smem_base = ptx::smem_u32(smem);
  auto stage_base = [&](int stage) { return smem_base + S::kQ + stage * S::kStage; };
  auto opaque = [](const int8_t* ptr) {
    asm volatile("" : "+l"(ptr));
    return ptr;
  };
  // K: 8 (D = 256), 16 (D = 128) or 32 rows per pass. A pass of 16 or 32 rows keeps the
  // swizzle's row bits, so its offset is the first one plus whole rows; D = 256's 8-row passes
  // XOR a per-pass constant in (sm80::k_pass_offset, folded to that sum at D <= 128).
  constexpr int kKChunks = D / 16, kKRows = kThreads / kKChunks;
  constexpr int kVChunks = kBlockN / 16, kVRows = kThreads / kVChunks;
  static_assert(kVRows * kBlockN % 1024 == 0, "V^T passes keep the swizzle");
  const int kc = tid % kKChunks, kr = tid / kKChunks, vc = tid % kVChunks, vd = tid / kVChunks;
  const int k_off = sm80::k_tile_offset<D>(kr, kc), v_off = sm80::swz128(vd * kBlockN + 16 * vc);
  const int8_t* const k_thread = p.k8 + b * p.k_st.bs + hkv * p.k_st.hs + (k0 + kr) * p.k_st.ts + 16 * kc;
  const int8_t* const v_thread =
      p.vt8 + b * p.vt_st.bs + hkv * p.vt_st.hs + vt_seq_start(p.cu_kv, b) + vd * p.vt_st.ts + 16 * vc;
  const float* const ks_head = p.k_scale + offset(p.ks_st, b, hkv, k0);
  const int64_t k_step = kKRows * p.k_st.ts, v_step = kVRows * p.vt_st.ts;
  // Paged: the thread's first bytes in page 0.
  const int8_t* const k_page0 = p.k8 + hkv * p.k_st.hs + kr * p.k_st.ts + 16 * kc;
  const int8_t* const v_page0 = p.vt8 + hkv * p.vt_st.hs + vd * p.vt_st.ts + 16 * vc;
  const float* const ks_page0 = p.k_scale + hkv * p.ks_st.hs;
  auto load_block_paged = [&](int n, int stage, int page, int tok) {  // tok: key0's place in the page
    const int key0 = n * kBlockN, k_left = page < 0 ? 0 : skv - key0 - kr;
    const int pg = max(page, 0);
    const uint32_t base = stage_base(stage);
    const int8_t* src = k_page0 + pg * p.k_st.bs + int64_t(tok) * p.k_st.ts;
#pragma unroll
    for (int it = 0; it < kBlockN / kKRows; ++it, src = opaque(src + k_step)) {
      const bool valid = it * kKRows < k_left;
      ptx::cp_async_16B(base + sm80::k_pass_offset<D>(k_off, kKRows, it), valid ? src : k_page0, valid);
    }
    const bool v_valid = page >= 0 && key0 + 16 * vc < skv;
    src = v_page0 + pg * p.vt_st.bs + tok;
#pragma unroll
    for (int it = 0; it < D / kVRows; ++it, src = opaque(src + v_step))
      ptx::cp_async_16B(base + S::kK + v_off + it * kVRows * kBlockN, v_valid ? src : v_page0, v_valid);
    if (tid < kBlockN) {
      const bool valid = page >= 0 && key0 + tid < skv;
      const float* ks = ks_page0 + pg * p.ks_st.bs + tok + tid;
      ptx::cp_async_4B(base + S::kK + S::kV + 4 * tid, valid ? ks : ks_page0, valid);
    }
  };
  // SmallPages: the thread's piece of each block (sm80::SmallPageTile) through the piece's page,
  // whose table entry is read a block ahead of the copies (next_piece_page below), so the
  // table's round trip stays off the copies' path.
  const bool vt_cm = SmallPages && p.page_size == 16;  // V^T in core-matrix order (sm80::vt_chunk_offset)
  const sm80::SmallPageTile<D, kThreads, kBlockN> small_tile(tid, vt_cm);
  const int8_t* const k_head = p.k8 + hkv * p.k_st.hs;
  const int8_t* const v_head = p.vt8 + hkv * p.vt_st.hs;
  auto piece_page = [&](int n) {
    const int key = n * kBlockN + small_tile.first_key();
    return small_pages.page(key, key < skv);
  };
  auto load_block_small = [&](int n, int stage, int pg) {
    const int key = n * kBlockN + small_tile.first_key(), tok = small_pages.tok(key);
    const int64_t page = max(pg, 0);
    const uint32_t base = stage_base(stage);
    small_tile.copy(base, base + S::kK, base + S::kK + S::kV, k_head + page * p.k_st.bs + int64_t(tok) * p.k_st.ts,
                    p.k_st.ts, v_head + page * p.vt_st.bs + tok, p.vt_st.ts, ks_page0 + page * p.ks_st.bs + tok,
                    pg >= 0, skv - key);
  };
  auto load_block = [&](int n, int stage) {
    const int key0 = n * kBlockN, k_left = skv - key0 - kr;
    const uint32_t base = stage_base(stage);
    const int8_t* src = k_thread + int64_t(key0) * p.k_st.ts;
#pragma unroll
    for (int it = 0; it < kBlockN / kKRows; ++it, src = opaque(src + k_step)) {
      const bool valid = it * kKRows < k_left;
      ptx::cp_async_16B(base + sm80::k_pass_offset<D>(k_off, kKRows, it), valid ? src : k_thread, valid);
    }
    const bool v_valid = key0 + 16 * vc < skv;
    src = v_thread + key0;
#pragma unroll
    for (int it = 0; it < D / kVRows; ++it, src = opaque(src + v_step))
      ptx::cp_async_16B(base + S::kK + v_off + it * kVRows * kBlockN, v_valid ? src : v_thread, v_valid);
    if (tid < kBlockN) {
      const bool valid = key0 + tid < skv;
      ptx::cp_async_4B(base + S::kK + S::kV + 4 * tid, valid ? ks_head + key0 + tid : ks_head, valid);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;

  if (count > 0) {
    const int8_t* const q_rows = p.q8 + b * p.q_st.bs + h * p.q_st.hs + q0 * p.q_st.ts;
    // The Q rows' 16-byte chunks: one per thread at D <= 128, two at D = 256.
    constexpr int kQChunks = kRows * (D / 16);
#pragma unroll
    for (int it = 0; it < (kQChunks + kThreads - 1) / kThreads; ++it) {
      const int i = tid + it * kThreads;
      if (i < kQChunks) {
        const int r = i / (D / 16), c = i % (D / 16);
        const bool valid = r < sq;
        ptx::cp_async_16B(smem_base + sm80::q_tile_offset<D>(r, c), valid ? q_rows + r * p.q_st.ts + 16 * c : q_rows,
                          valid);
      }
    }
    // The first kStages - 1 blocks (one group each, empty past the range).
#pragma unroll
    for (int s = 0, tok = tok0; s < kStages - 1; ++s, tok = walk.next_tok(p, tok)) {
      if constexpr (SmallPages) {
        if (s < count) load_block_small(kb0 + s, s, piece_page(kb0 + s));
      } else if constexpr (Paged) {
        if (s < count) load_block_paged(kb0 + s, s, first_pages[s], tok);
      } else {
        if (s < count) load_block(kb0 + s, s);
      }
      ptx::cp_async_commit();
    }
  }
  // Paged: the page of the next block to load (its place in the page: walk.last_tok).
  int next_page = first_pages[kStages - 1];
  int next_piece_page = -1;  // SmallPages: the thread's piece's page in the next block to load
  if constexpr (SmallPages) next_piece_page = piece_page(kb0 + kStages - 1);

  // Warp w's keys are the block's 32-key step w: n-tiles 4w .. 4w + 3 of the permuted QK^T
  // layout (sm80::permuted_key), k step w of the PV product.
  int k_lane_off[D / 32];
  sm80::k_lane_offsets<D>(lane, k_lane_off);
  // PV ldmatrix: lanes 0-15 read channel tile dn (V^T rows 8 dn + lane % 8, the step's two
  // 16-key chunks), lanes 16-31 tile dn + 1.
  const int v_lane_off =
      sm80::vt_chunk_offset<kBlockN>(8 * (lane >> 4) + (lane & 7), 2 * warp + ((lane >> 3) & 1), vt_cm);

  const bool block_local = p.scheme == Scheme::accurate;
  const float levels = block_local ? 255.f : 127.f;
  const float inv_levels = block_local ? 1.f / 255.f : 1.f / 127.f;
  uint32_t qf[D / 32][4];
  for (int i = 0; i < count; ++i) {
    const int n = kb0 + i, stage = i % kStages;
    // Keep kStages - 1 blocks in flight: after the barrier block i has landed for everyone and
    // every warp is done with block i - 1, whose stage block i + kStages - 1 refills.
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    if constexpr (SmallPages) {
      if (i + kStages - 1 < count) {
        load_block_small(n + kStages - 1, (i + kStages - 1) % kStages, next_piece_page);
        if (i + kStages < count) next_piece_page = piece_page(n + kStages);
      }
    } else if constexpr (Paged) {
      if (i + kStages - 1 < count) {
        load_block_paged(n + kStages - 1, (i + kStages - 1) % kStages, next_page, walk.last_tok(p));
        if (i + kStages < count) next_page = walk.read(p);
      }
    } else {
      if (i + kStages - 1 < count) load_block(n + kStages - 1, (i + kStages - 1) % kStages);
    }
    ptx::cp_async_commit();
    if (i == 0) sm80::load_q_frags<D>(smem, 0, lane, qf);

    // S (16 x 32, this warp's keys) = Q8 K8^T.
    int s_acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[j][e] = kMagicBits;
    const uint32_t sK = stage_base(stage) + 32 * warp * D;
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t bf[4];
        ptx::ldmatrix_x4(bf, sK + k_lane_off[kk] + jj * 16 * D);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        ptx::mma_m16n8k32_s8s8(s_acc[2 * jj], qf[kk], b0);
        ptx::mma_m16n8k32_s8s8(s_acc[2 * jj + 1], qf[kk], b1);
      }
    const int key0 = n * kBlockN + 32 * warp;
    const float* sKs = reinterpret_cast<const float*>(smem + S::kQ + stage * S::kStage + S::kK + S::kV) + 32 * warp;
    float u[4][4];
    sm80::scale_scores<32>(s_acc, sKs, key0, skv, t, u);
    if constexpr (Softcap) fwd::softcap_scores<32>(u, cap_a, cap_b);
    if ((p.causal && n * kBlockN + kBlockN - 1 > key_last_lo) || n * kBlockN < key_first_hi) {  // edge blocks
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + sm80::permuted_key(j, 2 * t + (e & 1));
          if (key > key_last[e >> 1] || key < key_first[e >> 1]) u[j][e] = kNegInf;
        }
    }
    // The block max over all four warps' keys, then the same running max in every warp.
    float mx[2];
    fwd::row_block_max<32>(u, mx);
    mx[0] = fwd::quad_max(mx[0]);
    mx[1] = fwd::quad_max(mx[1]);
    if (t == 0) {
      s_max[warp * kRows + g] = mx[0];
      s_max[warp * kRows + g + 8] = mx[1];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx[r] = fmaxf(mx[r], s_max[w * kRows + g + 8 * r]);
    float m_old[2], ref[2], neg_ref[2], alpha[2], cfac[2];
    fwd::row_max_update<0, false>(mx, rowf, block_local, m_run, m_old, ref, neg_ref);
    fwd::row_factors(m_old, m_run, ref, inv_levels, alpha, cfac);
    uint32_t pf[1][4];
    fwd::make_p_and_l<32>(u, rowf, neg_ref, alpha, cfac, block_local, levels, pf, l_part, [](int) {});

    // O = O * alpha + (P8 V8) * c over this warp's 32 keys: the magic-biased product x gives
    // (x - M) c + O alpha as FFMA(x, c, FFMA(O, alpha, -M c)).
    const uint32_t sV = stage_base(stage) + S::kK;
    const float nmc[2] = {-ptx::kMagic * cfac[0], -ptx::kMagic * cfac[1]};
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      int acc[2][4];
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[x][e] = kMagicBits;
      uint32_t vf[4];
      ptx::ldmatrix_x4(vf, sV + v_lane_off + dn * 8 * kBlockN);
      const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
      ptx::mma_m16n8k32_u8s8(acc[0], pf[0], b0);
      ptx::mma_m16n8k32_u8s8(acc[1], pf[0], b1);
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          o[dn + x][e] = __fmaf_rn(__int_as_float(acc[x][e]), cfac[r], __fmaf_rn(o[dn + x][e], alpha[r], nmc[r]));
        }
    }
  }
  ptx::cp_async_wait<0>();  // no copy outlives the CTA (empty groups past the range)

  // The warps' partial O and l (same running max) summed by warp 0 through the ring's memory.
  __syncthreads();
  float* const red = reinterpret_cast<float*>(smem + S::kQ);  // [warp 1..3][D / 2 + 2][32 lanes]
  constexpr int kPer = D / 2 + 2;
  if (warp > 0) {
    float* dst = red + (warp - 1) * kPer * 32 + lane;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[(4 * dn + e) * 32] = o[dn][e];
    dst[(D / 2) * 32] = l_part[0];
    dst[(D / 2 + 1) * 32] = l_part[1];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int w = 0; w < kWarps - 1; ++w) {
    const float* src = red + w * kPer * 32 + lane;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dn][e] += src[(4 * dn + e) * 32];
    l_part[0] += src[(D / 2) * 32];
    l_part[1] += src[(D / 2 + 1) * 32];
  }

  float2 v2[D / 8];
  fwd::load_v_scale<D>(p, b, hkv, t, v2);
  if (P.num_splits == 1) {
    fwd::epilogue<D, true>(p, b, h, q0, sq, row, o, l_part, m_run, t, v2);
    return;
  }
  // A key range: its partial rows for combine_kernel.
  float inv_l[2], l_full[2];
  fwd::row_sums(l_part, l_full, inv_l);
  const int64_t prow0 = part_row0(P, split, bh);
  fwd::write_partial_rows<D>(P.part_o, P.part_ml, prow0, sq, row, o, l_full, m_run, t, v2);
}

// Merges the key ranges of every row. One warp per row, 4 rows per block of 128 threads.
template <int D>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ Params P) {
  ptx::griddepcontrol_wait();  // the partial rows of fwd_kernel (a programmatic dependent launch)
  const FwdParams& p = P.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x / (kRows / 4), row = (blockIdx.x % (kRows / 4)) * 4 + warp;
  const int b = bh / p.heads_q, h = bh - b * p.heads_q;
  if (row >= min(seq_len(p.cu_q, b, p.seqlen_q), p.seqlen_q)) return;
  const int64_t prow = part_row0(P, 0, bh) + row;
  fwd::merge_split_row<D>(p, P.part_ml + prow, P.part_o + prow * D, int64_t(p.batch) * p.heads_q * kRows,
                          P.num_splits, lane, b, h, seq_start(p.cu_q, b) + row);
}

// Host side (fwd_decode_launch.cuh): the kernel's resident CTAs per SM (cached per device) and
// the launch of one (head dim, ring depth, paged KV, pages smaller than a block, soft-capping).
template <int D, int Stages, bool Paged, bool SmallPages = false, bool Softcap = false>
Status occupancy(int* ctas);
template <int D, int Stages, bool Paged, bool SmallPages = false, bool Softcap = false>
Status launch_fwd(const Params& prm, cudaStream_t stream);

}  // namespace intfa::decode
