// Input distributions and accuracy metrics (see inputs.h).
#include "inputs.h"

#include <cmath>
#include <random>

namespace intfa::tools {

const char* to_string(Dist d) {
  switch (d) {
    case Dist::normal: return "normal";
    case Dist::uniform: return "uniform";
    case Dist::llm: return "llm";
  }
  return "unknown";
}

bool parse_dist(const std::string& s, Dist* out) {
  for (Dist d : {Dist::normal, Dist::uniform, Dist::llm})
    if (s == to_string(d)) return *out = d, true;
  return false;
}

static uint16_t to_bits(float x, DType dt) {
  return dt == DType::bf16 ? float_to_bf16_bits(x) : float_to_half_bits(x);
}

float to_float(uint16_t bits, DType dt) {
  return dt == DType::bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

HostQKV make_inputs(Dist dist, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                    int head_dim, DType dtype, uint64_t seed) {
  HostQKV x;
  x.batch = batch; x.heads_q = heads_q; x.heads_kv = heads_kv;
  x.seqlen_q = seqlen_q; x.seqlen_kv = seqlen_kv; x.head_dim = head_dim; x.dtype = dtype;
  const int64_t d = head_dim;
  x.q.resize(static_cast<size_t>(batch) * heads_q * seqlen_q * d);
  x.k.resize(static_cast<size_t>(batch) * heads_kv * seqlen_kv * d);
  x.v.resize(x.k.size());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  auto draw = [&] { return dist == Dist::uniform ? uniform(rng) : normal(rng); };
  for (size_t i = 0; i < x.q.size(); ++i) {
    float val = draw();
    if (dist == Dist::llm && static_cast<int64_t>(i % d) < 4) val *= 10.f;
    x.q[i] = to_bits(val, dtype);
  }
  std::vector<float> offset(d, 0.f);
  const int64_t per_head = static_cast<int64_t>(seqlen_kv) * d;
  for (size_t i = 0; i < x.k.size(); ++i) {
    const int64_t c = static_cast<int64_t>(i % d);
    if (dist == Dist::llm && static_cast<int64_t>(i % per_head) == 0)
      for (auto& o : offset) o = 4.f * normal(rng);  // one offset per channel per batch·head
    float val = draw() + offset[c];
    if (dist == Dist::llm && c < 4) val *= 10.f;
    x.k[i] = to_bits(val, dtype);
  }
  for (auto& e : x.v) e = to_bits(draw(), dtype);
  return x;
}

Metrics compare(const std::vector<double>& got, const std::vector<double>& ref) {
  Metrics m;
  double diff2 = 0, ref2 = 0, got2 = 0, dot = 0, diff1 = 0, ref1 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) ++m.nonfinite;
    const double e = got[i] - ref[i];
    diff2 += e * e; ref2 += ref[i] * ref[i]; got2 += got[i] * got[i];
    dot += got[i] * ref[i]; diff1 += std::fabs(e); ref1 += std::fabs(ref[i]);
    m.max_abs = std::max(m.max_abs, std::fabs(e));
  }
  const double eps = 1e-3 * ref1 / std::max<size_t>(ref.size(), 1);
  double rel = 0;
  for (size_t i = 0; i < ref.size(); ++i) rel += std::fabs(got[i] - ref[i]) / (std::fabs(ref[i]) + eps);
  m.rel_l2 = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  m.rel_l1 = ref1 > 0 ? diff1 / ref1 : diff1;
  m.cosine = (ref2 > 0 && got2 > 0) ? dot / std::sqrt(ref2 * got2) : (ref2 == got2 ? 1.0 : 0.0);
  m.mean_rel = ref.empty() ? 0 : rel / ref.size();
  if (m.nonfinite) m.rel_l2 = m.rel_l1 = m.max_abs = m.mean_rel = NAN;
  return m;
}

}  // namespace intfa::tools
