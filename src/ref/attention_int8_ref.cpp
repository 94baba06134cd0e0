// The blocked INT8 flash-attention loop of each scheme, exactly as design.md §1 defines it.
// Integer block products are computed in fp32 on int8-valued operands: every partial sum is an
// integer below 2^24 (127*127*D for QK^T, 255*127*block_n for PV with block_n <= 512), so the
// result equals the int32 product bit for bit while the loops vectorize on any CPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/numerics.h"
#include "ref/ref.h"

namespace intfa::ref {
namespace {

constexpr int kBlockM = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Tile {
  int b, h, hkv, m0, rows, sq, skv;
  int64_t q0, k0;
};

// Loads key block [n0, n0+cols) as K^T (d x bn, so the score loop runs along keys) and V (bn x d).
// Keys before j0 (left of every row's window) are not read: zeros (a paged cache may have given
// their pages back).
void load_kv_block(const FwdParams& p, const Tile& t, int n0, int cols, int j0, float* kt, float* ks,
                   float* vb) {
  const int d = p.head_dim, bn = p.block_n;
  for (int j = 0; j < j0; ++j) {
    for (int c = 0; c < d; ++c) kt[c * bn + j] = 0.f, vb[j * d + c] = 0.f;
    ks[j] = 0.f;
  }
  for (int j = j0; j < cols; ++j) {
    const KvPlace at = kv_place(p, t.b, n0 + j);
    const int8_t* krow = p.k8 + offset(p.k_st, at.sb, t.hkv, at.tok);
    for (int c = 0; c < d; ++c) kt[c * bn + j] = krow[c];
    ks[j] = p.k_scale[offset(p.ks_st, at.sb, t.hkv, at.tok)];
  }
  if (p.scheme == Scheme::half) {
    for (int j = j0; j < cols; ++j) {
      const int64_t base = offset(p.v_st, t.b, t.hkv, t.k0 + n0 + j);
      for (int c = 0; c < d; ++c) vb[j * d + c] = static_cast<float>(load_scalar(p.v, p.v_dtype, base + c));
    }
  } else {
    for (int j = j0; j < cols; ++j) {
      const KvPlace at = kv_place(p, t.b, n0 + j);
      const int8_t* col = p.vt8 + at.sb * p.vt_st.bs + t.hkv * p.vt_st.hs + at.col;
      for (int c = 0; c < d; ++c) vb[j * d + c] = col[c * p.vt_st.ts];
    }
  }
}

void attend_tile(const FwdParams& p, const Tile& t) {
  const int d = p.head_dim, bn = p.block_n;
  std::vector<float> qf(kBlockM * d), rowf(kBlockM), m(kBlockM, kNegInf), l(kBlockM, 0.f), cap_b(kBlockM, 0.f);
  std::vector<float> acc(kBlockM * d, 0.f), kt(d * bn), ks(bn), vb(bn * d), s(kBlockM * bn);
  std::vector<float> prow(bn), pv(d);

  // Scores in log2 units: t = S_int * (s_q * scale * log2 e) * s_k.
  for (int i = 0; i < t.rows; ++i) {
    const int8_t* qrow = p.q8 + offset(p.q_st, t.b, t.h, t.q0 + t.m0 + i);
    for (int c = 0; c < d; ++c) qf[i * d + c] = qrow[c];
    rowf[i] = p.q_scale[offset(p.qs_st, t.b, t.h, t.q0 + t.m0 + i)] * p.softmax_scale * kLog2e;
    if (p.score_offset) cap_b[i] = p.score_offset[offset(p.qs_st, t.b, t.h, t.q0 + t.m0 + i)] / p.softcap;
  }
  // Soft-capping: t (log2 units) -> softcap log2(e) tanh(t / (softcap log2 e) + offset / softcap),
  // the offset being the smoothed schemes' K-mean term (FwdParams::score_offset).
  const bool capped = p.softcap > 0.f;
  const float cap2 = p.softcap * kLog2e, inv_cap2 = capped ? 1.f / cap2 : 0.f;
  // Bottom-right diagonal: row r sees keys first_key(r) .. last_key(r) (causal: <= r + skv - sq;
  // a sliding window bounds both sides). Blocks stay aligned to key 0 as on the GPU, so a block
  // the window cuts holds the same keys there.
  const int diag = t.skv - t.sq;
  const int kv_end = std::min(t.skv, last_key(p, t.m0 + t.rows - 1, diag) + 1);
  const int kv_begin = std::max(0, first_key(p, t.m0, diag));

  for (int n0 = kv_begin / bn * bn; n0 < kv_end; n0 += bn) {
    const int cols = std::min(bn, t.skv - n0);
    load_kv_block(p, t, n0, cols, std::max(0, kv_begin - n0), kt.data(), ks.data(), vb.data());
    std::fill(s.begin(), s.end(), 0.f);
    for (int i = 0; i < t.rows; ++i) {
      float* si = &s[i * bn];
      for (int c = 0; c < d; ++c) {
        const float qv = qf[i * d + c];
        const float* kc = &kt[c * bn];
        for (int j = 0; j < cols; ++j) si[j] += qv * kc[j];
      }
    }
    for (int i = 0; i < t.rows; ++i) {
      const int limit = std::min(cols, last_key(p, t.m0 + i, diag) - n0 + 1);
      const int first = std::max(0, first_key(p, t.m0 + i, diag) - n0);
      if (limit <= first) continue;  // this block is fully masked for the row
      float* si = &s[i * bn];
      float mb = kNegInf;
      for (int j = first; j < limit; ++j) {
        si[j] = si[j] * rowf[i] * ks[j];
        if (capped) si[j] = cap2 * std::tanh(std::fma(si[j], inv_cap2, cap_b[i]));
        mb = std::max(mb, si[j]);
      }
      const float m_new = std::max(m[i], mb);
      const float alpha = std::exp2(m[i] - m_new);  // 0 on the first visible block
      float c_blk = 1.f, l_blk = 0.f;
      switch (p.scheme) {
        case Scheme::paper:  // running max, s8 P with 127 levels, l from unquantized p
          for (int j = first; j < limit; ++j) {
            const float pr = std::exp2(si[j] - m_new);
            l_blk += pr;
            prow[j] = static_cast<float>(quantize_p(pr, 127.f));
          }
          c_blk = 1.f / 127.f;
          break;
        case Scheme::accurate: {  // block-local max, u8 P with 255 levels, l from quantized P
          float sum_p8 = 0.f;
          for (int j = first; j < limit; ++j) {
            prow[j] = static_cast<float>(quantize_p(std::exp2(si[j] - mb), 255.f));
            sum_p8 += prow[j];
          }
          c_blk = std::exp2(mb - m_new) / 255.f;
          l_blk = c_blk * sum_p8;
          break;
        }
        case Scheme::half:  // running max, P rounded to the input dtype, V unquantized
          for (int j = first; j < limit; ++j) {
            prow[j] = round_to_dtype(std::exp2(si[j] - m_new), p.v_dtype);
            l_blk += prow[j];
          }
          break;
      }
      std::fill(pv.begin(), pv.end(), 0.f);
      for (int j = first; j < limit; ++j) {
        const float pj = prow[j];
        if (pj == 0.f) continue;
        const float* vj = &vb[j * d];
        for (int c = 0; c < d; ++c) pv[c] += pj * vj[c];
      }
      float* ai = &acc[i * d];
      for (int c = 0; c < d; ++c) ai[c] = ai[c] * alpha + pv[c] * c_blk;
      l[i] = l[i] * alpha + l_blk;
      m[i] = m_new;
    }
  }

  // Epilogue: per-channel V scale and 1/l; fully masked rows give 0 and LSE = -inf.
  const float* vs = p.scheme == Scheme::half ? nullptr
                                             : p.v_scale + t.b * p.vs_st.bs + t.hkv * p.vs_st.hs;
  for (int i = 0; i < t.rows; ++i) {
    const int64_t obase = offset(p.o_st, t.b, t.h, t.q0 + t.m0 + i);
    const bool empty = !(l[i] > 0.f);
    float inv_l = empty ? 0.f : 1.f / l[i];
    const float off = p.lse_offset ? p.lse_offset[offset(p.qs_st, t.b, t.h, t.q0 + t.m0 + i)] : 0.f;
    float lse = empty ? kNegInf : m[i] * kLn2 + std::log(l[i]) + off;
    const float z = p.sinks ? sink_of(p, t.h, t.m0 + i) : kNegInf;
    if (z > kNegInf) {  // the GPU kernels' epilogue (fold_sink; -inf is no sink there, bit for bit)
      const SinkFold f = fold_sink(row_log2_sum(m[i], l[i]), sink_frame(z, off));
      inv_l *= f.scale;
      lse = lse_of(f.lse2, off);
    }
    for (int c = 0; c < d; ++c) {
      const float o = empty ? 0.f : acc[i * d + c] * (vs ? vs[c] : 1.f) * inv_l;
      store_scalar(p.out, p.out_dtype, obase + c, o);
    }
    if (p.lse) p.lse[offset(p.lse_st, t.b, t.h, t.q0 + t.m0 + i)] = lse;
  }
}

}  // namespace

void attention_int8(const FwdParams& p) {
  const int m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.heads_q * m_blocks;
  parallel_for(tasks, [&](int64_t task) {
    Tile t;
    t.m0 = static_cast<int>(task % m_blocks) * kBlockM;
    t.h = static_cast<int>((task / m_blocks) % p.heads_q);
    t.b = static_cast<int>(task / (static_cast<int64_t>(m_blocks) * p.heads_q));
    t.sq = seq_len(p.cu_q, t.b, p.seqlen_q);
    t.skv = kv_len(p, t.b);
    if (t.m0 >= t.sq) return;
    t.rows = std::min(kBlockM, t.sq - t.m0);
    t.hkv = t.h / (p.heads_q / p.heads_kv);
    t.q0 = seq_start(p.cu_q, t.b);
    t.k0 = seq_start(p.cu_kv, t.b);
    attend_tile(p, t);
  });
}

void fill_no_key_rows(const NoKeyRows& r) {
  const size_t row_bytes = static_cast<size_t>(r.head_dim) * r.elem_bytes;
  for (int64_t b = 0; b < r.batch; ++b)
    for (int64_t h = 0; h < r.heads; ++h)
      for (int64_t t = 0; t < r.tokens; ++t) {
        std::memset(static_cast<char*>(r.out) + offset(r.o_st, b, h, t) * r.elem_bytes, 0, row_bytes);
        if (r.lse) r.lse[offset(r.lse_st, b, h, t)] = r.sinks ? r.sinks[h] : kNegInf;
      }
}

}  // namespace intfa::ref
