// CPU quantizers of the three schemes. The arithmetic (and so every bit of the output) is the
// contract the GPU quantization kernels are tested against: see the rounding rule in intfa.h.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numerics.h"
#include "ref/ref.h"

namespace intfa::ref {

// Quantizes one token row x[0..d) (already fp32) symmetric per-token.
static void quantize_row(const float* x, int d, int8_t* out, float* scale) {
  float amax = 0.f;
  for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(x[c]));
  const float inv = quant_inv_scale(amax);
  for (int c = 0; c < d; ++c) out[c] = quantize_s8(x[c], inv);
  *scale = quant_scale(amax);
}

// K smoothing mean for one (sequence, kv head): fp64 sum -> /n -> fp32 -> input dtype.
static void k_channel_mean(const QuantParams& p, int b, int h, float* mean) {
  const int n = seq_len(p.cu_kv, b, p.seqlen_kv);
  const int64_t t0 = seq_start(p.cu_kv, b);
  std::vector<double> sum(p.head_dim, 0.0);
  for (int t = 0; t < n; ++t) {
    const int64_t base = offset(p.k_st, b, h, t0 + t);
    for (int c = 0; c < p.head_dim; ++c) sum[c] += load_scalar(p.k, p.in_dtype, base + c);
  }
  for (int c = 0; c < p.head_dim; ++c) {
    float m = n > 0 ? static_cast<float>(sum[c] / n) : 0.f;
    mean[c] = round_to_dtype(m, p.in_dtype);
  }
}

static void quantize_kv_head(const QuantParams& p, int b, int h) {
  const int d = p.head_dim;
  const int n = seq_len(p.cu_kv, b, p.seqlen_kv);
  const int64_t t0 = seq_start(p.cu_kv, b);
  const bool smooth = p.scheme != Scheme::paper;

  std::vector<float> mean(d, 0.f);
  if (smooth) k_channel_mean(p, b, h, mean.data());
  if (p.k_mean) {
    float* km = p.k_mean + b * p.km_st.bs + h * p.km_st.hs;
    for (int c = 0; c < d; ++c) km[c] = mean[c];
  }

  std::vector<float> row(d);
  for (int t = 0; t < n; ++t) {
    const int64_t base = offset(p.k_st, b, h, t0 + t);
    for (int c = 0; c < d; ++c)
      row[c] = static_cast<float>(load_scalar(p.k, p.in_dtype, base + c)) - mean[c];
    quantize_row(row.data(), d, p.k8 + offset(p.k8_st, b, h, t0 + t),
                 p.k_scale + offset(p.ks_st, b, h, t0 + t));
  }

  if (p.scheme == Scheme::half) return;  // V stays in fp16/bf16

  // V: per-channel amax (accurate) or one amax per (sequence, head) (paper).
  std::vector<float> amax(d, 0.f);
  for (int t = 0; t < n; ++t) {
    const int64_t base = offset(p.v_st, b, h, t0 + t);
    for (int c = 0; c < d; ++c)
      amax[c] = std::max(amax[c], std::fabs(static_cast<float>(load_scalar(p.v, p.in_dtype, base + c))));
  }
  if (p.scheme == Scheme::paper) {
    const float all = *std::max_element(amax.begin(), amax.end());
    std::fill(amax.begin(), amax.end(), all);
  }
  float* vs = p.v_scale + b * p.vs_st.bs + h * p.vs_st.hs;
  for (int c = 0; c < d; ++c) {
    const float inv = quant_inv_scale(amax[c]);
    vs[c] = quant_scale(amax[c]);
    int8_t* dst = p.vt8 + b * p.vt_st.bs + h * p.vt_st.hs + c * p.vt_st.ts + vt_seq_start(p.cu_kv, b);
    for (int t = 0; t < n; ++t) {
      const float x = static_cast<float>(load_scalar(p.v, p.in_dtype, offset(p.v_st, b, h, t0 + t) + c));
      dst[t] = quantize_s8(x, inv);
    }
  }
}

static void quantize_q_head(const QuantParams& p, int b, int h) {
  const int d = p.head_dim;
  const int n = seq_len(p.cu_q, b, p.seqlen_q);
  const int64_t t0 = seq_start(p.cu_q, b);
  const int hkv = h / (p.heads_q / p.heads_kv);
  const bool smooth = p.scheme != Scheme::paper;

  // The LSE correction uses the unquantized Q and the same (dtype-rounded) K mean that was
  // subtracted from K; recomputed here so Q and K heads can be processed independently.
  std::vector<float> mean(d, 0.f);
  if (smooth && p.lse_offset) k_channel_mean(p, b, hkv, mean.data());

  std::vector<float> row(d);
  for (int t = 0; t < n; ++t) {
    const int64_t base = offset(p.q_st, b, h, t0 + t);
    double dot = 0.0;
    for (int c = 0; c < d; ++c) {
      row[c] = static_cast<float>(load_scalar(p.q, p.in_dtype, base + c));
      dot += static_cast<double>(row[c]) * mean[c];
    }
    quantize_row(row.data(), d, p.q8 + offset(p.q8_st, b, h, t0 + t),
                 p.q_scale + offset(p.qs_st, b, h, t0 + t));
    if (p.lse_offset)
      p.lse_offset[offset(p.qs_st, b, h, t0 + t)] = static_cast<float>(p.softmax_scale * dot);
  }
}

void quantize_cache(const CacheQuantParams& p) {
  const int d = p.head_dim;
  const int group = p.mean ? p.heads / p.heads_kv : 1;
  parallel_for(static_cast<int64_t>(p.batch) * p.heads, [&](int64_t i) {
    const int b = static_cast<int>(i / p.heads), h = static_cast<int>(i % p.heads);
    const float* mean = p.mean ? p.mean + b * p.mean_st.bs + (h / group) * p.mean_st.hs : nullptr;
    std::vector<float> row(d);
    const int64_t pos0 = cache_pos0(p, b);
    for (int t = 0; t < p.tokens; ++t) {
      const int64_t base = offset(p.x_st, b, h, t);
      double dot = 0.0;  // as quantize_q_head: the raw row against the mean
      for (int c = 0; c < d; ++c) {
        const float x = static_cast<float>(load_scalar(p.x, p.in_dtype, base + c));
        if (mean) dot += static_cast<double>(x) * mean[c];
        row[c] = p.subtract_mean && mean ? x - mean[c] : x;
      }
      const int64_t at = cache_pos(p, pos0, t);
      if (at < 0) continue;
      const CachePlace w = cache_place(p, b, at);
      quantize_row(row.data(), d, p.x8 + offset(p.x8_st, w.sb, h, w.tok), p.scale + offset(p.s_st, w.sb, h, w.tok));
      if (p.lse_offset)
        p.lse_offset[offset(p.s_st, w.sb, h, w.tok)] = mean ? static_cast<float>(p.softmax_scale * dot) : 0.f;
    }
  });
  if (!p.v) return;
  parallel_for(static_cast<int64_t>(p.batch) * p.heads_kv, [&](int64_t i) {
    const int b = static_cast<int>(i / p.heads_kv), h = static_cast<int>(i % p.heads_kv);
    float* vs = p.v_scale + b * p.vs_st.bs + h * p.vs_st.hs;
    auto v_at = [&](int t, int c) { return static_cast<float>(load_scalar(p.v, p.in_dtype, offset(p.v_st, b, h, t) + c)); };
    // The new values' range per channel (per tensor: over all channels), and the scales that grow
    // (fixed scales never do: no range needed).
    std::vector<float> amax(d, 0.f), grown(d);
    const int64_t pos0 = cache_pos0(p, b);
    if (!p.fixed_v_scale) {
      for (int c = 0; c < d; ++c)
        for (int t = 0; t < p.tokens; ++t) amax[c] = std::max(amax[c], std::fabs(v_at(t, c)));
      if (p.v_per_tensor) std::fill(amax.begin(), amax.end(), *std::max_element(amax.begin(), amax.end()));
    }
    // V^T byte of channel c, column col (paged: the page holding it).
    auto vt_byte = [&](int c, int64_t col) -> int8_t& { return p.vt8[cache_vt_offset(p, cache_place(p, b, col), h, c)]; };
    // Paged: only the columns before the new tokens are the sequence's.
    const int64_t sweep = p.block_table ? std::min(std::max<int64_t>(pos0, 0), p.cap) : p.vt_cols;
    for (int c = 0; c < d; ++c) {
      grown[c] = !p.fixed_v_scale && v_needs_growth(amax[c], vs[c]) ? grown_v_scale(amax[c]) : vs[c];
      if (grown[c] != vs[c])  // every column the cache holds, but those the new tokens write
        for (int64_t col = 0; col < sweep; ++col)
          // Paged: a page given back (-1, checked by the API) holds nothing to requantize.
          if (!cache_writes(p, pos0, col) && (!p.block_table || cache_place(p, b, col).sb >= 0))
            vt_byte(c, col) = requantize_s8(vt_byte(c, col), vs[c], grown[c]);
      if (!p.fixed_v_scale) vs[c] = grown[c];  // fixed: only read (maybe shared by the batch)
      const float inv = inv_of_scale(vs[c]);
      for (int t = 0; t < p.tokens; ++t) {
        const int64_t at = cache_pos(p, pos0, t);
        if (at >= 0) vt_byte(c, at) = quantize_s8(v_at(t, c), inv);
      }
    }
  });
}

void quantize(const QuantParams& p) {
  parallel_for(static_cast<int64_t>(p.batch) * p.heads_kv,
               [&](int64_t i) { quantize_kv_head(p, static_cast<int>(i / p.heads_kv), static_cast<int>(i % p.heads_kv)); });
  parallel_for(static_cast<int64_t>(p.batch) * p.heads_q,
               [&](int64_t i) { quantize_q_head(p, static_cast<int>(i / p.heads_q), static_cast<int>(i % p.heads_q)); });
}

}  // namespace intfa::ref
