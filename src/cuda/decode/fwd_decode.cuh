// INT8 attention for calls with at most 16 query rows per (batch, head) after GQA packing
// (fwd::pack_gqa_rows): decode steps, speculative-decoding steps, short chunks over a long KV.
//
// Why a kernel of its own: the prefill kernels' 64- or 128-row tiles hold at most 16 real rows
// here, so per key byte they spend 4-8x the tensor, exp2 and fold work a 16-row tile needs, and
// read the int8 KV at about half the copy bandwidth (H200, docs/PERF_LOG.md s28). A decode step
// is a stream over K and V. So one warp (one CTA) takes a unit = (batch, head, key range) with
// its 16 rows in one m16 tile and streams the range's 128-key blocks through a cp.async ring of
// its own; no CTA barrier, and every resident warp keeps its next block in flight. `accurate`
// cuts each head's key blocks into ranges so the units fill the GPU (fwd::decode_split_count),
// and combine_kernel merges them (fwd::merge_split_row, as the sm90 splits). `paper` keeps one
// range per head: its P8 is quantized against the running max, which a range would restart.
//
// Per block the warp runs the sm80 path's own fragment code (mma.sync m16n8k32, ldmatrix, the
// permuted K rows that leave S in the PV A-fragment order, fwd::row_update / make_p_and_l, the
// magic-biased fold), so the numerics are the sm80 kernel's: 128-key blocks, the same P8.
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cuda/fwd_common.cuh"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::decode {

constexpr int kRows = 16;  // query rows per unit: one mma m16 tile
constexpr int kBlockN = sm80::kBlockN;
constexpr int kThreads = 32;
// K/V ring depth per warp: blocks n + 1 and n + 2 load while block n is computed. H200, same
// call, kernel ms 2 / 3 stages: B=1 Hkv=8 32k 0.045 / 0.040, B=16 8k 0.086 / 0.086, B=64 2k
// 0.091 / 0.092 (D=128: 3 CTAs per SM with 2 stages, 2 with 3).
#ifndef INTFA_DECODE_STAGES
#define INTFA_DECODE_STAGES 3
#endif
constexpr int kStages = INTFA_DECODE_STAGES;

template <int D>
struct Smem {
  static constexpr int kQ = kRows * D;     // int8 Q rows (swizzled like sm80's Q tile)
  static constexpr int kK = kBlockN * D;   // int8 K tile (rows = keys, sm80::k_tile_offset)
  static constexpr int kV = D * kBlockN;   // int8 V^T tile (rows = channels)
  static constexpr int kKs = kBlockN * 4;  // fp32 k_scale of the block
  static constexpr int kStage = kK + kV + kKs;
  static constexpr int kBytes = kQ + kStages * kStage;
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

template <int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const __grid_constant__ Params P) {
  using S = Smem<D>;
  const FwdParams& p = P.p;
  const float kNegInf = fwd::neg_inf();
  constexpr int kMagicBits = 0x4B400000;  // accumulators start at 1.5 * 2^23 (sm80 header)
  extern __shared__ __align__(128) uint8_t smem[];

  const int unit = blockIdx.x, bh = unit / P.num_splits, split = unit - bh * P.num_splits;
  const int b = bh / p.heads_q, h = bh - b * p.heads_q;
  const int hkv = h / (p.heads_q / p.heads_kv);
  const int sq = min(seq_len(p.cu_q, b, p.seqlen_q), p.seqlen_q);  // <= kRows (launcher)
  if (sq <= 0) return;
  const int skv = seq_len(p.cu_kv, b, p.seqlen_kv);
  const int64_t q0 = seq_start(p.cu_q, b), k0 = seq_start(p.cu_kv, b);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;

  // Bottom-right causal: a row at query position r sees keys <= r + diag; packed GQA rows are
  // positions r % row_period. key_last: the last key each of the thread's rows sees.
  const int period = p.row_period;
  const int diag = skv - (period > 0 ? period : sq);
  int pos_lo, pos_hi;
  fwd::row_positions(0, sq - 1, period, pos_lo, pos_hi);
  const int kv_end = p.causal ? min(skv, pos_hi + 1 + diag) : skv;
  int kb0 = 0, count = 0;
  fwd::split_range(kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0, P.num_splits, split, kb0, count);

  int row[2], key_last[2];
  float rowf[2], m_run[2], l_part[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = g + 8 * r;
    key_last[r] = (period > 0 ? row[r] % period : row[r]) + diag;
    rowf[r] = row[r] < sq ? p.q_scale[offset(p.qs_st, b, h, q0 + row[r])] * p.softmax_scale * kLog2e : 1.f;
    m_run[r] = kNegInf;
    l_part[r] = 0.f;
  }
  const int key_last_lo = pos_lo + diag;  // blocks past it need the diagonal mask

  // Loads of one key block: K rows (zero past skv), V^T chunks that start before skv (a chunk
  // may run into the row's padding, where P is 0), the K scales. Lane l copies 16-byte chunk
  // l % chunks-per-row of rows l / chunks-per-row + i * rows-per-pass. A pass moves the row by a
  // multiple of 4 (K) or of 512 bytes (V^T), which flips fixed swizzle bits, so each destination
  // is the lane's first offset XOR a constant plus a constant, and the sources step by a fixed
  // stride through `opaque` (an empty asm). Written the plain way, ptxas hoisted all 64
  // per-pass addresses out of the block loop: 255 registers and 180 B of spills at D = 128.
  const uint32_t smem_base = ptx::smem_u32(smem);
  auto stage_base = [&](int stage) { return smem_base + S::kQ + stage * S::kStage; };
  auto opaque = [](const int8_t* ptr) {
    asm volatile("" : "+l"(ptr));
    return ptr;
  };
  constexpr int kKChunks = D / 16, kKRows = kThreads / kKChunks;  // K: 4 (D=128) or 8 rows per pass
  constexpr int kVChunks = kBlockN / 16, kVRows = kThreads / kVChunks;
  static_assert(kVRows * kBlockN == 512, "a V^T pass moves 512 bytes: one swizzle bit flips");
  const int kc = lane % kKChunks, kr = lane / kKChunks, vc = lane % kVChunks, vd = lane / kVChunks;
  const int k_off0 = sm80::k_tile_offset<D>(kr, kc), v_off0 = sm80::swz128(vd * kBlockN + 16 * vc);
  const int8_t* const k_lane = p.k8 + b * p.k_st.bs + hkv * p.k_st.hs + (k0 + kr) * p.k_st.ts + 16 * kc;
  const int8_t* const v_lane =
      p.vt8 + b * p.vt_st.bs + hkv * p.vt_st.hs + vt_seq_start(p.cu_kv, b) + vd * p.vt_st.ts + 16 * vc;
  const float* const ks_head = p.k_scale + offset(p.ks_st, b, hkv, k0);
  const int64_t k_step = kKRows * p.k_st.ts, v_step = kVRows * p.vt_st.ts;
  auto load_block = [&](int n, int stage) {
    const int key0 = n * kBlockN, k_left = skv - key0 - kr;
    const uint32_t base = stage_base(stage);
    const int8_t* src = k_lane + int64_t(key0) * p.k_st.ts;
#pragma unroll
    for (int it = 0; it < kBlockN / kKRows; ++it, src = opaque(src + k_step)) {
      constexpr int kPass = kKRows * D;  // bytes per pass
      const int flip = sm80::k_tile_offset<D>(it * kKRows, 0) - it * kPass;  // the swizzle bits it flips
      const bool valid = it * kKRows < k_left;
      ptx::cp_async_16B(base + ((k_off0 ^ flip) + it * kPass), valid ? src : k_lane, valid);
    }
    const bool v_valid = key0 + 16 * vc < skv;
    src = v_lane + key0;
#pragma unroll
    for (int it = 0; it < D / kVRows; ++it, src = opaque(src + v_step))
      ptx::cp_async_16B(base + S::kK + ((v_off0 ^ ((it & 1) << 6)) + it * 512), v_valid ? src : v_lane, v_valid);
#pragma unroll
    for (int i = lane; i < kBlockN; i += kThreads) {
      const bool valid = key0 + i < skv;
      ptx::cp_async_4B(base + S::kK + S::kV + 4 * i, valid ? ks_head + key0 + i : ks_head, valid);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;

  if (count > 0) {
    const int8_t* const q_rows = p.q8 + b * p.q_st.bs + h * p.q_st.hs + q0 * p.q_st.ts;
    constexpr int kChunks = D / 16;
    for (int i = lane; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const bool valid = r < sq;
      ptx::cp_async_16B(smem_base + sm80::swz128(r * D + 16 * c), valid ? q_rows + r * p.q_st.ts + 16 * c : q_rows,
                        valid);
    }
    // The first kStages - 1 blocks (one group each, empty past the range).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < count) load_block(kb0 + s, s);
      ptx::cp_async_commit();
    }
  }

  int k_lane_off[D / 32];
  sm80::k_lane_offsets<D>(lane, k_lane_off);
  // PV ldmatrix lane offsets: channel tile dn reads V^T rows 8 dn + lane % 8. With 64-byte V^T
  // rows (kBlockN = 64) an 8-row tile spans 4 swizzle lines, so even and odd tiles differ.
  constexpr int kVPar = kBlockN == 64 ? 2 : 1;
  int v_lane_off[kVPar][kBlockN / 64];
#pragma unroll
  for (int par = 0; par < kVPar; ++par)
#pragma unroll
    for (int cc = 0; cc < kBlockN / 64; ++cc)
      v_lane_off[par][cc] =
          sm80::swz128((par * 8 + (lane & 7)) * kBlockN + (4 * cc + (lane >> 3)) * 16) - par * 8 * kBlockN;

  const bool block_local = p.scheme == Scheme::accurate;
  const float levels = block_local ? 255.f : 127.f;
  const float inv_levels = block_local ? 1.f / 255.f : 1.f / 127.f;
  uint32_t qf[D / 32][4];
  int s_acc[kBlockN / 8][4];
  for (int i = 0; i < count; ++i) {
    const int n = kb0 + i, stage = i % kStages;
    // Keep kStages - 1 blocks in flight: issue block i + kStages - 1 (into the stage block i - 1
    // used, which every lane finished with before this iteration's __syncwarp), then wait for i.
    ptx::cp_async_wait<kStages - 2>();
    __syncwarp();
    if (i + kStages - 1 < count) load_block(n + kStages - 1, (i + kStages - 1) % kStages);
    ptx::cp_async_commit();
    if (i == 0 || sm80::reload_q<D>()) sm80::load_q_frags<D>(smem, 0, lane, qf);  // D = 128: 16 registers freed
    sm80::qk_block<D>(qf, stage_base(stage), k_lane_off, kMagicBits, s_acc);

    const float* sKs = reinterpret_cast<const float*>(smem + S::kQ + stage * S::kStage + S::kK + S::kV);
    float u[kBlockN / 8][4];
    sm80::scale_scores(s_acc, sKs, n * kBlockN, skv, t, u);
    if (p.causal && (n + 1) * kBlockN - 1 > key_last_lo) {  // blocks on the diagonal
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n * kBlockN + sm80::permuted_key(j, 2 * t + (e & 1)) > key_last[e >> 1]) u[j][e] = kNegInf;
    }
    float alpha[2], cfac[2], neg_ref[2];
    fwd::row_update<kBlockN>(u, rowf, block_local, inv_levels, m_run, alpha, cfac, neg_ref);
    uint32_t pf[kBlockN / 32][4];
    fwd::make_p_and_l<kBlockN>(u, rowf, neg_ref, alpha, cfac, block_local, levels, pf, l_part, [](int) {});

    // O = O * alpha + (P8 V8) * c: the magic-biased product x gives (x - M) c + O alpha as
    // FFMA(x, c, FFMA(O, alpha, -M c)).
    const uint32_t sV = stage_base(stage) + S::kK;
    const float nmc[2] = {-ptx::kMagic * cfac[0], -ptx::kMagic * cfac[1]};
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      int acc[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};
#pragma unroll
      for (int cc = 0; cc < kBlockN / 64; ++cc) {
        uint32_t vf[4];
        ptx::ldmatrix_x4(vf, sV + v_lane_off[dn & (kVPar - 1)][cc] + dn * 8 * kBlockN);
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
  }
  ptx::cp_async_wait<0>();  // no copy outlives the CTA (empty groups past the range)

  float2 v2[D / 8];
  fwd::load_v_scale<D>(p, b, hkv, t, v2);
  if (P.num_splits == 1) {
    fwd::epilogue<D>(p, b, h, q0, sq, row, o, l_part, m_run, t, v2);
    return;
  }
  // A key range: O * v_scale and (m, l) of each row; a range that saw no key leaves O = 0 and
  // m = -inf, which the merge weighs 0.
  float inv_l[2], l_full[2];
  fwd::row_sums(l_part, l_full, inv_l);
  const int64_t prow0 = part_row0(P, split, bh);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= sq) continue;
    float* orow = P.part_o + (prow0 + row[r]) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<float2*>(orow + dn * 8 + 2 * t) =
          make_float2(o[dn][2 * r] * v2[dn].x, o[dn][2 * r + 1] * v2[dn].y);
    if (t == 0) P.part_ml[prow0 + row[r]] = make_float2(m_run[r], l_full[r]);
  }
}

// Merges the key ranges of every row. One warp per row, 4 rows per block of 128 threads.
template <int D>
__global__ void __launch_bounds__(128) combine_kernel(const __grid_constant__ Params P) {
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
// the launch of one head dim.
template <int D>
Status occupancy(int* ctas);
template <int D>
Status launch_fwd(const Params& prm, cudaStream_t stream);

}  // namespace intfa::decode
