// Input distributions and accuracy metrics (see inputs.h).
#include "inputs.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>

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

PagedCopy::PagedCopy(const QuantizedQKV& c, int page, Layout layout, int spare, uint32_t seed, int vt_pad) {
  const int64_t B = c.k8.shape[0], H = c.k8.shape[1], cap = c.k8.shape[2], D = c.k8.shape[3];
  const int64_t maxp = cap / page, P = B * maxp + spare;
  std::vector<int32_t> perm(static_cast<size_t>(P));
  for (int64_t i = 0; i < P; ++i) perm[i] = static_cast<int32_t>(i);
  std::mt19937 rng(seed);
  if (seed) std::shuffle(perm.begin(), perm.end(), rng);  // seed 0: in order
  table.assign(perm.begin(), perm.begin() + B * maxp);
  k8.assign(size_t(P * H * page * D), 0x7f);
  const int64_t vt_row = page + vt_pad;
  vt8.assign(size_t(P * H * D * vt_row), 0x7f);
  ks.assign(size_t(P * H * page), NAN);
  const bool bhsd = layout == Layout::BHSD;
  const int8_t* ck = static_cast<const int8_t*>(c.k8.data);
  const int8_t* cv = static_cast<const int8_t*>(c.vt8.data);
  const float* cs = static_cast<const float*>(c.k_scale.data);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < cap; ++t) {
      const int64_t pg = table[b * maxp + t / page], r = t % page;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t krow = bhsd ? (pg * H + h) * page + r : (pg * page + r) * H + h;
        for (int64_t d = 0; d < D; ++d) {
          k8[krow * D + d] = ck[b * c.k8.stride[0] + h * c.k8.stride[1] + t * c.k8.stride[2] + d];
          vt8[((pg * H + h) * D + d) * vt_row + r] = cv[b * c.vt8.stride[0] + h * c.vt8.stride[1] + d * c.vt8.stride[2] + t];
        }
        ks[(pg * H + h) * page + r] = cs[b * c.k_scale.stride[0] + h * c.k_scale.stride[1] + t];
      }
    }
  x = c;
  x.layout = layout;
  for (auto [t, v] : {std::pair<Tensor*, std::vector<float>*>{&x.v_scale, &vs}, {&x.k_mean, &km}}) {
    if (!t->defined()) continue;
    const float* src = static_cast<const float*>(t->data);
    v->assign(src, src + t->numel());  // contiguous [B, Hkv, D]
    t->data = v->data();
  }
  x.k8 = bhsd ? make_tensor(k8.data(), DType::i8, {P, H, page, D}) : make_tensor(k8.data(), DType::i8, {P, page, H, D});
  x.vt8 = make_tensor(vt8.data(), DType::i8, {P, H, D, page});
  x.vt8.stride[2] = vt_row;
  x.vt8.stride[1] = D * vt_row;
  x.vt8.stride[0] = H * D * vt_row;
  x.k_scale = make_tensor(ks.data(), DType::f32, {P, H, page});
  x.block_table = make_tensor(table.data(), DType::i32, {B, maxp});
}

std::vector<float> make_sinks(int heads_q, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  std::uniform_real_distribution<float> uniform(kSinkLo, kSinkHi);
  std::vector<float> z(static_cast<size_t>(heads_q));
  for (auto& e : z) e = uniform(rng);
  return z;
}

double visible_pairs(int sq, int skv, bool causal, int left, int right) {
  if (causal) right = 0;
  double n = 0;
  for (int r = 0; r < sq; ++r) {
    const int64_t diag = int64_t(r) + skv - sq;
    const int64_t lo = left >= 0 ? std::max<int64_t>(diag - left, 0) : 0;
    const int64_t hi = right >= 0 ? std::min<int64_t>(diag + right, skv - 1) : skv - 1;
    n += double(std::max<int64_t>(hi - lo + 1, 0));
  }
  return n;
}

}  // namespace intfa::tools
