// Exact attention in float64, the accuracy oracle: two passes per row block (scores, then the
// normalized weighted sum), no online softmax, no quantization.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ref/ref.h"

namespace intfa::ref {

void attention_exact(const ExactParams& p) {
  constexpr int kBlockM = 32;
  const int d = p.head_dim;
  const int m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.heads_q * m_blocks;
  parallel_for(tasks, [&](int64_t task) {
    const int m0 = static_cast<int>(task % m_blocks) * kBlockM;
    const int h = static_cast<int>((task / m_blocks) % p.heads_q);
    const int b = static_cast<int>(task / (static_cast<int64_t>(m_blocks) * p.heads_q));
    const int sq = seq_len(p.cu_q, b, p.seqlen_q), skv = seq_len(p.cu_kv, b, p.seqlen_kv);
    if (m0 >= sq) return;
    const int rows = std::min(kBlockM, sq - m0);
    const int hkv = h / (p.heads_q / p.heads_kv);
    const int64_t q0 = seq_start(p.cu_q, b), k0 = seq_start(p.cu_kv, b);

    // K^T (d x skv) and V (skv x d) in double, so both products vectorize along their last index.
    std::vector<double> kt(static_cast<size_t>(d) * skv), vv(static_cast<size_t>(skv) * d);
    for (int j = 0; j < skv; ++j) {
      const int64_t kb = offset(p.k_st, b, hkv, k0 + j), vb = offset(p.v_st, b, hkv, k0 + j);
      for (int c = 0; c < d; ++c) {
        kt[static_cast<size_t>(c) * skv + j] = load_scalar(p.k, p.in_dtype, kb + c);
        vv[static_cast<size_t>(j) * d + c] = load_scalar(p.v, p.in_dtype, vb + c);
      }
    }
    std::vector<double> s(skv), o(d), q(d);
    for (int i = 0; i < rows; ++i) {
      const int r = m0 + i;
      const int64_t qb = offset(p.q_st, b, h, q0 + r);
      for (int c = 0; c < d; ++c) q[c] = load_scalar(p.q, p.in_dtype, qb + c);
      // Keys first .. limit - 1: bottom-right diagonal r + skv - sq, causal and window edges.
      const int64_t diag = int64_t(r) + skv - sq;
      const int64_t hi = p.causal ? diag + p.window_right + 1 : skv;
      const int64_t lo = p.window_left >= 0 ? diag - p.window_left : 0;
      const int limit = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(skv, hi)));
      const int first = static_cast<int>(std::min<int64_t>(limit, std::max<int64_t>(0, lo)));
      std::fill(s.begin(), s.begin() + limit, 0.0);
      for (int c = 0; c < d; ++c) {
        const double qc = q[c];
        const double* kc = kt.data() + static_cast<size_t>(c) * skv;  // (kt is empty when skv = 0)
        for (int j = first; j < limit; ++j) s[j] += qc * kc[j];
      }
      double mx = -std::numeric_limits<double>::infinity();
      for (int j = first; j < limit; ++j) {
        s[j] *= p.softmax_scale;
        if (p.softcap > 0.0) s[j] = p.softcap * std::tanh(s[j] / p.softcap);
        mx = std::max(mx, s[j]);
      }
      double sum = 0.0;
      std::fill(o.begin(), o.end(), 0.0);
      for (int j = first; j < limit; ++j) {
        const double w = std::exp(s[j] - mx);
        sum += w;
        const double* vj = &vv[static_cast<size_t>(j) * d];
        for (int c = 0; c < d; ++c) o[c] += w * vj[c];
      }
      // A sink adds e^z to the denominator only: the weights are taken against max(mx, z).
      const double z = p.sinks ? double(p.sinks[h]) : -std::numeric_limits<double>::infinity();
      const bool any = limit > first;
      double ref = mx, wsum = sum;
      if (z > -std::numeric_limits<double>::infinity()) {
        ref = any ? std::max(mx, z) : z;
        wsum = (any ? sum * std::exp(mx - ref) : 0.0) + std::exp(z - ref);
      }
      const double e = any ? std::exp(mx - ref) : 0.0;  // 1 without a sink
      const int64_t ob = offset(p.o_st, b, h, q0 + r);
      for (int c = 0; c < d; ++c) store_scalar(p.out, p.out_dtype, ob + c, any ? o[c] * e / wsum : 0.0);
      if (p.lse)
        store_scalar(p.lse, p.lse_dtype, offset(p.lse_st, b, h, q0 + r),
                     wsum > 0.0 ? ref + std::log(wsum) : -std::numeric_limits<double>::infinity());
    }
  });
}

}  // namespace intfa::ref
