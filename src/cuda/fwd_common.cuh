// Per-thread softmax and epilogue code shared by the sm80 and sm90 forward kernels. Both hold
// the scores of a key block in the mma.sync m16n8 accumulator layout (a thread owns rows g and
// g+8 of a 16-row slice, columns 2t, 2t+1 of every 8-wide tile; a row is spread over the 4
// lanes of a quad) and feed P to an integer MMA whose A fragment is the m16n8k32 one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/numerics.h"
#include "common/params.h"
#include "cuda/ptx/ptx_sm80.cuh"
#include "cuda/tile_order.h"

namespace intfa::fwd {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ void store_out2(void* out, DType dt, int64_t idx, float a, float b) {
  switch (dt) {
    case DType::f16:
      *reinterpret_cast<__half2*>(static_cast<__half*>(out) + idx) = __floats2half2_rn(a, b);
      break;
    case DType::bf16:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + idx) =
          __floats2bfloat162_rn(a, b);
      break;
    default:
      *reinterpret_cast<float2*>(static_cast<float*>(out) + idx) = make_float2(a, b);
      break;
  }
}

// Row statistics of one key block of N keys, in two halves. u holds the scores in log2 units
// before the per-row factor rowf (> 0, so the max commutes with it).
// row_max: the new running max, m_old (the previous one) and ref, the max P is taken against:
// the block max (accurate) or the running max (paper); neg_ref = -ref is the exp2 offset
// (0 for a fully masked row, so exp2(-inf) = 0, never NaN).
// kLazy > 0 (accurate only): the running max, which for `accurate` is only the reference of O
// and l (P8 is taken against the block max), moves only when a block max exceeds it by more
// than kLazy (log2 units). O and l then carry factors up to 2^kLazy, harmless in fp32, and the
// fold's rescale of O (alpha != 1) drops out of nearly every block (FlashAttention-4's
// conditional rescaling). `paper` quantizes P against the running max and keeps it exact.
// The maxima of u (before rowf) of the thread's two rows over its keys of the block's N (the
// quad's four lanes still to be reduced: row_max_update or quad_max).
template <int N>
__device__ __forceinline__ void row_block_max(const float (&u)[N / 8][4], float (&mx)[2]) {
  // Row max over four independent partial maxima, so the FMNMX chains stay short (seeded with
  // the first four tiles, not -inf: eight FMNMX fewer per block).
  static_assert(N / 8 >= 4, "row_max needs at least four 8-key tiles");
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float part[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) part[j] = fmaxf(u[j][2 * r], u[j][2 * r + 1]);
#pragma unroll
    for (int j = 4; j < N / 8; ++j) part[j & 3] = fmaxf(part[j & 3], fmaxf(u[j][2 * r], u[j][2 * r + 1]));
    mx[r] = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// The running max from a block's maxima mx (row_block_max, before rowf; kQuad: reduced over the
// quad here, in the same loop, as the kernels were tuned with): see row_max.
template <int kLazy = 0, bool kQuad = true>
__device__ __forceinline__ void row_max_update(float (&mx)[2], const float (&rowf)[2], bool block_local,
                                               float (&m_run)[2], float (&m_old)[2], float (&ref)[2],
                                               float (&neg_ref)[2]) {
  const float kNegInf = neg_inf();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (kQuad) mx[r] = quad_max(mx[r]);
    const float mb = mx[r] * rowf[r];
    m_old[r] = m_run[r];
    const float cand = fmaxf(m_run[r], mb);
    // From -inf the difference is +inf (or NaN for -inf - -inf, where both are -inf anyway).
    m_run[r] = (kLazy > 0 && block_local && !(cand - m_old[r] > static_cast<float>(kLazy))) ? m_old[r] : cand;
    ref[r] = block_local ? mb : m_run[r];
    neg_ref[r] = ref[r] == kNegInf ? 0.f : -ref[r];
  }
}

template <int N, int kLazy = 0>
__device__ __forceinline__ void row_max(const float (&u)[N / 8][4], const float (&rowf)[2], bool block_local,
                                        float (&m_run)[2], float (&m_old)[2], float (&ref)[2],
                                        float (&neg_ref)[2]) {
  float mx[2];
  row_block_max<N>(u, mx);
  row_max_update<kLazy>(mx, rowf, block_local, m_run, m_old, ref, neg_ref);
}

// row_factors (the MUFU half): alpha = exp2(m_old - m_new), the factor of O and l, and
// cfac = exp2(ref - m_new) / levels, the factor of this block's integer P8 V8 product, taken
// as a product with inv_levels = 1 / levels (a division by the run-time levels is ~20
// instructions and a branch per row; the product differs from it by at most an ulp, below
// ex2.approx's error). Rows with nothing visible yet keep alpha = 1 and cfac = 0.
__device__ __forceinline__ void row_factors(const float (&m_old)[2], const float (&m_run)[2], const float (&ref)[2],
                                            float inv_levels, float (&alpha)[2], float (&cfac)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool none = m_run[r] == neg_inf();  // nothing visible in this row so far
    alpha[r] = none ? 1.f : ptx::ex2_approx(m_old[r] - m_run[r]);
    cfac[r] = (none || ref[r] == neg_inf()) ? 0.f : ptx::ex2_approx(ref[r] - m_run[r]) * inv_levels;
  }
}

// Both halves at once (the sm80 order).
template <int N>
__device__ __forceinline__ void row_update(const float (&u)[N / 8][4], const float (&rowf)[2],
                                           bool block_local, float inv_levels, float (&m_run)[2],
                                           float (&alpha)[2], float (&cfac)[2], float (&neg_ref)[2]) {
  float m_old[2], ref[2];
  row_max<N>(u, rowf, block_local, m_run, m_old, ref, neg_ref);
  row_factors(m_old, m_run, ref, inv_levels, alpha, cfac);
}

// A row's soft-capping factors for softcap_scores from its row factor rowf (q_scale * scale *
// log2 e), which becomes softcap log2 e: a = rowf * 2 / softcap, b = the row's K-mean term
// (FwdParams::score_offset at qrow, 0 for rows past the sequence or without one) * 2 log2 e /
// softcap.
__device__ __forceinline__ void softcap_row(const FwdParams& p, int b, int h, int64_t qrow, bool in_seq,
                                            float& rowf, float& a, float& c) {
  const float off = in_seq && p.score_offset ? p.score_offset[offset(p.qs_st, b, h, qrow)] : 0.f;
  a = rowf * (2.f / p.softcap);
  c = off * (2.f * kLog2e / p.softcap);
  rowf = p.softcap * kLog2e;
}

// Logit soft-capping of a block's scores (FwdParams::softcap): u <- tanh(y) per score with
// 2 log2(e) y = u a + b, the row's factors from softcap_row (its row factor, 1 / softcap and the
// K-mean term folded in), so the softmax then takes u against the row factor softcap log2 e.
// tanh(y) = 1 - 2 / (1 + 2^(u a + b)) by MUFU.EX2 and MUFU.RCP: within a few 1e-7 of tanh in
// absolute terms, which is what the scores see (tanh.approx.f32 is off by up to 2^-11
// relative, ~5e-3 of a score at softcap 50 and beyond the tests' CPU-emulation tolerance).
// Masked keys (-inf) stay -inf (kKeepNegInf); a kernel that masks them after the tanh anyway
// (sm90: keys past the sequence by the diagonal's test) saves the compare and select per score.
template <int N, bool kKeepNegInf = true>
__device__ __forceinline__ void softcap_scores(float (&u)[N / 8][4], const float (&a)[2], const float (&b)[2]) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = __fmaf_rn(u[j][e], a[e >> 1], b[e >> 1]);
      const float t = __fmaf_rn(-2.f, __fdividef(1.f, 1.f + ptx::ex2_approx(x)), 1.f);
      u[j][e] = kKeepNegInf && u[j][e] == neg_inf() ? neg_inf() : t;
    }
}

// 2^x on the FMA pipe, for x <= ~0 (scores against a row maximum). MUFU.EX2 takes 16 lanes per
// clock per SM against the FMA pipe's 128, and in the sm90 kernel the exp2 phases of the two
// consumer warpgroups queue on it (ncu: MIO-throttle stalls), so a share of the exponentials
// goes here (FlashAttention-4's trick). x rounds to j + f, |f| <= 1/2, by the 1.5 * 2^23 magic
// add; 2^f by a degree-4 polynomial (relative fit, max error 2.7e-6 in fp32; against exp2 in
// double, round(255 p) differs by one level at 51 of 9 * 10^5 points spread over [-9, 0], far
// below the tests' tolerance); 2^j by adding j to the exponent field. The clamp keeps j >= -64
// (masked keys' -inf gives 2^-64, which rounds to P8 = 0) so the exponent never wraps.
__device__ __forceinline__ float exp2_poly(float x) {
  x = fmaxf(x, -64.f);
  const float t = __fadd_rn(x, ptx::kMagic);               // bits: 0x4B400000 + round(x)
  const float f = __fsub_rn(x, __fsub_rn(t, ptx::kMagic));  // x - round(x), exact
  float p = __fmaf_rn(9.5701022e-3f, f, 5.5917863e-2f);
  p = __fmaf_rn(p, f, 0.24024743f);
  p = __fmaf_rn(p, f, 0.69312179f);
  p = __fmaf_rn(p, f, 0.99999928f);
  // (t's bits << 23) is round(x) << 23 modulo 2^32: the magic's own bits shift out.
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// P8 = round(levels * exp2(u * rowf - ref)) for the thread's two rows, packed as u8 A fragments
// (pf[c] = a0..a3 of the 32-key step c: a0 = row g, keys {2t, 2t+1} of tiles 4c and 4c+1, a2 the
// same of tiles 4c+2 and 4c+3, a1/a3 row g+8). Which k index each key lands on is the caller's
// business (sm80 permutes K rows, sm90 permutes V columns). kSumP also sums the unquantized p.
// `interleave(c)` runs before chunk c's exponentials, so independent work (a slice of the
// previous block's PV in the sm80 deferred mode) is scheduled between this block's ALU work.
// kPoly of the 16 exponentials per thread and 32-key step use exp2_poly instead of MUFU.EX2.
template <int N, bool kSumP, int kPoly = 0, typename Interleave>
__device__ __forceinline__ void make_p(const float (&u)[N / 8][4], const float (&rowf)[2],
                                       const float (&neg_ref)[2], float levels,
                                       uint32_t (&pf)[N / 32][4], float (&psum)[2],
                                       Interleave&& interleave) {
  float part[N / 32][2];  // one partial sum per 32-key step keeps the FADD chains short
#pragma unroll
  for (int c = 0; c < N / 32; ++c) {
    interleave(c);
    part[c][0] = part[c][1] = 0.f;
    uint32_t q[4][4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float x = __fmaf_rn(u[4 * c + jj][e], rowf[r], neg_ref[r]);
        const float pr = (e * 4 + jj) < kPoly ? exp2_poly(x) : ptx::ex2_approx(x);
        if (kSumP) part[c][r] += pr;
        q[jj][e] = ptx::quantize_p_magic(pr, levels);
      }
    }
    pf[c][0] = ptx::pack_low_bytes(q[0][0], q[0][1], q[1][0], q[1][1]);
    pf[c][1] = ptx::pack_low_bytes(q[0][2], q[0][3], q[1][2], q[1][3]);
    pf[c][2] = ptx::pack_low_bytes(q[2][0], q[2][1], q[3][0], q[3][1]);
    pf[c][3] = ptx::pack_low_bytes(q[2][2], q[2][3], q[3][2], q[3][3]);
  }
  psum[0] = psum[1] = 0.f;
  if (kSumP) {
#pragma unroll
    for (int c = 0; c < N / 32; ++c) {
      psum[0] += part[c][0];
      psum[1] += part[c][1];
    }
  }
}

// This thread's share of l after a block: accurate sums the quantized P8 (numerator and
// denominator share the weights, scaled by cfac), paper the unquantized p (psum from make_p).
template <int N>
__device__ __forceinline__ void block_l(const uint32_t (&pf)[N / 32][4], float (&psum)[2], const float (&alpha)[2],
                                        const float (&cfac)[2], bool block_local, float (&l_part)[2]) {
  if (block_local) {
    uint32_t cnt[2] = {0u, 0u};
#pragma unroll
    for (int c = 0; c < N / 32; ++c) {
      cnt[0] = __dp4a(pf[c][0], 0x01010101u, cnt[0]);
      cnt[0] = __dp4a(pf[c][2], 0x01010101u, cnt[0]);
      cnt[1] = __dp4a(pf[c][1], 0x01010101u, cnt[1]);
      cnt[1] = __dp4a(pf[c][3], 0x01010101u, cnt[1]);
    }
    psum[0] = cfac[0] * static_cast<float>(cnt[0]);
    psum[1] = cfac[1] * static_cast<float>(cnt[1]);
  }
  l_part[0] = l_part[0] * alpha[0] + psum[0];
  l_part[1] = l_part[1] * alpha[1] + psum[1];
}

// P of a block (make_p, summing p only for paper) and its contribution to l.
template <int N, int kPoly = 0, typename Interleave>
__device__ __forceinline__ void make_p_and_l(const float (&u)[N / 8][4], const float (&rowf)[2],
                                             const float (&neg_ref)[2], const float (&alpha)[2],
                                             const float (&cfac)[2], bool block_local, float levels,
                                             uint32_t (&pf)[N / 32][4], float (&l_part)[2],
                                             Interleave&& interleave) {
  float psum[2];
  if (block_local) make_p<N, false, kPoly>(u, rowf, neg_ref, levels, pf, psum, interleave);
  else make_p<N, true, kPoly>(u, rowf, neg_ref, levels, pf, psum, interleave);
  block_l<N>(pf, psum, alpha, cfac, block_local, l_part);
}

// The full row sums (l over the quad's four lanes) of the thread's two rows and their inverses
// (0 for a fully masked row, whose output is then 0).
__device__ __forceinline__ void row_sums(const float (&l_part)[2], float (&l_full)[2], float (&inv_l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_part[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_full[r] = l;
    inv_l[r] = l > 0.f ? 1.f / l : 0.f;
  }
}

// LSE (natural log, plus the K-smoothing offset) of the thread's rows, by the quad's lane 0;
// -inf for fully masked rows. l_full: the row sums reduced over the quad.
__device__ __forceinline__ void write_lse(const FwdParams& p, int b, int h, int64_t q0, int sq, const int (&row)[2],
                                          const float (&l_full)[2], const float (&m_run)[2], int t) {
  if (!p.lse || t != 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= sq) continue;
    const int64_t i = offset(p.qs_st, b, h, q0 + row[r]);
    const float off = p.lse_offset ? p.lse_offset[i] : 0.f;
    p.lse[offset(p.lse_st, b, h, q0 + row[r])] =
        l_full[r] > 0.f ? (m_run[r] + log2f(l_full[r])) * kLn2 + off : neg_inf();
  }
}

// Attention sinks (FwdParams::sinks) of the thread's two rows in the frame of the smoothed
// scores, z2 = (z - lse_offset) log2 e (-inf: none), for fold_sinks. sm90 issues the two loads
// with the v_scale loads, ahead of the epilogue's barriers, so their latency overlaps (inside
// the epilogue they cost a gpt-oss local layer 9.5%, before it 6%: docs/PERF_LOG.md s34).
__device__ __forceinline__ void load_sinks(const FwdParams& p, int b, int h, int64_t q0, int sq, const int (&row)[2],
                                           float (&z2)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    z2[r] = neg_inf();
    if (!p.sinks || row[r] >= sq) continue;
    const float off = p.lse_offset ? p.lse_offset[offset(p.qs_st, b, h, q0 + row[r])] : 0.f;
    z2[r] = sink_frame(sink_of(p, h, row[r]), off);
  }
}

// The sinks (fold_sink) of the thread's two rows, by every lane of the quad: inv_l scaled by
// each row's fold and lse2 the log2 of its whole denominator (-inf: no key and no sink), for
// write_lse2.
__device__ __forceinline__ void fold_sinks(const float (&l_full)[2], const float (&m_run)[2], const float (&z2)[2],
                                           float (&inv_l)[2], float (&lse2)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const SinkFold f = fold_sink(row_log2_sum(m_run[r], l_full[r]), z2[r]);
    inv_l[r] *= f.scale;
    lse2[r] = f.lse2;
  }
}

// write_lse after fold_sinks.
__device__ __forceinline__ void write_lse2(const FwdParams& p, int b, int h, int64_t q0, int sq, const int (&row)[2],
                                           const float (&lse2)[2], int t) {
  if (!p.lse || t != 0) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= sq) continue;
    const float off = p.lse_offset ? p.lse_offset[offset(p.qs_st, b, h, q0 + row[r])] : 0.f;
    p.lse[offset(p.lse_st, b, h, q0 + row[r])] = lse_of(lse2[r], off);
  }
}

// The v_scale pairs of the thread's output channels (8 dn + 2t, +1), loaded before the first
// output store: `out` may alias v_scale as far as the compiler knows, so loads interleaved with
// the stores wait for them, one L2 round trip per channel group (~13k cycles per tile on an
// H200, the persistent sm90 kernel's largest per-tile overhead until they were hoisted).
template <int D>
__device__ __forceinline__ void load_v_scale(const FwdParams& p, int b, int hkv, int t, float2 (&v2)[D / 8],
                                             int c0 = 0) {  // c0: the first channel (sm90, head dim 256)
  const float* vs = p.v_scale + b * p.vs_st.bs + hkv * p.vs_st.hs + c0;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int d = dn * 8 + 2 * t;
    v2[dn] = make_float2(vs[d], vs[d + 1]);  // v_scale may be only 4-byte aligned
  }
}

// Writes O * v_scale / l for the thread's rows (row[r] < sq) and the LSE; fully masked rows give
// 0 and -inf. o[dn] holds channels 8 dn + 2t, +1 of rows g (e = 0, 1) and g+8 (e = 2, 3); v2
// their v_scale (load_v_scale). kSinks: whether the kernel folds FwdParams::sinks in (the code
// moves a kernel's hot loop, so sm80's non-causal kernels leave it to the causal ones).
template <int D, bool kSinks>
__device__ __forceinline__ void epilogue(const FwdParams& p, int b, int h, int64_t q0, int sq,
                                         const int (&row)[2], const float (&o)[D / 8][4],
                                         const float (&l_part)[2], const float (&m_run)[2], int t,
                                         const float2 (&v2)[D / 8]) {
  float inv_l[2], l_full[2], lse2[2];
  row_sums(l_part, l_full, inv_l);
  const bool sinks = kSinks && p.sinks != nullptr;
  if (sinks) {
    float z2[2];
    load_sinks(p, b, h, q0, sq, row, z2);
    fold_sinks(l_full, m_run, z2, inv_l, lse2);
  }
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int d = dn * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= sq) continue;
      const int64_t idx = offset(p.o_st, b, h, q0 + row[r]) + d;
      store_out2(p.out, p.out_dtype, idx, o[dn][2 * r] * v2[dn].x * inv_l[r], o[dn][2 * r + 1] * v2[dn].y * inv_l[r]);
    }
  }
  if (sinks) write_lse2(p, b, h, q0, sq, row, lse2, t);
  else write_lse(p, b, h, q0, sq, row, l_full, m_run, t);
}

// A key range's partial rows (split kernels, for merge_split_row): O * v_scale (not divided by
// l) and (m, l) of the thread's rows row[r] < sq, at rows prow0 + row[r] of part_o (D floats
// each) and part_ml; l_full from row_sums. A range that saw no key leaves O = 0 and m = -inf,
// which the merge weighs 0.
template <int D>
__device__ __forceinline__ void write_partial_rows(float* part_o, float2* part_ml, int64_t prow0, int sq,
                                                   const int (&row)[2], const float (&o)[D / 8][4],
                                                   const float (&l_full)[2], const float (&m_run)[2], int t,
                                                   const float2 (&v2)[D / 8]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= sq) continue;
    float* orow = part_o + (prow0 + row[r]) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<float2*>(orow + dn * 8 + 2 * t) =
          make_float2(o[dn][2 * r] * v2[dn].x, o[dn][2 * r + 1] * v2[dn].y);
    if (t == 0) part_ml[prow0 + row[r]] = make_float2(m_run[r], l_full[r]);
  }
}

// Merges the key-range partials of one query row. Split kernels leave, per key range, the row's
// O * v_scale (not divided by l) and (m, l); then M = max m_s, L = sum l_s 2^(m_s - M),
// O = sum O_s 2^(m_s - M) / L and LSE = (M + log2 L) ln 2 (+ the K-smoothing offset); a row that
// saw no key (L = 0) gets 0 and -inf. A sink (fold_sink) joins once, here. One warp per row: ml
// and o point at range 0's partial row, range s's lies `stride` rows further. q_row: the row's
// token index (q0 + row) in b, h.
template <int D>
__device__ __forceinline__ void merge_split_row(const FwdParams& p, const float2* ml, const float* o, int64_t stride,
                                                int splits, int lane, int b, int h, int64_t q_row) {
  float mx = neg_inf();
  for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, ml[sp * stride].x);
  const float ref = mx == neg_inf() ? 0.f : mx;
  float l = 0.f;
  constexpr int kPairs = D / 64;  // channel pairs per lane
  float2 acc[kPairs];
#pragma unroll
  for (int i = 0; i < kPairs; ++i) acc[i] = make_float2(0.f, 0.f);
  for (int sp = 0; sp < splits; ++sp) {
    const float2 m_l = ml[sp * stride];
    const float w = exp2f(m_l.x - ref);  // 0 for a range that saw no key (m = -inf)
    l += w * m_l.y;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const float2 v = *reinterpret_cast<const float2*>(o + sp * stride * D + 2 * (lane + 32 * i));
      acc[i].x += w * v.x;
      acc[i].y += w * v.y;
    }
  }
  float inv_l = l > 0.f ? 1.f / l : 0.f;
  float lse2 = row_log2_sum(mx, l);
  const float off = p.lse_offset && (p.lse || p.sinks) ? p.lse_offset[offset(p.qs_st, b, h, q_row)] : 0.f;
  if (p.sinks) {  // fold_sinks
    const SinkFold f = fold_sink(lse2, sink_frame(sink_of(p, h, q_row - seq_start(p.cu_q, b)), off));
    inv_l *= f.scale;
    lse2 = f.lse2;
  }
  const int64_t idx = offset(p.o_st, b, h, q_row);
#pragma unroll
  for (int i = 0; i < kPairs; ++i)
    store_out2(p.out, p.out_dtype, idx + 2 * (lane + 32 * i), acc[i].x * inv_l, acc[i].y * inv_l);
  if (p.lse && lane == 0) p.lse[offset(p.lse_st, b, h, q_row)] = lse_of(lse2, off);
}

// Paged KV (FwdParams::block_table, pages a multiple of the kernel's key block kBlockN, so a
// block lies in one page): one sequence's table walked a key block at a time. `rd` is the entry
// of the next block whose page is read and rd_tok that block's first token within its page,
// advanced by kBlockN with a wrap at page_size, so only the start takes a division (PERF_LOG
// d8: two runtime divisions per block cost the decode kernel up to 15%). A page outside
// [0, num_pages) reads as -1: the kernels' loads then copy nothing (zero K, V and K scales) and
// never leave the pool.
template <int kBlockN>
struct PageWalk {
  const int32_t* rd = nullptr;
  int rd_tok = 0;

  __device__ __forceinline__ void start(const FwdParams& p, int b, int first_block) {
    const int idx = first_block * kBlockN / p.page_size;
    rd = p.block_table + b * p.bt_stride + idx;
    rd_tok = first_block * kBlockN - idx * p.page_size;
  }
  // The first token within its page of the block after the one starting at `tok`.
  __device__ __forceinline__ static int next_tok(const FwdParams& p, int tok) {
    return tok + kBlockN == p.page_size ? 0 : tok + kBlockN;
  }
  // The next block's page (-1 outside the pool); the walk moves on to the block after it.
  __device__ __forceinline__ int read(const FwdParams& p) {
    const int pg = __ldg(rd);
    rd_tok = next_tok(p, rd_tok);
    rd += rd_tok == 0;
    return pg >= 0 && pg < p.num_pages ? pg : -1;
  }
  // The first token within its page of the block read last.
  __device__ __forceinline__ int last_tok(const FwdParams& p) const {
    return (rd_tok == 0 ? p.page_size : rd_tok) - kBlockN;
  }
};

// Pages smaller than a key block: 16, 32 or 64 tokens (vLLM's block sizes; the kernels'
// SmallPages instantiations). A block then spans several pages, so every 16-key piece the loads
// copy (a page holds whole pieces) finds its own entry: page(key) reads the entry of the page
// holding `key`, and tok(key) is the key's token within that page. The entries of a block are
// neighbours in the table row, so after the first they are L1 hits; a key at or past the
// sequence's count reads no entry (the table row may end before the block does).
struct SmallPages {
  const int32_t* row = nullptr;  // sequence b's table row
  int shift = 0;                 // log2(page_size)
  int64_t num_pages = 0;

  __device__ __forceinline__ void start(const FwdParams& p, int b) {
    row = p.block_table + b * p.bt_stride;
    shift = __ffs(p.page_size) - 1;
    num_pages = p.num_pages;
  }
  // The page holding `key` (-1 outside the pool, or when !in_seq: nothing is copied then).
  __device__ __forceinline__ int page(int key, bool in_seq) const {
    const int pg = in_seq ? __ldg(row + (key >> shift)) : -1;
    return pg >= 0 && pg < num_pages ? pg : -1;
  }
  __device__ __forceinline__ int tok(int key) const { return key & ((1 << shift) - 1); }
};

}  // namespace intfa::fwd
