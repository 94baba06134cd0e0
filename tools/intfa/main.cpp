// intfa command-line tool: info, demo, accuracy, bench (design.md §2). Uses only the public API.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "inputs.h"
#include "intfa/intfa.h"

namespace {

using namespace intfa;
using tools::Dist;

constexpr int kExitUsage = 2;
constexpr int kExitError = 1;

struct UsageError {
  std::string msg;
};

// --name value parsing with precise messages.
class Args {
 public:
  Args(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) throw UsageError{"unexpected argument '" + a + "'"};
      // Flags: bare, they mean 1 (--causal 0|1 and --sinks 0|1 take a value too).
      const bool flag = a == "--causal" || a == "--sinks";
      if (flag && (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0)) {
        kv_[a] = "1";
        continue;
      }
      if (i + 1 >= argc) throw UsageError{a + ": expected a value"};
      kv_[a] = argv[++i];
    }
  }
  void allow(const std::vector<std::string>& names) const {
    for (auto& [k, v] : kv_) {
      bool ok = false;
      for (auto& n : names) ok |= n == k;
      if (!ok) throw UsageError{"unknown option " + k};
    }
  }
  std::string str(const std::string& name, const std::string& def) const {
    auto it = kv_.find(name);
    return it == kv_.end() ? def : it->second;
  }
  std::vector<std::string> list(const std::string& name, const std::string& def) const {
    std::vector<std::string> out;
    std::stringstream ss(str(name, def));
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) out.push_back(item);
    if (out.empty()) throw UsageError{name + ": expected a comma-separated list, got '" + str(name, def) + "'"};
    return out;
  }
  std::vector<int> ints(const std::string& name, const std::string& def, int lo, int hi) const {
    std::vector<int> out;
    for (auto& s : list(name, def)) {
      char* end = nullptr;
      long v = std::strtol(s.c_str(), &end, 10);
      if (s.empty() || *end != 0 || v < lo || v > hi)
        throw UsageError{name + ": expected integers in [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "] separated by commas, got '" + s + "'"};
      out.push_back(static_cast<int>(v));
    }
    return out;
  }
  int integer(const std::string& name, int def, int lo, int hi) const {
    auto v = ints(name, std::to_string(def), lo, hi);
    if (v.size() != 1) throw UsageError{name + ": expected one integer"};
    return v[0];
  }

 private:
  std::map<std::string, std::string> kv_;
};

std::vector<Scheme> parse_schemes(const Args& a, const std::string& def) {
  std::vector<Scheme> out;
  for (auto& s : a.list("--scheme", def)) {
    Scheme sc;
    if (!parse_scheme(s, &sc)) throw UsageError{"--scheme: expected paper, accurate or half, got '" + s + "'"};
    out.push_back(sc);
  }
  return out;
}

std::vector<Dist> parse_dists(const Args& a, const std::string& def) {
  std::vector<Dist> out;
  for (auto& s : a.list("--dist", def)) {
    Dist d;
    if (!tools::parse_dist(s, &d)) throw UsageError{"--dist: expected normal, uniform or llm, got '" + s + "'"};
    out.push_back(d);
  }
  return out;
}

DType parse_dtype(const Args& a) {
  std::string s = a.str("--dtype", "bf16");
  if (s == "bf16" || s == "bfloat16") return DType::bf16;
  if (s == "fp16" || s == "float16") return DType::f16;
  throw UsageError{"--dtype: expected bf16 or fp16, got '" + s + "'"};
}

Backend parse_device(const Args& a) {
  Backend b;
  std::string s = a.str("--device", "auto");
  if (!parse_backend(s, &b)) throw UsageError{"--device: expected cpu, gpu or auto, got '" + s + "'"};
  if (b == Backend::automatic) b = device_info(0).present ? Backend::gpu : Backend::cpu;
  if (b == Backend::gpu && !device_info(0).present)
    throw std::runtime_error("--device gpu needs a CUDA GPU: " + device_info(0).error);
  return b;
}

// --window LEFT,RIGHT: Options::window_left / window_right, FlashAttention's window_size (-1
// leaves a side open; the default -1,-1 is no window). causal is RIGHT = 0, so with causal runs
// (`causal`: any of --causal is 1) RIGHT must be -1 or 0: said here, before any work, as the
// library would say it at the first call.
std::pair<int, int> parse_window(const Args& a, bool causal) {
  const std::string s = a.str("--window", "-1,-1");
  const size_t comma = s.find(',');
  int edge[2] = {-1, -1};
  bool ok = comma != std::string::npos;
  for (int i = 0; i < 2 && ok; ++i) {
    const std::string part = i == 0 ? s.substr(0, comma) : s.substr(comma + 1);
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(part.c_str(), &end, 10);
    ok = !part.empty() && *end == 0 && errno == 0 && v >= -1 && v <= INT_MAX;
    edge[i] = static_cast<int>(v);
  }
  if (!ok)
    throw UsageError{"--window: expected LEFT,RIGHT, two integers each -1 (no edge) or >= 0, e.g. "
                     "255,0, got '" + s + "'"};
  if (causal && edge[1] > 0)
    throw UsageError{"--window: causal is RIGHT = 0, so RIGHT must be -1 or 0 when --causal includes 1, got '" +
                     s + "'"};
  return {edge[0], edge[1]};
}

bool windowed(const Options& o) { return o.window_left >= 0 || o.window_right >= 0; }

// ", window (L, R)" for a header line, or nothing without a window.
std::string window_note(const Options& o) {
  if (!windowed(o)) return "";
  return ", window (" + std::to_string(o.window_left) + ", " + std::to_string(o.window_right) + ")";
}

// The `, "window": [L, R]` field of a JSON row, or nothing without a window.
std::string window_json(const Options& o) {
  if (!windowed(o)) return "";
  return ", \"window\": [" + std::to_string(o.window_left) + ", " + std::to_string(o.window_right) + "]";
}

std::string fmt(double v, const char* f = "%.3e") {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// --sinks [0|1] (bare: 1): attention sinks (Options::sinks), one logit per query head from
// tools::make_sinks, in intfa and the float64 reference alike.
bool parse_sinks(const Args& a) { return a.integer("--sinks", 0, 0, 1) == 1; }

// A host tensor over z (the logits of one run), or an undefined one for an empty z.
Tensor sinks_tensor(std::vector<float>& z) {
  return z.empty() ? Tensor() : make_tensor(z.data(), DType::f32, {static_cast<int64_t>(z.size())});
}

// --softcap X: logit soft-capping (Options::softcap), X * tanh(s / X); 0 (default): none.
float parse_softcap(const Args& a) {
  const std::string s = a.str("--softcap", "0");
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !std::isfinite(v) || v < 0 || v > 1e30)
    throw UsageError{"--softcap: expected a finite number >= 0 (0: none), got '" + s + "'"};
  return static_cast<float>(v);
}

// ", softcap X" for a header line and the `, "softcap": X` field of a JSON row, or nothing.
std::string softcap_note(const Options& o) { return o.softcap > 0.f ? ", softcap " + fmt(o.softcap, "%g") : ""; }
std::string softcap_json(const Options& o) {
  return o.softcap > 0.f ? ", \"softcap\": " + fmt(o.softcap, "%g") : "";
}

// ", sinks U[0, 8) per head" for a header line, or nothing without sinks.
std::string sinks_note(const Options& o) {
  if (!o.sinks.defined()) return "";
  return ", sinks U[" + fmt(tools::kSinkLo, "%g") + ", " + fmt(tools::kSinkHi, "%g") + ") per head";
}

// The `, "sinks": [lo, hi]` field of a JSON row (the logits' range), or nothing without sinks.
std::string sinks_json(const Options& o) {
  if (!o.sinks.defined()) return "";
  return ", \"sinks\": [" + fmt(tools::kSinkLo, "%g") + ", " + fmt(tools::kSinkHi, "%g") + "]";
}

GpuPath parse_gpu_path(const Args& a) {
  GpuPath p;
  std::string s = a.str("--path", "auto");
  if (!parse_path(s, &p)) throw UsageError{"--path: expected auto, sm80, sm90 or decode, got '" + s + "'"};
  return p;
}

void check(const Status& st, const char* what) {
  if (!st.ok()) throw std::runtime_error(std::string(what) + ": " + st.message());
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Device copies of host inputs; freed on scope exit.
struct DeviceBuf {
  void* ptr = nullptr;
  explicit DeviceBuf(size_t bytes) { check(gpu_malloc(&ptr, bytes), "gpu_malloc"); }
  DeviceBuf(const void* host, size_t bytes) : DeviceBuf(bytes) {
    check(gpu_copy_to_device(ptr, host, bytes), "copy to GPU");
  }
  ~DeviceBuf() { if (ptr) (void)gpu_free(ptr); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

Tensor on_device(Tensor t, void* ptr) {
  t.data = ptr;
  t.on_device = true;
  return t;
}

// Runs intfa on (q,k,v) on the chosen backend; returns the fp32 output and the time. Sinks
// (opts.sinks) are host logits; a GPU run copies them to the device.
struct RunResult {
  std::vector<float> out;
  double ms = 0;
  GpuPath ran = GpuPath::automatic;  // GPU runs: the kernel family that ran (Options::ran)
};

RunResult run_intfa(tools::HostQKV& x, const Options& opts, Backend backend) {
  RunResult r;
  r.out.assign(x.q.size(), NAN);  // poisoned: unwritten elements show
  const int64_t shape[4] = {x.batch, x.heads_q, x.seqlen_q, x.head_dim};
  Tensor out = make_tensor(r.out.data(), DType::f32, 4, shape);
  if (backend == Backend::cpu) {
    double t0 = now_ms();
    check(attention(x.tq(), x.tk(), x.tv(), out, nullptr, opts), "attention (cpu)");
    r.ms = now_ms() - t0;
    return r;
  }
  const size_t qb = x.q.size() * 2, kb = x.k.size() * 2;
  DeviceBuf dq(x.q.data(), qb), dk(x.k.data(), kb), dv(x.v.data(), kb), dout(r.out.data(), r.out.size() * 4);
  Tensor tq = on_device(x.tq(), dq.ptr), tk = on_device(x.tk(), dk.ptr), tv = on_device(x.tv(), dv.ptr);
  Tensor to = on_device(out, dout.ptr);
  Options o = opts;
  o.ran = &r.ran;
  std::unique_ptr<DeviceBuf> dz;  // the sinks (host logits in opts) in the memory space of q
  if (opts.sinks.defined()) {
    dz = std::make_unique<DeviceBuf>(opts.sinks.data, static_cast<size_t>(opts.sinks.numel()) * 4);
    o.sinks = on_device(opts.sinks, dz->ptr);
  }
  double t0 = now_ms();
  check(attention(tq, tk, tv, to, nullptr, o), "attention (gpu)");
  check(gpu_synchronize(), "attention (gpu)");
  r.ms = now_ms() - t0;
  check(gpu_copy_to_host(r.out.data(), dout.ptr, r.out.size() * 4), "copy from GPU");
  return r;
}

// Exact float64 attention under the mask of `mask` (its causal flag and window) with its sinks
// (host logits); nothing else of it.
std::vector<double> run_exact(tools::HostQKV& x, const Options& mask, double* ms) {
  std::vector<double> ref(x.q.size(), NAN);
  const int64_t shape[4] = {x.batch, x.heads_q, x.seqlen_q, x.head_dim};
  Tensor out = make_tensor(ref.data(), DType::f64, 4, shape);
  Options o;
  o.causal = mask.causal;
  o.window_left = mask.window_left;
  o.window_right = mask.window_right;
  o.sinks = mask.sinks;
  o.softcap = mask.softcap;
  double t0 = now_ms();
  check(attention_reference(x.tq(), x.tk(), x.tv(), out, nullptr, o), "attention_reference");
  if (ms) *ms = now_ms() - t0;
  return ref;
}

// ------------------------------------------------------------------------------------------
int cmd_info() {
  BuildInfo b = build_info();
  DeviceInfo d = device_info(0);
  std::printf("intfa %s\n", b.version.c_str());
  std::printf("CUDA backend built: %s%s%s\n", b.cuda_built ? "yes" : "no",
              b.cuda_built ? " (" : "", b.cuda_built ? (b.cuda_archs + ")").c_str() : "");
  if (d.present) {
    std::printf("GPU: %s, compute capability %d.%d, %d SMs, %.1f GiB\n", d.name.c_str(), d.major,
                d.minor, d.sm_count, d.memory_bytes / 1073741824.0);
    GpuPath p;
    Status st = resolve_gpu_path(GpuPath::automatic, 0, &p);
    std::printf("GPU path: %s%s\n", st.ok() ? to_string(p) : st.message().c_str(),
                st.ok() ? " (decode kernel for <= 16 query rows per batch and K/V head at head dims 64, 128, 256; "
                          "head dim 256: sm90 for prefill without soft-capping)"
                        : "");
  } else {
    std::printf("GPU: none (%s); the CPU backend serves every call\n", d.error.c_str());
  }
  std::printf("CPU backend: schemes paper, accurate, half; head_dim multiple of 16 up to 256\n");
  return 0;
}

int cmd_demo(const Args& a) {
  a.allow({"--device", "--seq", "--heads", "--hdim", "--scheme", "--path", "--sinks"});
  const Backend backend = parse_device(a);
  const bool gpu = backend == Backend::gpu;
  const int seq = a.integer("--seq", gpu ? 4096 : 1024, 1, 1 << 20);
  const int heads = a.integer("--heads", 8, 1, 1024);
  const int hdim = a.integer("--hdim", 128, 16, 256);
  Options opts;
  opts.scheme = parse_schemes(a, "accurate").at(0);
  opts.backend = backend;
  opts.path = parse_gpu_path(a);
  std::vector<float> z = parse_sinks(a) ? tools::make_sinks(heads, 2024) : std::vector<float>();
  opts.sinks = sinks_tensor(z);
  std::printf("intfa demo: B=1 H=%d N=%d D=%d bf16, scheme %s, backend %s%s\n", heads, seq, hdim,
              to_string(opts.scheme), to_string(backend), sinks_note(opts).c_str());
  auto x = tools::make_inputs(Dist::normal, 1, heads, heads, seq, seq, hdim, DType::bf16, 2024);
  double ref_ms = 0;
  auto ref = run_exact(x, opts, &ref_ms);
  if (gpu) (void)run_intfa(x, opts, backend);  // warm-up: module load, allocator
  RunResult r = run_intfa(x, opts, backend);
  tools::Metrics m = tools::compare(std::vector<double>(r.out.begin(), r.out.end()), ref);
  const double ops = 4.0 * heads * double(seq) * seq * hdim;
  std::printf("accuracy vs float64: rel_l2 %s  rel_l1 %s  cosine %.6f  max_abs %s\n",
              fmt(m.rel_l2).c_str(), fmt(m.rel_l1).c_str(), m.cosine, fmt(m.max_abs).c_str());
  const std::string where = gpu ? std::string(" (") + to_string(r.ran) + " kernel)" : std::string();
  std::printf("time: intfa %s%s %.2f ms (%.2f TOPS, quantization included); baseline float64 "
              "reference on the CPU %.2f ms (same run): %.1fx\n",
              to_string(backend), where.c_str(), r.ms, ops / r.ms / 1e9, ref_ms, ref_ms / r.ms);
  if (!gpu) std::printf("(no GPU found: this ran on the CPU backend; `intfa bench` needs a GPU)\n");
  return std::isfinite(m.rel_l2) ? 0 : kExitError;
}

int cmd_accuracy(const Args& a) {
  a.allow({"--device", "--seq", "--dist", "--scheme", "--batch", "--heads", "--heads-kv", "--hdim",
           "--block", "--dtype", "--causal", "--window", "--sinks", "--softcap", "--seed", "--json", "--path"});
  const Backend backend = parse_device(a);
  const auto seqs = a.ints("--seq", "1024,4096", 1, 1 << 20);
  const auto dists = parse_dists(a, "normal,uniform,llm");
  const auto schemes = parse_schemes(a, "paper,accurate,half");
  const int batch = a.integer("--batch", 1, 1, 1024);
  const int heads = a.integer("--heads", 8, 1, 1024);
  const int heads_kv = a.integer("--heads-kv", heads, 1, heads);
  if (heads % heads_kv) throw UsageError{"--heads-kv: must divide --heads"};
  const int hdim = a.integer("--hdim", 128, 16, 256);
  const int block = a.integer("--block", 64, 16, 512);
  const bool causal = a.integer("--causal", 0, 0, 1) == 1;
  const int seed = a.integer("--seed", 1, 0, 1 << 30);
  const bool sinks = parse_sinks(a);
  const DType dtype = parse_dtype(a);
  const std::string json = a.str("--json", "");
  Options base;
  base.backend = backend;
  base.block_n = block;
  base.causal = causal;
  std::tie(base.window_left, base.window_right) = parse_window(a, causal);
  base.path = parse_gpu_path(a);
  base.softcap = parse_softcap(a);
  std::vector<float> z(sinks ? size_t(heads) : 0);  // each input set's sink logits (--sinks)
  base.sinks = sinks_tensor(z);

  // The GPU kernels' key block is fixed per head dim and kernel at build time (head dim 256 on
  // path auto: sm80's 64, or sm90's / decode's 128, per call: each row reports the kernel that
  // ran and its block); --block sets the CPU emulation's.
  const bool gpu = backend == Backend::gpu;
  const bool either = gpu && hdim == 256 && base.path == GpuPath::automatic;
  const std::string eff_block = either ? std::string("per row (sm80 64, sm90 128)")
                                       : std::to_string(gpu ? gpu_block_n(hdim, base.path) : block);
  std::printf("intfa accuracy: backend %s, B=%d H=%d Hkv=%d D=%d %s, key block %s, causal %d%s%s, "
              "output fp32 vs float64 reference\n",
              to_string(backend), batch, heads, heads_kv, hdim, to_string(dtype), eff_block.c_str(), causal,
              window_note(base).c_str(), (sinks_note(base) + softcap_note(base)).c_str());
  std::printf("%-9s %-8s %6s  %9s %9s %9s %9s %9s%s\n", "scheme", "dist", "seq", "rel_l2",
              "rel_l1", "cosine", "max_abs", "mean_rel", gpu ? "  kernel" : "");
  std::ostringstream rows;
  int n = 0, total = static_cast<int>(seqs.size() * dists.size() * schemes.size());
  bool bad = false;
  for (int seq : seqs) {
    for (Dist dist : dists) {
      const uint64_t input_seed = seed * 7919ull + seq * 31ull + static_cast<int>(dist);
      auto x = tools::make_inputs(dist, batch, heads, heads_kv, seq, seq, hdim, dtype, input_seed);
      if (sinks) {
        z = tools::make_sinks(heads, input_seed);
        base.sinks = sinks_tensor(z);
      }
      std::fprintf(stderr, "  [%d/%d] float64 reference %s seq %d ...\n", n, total,
                   tools::to_string(dist), seq);
      auto ref = run_exact(x, base, nullptr);
      for (Scheme sc : schemes) {
        ++n;
        std::fprintf(stderr, "  [%d/%d] %s %s seq %d\n", n, total, to_string(sc),
                     tools::to_string(dist), seq);
        Options o = base;
        o.scheme = sc;
        if (backend == Backend::gpu && sc == Scheme::half) {
          std::printf("%-9s %-8s %6d  (not available on the GPU in this build)\n", to_string(sc),
                      tools::to_string(dist), seq);
          continue;
        }
        RunResult r = run_intfa(x, o, backend);
        auto m = tools::compare(std::vector<double>(r.out.begin(), r.out.end()), ref);
        bad |= !std::isfinite(m.rel_l2);
        const std::string ran = gpu ? std::string("  ") + to_string(r.ran) : std::string();
        std::printf("%-9s %-8s %6d  %9.3e %9.3e %9.6f %9.3e %9.3e%s\n", to_string(sc),
                    tools::to_string(dist), seq, m.rel_l2, m.rel_l1, m.cosine, m.max_abs, m.mean_rel, ran.c_str());
        std::fflush(stdout);
        rows << (rows.tellp() > 0 ? ",\n" : "") << "    {\"scheme\": \"" << to_string(sc)
             << "\", \"dist\": \"" << tools::to_string(dist) << "\", \"seq\": " << seq
             << ", \"hdim\": " << hdim << ", \"batch\": " << batch << ", \"heads\": " << heads
             << ", \"heads_kv\": " << heads_kv << ", \"causal\": " << causal << window_json(base)
             << sinks_json(base) << softcap_json(base)
             << ", \"block\": " << (gpu ? gpu_block_n(hdim, r.ran) : block)
             << (gpu ? std::string(", \"path\": \"") + to_string(r.ran) + "\"" : std::string())
             << ", \"dtype\": \"" << to_string(dtype)
             << "\", \"device\": \"" << to_string(backend) << "\", \"rel_l2\": " << fmt(m.rel_l2, "%.6e")
             << ", \"rel_l1\": " << fmt(m.rel_l1, "%.6e") << ", \"cosine\": " << fmt(m.cosine, "%.9f")
             << ", \"max_abs\": " << fmt(m.max_abs, "%.6e") << ", \"mean_rel\": " << fmt(m.mean_rel, "%.6e")
             << ", \"ms\": " << fmt(r.ms, "%.3f") << "}";
      }
    }
  }
  if (!json.empty()) {
    std::ofstream f(json);
    if (!f) throw std::runtime_error("--json: cannot write '" + json + "'");
    DeviceInfo d = device_info(0);
    f << "{\n  \"tool\": \"intfa accuracy\",\n  \"device\": \"" << to_string(backend) << "\",\n"
      << "  \"card\": \"" << (backend == Backend::gpu ? d.name : "cpu") << "\",\n  \"rows\": [\n"
      << rows.str() << "\n  ]\n}\n";
  }
  return bad ? kExitError : 0;
}

// Bench: kernel-only (pre-quantized inputs) and end-to-end (quantization included).
struct BenchCtx {
  std::function<Status(void* stream)> fn;
};
Status bench_trampoline(void* ctx) { return static_cast<BenchCtx*>(ctx)->fn(nullptr); }
Status bench_graph_trampoline(void* ctx, void* stream) { return static_cast<BenchCtx*>(ctx)->fn(stream); }

// How a row is timed: each call alone between CUDA events (graph_calls 0: host enqueue included,
// what an eager caller sees), or replayed from a CUDA graph of graph_calls back-to-back calls.
Status time_bench_ctx(BenchCtx* ctx, int reps, int graph_calls, double* ms) {
  return graph_calls ? gpu_graph_time_ms(bench_graph_trampoline, ctx, graph_calls, reps, ms)
                     : gpu_time_ms(bench_trampoline, ctx, 3, reps, nullptr, ms);
}

// One bench shape: dense (lens empty: B sequences of seq_q queries and seq keys) or packed
// varlen (lens: one sequence per entry, queries = keys, THD tensors with cu_seqlens).
struct BenchShape {
  int batch, heads, heads_kv, seq_q, seq, hdim;
  std::vector<int> lens;
  // Kernel-only runs with seqused_kv: 1 = every sequence's full key count; 2 = a ragged batch,
  // sequence b counting (b + 1) / B of its keys (a decode batch of uneven requests).
  int seqused = 0;
  // Kernel-only runs over a paged copy of the quantized K/V (pages of `page` tokens in one pool,
  // tools::PagedCopy, shuffled or each sequence's in order); 0: the contiguous tensors.
  int page = 0;
  bool page_shuffled = true;
  // The block table's width in pages (0: the sequence's own, seq / page): a wider table has -1
  // past each sequence's pages, as a serving pool's table sized for the longest request; the
  // launch then spans table_pages * page keys, of which seqused_kv counts seq.
  int table_pages = 0;
};

// The paged copy of the quantized K/V of `qx` (device memory at `base`, laid out by
// alloc_quantized for `ps` and `sc`): built on the host, its pool and table moved to the device, and the view that
// reads them (v_scale and k_mean stay qx's).
struct DevicePagedKv {
  std::unique_ptr<tools::PagedCopy> host;
  std::unique_ptr<DeviceBuf> k8, vt8, ks, table;
  QuantizedQKV view(const QuantizedQKV& qx, const void* base, const ProblemShape& ps, Scheme sc, size_t bytes,
                    int page, bool shuffled, int table_pages) {
    std::vector<uint8_t> raw(bytes + 256);
    void* hb = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw.data()) + 255) & ~uintptr_t(255));
    QuantizedQKV hx;
    check(alloc_quantized(ps, sc, Layout::BHSD, hb, bytes, false, 0, &hx), "alloc_quantized (host)");
    check(gpu_copy_to_host(hb, base, bytes), "copy the quantized tensors to the host");
    host = std::make_unique<tools::PagedCopy>(hx, page, Layout::BHSD, 0, shuffled ? 1 : 0);
    const tools::PagedCopy& h = *host;
    k8 = std::make_unique<DeviceBuf>(h.k8.data(), h.k8.size());
    vt8 = std::make_unique<DeviceBuf>(h.vt8.data(), h.vt8.size());
    ks = std::make_unique<DeviceBuf>(h.ks.data(), h.ks.size() * sizeof(float));
    // The table, widened to table_pages columns of -1 past each sequence's own.
    const int64_t B = h.x.block_table.shape[0], own = h.x.block_table.shape[1];
    const int64_t cols = std::max<int64_t>(own, table_pages);
    std::vector<int32_t> wide(size_t(B * cols), -1);
    for (int64_t b = 0; b < B; ++b)
      std::copy(h.table.begin() + b * own, h.table.begin() + (b + 1) * own, wide.begin() + b * cols);
    table = std::make_unique<DeviceBuf>(wide.data(), wide.size() * sizeof(int32_t));
    QuantizedQKV x = qx;
    x.k8 = on_device(h.x.k8, k8->ptr);
    x.vt8 = on_device(h.x.vt8, vt8->ptr);
    x.k_scale = on_device(h.x.k_scale, ks->ptr);
    x.block_table = make_tensor(table->ptr, DType::i32, {B, cols}, true);
    return x;
  }
};

// The kernel a row's calls run, for its JSON label: the path named, or for path auto the one
// the dispatcher picks, the decode kernel for at most 16 query rows per K/V head after GQA
// packing (as bench/compare.py labels its in-process rows), sm80 at head dim 256 (the one kernel
// built for it), else `resolved` (sm90 on Hopper).
GpuPath row_path(GpuPath requested, GpuPath resolved, const BenchShape& sh, Scheme sc) {
  if (requested != GpuPath::automatic) return resolved;
  if (sh.hdim == 256) return GpuPath::sm80;
  const bool decode = sh.lens.empty() && sc != Scheme::half && (sh.hdim == 64 || sh.hdim == 128) &&
                      int64_t(sh.seq_q) * (sh.heads / sh.heads_kv) <= 16;
  return decode ? GpuPath::decode : resolved;
}

// Times kernel-only and end-to-end for every scheme and causal flag of one shape (all with the
// window and the sinks of `mask`, host logits copied to the device here); prints a line and
// appends two JSON rows per case.
void bench_shape(const BenchShape& sh, const std::vector<Scheme>& schemes, const std::vector<int>& causals,
                 const Options& mask, DType dtype, GpuPath path_req, GpuPath path, int reps, int graph_calls,
                 std::ostringstream& rows) {
  const bool varlen = !sh.lens.empty();
  int64_t total = 0;
  std::vector<int32_t> cu{0};
  for (int L : sh.lens) cu.push_back(static_cast<int32_t>(total += L));
  // Varlen inputs are generated as one sequence of all tokens; THD is BSHD with B = 1. Only the
  // timing matters here, so the values come from the parallel generator.
  auto x = varlen ? tools::make_inputs_parallel(Dist::normal, 1, sh.heads, sh.heads_kv, int(total), int(total), sh.hdim,
                                                dtype, 7)
                  : tools::make_inputs_parallel(Dist::normal, sh.batch, sh.heads, sh.heads_kv, sh.seq_q, sh.seq,
                                                sh.hdim, dtype, 7);
  const size_t qb = x.q.size() * 2, kb = x.k.size() * 2;
  DeviceBuf dq(x.q.data(), qb), dk(x.k.data(), kb), dv(x.v.data(), kb), dout(qb);
  DeviceBuf dcu(cu.data(), cu.size() * sizeof(int32_t));
  auto thd = [&](void* ptr, int heads) {
    return make_tensor(ptr, dtype, {total, int64_t(heads), int64_t(sh.hdim)}, true);
  };
  Tensor tq = varlen ? thd(dq.ptr, sh.heads) : on_device(x.tq(), dq.ptr);
  Tensor tk = varlen ? thd(dk.ptr, sh.heads_kv) : on_device(x.tk(), dk.ptr);
  Tensor tv = varlen ? thd(dv.ptr, sh.heads_kv) : on_device(x.tv(), dv.ptr);
  Tensor to = varlen ? thd(dout.ptr, sh.heads) : on_device(x.tq(), dout.ptr);
  Tensor tcu = varlen ? make_tensor(dcu.ptr, DType::i32, {int64_t(cu.size())}, true) : Tensor();
  ProblemShape ps;
  ps.batch = sh.batch; ps.heads_q = sh.heads; ps.heads_kv = sh.heads_kv;
  ps.seqlen_q = sh.seq_q; ps.seqlen_kv = sh.seq; ps.head_dim = sh.hdim;
  ps.varlen = varlen; ps.total_q = varlen ? total : 0; ps.total_kv = ps.total_q;
  // --seqused 1: the same keys, counted through seqused_kv (what a ragged KV cache pays for the
  // counts alone: sm90 then runs its split kernels); 2: ragged counts.
  std::vector<int32_t> used = varlen ? std::vector<int32_t>(sh.lens.begin(), sh.lens.end())
                                     : std::vector<int32_t>(size_t(sh.batch), sh.seq);
  if (sh.seqused == 2)
    for (size_t b = 0; b < used.size(); ++b) used[b] = static_cast<int32_t>(int64_t(used[b]) * int64_t(b + 1) / int64_t(used.size()));
  DeviceBuf dused(used.data(), used.size() * sizeof(int32_t));
  std::unique_ptr<DeviceBuf> dsinks;
  if (mask.sinks.defined())
    dsinks = std::make_unique<DeviceBuf>(mask.sinks.data, static_cast<size_t>(mask.sinks.numel()) * 4);
  for (Scheme sc : schemes) {
    const size_t qbytes = quantized_bytes(ps, sc);
    DeviceBuf ws(qbytes), ws2(qbytes);
    QuantizedQKV qx;
    check(alloc_quantized(ps, sc, Layout::BHSD, ws.ptr, qbytes, true, 0, &qx), "alloc_quantized");
    QuantizedQKV qk = qx;  // what the kernel-only runs read
    if (sh.seqused) qk.seqused_kv = make_tensor(dused.ptr, DType::i32, {int64_t(used.size())}, true);
    DevicePagedKv paged;
    for (int causal : causals) {
      Options o;
      o.scheme = sc;
      o.causal = causal;
      o.window_left = mask.window_left;
      o.window_right = mask.window_right;
      if (dsinks) o.sinks = on_device(mask.sinks, dsinks->ptr);
      o.softcap = mask.softcap;
      o.path = path_req;  // auto: what a caller gets (the decode kernel for decode-sized calls)
      o.workspace = make_tensor(ws2.ptr, DType::u8, {static_cast<int64_t>(qbytes)}, true);
      check(quantize(tq, tk, tv, tcu, tcu, o, qx), "quantize");
      if (sh.page && !paged.host) {
        const Tensor used_kv = qk.seqused_kv;
        qk = paged.view(qx, ws.ptr, ps, sc, qbytes, sh.page, sh.page_shuffled, sh.table_pages);
        qk.seqused_kv = used_kv;
      }
      // s: the graph timer's stream, or nullptr (the legacy default stream) for eager timing.
      BenchCtx kern{[&](void* s) {
        o.stream = s;
        return attention_int8(qk, tcu, tcu, sh.seq_q, sh.seq, to, nullptr, o);
      }};
      BenchCtx e2e{[&](void* s) {
        o.stream = s;
        return varlen ? attention_varlen(tq, tk, tv, tcu, tcu, sh.seq_q, sh.seq, to, nullptr, o)
                      : attention(tq, tk, tv, to, nullptr, o);
      }};
      // A paged cache is quantized page by page as tokens arrive, so a paged call has no
      // end-to-end form: attention() over the bf16 tensors would time the contiguous path.
      const bool has_e2e = sh.page == 0;
      double k_ms = 0, e_ms = 0;
      check(time_bench_ctx(&kern, reps, graph_calls, &k_ms), "bench kernel");
      if (has_e2e) check(time_bench_ctx(&e2e, reps, graph_calls, &e_ms), "bench e2e");
      // Square causal without a window counts half the pairs (design.md); otherwise the pairs
      // the mask (bottom-right causal, the window) leaves visible. Varlen: the sum over its
      // sequences.
      auto visible = [&](int lq, int lkv) {
        return tools::visible_pairs(lq, lkv, causal, o.window_left, o.window_right);
      };
      double pairs = 0;
      if (sh.seqused == 2) {  // the keys counted (queries = keys for varlen)
        for (size_t b = 0; b < used.size(); ++b) pairs += visible(varlen ? sh.lens[b] : sh.seq_q, used[b]);
      } else if (varlen) {
        for (int L : sh.lens) pairs += visible(L, L);
      } else {
        const bool half = causal && !windowed(o) && sh.seq_q == sh.seq;
        pairs = half ? 0.5 * double(sh.seq_q) * sh.seq : visible(sh.seq_q, sh.seq);
        pairs *= sh.batch;
      }
      const double ops = 4.0 * sh.heads * pairs * sh.hdim;
      const double k_tops = ops / k_ms / 1e9, e_tops = has_e2e ? ops / e_ms / 1e9 : 0;
      char e2e_cols[64];
      if (has_e2e)
        std::snprintf(e2e_cols, sizeof e2e_cols, "%10.4f %8.1f  %6.3f", e_ms, e_tops, k_ms / e_ms);
      else
        std::snprintf(e2e_cols, sizeof e2e_cols, "%10s %8s  %6s", "-", "-", "-");
      std::printf("%-9s %6d %5d %7d  %10.4f %8.1f  %s\n", to_string(sc), sh.seq, sh.hdim, causal, k_ms, k_tops,
                  e2e_cols);
      std::fflush(stdout);
      std::string extra;
      if (varlen) {
        extra = ", \"varlen\": [";
        for (size_t i = 0; i < sh.lens.size(); ++i) extra += (i ? ", " : "") + std::to_string(sh.lens[i]);
        extra += "]";
      } else if (sh.seq_q != sh.seq) {
        extra = ", \"seq_q\": " + std::to_string(sh.seq_q);
      }
      if (sh.heads_kv != sh.heads) extra += ", \"heads_kv\": " + std::to_string(sh.heads_kv);
      extra += window_json(o) + sinks_json(o) + softcap_json(o);
      if (sh.seqused) extra += sh.seqused == 2 ? ", \"seqused_kv\": \"ragged\"" : ", \"seqused_kv\": true";
      if (sh.page)
        extra += ", \"page_size\": " + std::to_string(sh.page) + ", \"pages\": \"" +
                 (sh.page_shuffled ? "shuffled" : "ordered") + "\"";
      if (sh.table_pages) extra += ", \"table_pages\": " + std::to_string(sh.table_pages);
      if (graph_calls) extra += ", \"graph_calls\": " + std::to_string(graph_calls);
      for (int e = 0; e < (has_e2e ? 2 : 1); ++e) {
        rows << (rows.tellp() > 0 ? ",\n" : "") << "    {\"provider\": \"intfa\", \"path\": \""
             << to_string(row_path(path_req, path, sh, sc)) << "\", \"scheme\": \"" << to_string(sc) << "\", \"seq\": " << sh.seq << extra
             << ", \"hdim\": " << sh.hdim << ", \"causal\": " << causal << ", \"batch\": " << sh.batch
             << ", \"heads\": " << sh.heads << ", \"e2e\": " << (e ? "true" : "false")
             << ", \"ms\": " << fmt(e ? e_ms : k_ms, "%.4f") << ", \"tops\": "
             << fmt(e ? e_tops : k_tops, "%.2f") << "}";
      }
    }
  }
}

int cmd_bench(const Args& a) {
  a.allow({"--seq", "--seq-q", "--varlen", "--hdim", "--causal", "--window", "--sinks", "--softcap", "--scheme", "--batch",
           "--heads", "--heads-kv", "--path", "--json", "--reps", "--dtype", "--seqused", "--page", "--page-order", "--table-pages", "--graph"});
  // Arguments first, so that a bad one is reported on any machine.
  const auto seqs = a.ints("--seq", "1024,4096,16384", 1, 1 << 20);
  const auto hdims = a.ints("--hdim", "128,64", 16, 256);
  const auto causals = a.ints("--causal", "0,1", 0, 1);
  Options mask;  // the window (and the sinks, below) every case runs with
  std::tie(mask.window_left, mask.window_right) =
      parse_window(a, std::find(causals.begin(), causals.end(), 1) != causals.end());
  const auto schemes = parse_schemes(a, "accurate");
  const int batch = a.integer("--batch", 4, 1, 1024);
  const int heads = a.integer("--heads", 32, 1, 1024);
  // --sinks: the logits of every case (the inputs' seed, 7), on the host until bench_shape.
  std::vector<float> z = parse_sinks(a) ? tools::make_sinks(heads, 7) : std::vector<float>();
  mask.sinks = sinks_tensor(z);
  mask.softcap = parse_softcap(a);
  const int heads_kv = a.integer("--heads-kv", heads, 1, heads);
  const int reps = a.integer("--reps", 20, 1, 10000);
  // Query rows per sequence when they differ from the keys (--seq): chunked prefill or decode
  // against a long cache. 0: square.
  const int seq_q_opt = a.integer("--seq-q", 0, 0, 1 << 20);
  const int seqused = a.integer("--seqused", 0, 0, 2);
  // Time each row as CUDA graphs of this many back-to-back calls (no host enqueue between
  // them); 0: every call alone between events.
  const int graph_calls = a.integer("--graph", 0, 0, 1000);
  // Kernel-only runs over a paged copy of the cache (pages of this many tokens); 0: contiguous.
  const int page = a.integer("--page", 0, 0, 1 << 20);
  const std::string page_order = a.str("--page-order", "shuffled");
  if (page_order != "shuffled" && page_order != "ordered")
    throw UsageError{"--page-order: expected shuffled or ordered, got '" + page_order + "'"};
  if (page) {
    if (!a.str("--varlen", "").empty()) throw UsageError{"--page: paged KV takes dense queries; drop --varlen"};
    if (page % 16) throw UsageError{"--page: expected a multiple of 16 tokens"};
    for (int s : seqs)
      if (s % page) throw UsageError{"--page: must divide every --seq (" + std::to_string(s) + ")"};
  }
  // A block table wider than the sequences' pages (a pool's table sized for longer requests).
  const int table_pages = a.integer("--table-pages", 0, 0, 1 << 20);
  if (table_pages) {
    if (!page) throw UsageError{"--table-pages: needs --page"};
    if (!seqused) throw UsageError{"--table-pages: needs --seqused 1 or 2 (the keys each sequence holds)"};
    for (int s : seqs)
      if (int64_t(table_pages) * page < s)
        throw UsageError{"--table-pages: expected at least --seq / --page = " + std::to_string(s / page) +
                         " pages, got " + std::to_string(table_pages)};
  }
  // Packed varlen batch: one sequence per length (queries = keys), in place of --batch/--seq.
  const std::vector<int> lens = a.str("--varlen", "").empty() ? std::vector<int>() : a.ints("--varlen", "", 1, 1 << 20);
  if (!lens.empty() && (!a.str("--seq", "").empty() || seq_q_opt || !a.str("--batch", "").empty()))
    throw UsageError{"--varlen: gives the sequences itself; drop --seq, --seq-q and --batch"};
  if (heads % heads_kv) throw UsageError{"--heads-kv: must divide --heads"};
  const DType dtype = parse_dtype(a);
  const GpuPath path_req = parse_gpu_path(a);
  DeviceInfo dev = device_info(0);
  if (!dev.present) {
    std::fprintf(stderr, "intfa bench: needs a CUDA GPU (%s). Use `intfa demo` or `intfa accuracy "
                 "--device cpu` on this machine.\n", dev.error.c_str());
    return kExitError;
  }
  GpuPath path;
  check(resolve_gpu_path(path_req, 0, &path), "--path");
  const std::string json = a.str("--json", "");

  std::string what = "B=" + std::to_string(batch);
  if (!lens.empty()) {
    what = "varlen " + std::to_string(lens.size()) + " sequences (";
    for (size_t i = 0; i < lens.size(); ++i) what += (i ? "," : "") + std::to_string(lens[i]);
    what += ")";
  }
  if (page) what += ", kernel-only over " + std::to_string(page) + "-token pages (" + page_order + ")";
  what += window_note(mask) + sinks_note(mask) + softcap_note(mask);
  if (seqused) what += seqused == 2 ? ", kernel-only with ragged seqused_kv ((b + 1) / B of the keys)"
                                    : ", kernel-only with seqused_kv";
  const std::string timing = graph_calls ? " CUDA-graph launches of " + std::to_string(graph_calls) + " calls (per call)"
                                         : " calls, each timed alone (host enqueue included)";
  std::printf("intfa bench on %s (%d SMs): %s H=%d Hkv=%d %s, path %s, median of %d%s%s\n",
              dev.name.c_str(), dev.sm_count, what.c_str(), heads, heads_kv, to_string(dtype),
              (path_req == GpuPath::automatic ? std::string("auto (") + to_string(path) + ", decode for decode-sized calls)"
                                              : std::string(to_string(path))).c_str(),
              reps, timing.c_str(), seq_q_opt ? (", " + std::to_string(seq_q_opt) + " query rows (seq = keys)").c_str() : "");
  std::printf("%-9s %6s %5s %7s  %10s %8s  %10s %8s  %6s\n", "scheme", "seq", "hdim", "causal",
              "kernel_ms", "TOPS", "e2e_ms", "TOPS", "e2e/k");
  std::ostringstream rows;
  for (int hdim : hdims) {
    if (!lens.empty()) {
      const int longest = *std::max_element(lens.begin(), lens.end());
      bench_shape({int(lens.size()), heads, heads_kv, longest, longest, hdim, lens, seqused}, schemes, causals,
                  mask, dtype, path_req, path, reps, graph_calls, rows);
      continue;
    }
    for (int seq : seqs)
      bench_shape({batch, heads, heads_kv, seq_q_opt ? seq_q_opt : seq, seq, hdim, {}, seqused, page,
                   page_order == "shuffled", table_pages}, schemes, causals,
                  mask, dtype, path_req, path, reps, graph_calls, rows);
  }
  if (!json.empty()) {
    std::ofstream f(json);
    if (!f) throw std::runtime_error("--json: cannot write '" + json + "'");
    f << "{\n  \"tool\": \"intfa bench\",\n  \"card\": \"" << dev.name << "\",\n  \"rows\": [\n"
      << rows.str() << "\n  ]\n}\n";
  }
  return 0;
}

void usage(FILE* f) {
  std::fprintf(f,
               "usage: intfa <command> [options]\n"
               "  info                         build, compiled archs, GPU found\n"
               "  demo [--device cpu|gpu|auto] [--sinks] accuracy vs float64 and time on a default problem\n"
               "  accuracy [--device D] [--seq L1,L2] [--dist normal,uniform,llm]\n"
               "           [--scheme paper,accurate,half] [--batch B] [--heads H] [--heads-kv H]\n"
               "           [--hdim D] [--block N] [--dtype bf16|fp16] [--causal 0|1] [--window L,R] [--sinks]\n"
               "           [--softcap X] [--json FILE]\n"
               "  bench [--seq ..] [--seq-q N | --varlen L1,L2,..] [--hdim 128,64] [--causal 0,1] [--window L,R] [--sinks]\n"
               "        [--softcap X]\n"
               "        [--scheme ..] [--path auto|sm80|sm90|decode] [--batch 4] [--heads 32] [--heads-kv H] [--reps 20]\n"
               "        [--seqused 0|1|2] [--page N [--page-order O] [--table-pages P]] [--graph N] [--json FILE]   (needs a GPU; --seq-q: query rows when fewer than the keys;\n"
               "        --seqused 1: kernel-only runs count every sequence's keys through seqused_kv, 2: sequence b\n"
               "        counts (b + 1) / B of its keys, a ragged batch; --page N: the kernel reads a paged copy\n"
               "        of the cache, N-token pages in a pool, --page-order shuffled (default) or ordered;\n"
               "        no end-to-end column: a paged cache is quantized as tokens arrive; --table-pages P: the\n"
               "        block table P pages wide, -1 past each sequence's pages, as a pool's table sized for\n"
               "        longer requests: the launch spans P * N keys, seqused_kv counts the sequence's;\n"
               "        --graph N: time CUDA-graph replays of N back-to-back calls, no host enqueue in the time)\n"
               "  --window LEFT,RIGHT: sliding-window attention (FlashAttention's window_size): query i sees keys\n"
               "        i + Skv - Sq - LEFT .. i + Skv - Sq + RIGHT, -1 an open side (default -1,-1: no window);\n"
               "        causal is RIGHT = 0 (a Mistral-style local layer of W keys: --causal 1 --window W-1,0)\n"
               "  --sinks [0|1]: attention sinks (gpt-oss's; Options::sinks), one logit per query head, drawn\n"
               "        uniform in [0, 8) from the seed: about the log-sum-exp of rows of one to a few thousand\n"
               "        N(0,1) keys, so each sink takes a real share of its rows' softmax. accuracy and demo give\n"
               "        them to intfa and the float64 reference alike; bench times every case with them\n"
               "        (TOPS counted as without)\n"
               "  --softcap X: logit soft-capping (Gemma 2's; Options::softcap), scores X * tanh(s / X); on the\n"
               "        GPU the decode and sm80 kernels run it (path auto takes prefill calls to sm80)\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return kExitUsage;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "info") return cmd_info();
    if (cmd == "demo") return cmd_demo(Args(argc, argv, 2));
    if (cmd == "accuracy") return cmd_accuracy(Args(argc, argv, 2));
    if (cmd == "bench") return cmd_bench(Args(argc, argv, 2));
    if (cmd == "help" || cmd == "--help" || cmd == "-h") {
      usage(stdout);
      return 0;
    }
    std::fprintf(stderr, "intfa: unknown command '%s'\n", cmd.c_str());
    usage(stderr);
    return kExitUsage;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "intfa %s: %s\n", cmd.c_str(), e.msg.c_str());
    return kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "intfa %s: %s\n", cmd.c_str(), e.what());
    return kExitError;
  }
}
