// intfa public API: INT8 FlashAttention with a CPU reference backend and CUDA paths.
// Includable without CUDA headers. Every entry point validates its arguments and returns a
// Status whose message names the argument, what was expected and what came.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace intfa {

// ---------------------------------------------------------------------------------------------
// Basic types
// ---------------------------------------------------------------------------------------------
enum class DType : int { f16, bf16, f32, f64, i8, u8, i32 };
enum class Layout : int { BHSD, BSHD };  // varlen tensors are always THD (total tokens, heads, dim)
enum class Scheme : int { paper, accurate, half };
enum class Backend : int { automatic, cpu, gpu };  // automatic: where the tensors live
// automatic: the decode kernel for at most 16 query rows per (batch, K/V head) after GQA
// packing, else sm90 on compute capability 9.0 (if built), else sm80. decode forces the decode
// kernel (not_available for other shapes); sm80 / sm90 force that kernel for every shape.
enum class GpuPath : int { automatic, sm80, sm90, decode };

const char* to_string(DType);
const char* to_string(Layout);
const char* to_string(Scheme);
const char* to_string(Backend);
const char* to_string(GpuPath);
// Parse names as the CLI and the bindings spell them ("paper", "BSHD", "sm80", ...).
bool parse_scheme(const std::string&, Scheme*);
bool parse_layout(const std::string&, Layout*);
bool parse_backend(const std::string&, Backend*);
bool parse_path(const std::string&, GpuPath*);
size_t dtype_size(DType);

enum class StatusCode : int {
  ok = 0,
  invalid_argument,  // shapes, sizes, strides, alignment, cu_seqlens, options
  unsupported_type,  // a dtype the entry point does not take
  not_available,     // feature or path not built in / not possible on this device
  device_error,      // a CUDA runtime error
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status OK() { return Status(); }
  bool ok() const { return code_ == StatusCode::ok; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::ok;
  std::string message_;
};

// A strided view of memory. Shapes and strides are in elements; the last dim must be
// contiguous (stride 1). `on_device` marks CUDA device memory of GPU `device_index`.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f16;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
  bool on_device = false;
  int device_index = 0;

  bool defined() const { return data != nullptr; }
  int64_t numel() const;
};

// A contiguous (row-major) tensor view.
Tensor make_tensor(void* data, DType dtype, int ndim, const int64_t* shape, bool on_device = false,
                   int device_index = 0);
Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                   bool on_device = false, int device_index = 0);

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------
struct Options {
  bool causal = false;   // bottom-right aligned when Sq != Skv: query i sees keys j <= i + Skv - Sq
  // Sliding-window (local) attention, FlashAttention's window_size = (left, right): query i
  // sees keys j with i + Skv - Sq - window_left <= j <= i + Skv - Sq + window_right (the same
  // bottom-right diagonal as causal; Skv is a sequence's key count, seqused_kv included); -1
  // leaves a side open. causal is window_right = 0, so with causal window_right must be -1 or 0.
  // Mistral / Gemma / gpt-oss local layers are causal with window_left = W - 1 (W keys each).
  // Rows that see no key give zeros (LSE -inf). Every backend, path and entry point.
  int window_left = -1;
  int window_right = -1;
  // Attention sinks (gpt-oss; StreamingLLM's learned form): f32 [heads_q], one logit z_h per
  // query head in the units of the scaled scores (scale * q.k, natural log). Each row's softmax
  // gains the term e^z_h in its denominator and nothing in its numerator:
  //   out = sum_j e^(s_j) v_j / (e^z_h + sum_j e^(s_j)),   lse = log(e^z_h + sum_j e^(s_j)).
  // So the LSE includes the sink (flash_attn's learnable_sink does the same); a row that sees
  // no key gives zeros and LSE z_h; z_h = -inf is no sink. Undefined (data == nullptr): none.
  // In the memory space of q (device memory on the GPU, where the values are not checked:
  // finite or -inf; the CPU backend refuses NaN and +inf). Every backend, path and entry point;
  // with pre-quantized inputs of scheme accurate (or half) qkv.lse_offset must be defined,
  // since the smoothed scores are shifted by it and the sink is not.
  Tensor sinks;
  // Logit soft-capping (Gemma 2's attn_logit_softcapping, Grok's; FlashAttention's softcap):
  // each score s = scale * q.k becomes softcap * tanh(s / softcap) before the softmax; 0 (the
  // default) is none. With accurate / half the smoothed scores are moved back by scale *
  // q . k_mean before the tanh (softmax is invariant to that shift, the tanh is not), so
  // pre-quantized inputs of those schemes need qkv.lse_offset, as sinks do. Sinks are not
  // capped. CPU backend and every GPU kernel (sm80, decode, sm90, at every head dim they take),
  // paged caches included.
  float softcap = 0.0f;
  float scale = 0.0f;    // softmax scale; 0 means 1/sqrt(D)
  Layout layout = Layout::BHSD;  // of q, k, v, out (ignored by the varlen entry points)
  Scheme scheme = Scheme::accurate;
  Backend backend = Backend::automatic;
  GpuPath path = GpuPath::automatic;  // see GpuPath
  int block_n = 64;          // CPU backend: key block of the emulated loop (16..512, multiple of 16)
  // GPU calls: where not null, receives the kernel family that ran the call (sm80, sm90 or
  // decode), e.g. to see what path auto chose, or to emulate the call block for block on the CPU
  // (block_n = gpu_block_n(head_dim, *ran)). Left as it is by CPU calls, refused calls and
  // calls that launch no attention kernel (no rows, or no keys).
  GpuPath* ran = nullptr;
  void* stream = nullptr;    // cudaStream_t for GPU calls (nullptr: legacy default stream)
  // GPU: scratch memory for the quantized tensors of attention()/attention_varlen(). If not given
  // (data == nullptr) the library allocates it stream-ordered (cudaMallocAsync) and frees it after.
  Tensor workspace;
  // append_kv only: keep the cache's V scales as they are (static scales, as FP8 KV caches keep
  // theirs). A new value past 127 levels of its channel's scale (paper: the head's) saturates at
  // +-127 instead of growing the scale and requantizing what the cache holds, so append_kv
  // writes only its new tokens' bytes and never v_scale. Bytes once written then never change:
  // pages may be shared by sequences whose k_mean and v_scale are equal (prefix caching), e.g.
  // one set for every sequence through a batch stride of 0 (docs/KV_CACHE.md, "Shared pages").
  bool fixed_v_scale = false;
};

// ---------------------------------------------------------------------------------------------
// Quantized inputs (what quantize() writes and attention_int8() reads).
//
// Rounding rule, shared bit-for-bit by every backend: for a group g (a token row, or a V channel)
//   amax  = max |x| over g (x converted exactly from fp16/bf16 to fp32),
//   s     = amax / 127 (fp32 division), or 1 when amax < 2^-100 (a zero row),
//   inv   = 127 / amax (fp32 division), or 1 when amax < 2^-100,
//   x8    = clamp(round_half_to_even(x * inv), -127, 127)          (one fp32 multiply)
// K smoothing (accurate, half): kmean[c] = fp32(sum over tokens in fp64 / n) rounded to the
// input dtype (fp16/bf16), so the value is independent of summation order; K' = K - kmean in fp32.
// ---------------------------------------------------------------------------------------------
struct QuantizedQKV {
  Scheme scheme = Scheme::accurate;
  Layout layout = Layout::BHSD;  // of q8 and k8 (varlen: THD)
  Tensor q8;          // int8, same shape as q: [B,Hq,Sq,D] / [B,Sq,Hq,D] / [Tq,Hq,D]
  Tensor q_scale;     // f32 [B,Hq,Sq] or [Hq,Tq]
  Tensor lse_offset;  // f32 like q_scale: scale * Q.kmean, added to the LSE (may be undefined: 0)
  Tensor k8;          // int8, same shape as k (smoothed K' for accurate/half)
  Tensor k_scale;     // f32 [B,Hkv,Skv] (rows may be padded: a cache's first Skv tokens) or [Hkv,Tkv]
  // k_mean and v_scale where they are only read (attention_int8, quantize_q, append_kv; v_scale
  // there with Options::fixed_v_scale) may have a batch stride of 0: one set for every sequence.
  Tensor k_mean;      // f32 [B,Hkv,D] or [nseq,Hkv,D] (accurate/half; informational)
  Tensor vt8;         // int8 V transposed (paper, accurate): [B,Hkv,D,>=Skv], or for varlen
                      // [Hkv,D,>=Tkv+16*(nseq+1)] with sequence b at column
                      // round_up(cu_kv[b],16)+16*b (16-byte aligned for vector loads)
  Tensor v_scale;     // f32 [B,Hkv,D] or [nseq,Hkv,D]; paper: all D entries equal (per tensor)
  Tensor v;           // half scheme: V as given (fp16/bf16), vt8/v_scale unused
  // attention_int8 only (optional): int32 [B] (varlen: [nseq]) on the device of q8, the keys each
  // sequence attends to: its first seqused_kv[b], clamped to [0, Skv] (FlashAttention's
  // seqused_k). A batch of caches of different lengths is one call over views of the longest:
  // what lies past a sequence's count is never read into the result (garbage there is fine).
  // Read by the kernels, so the counts may change on the device between CUDA graph replays.
  Tensor seqused_kv;
  // attention_int8 only (optional): a paged KV cache, the layout of serving engines (vLLM's
  // block tables). K and V live in pages of page_size tokens, a pool shared by the batch, and
  // block_table, int32 [B, max_pages] in q8's memory space, maps token t of sequence b to token
  // t % page_size of page block_table[b][t / page_size]. Then k8 is [num_pages, Hkv, page_size,
  // D] (BHSD; BSHD: [num_pages, page_size, Hkv, D]), k_scale [num_pages, Hkv, page_size], vt8
  // [num_pages, Hkv, D, >= page_size] (V^T within each page), with page_size a multiple of 16;
  // v_scale and k_mean stay per sequence, [B, Hkv, D]. Each sequence has max_pages * page_size
  // keys, or seqused_kv[b]; only the table entries of pages that hold its keys are read, and
  // must name a page in [0, num_pages). Under a window's left edge (Options::window_left) the
  // pages wholly before the first key of query row 0 (the lowest) are not read (with pages of
  // 16-64 tokens on the GPU, those in that key's 128-key block are, and their keys masked): a
  // local layer may give them back (entry -1, which reads nothing), and append_kv's V sweep
  // skips -1 entries before its new tokens (Python: PagedKVCache.trim). Dense queries (no cu_seqlens), schemes paper and
  // accurate. On the GPU every path reads pages of a multiple of 128 tokens or of 16, 32 or 64
  // tokens (other page sizes answer not_available): the decode kernel for at most 16
  // query rows per (batch, K/V head) after GQA packing, sm90 / sm80 for more (chunked prefill);
  // append_kv writes any of them. The host
  // cannot check a device table, so there an entry outside the pool reads zeros (K, V, K
  // scales) and is written nowhere, never memory past the pool.
  Tensor block_table;
};

// Sizes of the quantized tensors for a problem; alloc_quantized() fills a QuantizedQKV whose
// tensors point into one caller-provided buffer of quantized_bytes() (256-byte aligned parts).
struct ProblemShape {
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  bool varlen = false;
  int64_t total_q = 0, total_kv = 0;  // varlen only; batch = number of sequences
};
size_t quantized_bytes(const ProblemShape&, Scheme);
Status alloc_quantized(const ProblemShape&, Scheme, Layout, void* buffer, size_t bytes,
                       bool on_device, int device_index, QuantizedQKV* out);

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------
// q: [B,Hq,Sq,D] (BHSD) or [B,Sq,Hq,D] (BSHD); k, v with Hkv heads and Skv tokens; fp16/bf16.
// out like q, same dtype. lse (optional): f32 [B,Hq,Sq], natural log, -inf for fully masked rows.
// B, Sq and Skv may be 0 (as torch SDPA and FlashAttention take them; an empty tensor's data may
// be null): with Skv = 0 every row is 0 and its LSE -inf (or the head's sink, Options::sinks).
// Heads and D must be >= 1. quantize() / attention_int8() take no empty problem.
Status attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                 const Tensor* lse, const Options& opts);

// Packed varlen: q [Tq,Hq,D], k/v [Tkv,Hkv,D]; cu_seqlens_q/kv int32 [nseq+1], monotonic, first 0,
// last Tq/Tkv; on the same device as q. lse (optional): f32 [Hq,Tq]. Tq and Tkv may be 0 (every
// sequence empty; max_seqlen_* may then be 0), as attention() takes B, Sq and Skv of 0.
Status attention_varlen(const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_kv, int max_seqlen_q,
                        int max_seqlen_kv, const Tensor& out, const Tensor* lse,
                        const Options& opts);

// fp16/bf16 -> QuantizedQKV (tensors allocated by the caller, e.g. alloc_quantized()). For varlen
// pass cu_seqlens (else undefined tensors).
Status quantize(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                const Tensor& cu_seqlens_kv, const Options& opts, const QuantizedQKV& out);

// Attention on pre-quantized inputs (e.g. an INT8 KV cache). `out` is fp16/bf16 shaped like q.
// For varlen, cu_seqlens are given and max_seqlen_* bound the per-sequence lengths.
Status attention_int8(const QuantizedQKV& qkv, const Tensor& cu_seqlens_q,
                      const Tensor& cu_seqlens_kv, int max_seqlen_q, int max_seqlen_kv,
                      const Tensor& out, const Tensor* lse, const Options& opts);

// ---------------------------------------------------------------------------------------------
// INT8 KV cache for decoding (docs/KV_CACHE.md). quantize() on the prompt fixes a cache's
// statistics: the K smoothing mean (accurate) and the V scales. quantize_q() quantizes a decode
// step's queries against that mean and append_kv() adds tokens quantized with those statistics,
// so the cache grows without requantizing what it holds. Softmax is invariant to any per-channel
// vector subtracted from every key, so a fixed K mean is exact; a V value beyond a scale's range
// (per channel; paper: per tensor) grows that scale instead of clamping. attention_int8() then reads the first
// L tokens of a cache of capacity C through views: k8 [B,Hkv,L,D] and k_scale [B,Hkv,L] with
// the cache's strides, vt8 as it is (>= L columns).
// ---------------------------------------------------------------------------------------------
// q: [B,Hq,Sq,D] / [B,Sq,Hq,D] (opts.layout), fp16/bf16. Writes out.q8 and out.q_scale (the
// per-token rule: bit-identical to quantize() for the same q) and, if defined, out.lse_offset =
// scale * (q . k_mean[h / (Hq / Hkv)]) (0 for paper). k_mean: f32 [B,Hkv,D], the cache's
// (needed for lse_offset with accurate; otherwise it may be undefined). Other parts of `out`
// are not touched; out.scheme must be opts.scheme.
Status quantize_q(const Tensor& q, const Tensor& k_mean, const Options& opts, const QuantizedQKV& out);

// Writes k_new, v_new ([B,Hkv,n,D] / [B,n,Hkv,D] in opts.layout, fp16/bf16) as tokens pos ..
// pos + n - 1 of `cache` (dense, from alloc_quantized() with seqlen_kv = the capacity C, its k8
// in cache.layout): k8 / k_scale by the per-token rule on K - cache.k_mean (bit-identical to
// quantize() with that mean; paper: K as is), and V^T columns of vt8 by
// v8 = round_half_even(v * (1 / v_scale[c])). Where a new value would round past 127, v_scale[c]
// (paper: the head's one scale, every channel) grows to 1.25 * max|v_new| / 127 and the other
// columns of its vt8 rows (the whole capacity) are requantized, round(x8 * s_old * (1 / s_new)):
// the cache's v_scale and vt8 may change outside pos .. pos + n - 1. Schemes paper and accurate
// (half: not_available). With opts.fixed_v_scale nothing grows: such values saturate at +-127 and
// only the new tokens' bytes are written (cache.v_scale may then be shared, batch stride 0).
Status append_kv(const Tensor& k_new, const Tensor& v_new, int64_t pos, const Options& opts,
                 const QuantizedQKV& cache);
// The same with a position per sequence (ragged batches): pos int32 [B] on the device of k_new;
// sequence b's tokens go to pos[b] .. pos[b] + n - 1. The positions are read by the kernels (so
// they may live on the device and change between CUDA graph replays); a token whose position
// falls outside [0, C) is not written, since the host cannot check them without a
// synchronization. V scales grow for all n new tokens of a sequence, written or not.
Status append_kv(const Tensor& k_new, const Tensor& v_new, const Tensor& pos, const Options& opts,
                 const QuantizedQKV& cache);

// Exact attention in float64 on the CPU (the accuracy oracle). Inputs of any float dtype on the
// host, out f64 or f32 shaped like q; lse f64/f32 or nullptr. Same shape rules as attention().
Status attention_reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                           const Tensor* lse, const Options& opts);

// ---------------------------------------------------------------------------------------------
// Build and device information
// ---------------------------------------------------------------------------------------------
struct BuildInfo {
  std::string version;
  bool cuda_built = false;
  std::string cuda_archs;  // e.g. "sm_80 sm_90a"
  int gpu_block_n = 0;     // key block of the GPU kernels at head_dim 64 and 128 (gpu_block_n())
};
BuildInfo build_info();
// Key block of the GPU kernels at head_dim, for block-exact CPU emulation (Options::block_n): 128,
// or 64 at head_dim 256 (the sm80 kernel's); 0 for a head dim the GPU backend does not take or
// without the CUDA backend. Head dim 256 on Hopper: path auto runs most calls on the sm90 kernel
// or, decode steps, the decode kernel, whose blocks are 128 (not calls with few query tiles
// over many keys or with soft-capping): gpu_block_n(head_dim, path) with the path that ran
// (Options::ran) gives the block for any call.
int gpu_block_n(int head_dim);
// The same for the kernels of one path (sm80, sm90, decode): 128 for sm90 and decode at
// head_dim 256; automatic: as gpu_block_n(head_dim).
int gpu_block_n(int head_dim, GpuPath path);

struct DeviceInfo {
  bool present = false;
  std::string name;
  int major = 0, minor = 0, sm_count = 0;
  size_t memory_bytes = 0;
  std::string error;  // why no device, if none
};
DeviceInfo device_info(int device_index = 0);
// Which GPU path `requested` resolves to on the current device, or an error naming why not.
Status resolve_gpu_path(GpuPath requested, int device_index, GpuPath* resolved);

// ---------------------------------------------------------------------------------------------
// Device memory and timing helpers for tools, tests and bindings that must not include CUDA
// headers. All return not_available in a build without CUDA.
// ---------------------------------------------------------------------------------------------
Status gpu_malloc(void** ptr, size_t bytes, int device_index = 0);
Status gpu_free(void* ptr);
Status gpu_copy_to_device(void* dst, const void* src, size_t bytes);  // synchronous
Status gpu_copy_to_host(void* dst, const void* src, size_t bytes);    // synchronous
Status gpu_memset(void* ptr, int byte, size_t bytes);                  // synchronous
Status gpu_synchronize();
// Median time in ms of `run` (which enqueues work on `stream`), CUDA events around each of
// `reps` calls after `warmup` calls. `run` returning an error stops the timing with that error.
Status gpu_time_ms(Status (*run)(void* ctx), void* ctx, int warmup, int reps, void* stream,
                   double* median_ms);
// Median time in ms per call of `run` replayed from a CUDA graph: one eager call, then `calls`
// calls of run(ctx, stream) captured back to back on a stream of the timer's own, the graph
// launched twice to warm up and `reps` times between CUDA events (each sample = launch / calls).
// What a caller that replays graphs sees (serving loops, torch.compile's cudagraphs): no host
// enqueue in the time, and consecutive calls' kernels back to back.
Status gpu_graph_time_ms(Status (*run)(void* ctx, void* stream), void* ctx, int calls, int reps,
                         double* median_ms);

// fp16/bf16 <-> f32 on the host (round to nearest even), for tools and tests.
uint16_t float_to_half_bits(float);
float half_bits_to_float(uint16_t);
uint16_t float_to_bf16_bits(float);
float bf16_bits_to_float(uint16_t);

}  // namespace intfa
