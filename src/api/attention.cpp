// Entry points: validate, then hand plain parameter structs to the backend that serves the call.
// This is the one place that knows which backend (CPU reference or CUDA) runs what.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <vector>

#include "api/validate.h"
#include "cuda/backend.h"
#include "ref/ref.h"

namespace intfa {
namespace {

using api::Form;
using api::MessageStream;
using api::invalid;
using api::View;

const std::vector<DType> kInputTypes = {DType::f16, DType::bf16};

#define INTFA_TRY(expr)                 \
  do {                                  \
    Status _st = (expr);                \
    if (!_st.ok()) return _st;          \
  } while (0)

// Everything validation learns about a call.
struct Problem {
  ProblemShape shape;
  Form form = Form::dense;
  Layout layout = Layout::BHSD;
  bool gpu = false;
  int device = 0;
  DType dtype = DType::f16;
  float softmax_scale = 0.f;
  View q, k, v;
  std::vector<int32_t> cu_q_host, cu_kv_host;  // varlen, host copies (checked)
  const int32_t* cu_q = nullptr;                // varlen, as the backend reads them
  const int32_t* cu_kv = nullptr;
};

Status choose_backend(const Tensor& q, const Options& o, bool* gpu) {
  switch (o.backend) {
    case Backend::automatic: *gpu = q.on_device; return Status::OK();
    case Backend::cpu:
      if (q.on_device)
        return invalid("backend: cpu requested but q is in GPU memory; pass host tensors or use "
                       "backend gpu/auto");
      *gpu = false;
      return Status::OK();
    case Backend::gpu:
      if (!cuda::built())
        return Status(StatusCode::not_available,
                      "backend: gpu requested but the GPU backend is not available in this build (no CUDA); use backend cpu");
      if (!q.on_device)
        return invalid("backend: gpu requested but q is in host memory; pass device tensors or "
                       "use backend cpu/auto");
      *gpu = true;
      return Status::OK();
  }
  return invalid("backend: unknown value");
}

// cu_seqlens: int32 [nseq+1] on the device of q; checked on the host. On a stream that is
// capturing a CUDA graph a synchronous copy is impossible: then only the shape is checked and
// the kernels clamp every index to the packed tensors.
Status read_cu_seqlens(const Tensor& cu, const char* name, const Problem& p, int64_t total,
                       int max_seqlen, const char* max_name, void* stream,
                       std::vector<int32_t>* host, const int32_t** dev_ptr) {
  MessageStream os;
  if (!cu.defined()) return invalid(std::string(name) + ": expected a tensor, got null data");
  if (cu.dtype != DType::i32) {
    os << name << ": expected dtype int32, got " << to_string(cu.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  if (cu.ndim != 1 || cu.shape[0] < 2) {
    os << name << ": expected a 1-d tensor [num_sequences + 1] with at least 2 entries, got "
       << api::shape_str(cu);
    return invalid(os.str());
  }
  if (cu.stride[0] != 1) {
    os << name << ": expected a contiguous tensor, got stride " << cu.stride[0];
    return invalid(os.str());
  }
  if (cu.on_device != p.gpu || (p.gpu && cu.device_index != p.device))
    return invalid(std::string(name) + ": expected " +
                   (p.gpu ? "GPU memory of device " + std::to_string(p.device) : "host memory") +
                   " like q, got " +
                   (cu.on_device ? "GPU memory of device " + std::to_string(cu.device_index)
                                 : "host memory"));
  const int least = total == 0 ? 0 : 1;  // 0 only when every sequence is empty
  if (max_seqlen < least) {
    os << max_name << ": expected >= " << least << ", got " << max_seqlen;
    return invalid(os.str());
  }
  const size_t n = static_cast<size_t>(cu.shape[0]);
  host->resize(n);
  if (p.gpu) {
    bool capturing = false;
    INTFA_TRY(cuda::copy_to_host_sync(host->data(), cu.data, n * sizeof(int32_t), stream,
                                      &capturing));
    if (capturing) {
      host->clear();
      *dev_ptr = static_cast<const int32_t*>(cu.data);
      return Status::OK();
    }
  } else {
    std::memcpy(host->data(), cu.data, n * sizeof(int32_t));
  }
  INTFA_TRY(api::check_cu_seqlens(*host, name, total, max_seqlen, max_name));
  *dev_ptr = static_cast<const int32_t*>(cu.data);
  return Status::OK();
}

// Checks q, k, v (and options) for attention() / attention_varlen() / quantize().
// allow_empty: batch and token counts may be 0 (attention / attention_varlen).
Status validate_qkv(const Tensor& q, const Tensor& k, const Tensor& v, Form form,
                    const Options& opts, Problem* p, bool allow_empty = false) {
  INTFA_TRY(api::check_options(opts));
  INTFA_TRY(choose_backend(q, opts, &p->gpu));
  p->device = q.device_index;
  p->form = form;
  p->layout = form == Form::varlen ? Layout::BHSD : opts.layout;
  INTFA_TRY(api::check_operand(q, "q", p->layout, form, kInputTypes, p->gpu, &p->q, allow_empty));
  INTFA_TRY(api::check_operand(k, "k", p->layout, form, kInputTypes, p->gpu, &p->k, allow_empty));
  INTFA_TRY(api::check_operand(v, "v", p->layout, form, kInputTypes, p->gpu, &p->v, allow_empty));
  INTFA_TRY(api::check_same_device(k, "k", q, "q"));
  INTFA_TRY(api::check_same_device(v, "v", q, "q"));
  p->dtype = q.dtype;
  MessageStream os;
  for (const Tensor* t : {&k, &v}) {
    if (t->dtype != q.dtype) {
      os << (t == &k ? "k" : "v") << ": expected dtype " << to_string(q.dtype) << " (as q), got "
         << to_string(t->dtype);
      return Status(StatusCode::unsupported_type, os.str());
    }
  }
  const View &Q = p->q, &K = p->k, &V = p->v;
  auto mismatch = [&](const char* name, const char* what, int64_t expected, const char* as,
                      int64_t got) {
    std::ostringstream m;
    m << name << ": " << what << " expected " << expected << " (as " << as << "), got " << got;
    return invalid(m.str());
  };
  INTFA_TRY(api::check_qk_shapes(Q, K, "q", "k", form));
  if (form == Form::dense && V.B != Q.B) return mismatch("v", "batch", Q.B, "q", V.B);
  if (V.D != Q.D) return mismatch("v", "head_dim", Q.D, "q", V.D);
  if (V.H != K.H) return mismatch("v", "heads", K.H, "k", V.H);
  if (V.S != K.S)
    return mismatch("v", form == Form::varlen ? "total_tokens" : "seqlen", K.S, "k", V.S);
  INTFA_TRY(api::check_head_dim(Q.D, p->gpu));
  if (p->gpu && opts.scheme == Scheme::half)
    return Status(StatusCode::not_available,
                  "scheme: half is not available on the GPU paths in this build; use paper or "
                  "accurate, or backend cpu");
  const int64_t kMaxTokens = int64_t(1) << 31;
  if (Q.S >= kMaxTokens || K.S >= kMaxTokens) {
    os << "q/k: sequence length must be < 2^31, got " << std::max(Q.S, K.S);
    return invalid(os.str());
  }
  ProblemShape& s = p->shape;
  s.batch = static_cast<int>(Q.B);
  s.heads_q = static_cast<int>(Q.H);
  s.heads_kv = static_cast<int>(K.H);
  s.seqlen_q = static_cast<int>(Q.S);
  s.seqlen_kv = static_cast<int>(K.S);
  s.head_dim = static_cast<int>(Q.D);
  s.varlen = form == Form::varlen;
  p->softmax_scale = opts.scale != 0.f ? opts.scale : 1.0f / std::sqrt(static_cast<float>(Q.D));
  return Status::OK();
}

Status validate_varlen(const Tensor& cu_q, const Tensor& cu_kv, int max_q, int max_kv,
                       const Options& opts, Problem* p) {
  ProblemShape& s = p->shape;
  s.total_q = p->q.S;
  s.total_kv = p->k.S;
  INTFA_TRY(read_cu_seqlens(cu_q, "cu_seqlens_q", *p, s.total_q, max_q, "max_seqlen_q",
                            opts.stream, &p->cu_q_host, &p->cu_q));
  INTFA_TRY(read_cu_seqlens(cu_kv, "cu_seqlens_kv", *p, s.total_kv, max_kv, "max_seqlen_kv",
                            opts.stream, &p->cu_kv_host, &p->cu_kv));
  if (cu_q.shape[0] != cu_kv.shape[0]) {
    MessageStream os;
    os << "cu_seqlens_kv: expected " << cu_q.shape[0] << " entries (as cu_seqlens_q), got "
       << cu_kv.shape[0];
    return invalid(os.str());
  }
  s.batch = static_cast<int>(cu_q.shape[0] - 1);
  s.seqlen_q = max_q;
  s.seqlen_kv = max_kv;
  return Status::OK();
}

// Shapes of the per-row and per-channel side tensors.
std::vector<int64_t> rows_shape(const ProblemShape& s, bool q_side) {
  const int64_t h = q_side ? s.heads_q : s.heads_kv;
  if (s.varlen) return {h, q_side ? s.total_q : s.total_kv};
  return {s.batch, h, q_side ? s.seqlen_q : s.seqlen_kv};
}
std::vector<int64_t> channel_shape(const ProblemShape& s) {
  return {s.batch, s.heads_kv, s.head_dim};
}
const char* rows_desc(const ProblemShape& s, bool q_side) {
  if (s.varlen) return q_side ? "[heads_q, total_q]" : "[heads_kv, total_kv]";
  return q_side ? "[batch, heads_q, seqlen_q]" : "[batch, heads_kv, seqlen_kv]";
}
const char* channel_desc(const ProblemShape& s) {
  return s.varlen ? "[num_sequences, heads_kv, head_dim]" : "[batch, heads_kv, head_dim]";
}

Status validate_out(const Tensor& out, const Tensor* lse, const Problem& p, bool allow_f64) {
  std::vector<DType> types = {p.dtype, DType::f32};
  if (allow_f64) types = {DType::f64, DType::f32};
  View o;
  INTFA_TRY(api::check_operand(out, "out", p.layout, p.form, types, p.gpu, &o, true));
  if (out.on_device != p.gpu || (p.gpu && out.device_index != p.device))
    return invalid(std::string("out: expected ") + (p.gpu ? "GPU memory" : "host memory") +
                   " like q, got " + (out.on_device ? "GPU memory" : "host memory"));
  if (o.B != p.q.B || o.H != p.q.H || o.S != p.q.S || o.D != p.q.D) {
    return invalid("out: expected the shape of q, got " + api::shape_str(out));
  }
  if (lse && lse->defined()) {
    const DType lse_type = allow_f64 && lse->dtype == DType::f64 ? DType::f64 : DType::f32;
    INTFA_TRY(api::check_exact_shape(*lse, "lse", lse_type, rows_shape(p.shape, true),
                                     rows_desc(p.shape, true)));
    if (lse->on_device != p.gpu)
      return invalid(std::string("lse: expected ") + (p.gpu ? "GPU memory" : "host memory") +
                     " like q, got " + (lse->on_device ? "GPU memory" : "host memory"));
  }
  return Status::OK();
}

// The table entries a paged call uses (host memory: the CPU backend): those of the pages that
// hold keys [first(b), keys(b)) of sequence b must name a page of the pool. The pages before
// first(b): unchecked when the call does not read them (attention under a window's left edge),
// else (swept: append_kv's V sweep) a page of the pool or -1, a page the caller released, which
// the sweep skips (a local layer's cache gives back the pages its window has passed).
template <typename Keys, typename First>
Status check_pages(const int32_t* table, int64_t stride, int64_t batch, int64_t page, int64_t num_pages, Keys keys,
                   First first, bool swept) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = first(b) / page;
    for (int64_t i = swept ? 0 : used; i < (keys(b) + page - 1) / page; ++i) {
      const int32_t pg = table[b * stride + i];
      if ((pg < 0 && !(i < used && pg == -1)) || pg >= num_pages) {
        MessageStream os;
        os << "block_table[" << b << "][" << i << "]: expected a page in [0, " << num_pages << ") (it holds keys of "
           << "sequence " << b << (i < used ? " that the V sweep requantizes; -1: a released page" : "") << "), got "
           << pg;
        return invalid(os.str());
      }
    }
  }
  return Status::OK();
}

// block_table as a paged call takes it: int32 [batch, max_pages >= 1], contiguous last dim,
// in the memory space of `like`.
Status check_table_tensor(const Tensor& bt, const char* name, int64_t batch, const Tensor& like, const char* like_name) {
  MessageStream os;
  if (bt.dtype != DType::i32) {
    os << name << ": expected dtype int32, got " << to_string(bt.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  if (bt.ndim != 2 || bt.shape[0] != batch || bt.shape[1] < 1 || bt.stride[1] != 1) {
    os << name << ": expected [batch = " << batch << ", max_pages >= 1] with a contiguous last dim, got "
       << api::shape_str(bt);
    return invalid(os.str());
  }
  return api::check_same_device(bt, name, like, like_name);
}

// A page size (the token dim of k8's pages): a multiple of 16, and max_pages of them < 2^31.
Status check_page_size(int64_t page, int64_t max_pages, const char* k8_name) {
  MessageStream os;
  if (page % 16 != 0) {
    os << k8_name << ": page_size (the token dim of the pages) must be a multiple of 16, got " << page;
    return invalid(os.str());
  }
  if (max_pages * page > std::numeric_limits<int>::max()) {
    os << "block_table: max_pages * page_size = " << max_pages * page << " keys per sequence, expected < 2^31";
    return invalid(os.str());
  }
  return Status::OK();
}

// V^T pages as a paged call takes them: int8 [num_pages, heads_kv, head_dim, >= page_size], last
// dim contiguous; on the GPU, rows of 16-byte chunks (aligned pointer and strides).
Status check_vt_pages(const Tensor& vt, const char* name, int64_t num_pages, int64_t heads, int64_t dim,
                      int64_t page, bool gpu) {
  MessageStream os;
  if (!vt.defined()) return invalid(std::string(name) + ": expected a tensor, got null data");
  if (vt.dtype != DType::i8) {
    os << name << ": expected dtype int8, got " << to_string(vt.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  if (vt.ndim != 4 || vt.stride[3] != 1 || vt.shape[0] != num_pages || vt.shape[1] != heads || vt.shape[2] != dim ||
      vt.shape[3] < page) {
    os << name << ": expected V^T pages [num_pages = " << num_pages << ", heads_kv = " << heads << ", head_dim = " << dim
       << ", >= page_size = " << page << "] with a contiguous last dim, got " << api::shape_str(vt);
    return invalid(os.str());
  }
  if (gpu && (reinterpret_cast<uintptr_t>(vt.data) % 16 != 0 || vt.stride[0] % 16 != 0 || vt.stride[1] % 16 != 0 ||
              vt.stride[2] % 16 != 0)) {
    os << name << ": the GPU needs a 16-byte aligned pointer and strides that are multiples of 16, got strides "
       << vt.stride[0] << ", " << vt.stride[1] << ", " << vt.stride[2];
    return invalid(os.str());
  }
  return Status::OK();
}

// Paged KV (x.block_table), before the shapes are compared: k8 holds pages (its batch dim the
// pages, its token dim page_size), and the problem sees B sequences of max_pages * page_size
// keys. Leaves the page count in *num_pages.
Status check_paged(const QuantizedQKV& x, Problem* p, int64_t* num_pages) {
  MessageStream os;
  if (x.scheme == Scheme::half)
    return Status(StatusCode::not_available, "block_table: paged KV holds int8 V^T pages (schemes paper and "
                                             "accurate); half keeps V in fp16/bf16");
  const Tensor& bt = x.block_table;
  INTFA_TRY(check_table_tensor(bt, "block_table", p->q.B, x.q8, "q8"));
  const int64_t page = p->k.S, skv = bt.shape[1] * page;
  INTFA_TRY(check_page_size(page, bt.shape[1], "k8"));
  *num_pages = p->k.B;
  p->k.B = p->q.B;
  p->k.S = skv;
  return Status::OK();
}

// validate_quantized for a paged cache: pages of k8, k_scale and vt8 (check_paged has set the
// problem's keys), per-sequence v_scale and k_mean (shared_stats: possibly one set for all).
Status validate_paged(const QuantizedQKV& x, const View& q8, const View& k8, Problem* p, bool shared_stats) {
  const ProblemShape& s = p->shape;
  MessageStream os;
  if (k8.H != s.heads_kv || k8.D != s.head_dim || k8.S * x.block_table.shape[1] != s.seqlen_kv) {
    os << "k8: expected pages [num_pages, heads_kv = " << s.heads_kv << ", page_size, head_dim = " << s.head_dim
       << "] (BHSD order), got " << api::shape_str(x.k8);
    return invalid(os.str());
  }
  p->q = q8;
  p->k.st = k8.st;
  INTFA_TRY(api::check_exact_shape(x.q_scale, "q_scale", DType::f32, rows_shape(s, true), rows_desc(s, true)));
  if (x.lse_offset.defined())
    INTFA_TRY(api::check_exact_shape(x.lse_offset, "lse_offset", DType::f32, rows_shape(s, true), rows_desc(s, true)));
  INTFA_TRY(api::check_exact_shape(x.k_scale, "k_scale", DType::f32, {k8.B, k8.H, k8.S},
                                   "[num_pages, heads_kv, page_size]"));
  if (x.k_mean.defined())
    INTFA_TRY(api::check_exact_shape(x.k_mean, "k_mean", DType::f32, channel_shape(s), channel_desc(s), false,
                                     shared_stats));
  const Tensor& vt = x.vt8;
  INTFA_TRY(check_vt_pages(vt, "vt8", k8.B, k8.H, k8.D, k8.S, p->gpu));
  INTFA_TRY(api::check_exact_shape(x.v_scale, "v_scale", DType::f32, channel_shape(s), channel_desc(s), false,
                                   shared_stats));
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&x.q_scale, "q_scale"},
                                {&x.k_scale, "k_scale"}, {&x.k8, "k8"}, {&x.vt8, "vt8"}, {&x.v_scale, "v_scale"}})
    INTFA_TRY(api::check_same_device(*t, name, x.q8, "q8"));
  p->v.st = Strides3{vt.stride[0], vt.stride[1], vt.stride[2]};
  return Status::OK();
}

// Validates a QuantizedQKV against the problem (for quantize() outputs and attention_int8()).
// shared_stats (attention_int8, which only reads them): k_mean and v_scale may have a batch
// stride of 0, one set of statistics for every sequence (pages shared by sequences).
Status validate_quantized(const QuantizedQKV& x, Problem* p, bool need_v_or_vt, bool shared_stats) {
  const ProblemShape& s = p->shape;
  View q8, k8;
  INTFA_TRY(api::check_operand(x.q8, "q8", p->layout, p->form, {DType::i8}, p->gpu, &q8));
  INTFA_TRY(api::check_operand(x.k8, "k8", p->layout, p->form, {DType::i8}, p->gpu, &k8));
  MessageStream os;
  if (q8.B != p->q.B || q8.H != p->q.H || q8.S != p->q.S || q8.D != p->q.D) {
    os << "q8: expected the shape of q, got " << api::shape_str(x.q8);
    return invalid(os.str());
  }
  const bool paged = x.block_table.defined();
  if (paged) return validate_paged(x, q8, k8, p, shared_stats);
  if (k8.B != p->k.B || k8.H != p->k.H || k8.S != p->k.S || k8.D != p->k.D) {
    os << "k8: expected the shape of k, got " << api::shape_str(x.k8);
    return invalid(os.str());
  }
  p->q = q8;
  p->k = k8;
  INTFA_TRY(api::check_exact_shape(x.q_scale, "q_scale", DType::f32, rows_shape(s, true), rows_desc(s, true)));
  // Dense k_scale may have padded rows: a view of the first seqlen_kv tokens of a longer KV cache.
  INTFA_TRY(api::check_exact_shape(x.k_scale, "k_scale", DType::f32, rows_shape(s, false), rows_desc(s, false),
                                   p->form == Form::dense));
  if (x.lse_offset.defined())
    INTFA_TRY(api::check_exact_shape(x.lse_offset, "lse_offset", DType::f32, rows_shape(s, true), rows_desc(s, true)));
  if (x.k_mean.defined())
    INTFA_TRY(api::check_exact_shape(x.k_mean, "k_mean", DType::f32, channel_shape(s), channel_desc(s), false,
                                     shared_stats));
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&x.q_scale, "q_scale"},
                                {&x.k_scale, "k_scale"}, {&x.k8, "k8"}, {&x.q8, "q8"}}) {
    if (t->on_device != p->gpu || (p->gpu && t->device_index != p->device))
      return invalid(std::string(name) + ": expected " +
                     (p->gpu ? "GPU memory of device " + std::to_string(p->device) : "host memory") +
                     ", got " + (t->on_device ? "GPU memory" : "host memory"));
  }
  if (!need_v_or_vt) return Status::OK();
  if (x.scheme == Scheme::half) {
    View v;
    INTFA_TRY(api::check_operand(x.v, "v", p->layout, p->form, kInputTypes, p->gpu, &v));
    if (v.B != k8.B || v.H != k8.H || v.S != k8.S || v.D != k8.D) {
      os << "v: expected the shape of k8, got " << api::shape_str(x.v);
      return invalid(os.str());
    }
    p->v = v;
    return Status::OK();
  }
  // vt8: [B, Hkv, D, >= Skv] or [Hkv, D, >= Tkv], last dim contiguous.
  const Tensor& vt = x.vt8;
  const bool varlen = p->form == Form::varlen;
  const int rank = varlen ? 3 : 4;
  if (!vt.defined()) return invalid("vt8: expected a tensor, got null data");
  if (vt.dtype != DType::i8) {
    os << "vt8: expected dtype int8, got " << to_string(vt.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  const int64_t want_tokens = varlen ? vt_varlen_columns(s.total_kv, s.batch) : s.seqlen_kv;
  bool ok = vt.ndim == rank && vt.stride[rank - 1] == 1;
  if (ok && varlen) ok = vt.shape[0] == s.heads_kv && vt.shape[1] == s.head_dim && vt.shape[2] >= want_tokens;
  if (ok && !varlen)
    ok = vt.shape[0] == s.batch && vt.shape[1] == s.heads_kv && vt.shape[2] == s.head_dim &&
         vt.shape[3] >= want_tokens;
  if (!ok) {
    os << "vt8: expected V transposed, shape " << (varlen ? "[heads_kv, head_dim, >= total_kv + 16*(num_sequences+1)] (sequence b at column round_up(cu_kv[b],16)+16b)" : "[batch, heads_kv, head_dim, >= seqlen_kv]")
       << " with a contiguous last dim, got " << api::shape_str(vt);
    return invalid(os.str());
  }
  if (p->gpu && !varlen && vt.shape[3] < ((s.seqlen_kv + 15) / 16) * 16) {
    os << "vt8: the GPU reads V^T rows in 16-byte chunks: expected >= " << ((s.seqlen_kv + 15) / 16) * 16
       << " columns (seqlen_kv rounded up to 16), got " << vt.shape[3];
    return invalid(os.str());
  }
  if (p->gpu && (reinterpret_cast<uintptr_t>(vt.data) % 16 != 0 || vt.stride[rank - 2] % 16 != 0)) {
    os << "vt8: the GPU needs a 16-byte aligned pointer and a head_dim stride that is a multiple "
          "of 16, got stride "
       << vt.stride[rank - 2];
    return invalid(os.str());
  }
  if (vt.on_device != p->gpu) return invalid("vt8: expected the memory space of q8");
  INTFA_TRY(api::check_exact_shape(x.v_scale, "v_scale", DType::f32, channel_shape(s), channel_desc(s), false,
                                   shared_stats));
  p->v.st = varlen ? Strides3{0, vt.stride[0], vt.stride[1]}
                   : Strides3{vt.stride[0], vt.stride[1], vt.stride[2]};
  return Status::OK();
}

Strides3 rows_strides(const ProblemShape& s, bool q_side) {
  const int64_t n = q_side ? (s.varlen ? s.total_q : s.seqlen_q) : (s.varlen ? s.total_kv : s.seqlen_kv);
  const int64_t h = q_side ? s.heads_q : s.heads_kv;
  return s.varlen ? Strides3{0, n, 1} : Strides3{h * n, n, 1};
}
Strides3 channel_strides(const ProblemShape& s) {
  return {static_cast<int64_t>(s.heads_kv) * s.head_dim, s.head_dim, 0};
}
// k_scale as validate_quantized accepts it: dense views keep their own strides.
Strides3 k_scale_strides(const ProblemShape& s, const Tensor& k_scale) {
  return s.varlen ? rows_strides(s, false) : Strides3{k_scale.stride[0], k_scale.stride[1], 1};
}

void fill_common(const Problem& p, int& batch, int& hq, int& hkv, int& sq, int& skv, int& d) {
  batch = p.shape.batch; hq = p.shape.heads_q; hkv = p.shape.heads_kv;
  sq = p.shape.seqlen_q; skv = p.shape.seqlen_kv; d = p.shape.head_dim;
}

QuantParams make_quant_params(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                              const QuantizedQKV& x, Scheme scheme, const View& q8v, const View& k8v) {
  QuantParams qp;
  fill_common(p, qp.batch, qp.heads_q, qp.heads_kv, qp.seqlen_q, qp.seqlen_kv, qp.head_dim);
  qp.cu_q = p.cu_q;
  qp.cu_kv = p.cu_kv;
  qp.in_dtype = p.dtype;
  qp.scheme = scheme;
  qp.softmax_scale = p.softmax_scale;
  qp.q = q.data; qp.q_st = p.q.st;
  qp.k = k.data; qp.k_st = p.k.st;
  qp.v = v.data; qp.v_st = p.v.st;
  qp.q8 = static_cast<int8_t*>(x.q8.data); qp.q8_st = q8v.st;
  qp.k8 = static_cast<int8_t*>(x.k8.data); qp.k8_st = k8v.st;
  qp.q_scale = static_cast<float*>(x.q_scale.data); qp.qs_st = rows_strides(p.shape, true);
  qp.lse_offset = static_cast<float*>(x.lse_offset.data);
  qp.k_scale = static_cast<float*>(x.k_scale.data); qp.ks_st = k_scale_strides(p.shape, x.k_scale);
  qp.k_mean = static_cast<float*>(x.k_mean.data); qp.km_st = channel_strides(p.shape);
  if (scheme != Scheme::half) {
    const Tensor& vt = x.vt8;
    qp.vt8 = static_cast<int8_t*>(vt.data);
    qp.vt_st = p.form == Form::varlen ? Strides3{0, vt.stride[0], vt.stride[1]}
                                      : Strides3{vt.stride[0], vt.stride[1], vt.stride[2]};
    qp.v_scale = static_cast<float*>(x.v_scale.data);
    qp.vs_st = channel_strides(p.shape);
  }
  return qp;
}

// Options' mask in the form FwdParams and ref::ExactParams hold it (their seqlen_q / seqlen_kv
// set first): causal is window_right = 0, and a right edge alone makes a launch causal-shaped.
// An edge that leaves no key of any row out (left >= Skv - 1, right >= Sq - 1; Sq, Skv the
// longest sequences) is dropped, so such calls run the unwindowed kernels.
template <typename P>
void set_mask(const Options& opts, P* p) {
  const bool right_open = opts.window_right < 0 || opts.window_right >= p->seqlen_q - 1;
  p->causal = opts.causal || !right_open;
  p->window_right = opts.causal ? 0 : std::max(opts.window_right, 0);
  p->window_left = opts.window_left >= p->seqlen_kv - 1 ? -1 : opts.window_left;
}

FwdParams make_fwd_params(const Problem& p, const QuantizedQKV& x, const Tensor& out,
                          const Tensor* lse, const Options& opts) {
  FwdParams f;
  fill_common(p, f.batch, f.heads_q, f.heads_kv, f.seqlen_q, f.seqlen_kv, f.head_dim);
  f.cu_q = p.cu_q;
  f.cu_kv = p.cu_kv;
  f.total_q = p.shape.total_q;
  f.total_kv = p.shape.total_kv;
  f.scheme = x.scheme;
  f.softmax_scale = p.softmax_scale;
  set_mask(opts, &f);
  f.block_n = opts.block_n;
  f.q8 = static_cast<const int8_t*>(x.q8.data); f.q_st = p.q.st;
  f.k8 = static_cast<const int8_t*>(x.k8.data); f.k_st = p.k.st;
  if (x.scheme == Scheme::half) {
    f.v = x.v.data; f.v_st = p.v.st; f.v_dtype = x.v.dtype;
  } else {
    f.vt8 = static_cast<const int8_t*>(x.vt8.data); f.vt_st = p.v.st;
    // The tensor's own strides: a batch stride of 0 is one set shared by the sequences.
    f.v_scale = static_cast<const float*>(x.v_scale.data);
    f.vs_st = {x.v_scale.stride[0], x.v_scale.stride[1], 0};
  }
  f.q_scale = static_cast<const float*>(x.q_scale.data); f.qs_st = rows_strides(p.shape, true);
  f.lse_offset = static_cast<const float*>(x.lse_offset.data);
  f.k_scale = static_cast<const float*>(x.k_scale.data); f.ks_st = k_scale_strides(p.shape, x.k_scale);
  f.out = out.data; f.o_st = api::view_of(out, p.layout, p.form).st; f.out_dtype = out.dtype;
  if (lse && lse->defined()) {
    f.lse = static_cast<float*>(lse->data);
    f.lse_st = rows_strides(p.shape, true);
  }
  f.sinks = static_cast<const float*>(opts.sinks.data);
  if (opts.softcap > 0.f) {
    // The K-mean term goes into the scores before the tanh; the LSE and sinks then take none.
    f.softcap = opts.softcap;
    f.score_offset = f.lse_offset;
    f.lse_offset = nullptr;
  }
  return f;
}

Status resolve_gpu(const Problem& p, const Options& opts, GpuPath* path) {
  return cuda::resolve_path(opts.path, p.device, path);
}

// Quantizes then attends; shared by attention() and attention_varlen().
Status run_fp_attention(Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor* lse, const Options& opts) {
  const size_t bytes = quantized_bytes(p.shape, opts.scheme);
  GpuPath path = GpuPath::automatic;
  std::vector<uint8_t> host_buf;
  void* buf = nullptr;
  bool owned = false;
  if (p.gpu) {
    INTFA_TRY(resolve_gpu(p, opts, &path));
    if (opts.workspace.defined()) {
      const int64_t have = opts.workspace.numel() * static_cast<int64_t>(dtype_size(opts.workspace.dtype));
      if (have < static_cast<int64_t>(bytes)) {
        MessageStream os;
        os << "workspace: expected at least " << bytes << " bytes, got " << have;
        return invalid(os.str());
      }
      if (!opts.workspace.on_device || opts.workspace.device_index != p.device)
        return invalid("workspace: expected GPU memory on the device of q");
      if (reinterpret_cast<uintptr_t>(opts.workspace.data) % 256 != 0)
        return invalid("workspace: expected a 256-byte aligned pointer");
      buf = opts.workspace.data;
    } else {
      INTFA_TRY(cuda::malloc_async(&buf, bytes, opts.stream));
      owned = true;
    }
  } else {
    host_buf.resize(bytes + 256);
    buf = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(host_buf.data()) + 255) & ~uintptr_t(255));
  }
  QuantizedQKV x;
  Status st = alloc_quantized(p.shape, opts.scheme, p.layout, buf, bytes, p.gpu, p.device, &x);
  if (st.ok()) {
    if (opts.scheme == Scheme::half) x.v = v;
    const View q8v = api::view_of(x.q8, p.layout, p.form), k8v = api::view_of(x.k8, p.layout, p.form);
    QuantParams qp = make_quant_params(p, q, k, v, x, opts.scheme, q8v, k8v);
    Problem pq = p;  // the attention reads the quantized tensors' strides
    pq.q = q8v;
    pq.k = k8v;
    if (opts.scheme != Scheme::half) pq.v.st = qp.vt_st;
    FwdParams fp = make_fwd_params(pq, x, out, lse, opts);
    // Only the LSE, sinks and soft-capping need q . mean(K) (the frame of the smoothed
    // scores): without them Q rows wait for no K statistics.
    if (!fp.lse && !fp.sinks && !(fp.softcap > 0.f)) {
      qp.lse_offset = nullptr;
      fp.lse_offset = nullptr;
    }
    if (p.gpu) {
      // Q itself, for the kernel that quantizes it (cuda::attention decides).
      fp.q_in = q.data;
      fp.qin_st = p.q.st;
      fp.q_in_dtype = q.dtype;
      st = cuda::attention(qp, fp, path, opts.path == GpuPath::automatic, opts.stream, opts.ran);
    } else {
      ref::quantize(qp);
      ref::attention_int8(fp);
    }
  }
  if (owned) {
    Status fst = cuda::free_async(buf, opts.stream);
    if (st.ok()) st = fst;
  }
  return st;
}

// Lays the quantized tensors of a problem out from `base` (256-byte aligned parts) and returns
// the bytes they take: the one definition behind quantized_bytes() and alloc_quantized().
size_t lay_out_quantized(const ProblemShape& s, Scheme scheme, Layout layout, uintptr_t base,
                         bool on_device, int device_index, QuantizedQKV* out) {
  auto up = [](size_t n) { return (n + 255) & ~size_t(255); };
  uintptr_t cur = base;
  auto take = [&](DType dt, std::initializer_list<int64_t> shape) {
    Tensor t = make_tensor(reinterpret_cast<void*>(cur), dt, shape, on_device, device_index);
    cur += up(static_cast<size_t>(t.numel()) * dtype_size(dt));
    return t;
  };
  const int64_t B = s.batch, Hq = s.heads_q, Hk = s.heads_kv, D = s.head_dim;
  QuantizedQKV x;
  x.scheme = scheme;
  x.layout = layout;
  if (s.varlen) {
    x.q8 = take(DType::i8, {s.total_q, Hq, D});
    x.q_scale = take(DType::f32, {Hq, s.total_q});
    x.lse_offset = take(DType::f32, {Hq, s.total_q});
    x.k8 = take(DType::i8, {s.total_kv, Hk, D});
    x.k_scale = take(DType::f32, {Hk, s.total_kv});
    x.k_mean = take(DType::f32, {B, Hk, D});
    if (scheme != Scheme::half) {
      // Sequence b starts at column vt_seq_start(cu_kv, b); rows padded to 256 bytes.
      const int64_t cols = vt_varlen_columns(s.total_kv, s.batch);
      x.vt8 = take(DType::i8, {Hk, D, static_cast<int64_t>(up(cols))});
      x.v_scale = take(DType::f32, {B, Hk, D});
    }
  } else {
    const int64_t Sq = s.seqlen_q, Skv = s.seqlen_kv;
    if (layout == Layout::BHSD) {
      x.q8 = take(DType::i8, {B, Hq, Sq, D});
      x.k8 = take(DType::i8, {B, Hk, Skv, D});
    } else {
      x.q8 = take(DType::i8, {B, Sq, Hq, D});
      x.k8 = take(DType::i8, {B, Skv, Hk, D});
    }
    x.q_scale = take(DType::f32, {B, Hq, Sq});
    x.lse_offset = take(DType::f32, {B, Hq, Sq});
    x.k_scale = take(DType::f32, {B, Hk, Skv});
    x.k_mean = take(DType::f32, {B, Hk, D});
    if (scheme != Scheme::half) {
      // Rows padded to 256 bytes: the GPU reads V^T in 16-byte chunks past seqlen_kv.
      x.vt8 = take(DType::i8, {B, Hk, D, static_cast<int64_t>(up(Skv))});
      x.v_scale = take(DType::f32, {B, Hk, D});
    }
  }
  if (out) *out = x;
  return cur - base;
}

}  // namespace

size_t quantized_bytes(const ProblemShape& s, Scheme scheme) {
  return lay_out_quantized(s, scheme, Layout::BHSD, 0, false, 0, nullptr);
}

Status alloc_quantized(const ProblemShape& s, Scheme scheme, Layout layout, void* buffer,
                       size_t bytes, bool on_device, int device_index, QuantizedQKV* out) {
  if (!buffer) return invalid("buffer: expected memory, got null");
  if (reinterpret_cast<uintptr_t>(buffer) % 256 != 0) return invalid("buffer: expected a 256-byte aligned pointer");
  if (s.batch < 1 || s.heads_q < 1 || s.heads_kv < 1 || s.head_dim < 1 ||
      (!s.varlen && (s.seqlen_q < 1 || s.seqlen_kv < 1)) ||
      (s.varlen && (s.total_q < 1 || s.total_kv < 1)))
    return invalid("shape: every size must be >= 1");
  const size_t need = quantized_bytes(s, scheme);
  if (bytes < need) {
    MessageStream os;
    os << "bytes: expected at least " << need << " (quantized_bytes), got " << bytes;
    return invalid(os.str());
  }
  lay_out_quantized(s, scheme, layout, reinterpret_cast<uintptr_t>(buffer), on_device, device_index, out);
  return Status::OK();
}

namespace {

// Calls with no query row or no key, which torch SDPA and FlashAttention take: nothing to
// compute, and rows without keys give what the kernels give such rows (0, LSE -inf or the sink).
bool no_work(const Problem& p) { return p.q.B == 0 || p.q.S == 0 || p.k.S == 0; }
Status attend_without_keys(const Problem& p, const Tensor& out, const Tensor* lse, const Options& opts) {
  const View o = api::view_of(out, p.layout, p.form);
  NoKeyRows r;
  r.out = out.data;
  r.o_st = o.st;
  r.elem_bytes = static_cast<int>(dtype_size(out.dtype));
  r.batch = o.B; r.heads = o.H; r.tokens = o.S; r.head_dim = o.D;
  if (lse && lse->defined()) {
    r.lse = static_cast<float*>(lse->data);
    r.lse_st = rows_strides(p.shape, true);
  }
  r.sinks = static_cast<const float*>(opts.sinks.data);
  if (!p.gpu) {
    ref::fill_no_key_rows(r);
    return Status::OK();
  }
  GpuPath path = GpuPath::automatic;
  INTFA_TRY(resolve_gpu(p, opts, &path));  // a path this device cannot run is still an error
  return cuda::fill_no_key_rows(r, opts.stream);
}

}  // namespace

Status attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                 const Tensor* lse, const Options& opts) {
  Problem p;
  INTFA_TRY(validate_qkv(q, k, v, Form::dense, opts, &p, true));
  INTFA_TRY(validate_out(out, lse, p, false));
  INTFA_TRY(api::check_sinks(opts, p.shape.heads_q, q, "q"));
  if (no_work(p)) return attend_without_keys(p, out, lse, opts);
  return run_fp_attention(p, q, k, v, out, lse, opts);
}

Status attention_varlen(const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_kv, int max_seqlen_q,
                        int max_seqlen_kv, const Tensor& out, const Tensor* lse,
                        const Options& opts) {
  Problem p;
  INTFA_TRY(validate_qkv(q, k, v, Form::varlen, opts, &p, true));
  INTFA_TRY(validate_varlen(cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, opts, &p));
  INTFA_TRY(validate_out(out, lse, p, false));
  INTFA_TRY(api::check_sinks(opts, p.shape.heads_q, q, "q"));
  if (no_work(p)) return attend_without_keys(p, out, lse, opts);  // total_q or total_kv is 0
  return run_fp_attention(p, q, k, v, out, lse, opts);
}

Status quantize(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                const Tensor& cu_seqlens_kv, const Options& opts, const QuantizedQKV& out) {
  const Form form = cu_seqlens_q.defined() || cu_seqlens_kv.defined() ? Form::varlen : Form::dense;
  Problem p;
  INTFA_TRY(validate_qkv(q, k, v, form, opts, &p));
  if (form == Form::varlen) {
    INTFA_TRY(validate_varlen(cu_seqlens_q, cu_seqlens_kv, static_cast<int>(p.q.S),
                              static_cast<int>(p.k.S), opts, &p));
  }
  if (out.scheme != opts.scheme) {
    MessageStream os;
    os << "out.scheme: expected " << to_string(opts.scheme) << " (as options), got "
       << to_string(out.scheme);
    return invalid(os.str());
  }
  if (out.seqused_kv.defined())
    return invalid("out.seqused_kv: quantize() quantizes every token of k and v (its statistics too) and takes no "
                   "key counts; expected undefined (pass views of the tokens to quantize)");
  if (out.block_table.defined())
    return invalid("out.block_table: quantize() writes contiguous tensors; expected undefined (copy its rows into "
                   "pages for a paged cache)");
  Problem pv = p;
  INTFA_TRY(validate_quantized(out, &pv, opts.scheme != Scheme::half, false));
  View q8v = pv.q, k8v = pv.k;
  QuantParams qp = make_quant_params(p, q, k, v, out, opts.scheme, q8v, k8v);
  if (p.gpu) {
    GpuPath path;
    INTFA_TRY(resolve_gpu(p, opts, &path));
    return cuda::quantize(qp, opts.stream);
  }
  ref::quantize(qp);
  return Status::OK();
}

Status attention_int8(const QuantizedQKV& x, const Tensor& cu_seqlens_q,
                      const Tensor& cu_seqlens_kv, int max_seqlen_q, int max_seqlen_kv,
                      const Tensor& out, const Tensor* lse, const Options& opts) {
  INTFA_TRY(api::check_options(opts));
  if (static_cast<int>(x.scheme) < 0 || static_cast<int>(x.scheme) > 2)
    return invalid("qkv.scheme: unknown value (expected paper, accurate or half)");
  Problem p;
  const Form form = cu_seqlens_q.defined() || cu_seqlens_kv.defined() ? Form::varlen : Form::dense;
  p.form = form;
  p.layout = form == Form::varlen ? Layout::BHSD : x.layout;
  if (x.block_table.defined() && form == Form::varlen)
    return invalid("block_table: paged KV takes dense queries; expected no cu_seqlens_q / cu_seqlens_kv, got them");
  INTFA_TRY(choose_backend(x.q8, opts, &p.gpu));
  p.device = x.q8.device_index;
  // Shapes come from q8 / k8 themselves.
  INTFA_TRY(api::check_operand(x.q8, "q8", p.layout, form, {DType::i8}, p.gpu, &p.q));
  INTFA_TRY(api::check_operand(x.k8, "k8", p.layout, form, {DType::i8}, p.gpu, &p.k));
  const bool paged = x.block_table.defined();
  int64_t num_pages = 0;
  if (paged) INTFA_TRY(check_paged(x, &p, &num_pages));
  INTFA_TRY(api::check_qk_shapes(p.q, p.k, "q8", "k8", form));
  MessageStream os;
  INTFA_TRY(api::check_head_dim(p.q.D, p.gpu));
  if (p.gpu && x.scheme == Scheme::half)
    return Status(StatusCode::not_available, "qkv.scheme: half is not available on the GPU paths in this build");
  ProblemShape& s = p.shape;
  s.batch = static_cast<int>(p.q.B);
  s.heads_q = static_cast<int>(p.q.H);
  s.heads_kv = static_cast<int>(p.k.H);
  s.seqlen_q = static_cast<int>(p.q.S);
  s.seqlen_kv = static_cast<int>(p.k.S);
  s.head_dim = static_cast<int>(p.q.D);
  s.varlen = form == Form::varlen;
  p.softmax_scale = opts.scale != 0.f ? opts.scale : 1.0f / std::sqrt(static_cast<float>(p.q.D));
  if (form == Form::varlen)
    INTFA_TRY(validate_varlen(cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, opts, &p));
  INTFA_TRY(validate_quantized(x, &p, true, true));
  if (x.seqused_kv.defined()) {
    INTFA_TRY(api::check_exact_shape(x.seqused_kv, "seqused_kv", DType::i32, {int64_t(s.batch)},
                                     form == Form::varlen ? "[num_sequences]" : "[batch]"));
    INTFA_TRY(api::check_same_device(x.seqused_kv, "seqused_kv", x.q8, "q8"));
  }
  p.dtype = x.scheme == Scheme::half ? x.v.dtype : DType::f16;
  // Output: fp16/bf16 (or f32) shaped like q8.
  View o;
  INTFA_TRY(api::check_operand(out, "out", p.layout, form, {DType::f16, DType::bf16, DType::f32}, p.gpu, &o));
  if (o.B != p.q.B || o.H != p.q.H || o.S != p.q.S || o.D != p.q.D) {
    os << "out: expected the shape of q8, got " << api::shape_str(out);
    return invalid(os.str());
  }
  if (out.on_device != p.gpu) return invalid("out: expected the memory space of q8");
  if (lse && lse->defined()) {
    INTFA_TRY(api::check_exact_shape(*lse, "lse", DType::f32, rows_shape(s, true), rows_desc(s, true)));
    if (lse->on_device != p.gpu) return invalid("lse: expected the memory space of q8");
  }
  INTFA_TRY(api::check_sinks(opts, s.heads_q, x.q8, "q8"));
  if (opts.sinks.defined() && x.scheme != Scheme::paper && !x.lse_offset.defined())
    return invalid("qkv.lse_offset: sinks with scheme " + std::string(to_string(x.scheme)) +
                   " need it (the smoothed scores are shifted by scale * q . k_mean and the sink is not); "
                   "expected the tensor quantize() / quantize_q() write, got undefined");
  if (opts.softcap > 0.f && x.scheme != Scheme::paper && !x.lse_offset.defined())
    return invalid("qkv.lse_offset: softcap with scheme " + std::string(to_string(x.scheme)) +
                   " needs it (the smoothed scores are shifted by scale * q . k_mean, which the tanh does "
                   "not ignore); expected the tensor quantize() / quantize_q() write, got undefined");
  FwdParams fp = make_fwd_params(p, x, out, lse, opts);
  fp.seqused_kv = static_cast<const int32_t*>(x.seqused_kv.data);
  if (paged) {
    fp.block_table = static_cast<const int32_t*>(x.block_table.data);
    fp.bt_stride = x.block_table.stride[0];
    fp.page_size = static_cast<int>(x.k8.shape[p.layout == Layout::BHSD ? 2 : 1]);
    fp.num_pages = num_pages;
    // The host reads a host table (the CPU backend, whose loop reads no key before a window's
    // first); a device table is the kernels' to guard (FwdParams). A window's left edge: the
    // pages wholly before the first key of row 0 (the lowest) may be released (-1), so they
    // are not checked.
    auto kv = [&](int64_t b) {
      return fp.seqused_kv ? std::clamp<int64_t>(fp.seqused_kv[b], 0, fp.seqlen_kv) : int64_t(fp.seqlen_kv);
    };
    if (!p.gpu)
      INTFA_TRY(check_pages(
          fp.block_table, fp.bt_stride, fp.batch, fp.page_size, num_pages, kv,
          [&](int64_t b) { return std::max<int64_t>(0, first_key(fp, 0, static_cast<int>(kv(b) - fp.seqlen_q))); },
          false));
  }
  if (p.gpu) {
    GpuPath path;
    INTFA_TRY(resolve_gpu(p, opts, &path));
    return cuda::attention_int8(fp, path, opts.path == GpuPath::automatic, opts.stream, opts.ran);
  }
  ref::attention_int8(fp);
  return Status::OK();
}

Status quantize_q(const Tensor& q, const Tensor& k_mean, const Options& opts, const QuantizedQKV& out) {
  INTFA_TRY(api::check_options(opts));
  Problem p;
  p.layout = opts.layout;
  INTFA_TRY(choose_backend(q, opts, &p.gpu));
  p.device = q.device_index;
  INTFA_TRY(api::check_operand(q, "q", p.layout, Form::dense, kInputTypes, p.gpu, &p.q));
  INTFA_TRY(api::check_head_dim(p.q.D, p.gpu));
  MessageStream os;
  if (out.scheme != opts.scheme) {
    os << "out.scheme: expected " << to_string(opts.scheme) << " (as options), got " << to_string(out.scheme);
    return invalid(os.str());
  }
  const View& Q = p.q;
  const std::vector<int64_t> rows = {Q.B, Q.H, Q.S};
  View q8;
  INTFA_TRY(api::check_operand(out.q8, "out.q8", p.layout, Form::dense, {DType::i8}, p.gpu, &q8));
  if (q8.B != Q.B || q8.H != Q.H || q8.S != Q.S || q8.D != Q.D)
    return invalid("out.q8: expected the shape of q, got " + api::shape_str(out.q8));
  INTFA_TRY(api::check_exact_shape(out.q_scale, "out.q_scale", DType::f32, rows, "[batch, heads_q, seqlen_q]"));
  if (out.lse_offset.defined())
    INTFA_TRY(api::check_exact_shape(out.lse_offset, "out.lse_offset", DType::f32, rows, "[batch, heads_q, seqlen_q]"));
  // The K mean enters only lse_offset (q itself is not smoothed); paper has none.
  const bool use_mean = opts.scheme != Scheme::paper && out.lse_offset.defined();
  int64_t hkv = Q.H;
  if (use_mean) {
    if (!k_mean.defined())
      return invalid("k_mean: expected the cache's K mean, f32 [batch, heads_kv, head_dim] (for out.lse_offset), got null data");
    if (k_mean.ndim == 3) hkv = k_mean.shape[1];
    if (hkv < 1 || Q.H % hkv != 0) {
      os << "k_mean: expected [batch, heads_kv, head_dim] with heads_kv dividing heads_q = " << Q.H << ", got "
         << api::shape_str(k_mean);
      return invalid(os.str());
    }
    INTFA_TRY(api::check_exact_shape(k_mean, "k_mean", DType::f32, {Q.B, hkv, Q.D}, "[batch, heads_kv, head_dim]",
                                     false, true));
    INTFA_TRY(api::check_same_device(k_mean, "k_mean", q, "q"));
  }
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&out.q8, "out.q8"}, {&out.q_scale, "out.q_scale"},
                                {&out.lse_offset, "out.lse_offset"}})
    if (t->defined()) INTFA_TRY(api::check_same_device(*t, name, q, "q"));

  CacheQuantParams c;
  c.batch = static_cast<int>(Q.B);
  c.heads = static_cast<int>(Q.H);
  c.heads_kv = static_cast<int>(hkv);
  c.tokens = static_cast<int>(Q.S);
  c.cap = Q.S;
  c.head_dim = static_cast<int>(Q.D);
  c.in_dtype = q.dtype;
  c.softmax_scale = opts.scale != 0.f ? opts.scale : 1.0f / std::sqrt(static_cast<float>(Q.D));
  c.x = q.data;
  c.x_st = Q.st;
  if (use_mean) {
    c.mean = static_cast<const float*>(k_mean.data);
    c.mean_st = {k_mean.stride[0], k_mean.stride[1], 0};
  }
  c.x8 = static_cast<int8_t*>(out.q8.data);
  c.x8_st = q8.st;
  c.scale = static_cast<float*>(out.q_scale.data);
  c.s_st = {Q.H * Q.S, Q.S, 1};
  c.lse_offset = static_cast<float*>(out.lse_offset.data);
  if (p.gpu) return cuda::quantize_cache(c, opts.stream);
  ref::quantize_cache(c);
  return Status::OK();
}

namespace {

// append_kv with one position (pos_b null) or a position per sequence (pos_b: int32 [B], read
// by the kernels).
Status append_kv_impl(const Tensor& k_new, const Tensor& v_new, int64_t pos, const Tensor* pos_b,
                      const Options& opts, const QuantizedQKV& cache) {
  INTFA_TRY(api::check_options(opts));
  MessageStream os;
  if (cache.scheme != opts.scheme) {
    os << "cache.scheme: expected " << to_string(opts.scheme) << " (as options), got " << to_string(cache.scheme);
    return invalid(os.str());
  }
  if (opts.scheme == Scheme::half)
    return Status(StatusCode::not_available,
                  "scheme: append_kv takes paper and accurate; half keeps V in fp16/bf16 (cache.v), not quantized");
  Problem p;
  p.layout = opts.layout;
  INTFA_TRY(choose_backend(k_new, opts, &p.gpu));
  p.device = k_new.device_index;
  INTFA_TRY(api::check_operand(k_new, "k_new", p.layout, Form::dense, kInputTypes, p.gpu, &p.k));
  INTFA_TRY(api::check_operand(v_new, "v_new", p.layout, Form::dense, kInputTypes, p.gpu, &p.v));
  INTFA_TRY(api::check_same_device(v_new, "v_new", k_new, "k_new"));
  INTFA_TRY(api::check_head_dim(p.k.D, p.gpu));
  if (v_new.dtype != k_new.dtype) {
    os << "v_new: expected dtype " << to_string(k_new.dtype) << " (as k_new), got " << to_string(v_new.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  const View &K = p.k, &V = p.v;
  if (V.B != K.B || V.H != K.H || V.S != K.S || V.D != K.D)
    return invalid("v_new: expected the shape of k_new, got " + api::shape_str(v_new));
  View k8;
  INTFA_TRY(api::check_operand(cache.k8, "cache.k8", cache.layout, Form::dense, {DType::i8}, p.gpu, &k8));
  // Paged (cache.block_table): k8, k_scale and vt8 hold pages of page_size tokens.
  const bool paged = cache.block_table.defined();
  const int64_t page = paged ? k8.S : 0, num_pages = paged ? k8.B : 0;
  if (paged) {
    INTFA_TRY(check_table_tensor(cache.block_table, "cache.block_table", K.B, k_new, "k_new"));
    if (k8.H != K.H || k8.D != K.D) {
      os << "cache.k8: expected pages [num_pages, heads_kv = " << K.H << ", page_size, head_dim = " << K.D
         << "] (BHSD order), got " << api::shape_str(cache.k8);
      return invalid(os.str());
    }
    INTFA_TRY(check_page_size(page, cache.block_table.shape[1], "cache.k8"));
  } else if (k8.B != K.B || k8.H != K.H || k8.D != K.D) {
    os << "cache.k8: expected batch, heads and head_dim of k_new (" << K.B << ", " << K.H << ", " << K.D << "), got "
       << api::shape_str(cache.k8);
    return invalid(os.str());
  }
  const int64_t cap = paged ? cache.block_table.shape[1] * page : k8.S;
  if (pos_b) {
    INTFA_TRY(api::check_exact_shape(*pos_b, "pos", DType::i32, {K.B}, "[batch]"));
    INTFA_TRY(api::check_same_device(*pos_b, "pos", k_new, "k_new"));
  } else if (pos < 0 || pos + K.S > cap) {
    os << "pos: expected 0 <= pos and pos + new tokens (" << K.S << ") <= the cache's " << cap << " tokens, got pos "
       << pos;
    return invalid(os.str());
  }
  if (paged)
    INTFA_TRY(api::check_exact_shape(cache.k_scale, "cache.k_scale", DType::f32, {num_pages, K.H, page},
                                     "[num_pages, heads_kv, page_size]"));
  else
    INTFA_TRY(api::check_exact_shape(cache.k_scale, "cache.k_scale", DType::f32, {K.B, K.H, cap},
                                     "[batch, heads_kv, cache tokens]"));
  // k_mean is only read; v_scale too with fixed_v_scale (else it grows per sequence).
  if (opts.scheme == Scheme::accurate)
    INTFA_TRY(api::check_exact_shape(cache.k_mean, "cache.k_mean", DType::f32, {K.B, K.H, K.D},
                                     "[batch, heads_kv, head_dim]", false, true));
  if (!opts.fixed_v_scale && K.B > 1 && cache.v_scale.ndim == 3 && cache.v_scale.stride[0] == 0)
    return invalid("cache.v_scale: a batch stride of 0 (one set of V scales for every sequence) needs "
                   "opts.fixed_v_scale = true; without it append_kv grows each sequence's scales");
  INTFA_TRY(api::check_exact_shape(cache.v_scale, "cache.v_scale", DType::f32, {K.B, K.H, K.D},
                                   "[batch, heads_kv, head_dim]", false, opts.fixed_v_scale));
  const Tensor& vt = cache.vt8;
  if (!vt.defined()) return invalid("cache.vt8: expected a tensor, got null data");
  if (vt.dtype != DType::i8) {
    os << "cache.vt8: expected dtype int8, got " << to_string(vt.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  // Per-sequence positions write only columns < cap (cache_pos), so vt8 needs the capacity.
  const int64_t vt_need = pos_b ? cap : pos + K.S;
  if (paged) {
    INTFA_TRY(check_vt_pages(vt, "cache.vt8", num_pages, K.H, K.D, page, p.gpu));
  } else if (vt.ndim != 4 || vt.stride[3] != 1 || vt.shape[0] != K.B || vt.shape[1] != K.H || vt.shape[2] != K.D ||
             vt.shape[3] < vt_need) {
    os << "cache.vt8: expected V transposed [batch, heads_kv, head_dim, >= " << (pos_b ? "cache tokens" : "pos + new tokens")
       << " = " << vt_need << "] with a contiguous last dim, got " << api::shape_str(vt);
    return invalid(os.str());
  }
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&cache.k8, "cache.k8"}, {&cache.k_scale, "cache.k_scale"},
                                {&cache.k_mean, "cache.k_mean"}, {&cache.vt8, "cache.vt8"}, {&cache.v_scale, "cache.v_scale"}})
    if (t->defined()) INTFA_TRY(api::check_same_device(*t, name, k_new, "k_new"));

  CacheQuantParams c;
  c.batch = static_cast<int>(K.B);
  c.heads = c.heads_kv = static_cast<int>(K.H);
  c.tokens = static_cast<int>(K.S);
  c.head_dim = static_cast<int>(K.D);
  c.pos = pos;
  c.pos_b = pos_b ? static_cast<const int32_t*>(pos_b->data) : nullptr;
  c.cap = cap;
  c.in_dtype = k_new.dtype;
  c.x = k_new.data;
  c.x_st = K.st;
  if (opts.scheme == Scheme::accurate) {
    c.mean = static_cast<const float*>(cache.k_mean.data);
    c.mean_st = {cache.k_mean.stride[0], cache.k_mean.stride[1], 0};
    c.subtract_mean = true;
  }
  c.x8 = static_cast<int8_t*>(cache.k8.data);
  c.x8_st = k8.st;
  c.scale = static_cast<float*>(cache.k_scale.data);
  c.s_st = paged ? Strides3{K.H * page, page, 1} : Strides3{K.H * cap, cap, 1};
  c.v = v_new.data;
  c.v_st = V.st;
  c.v_scale = static_cast<float*>(cache.v_scale.data);
  c.vs_st = {cache.v_scale.stride[0], cache.v_scale.stride[1], 0};
  c.fixed_v_scale = opts.fixed_v_scale;
  c.vt8 = static_cast<int8_t*>(vt.data);
  c.vt_st = {vt.stride[0], vt.stride[1], vt.stride[2]};
  c.vt_cols = vt.shape[3];
  c.v_per_tensor = opts.scheme == Scheme::paper;
  if (paged) {
    c.block_table = static_cast<const int32_t*>(cache.block_table.data);
    c.bt_stride = cache.block_table.stride[0];
    c.page_size = static_cast<int>(page);
    c.num_pages = num_pages;
    // The pages written (the new tokens within the capacity) and swept (the columns before them);
    // on the GPU the kernels guard the device table's entries (CacheQuantParams).
    if (!p.gpu)
      INTFA_TRY(check_pages(
          c.block_table, c.bt_stride, K.B, page, num_pages,
          [&](int64_t b) { return std::clamp<int64_t>(cache_pos0(c, static_cast<int>(b)) + K.S, 0, cap); },
          [&](int64_t b) { return std::clamp<int64_t>(cache_pos0(c, static_cast<int>(b)), 0, cap); }, true));
  }
  if (p.gpu) return cuda::quantize_cache(c, opts.stream);
  ref::quantize_cache(c);
  return Status::OK();
}

}  // namespace

Status append_kv(const Tensor& k_new, const Tensor& v_new, int64_t pos, const Options& opts,
                 const QuantizedQKV& cache) {
  return append_kv_impl(k_new, v_new, pos, nullptr, opts, cache);
}

Status append_kv(const Tensor& k_new, const Tensor& v_new, const Tensor& pos, const Options& opts,
                 const QuantizedQKV& cache) {
  return append_kv_impl(k_new, v_new, 0, &pos, opts, cache);
}

Status attention_reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                           const Tensor* lse, const Options& opts) {
  INTFA_TRY(api::check_options(opts));
  if (q.on_device || k.on_device || v.on_device || out.on_device)
    return invalid("attention_reference: expected host tensors (the float64 oracle runs on the CPU)");
  Problem p;
  const std::vector<DType> any = {DType::f16, DType::bf16, DType::f32, DType::f64};
  p.layout = opts.layout;
  // Empty batch and sequences as attention() takes them (attention_exact: rows without a key
  // give 0 and LSE -inf or the sink).
  INTFA_TRY(api::check_operand(q, "q", p.layout, Form::dense, any, false, &p.q, true));
  INTFA_TRY(api::check_operand(k, "k", p.layout, Form::dense, {q.dtype}, false, &p.k, true));
  INTFA_TRY(api::check_operand(v, "v", p.layout, Form::dense, {q.dtype}, false, &p.v, true));
  MessageStream os;
  if (p.k.B != p.q.B || p.v.B != p.q.B || p.k.D != p.q.D || p.v.D != p.q.D || p.v.S != p.k.S ||
      p.v.H != p.k.H || p.q.H % p.k.H != 0) {
    os << "k/v: shapes " << api::shape_str(k) << " / " << api::shape_str(v)
       << " do not match q " << api::shape_str(q) << " (same batch and head_dim, heads_kv dividing heads_q)";
    return invalid(os.str());
  }
  p.dtype = q.dtype;
  p.shape.batch = static_cast<int>(p.q.B);
  p.shape.heads_q = static_cast<int>(p.q.H);
  p.shape.heads_kv = static_cast<int>(p.k.H);
  p.shape.seqlen_q = static_cast<int>(p.q.S);
  p.shape.seqlen_kv = static_cast<int>(p.k.S);
  p.shape.head_dim = static_cast<int>(p.q.D);
  INTFA_TRY(validate_out(out, lse, p, true));
  INTFA_TRY(api::check_sinks(opts, p.shape.heads_q, q, "q"));
  const View o = api::view_of(out, p.layout, Form::dense);
  ref::ExactParams e;
  e.batch = p.shape.batch; e.heads_q = p.shape.heads_q; e.heads_kv = p.shape.heads_kv;
  e.seqlen_q = p.shape.seqlen_q; e.seqlen_kv = p.shape.seqlen_kv; e.head_dim = p.shape.head_dim;
  e.softmax_scale = opts.scale != 0.f ? opts.scale : 1.0f / std::sqrt(static_cast<float>(p.q.D));
  set_mask(opts, &e);
  e.in_dtype = q.dtype;
  e.q = q.data; e.q_st = p.q.st;
  e.k = k.data; e.k_st = p.k.st;
  e.v = v.data; e.v_st = p.v.st;
  e.out = out.data; e.o_st = o.st; e.out_dtype = out.dtype;
  e.sinks = static_cast<const float*>(opts.sinks.data);
  e.softcap = opts.softcap;
  if (lse && lse->defined()) {
    e.lse = lse->data;
    e.lse_dtype = lse->dtype;
    e.lse_st = rows_strides(p.shape, true);
  }
  ref::attention_exact(e);
  return Status::OK();
}

BuildInfo build_info() {
  BuildInfo b;
  b.version = INTFA_VERSION;
  b.cuda_built = cuda::built();
  b.cuda_archs = cuda::compiled_archs();
  b.gpu_block_n = cuda::kernel_block_n(128, GpuPath::automatic);
  return b;
}

int gpu_block_n(int head_dim) { return cuda::kernel_block_n(head_dim, GpuPath::automatic); }
int gpu_block_n(int head_dim, GpuPath path) { return cuda::kernel_block_n(head_dim, path); }

DeviceInfo device_info(int device_index) { return cuda::device_info(device_index); }

Status gpu_malloc(void** ptr, size_t bytes, int device_index) {
  return cuda::gpu_malloc(ptr, bytes, device_index);
}
Status gpu_free(void* ptr) { return cuda::gpu_free(ptr); }
Status gpu_copy_to_device(void* dst, const void* src, size_t bytes) {
  return cuda::gpu_copy(dst, src, bytes, true);
}
Status gpu_copy_to_host(void* dst, const void* src, size_t bytes) {
  return cuda::gpu_copy(dst, src, bytes, false);
}
Status gpu_memset(void* ptr, int byte, size_t bytes) { return cuda::gpu_memset(ptr, byte, bytes); }
Status gpu_synchronize() { return cuda::gpu_synchronize(); }
Status gpu_time_ms(Status (*run)(void*), void* ctx, int warmup, int reps, void* stream,
                   double* median_ms) {
  if (warmup < 0 || reps < 1) return invalid("reps: expected >= 1 (and warmup >= 0)");
  return cuda::gpu_time_ms(run, ctx, warmup, reps, stream, median_ms);
}
Status gpu_graph_time_ms(Status (*run)(void*, void*), void* ctx, int calls, int reps, double* median_ms) {
  if (calls < 1 || reps < 1) return invalid("calls, reps: expected >= 1");
  return cuda::gpu_graph_time_ms(run, ctx, calls, reps, median_ms);
}

Status resolve_gpu_path(GpuPath requested, int device_index, GpuPath* resolved) {
  return cuda::resolve_path(requested, device_index, resolved);
}

}  // namespace intfa
