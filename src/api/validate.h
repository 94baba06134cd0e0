// Argument checks shared by the entry points. Each returns the first problem as a Status whose
// message names the argument, what was expected and what came.
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common/params.h"
#include "intfa/intfa.h"

namespace intfa::api {

Status invalid(const std::string& msg);
std::string shape_str(const Tensor& t);

// The stream the checks build their error messages in, an std::ostringstream made on first
// use: the checks declare one up front, and constructing a stream (locale, facets: ~0.34 us
// here) on the path without an error was the largest host cost of validation (perf: a decode-
// shaped attention_int8 call's checks up to its last one 4.9 -> 3.6 us).
class MessageStream {
 public:
  template <typename T>
  MessageStream& operator<<(const T& v) {
    stream() << v;
    return *this;
  }
  MessageStream& operator<<(std::ios_base& (*manip)(std::ios_base&)) {
    stream() << manip;
    return *this;
  }
  std::string str() const { return s_ ? s_->str() : std::string(); }

 private:
  std::ostringstream& stream() {
    if (!s_) s_.emplace();
    return *s_;
  }
  std::optional<std::ostringstream> s_;
};

// A [batch, head, token, dim] view of an attention operand in either layout (or THD varlen).
struct View {
  int64_t B = 0, H = 0, S = 0, D = 0;
  Strides3 st;
};

enum class Form { dense, varlen };

// The [batch, head, token, dim] view of a tensor whose rank and layout are already checked.
View view_of(const Tensor& t, Layout layout, Form form);

// q/k consistency shared by the fp and int8 entry points: batch (dense), head_dim, and heads_kv
// dividing heads_q. Names are the arguments as the caller calls them ("q"/"k", "q8"/"k8").
Status check_qk_shapes(const View& q, const View& k, const char* q_name, const char* k_name,
                       Form form);

// Checks a q/k/v/out style operand: defined, rank, positive sizes, dtype among `dtypes`,
// contiguous last dim, element-aligned pointer (16-byte aligned rows for the GPU). With
// allow_empty (attention / attention_varlen, as torch SDPA and FlashAttention take them) the
// batch and token dims may be 0, and then the data pointer may be null and is not checked.
Status check_operand(const Tensor& t, const char* name, Layout layout, Form form,
                     const std::vector<DType>& dtypes, bool gpu, View* view, bool allow_empty = false);
// A per-row/per-channel side tensor (scales, lse): rank = shape.size(), exact shape, dtype,
// row-major contiguous; with padded_rows (k_scale of a KV cache's first tokens) the dims but the
// last may have larger strides; with shared_first (statistics that are only read: k_mean and
// v_scale of attention_int8, quantize_q, append_kv with fixed_v_scale) the first dim may also
// have stride 0, one set of entries for every sequence. An expected shape with a 0 takes a null
// pointer (an empty tensor has nothing to read or write).
Status check_exact_shape(const Tensor& t, const char* name, DType dtype, const std::vector<int64_t>& shape,
                         const char* dims_desc, bool padded_rows = false, bool shared_first = false);
Status check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);
Status check_options(const Options& o);
// Options::sinks, when defined: f32 [heads_q] in the memory space of `ref` (named ref_name); on
// the host, values finite or -inf.
Status check_sinks(const Options& o, int64_t heads_q, const Tensor& ref, const char* ref_name);
// head_dim supported by the backend chosen (cpu: multiple of 16 in [16, 256]; GPU: 64, 128).
Status check_head_dim(int64_t d, bool gpu);
// cu_seqlens (int32 [nseq+1], host copy): first 0, non-decreasing, last == total; returns the
// longest sequence.
Status check_cu_seqlens(const std::vector<int32_t>& cu, const char* name, int64_t total,
                        int max_seqlen, const char* max_name);

}  // namespace intfa::api
