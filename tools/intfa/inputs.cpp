// Input distributions and accuracy metrics (see inputs.h).
#include "inputs.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <thread>
#include <utility>
#include <vector>

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

HostQKV make_inputs_parallel(Dist dist, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                             int head_dim, DType dtype, uint64_t seed) {
  HostQKV x;
  x.batch = batch; x.heads_q = heads_q; x.heads_kv = heads_kv;
  x.seqlen_q = seqlen_q; x.seqlen_kv = seqlen_kv; x.head_dim = head_dim; x.dtype = dtype;
  const int64_t d = head_dim, q_len = int64_t(seqlen_q) * d, kv_len = int64_t(seqlen_kv) * d;
  const int64_t q_slices = int64_t(batch) * heads_q, kv_slices = int64_t(batch) * heads_kv;
  x.q.resize(static_cast<size_t>(q_slices * q_len));
  x.k.resize(static_cast<size_t>(kv_slices * kv_len));
  x.v.resize(x.k.size());
  // Slice s: Q's (b, h) for s < q_slices, then K's, then V's; each as make_inputs draws that
  // tensor (llm: Q and K channels 0-3 x10, K offsets per channel of the slice's head).
  auto fill = [&](int64_t s) {
    const int tensor = s < q_slices ? 0 : s < q_slices + kv_slices ? 1 : 2;
    const int64_t local = tensor == 0 ? s : tensor == 1 ? s - q_slices : s - q_slices - kv_slices;
    uint16_t* out = tensor == 0 ? x.q.data() + local * q_len : (tensor == 1 ? x.k : x.v).data() + local * kv_len;
    const int64_t n = tensor == 0 ? q_len : kv_len;
    // A splitmix64 stream per slice (a 64-bit state stepped by the golden ratio, then mixed):
    // uniforms from 24 of its bits, normals in pairs by Box-Muller. ~5x cheaper per value than
    // std::normal_distribution over mt19937_64, and plenty for test inputs.
    uint64_t state = seed ^ (0xD1B54A32D192ED03ull * static_cast<uint64_t>(s + 1));
    auto next = [&state] {
      uint64_t z = (state += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return z ^ (z >> 31);
    };
    auto uniform = [&] { return static_cast<float>(next() >> 40) * 0x1p-24f; };  // [0, 1)
    float spare = 0.f;
    bool have_spare = false;
    auto normal = [&] {
      if (have_spare) {
        have_spare = false;
        return spare;
      }
      const uint64_t z = next();
      const float u1 = (static_cast<float>(z >> 40) + 1.f) * 0x1p-24f;  // (0, 1]
      const float u2 = static_cast<float>((z >> 16) & 0xFFFFFF) * 0x1p-24f;
      const float r = std::sqrt(-2.f * std::log(u1)), a = 6.2831853f * u2;
      spare = r * std::sin(a);
      have_spare = true;
      return r * std::cos(a);
    };
    std::vector<float> offset(d, 0.f);
    if (dist == Dist::llm && tensor == 1)
      for (auto& o : offset) o = 4.f * normal();
    const bool scaled = dist == Dist::llm && tensor < 2;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = i % d;
      float val = (dist == Dist::uniform ? uniform() : normal()) + offset[c];
      if (scaled && c < 4) val *= 10.f;
      out[i] = to_bits(val, dtype);
    }
  };
  const int64_t slices = q_slices + 2 * kv_slices;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1u, std::thread::hardware_concurrency()), slices));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t s; (s = next.fetch_add(1)) < slices;) fill(s);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
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
