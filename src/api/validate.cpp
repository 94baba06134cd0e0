// Argument validation for every entry point (see validate.h).
#include "api/validate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace intfa::api {

Status invalid(const std::string& msg) { return Status(StatusCode::invalid_argument, msg); }

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim && i < 4; ++i) os << (i ? ", " : "") << t.shape[i];
  if (t.ndim > 4) os << ", ...";
  os << "]";
  return os.str();
}

static std::string dtype_list(const std::vector<DType>& dts) {
  std::string s;
  for (size_t i = 0; i < dts.size(); ++i) {
    if (i) s += i + 1 == dts.size() ? " or " : ", ";
    s += to_string(dts[i]);
  }
  return s;
}

Status check_operand(const Tensor& t, const char* name, Layout layout, Form form,
                     const std::vector<DType>& dtypes, bool gpu, View* view, bool allow_empty) {
  const bool varlen = form == Form::varlen;
  const int rank = varlen ? 3 : 4;
  const char* dims = varlen ? "[total_tokens, heads, head_dim]"
                   : layout == Layout::BHSD ? "[batch, heads, seqlen, head_dim] (layout BHSD)"
                                            : "[batch, seqlen, heads, head_dim] (layout BSHD)";
  MessageStream os;
  if (t.ndim != rank) {
    if (!t.defined()) return invalid(std::string(name) + ": expected a tensor, got null data");
    os << name << ": expected " << rank << " dims " << dims << ", got " << t.ndim << " dims";
    return invalid(os.str());
  }
  const char* names4[2][4] = {{"batch", "heads", "seqlen", "head_dim"},
                              {"batch", "seqlen", "heads", "head_dim"}};
  const char* names3[3] = {"total_tokens", "heads", "head_dim"};
  const int head_dim = rank - 1, heads = varlen ? 1 : layout == Layout::BHSD ? 1 : 2;
  bool empty = false;
  for (int i = 0; i < rank; ++i) {
    // Heads and head_dim are always >= 1; batch and tokens may be 0 where allow_empty says.
    const bool may_be_0 = allow_empty && i != head_dim && i != heads;
    empty |= t.shape[i] == 0;
    if (t.shape[i] < (may_be_0 ? 0 : 1)) {
      os << name << ": dim " << i << " ("
         << (varlen ? names3[i] : names4[layout == Layout::BSHD][i]) << ") must be >= "
         << (may_be_0 ? 0 : 1) << ", got " << t.shape[i];
      return invalid(os.str());
    }
  }
  if (!t.defined() && !empty) return invalid(std::string(name) + ": expected a tensor, got null data");
  bool ok_dtype = false;
  for (DType d : dtypes) ok_dtype |= d == t.dtype;
  if (!ok_dtype) {
    os << name << ": expected dtype " << dtype_list(dtypes) << ", got " << to_string(t.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  // An empty tensor is never read or written: its strides (which exporters report in any form,
  // NumPy's as 0) and its pointer are not checked.
  if (t.stride[rank - 1] != 1 && !empty) {
    os << name << ": last dim (head_dim) must be contiguous (stride 1), got stride "
       << t.stride[rank - 1];
    return invalid(os.str());
  }
  for (int i = 0; i < rank - 1 && !empty; ++i) {
    if (t.stride[i] < 0) {
      os << name << ": stride of dim " << i << " must be >= 0, got " << t.stride[i];
      return invalid(os.str());
    }
  }
  const size_t es = dtype_size(t.dtype);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(t.data);
  // The GPU kernels move 16-byte vectors along every row.
  const size_t align = gpu ? 16 : es;
  if (addr % align != 0 && !empty) {
    os << name << ": data pointer must be " << align << "-byte aligned"
       << (gpu ? " for the GPU" : "") << ", got address 0x" << std::hex << addr << std::dec
       << " (offset " << addr % align << ")";
    return invalid(os.str());
  }
  if (gpu && !empty) {
    for (int i = 0; i < rank - 1; ++i) {
      // A size-1 dim is never stepped over, so its stride is irrelevant (DLPack exporters such
      // as torch report 1 there).
      if (t.shape[i] > 1 && (t.stride[i] * static_cast<int64_t>(es)) % 16 != 0) {
        os << name << ": stride of dim " << i << " must be a multiple of " << 16 / es
           << " elements (16 bytes) for the GPU, got " << t.stride[i];
        return invalid(os.str());
      }
    }
  }
  *view = view_of(t, layout, form);
  return Status::OK();
}

View view_of(const Tensor& t, Layout layout, Form form) {
  View v;
  if (form == Form::varlen) {
    v.B = 1; v.S = t.shape[0]; v.H = t.shape[1]; v.D = t.shape[2];
    v.st = {0, t.stride[1], t.stride[0]};
  } else if (layout == Layout::BHSD) {
    v.B = t.shape[0]; v.H = t.shape[1]; v.S = t.shape[2]; v.D = t.shape[3];
    v.st = {t.stride[0], t.stride[1], t.stride[2]};
  } else {
    v.B = t.shape[0]; v.S = t.shape[1]; v.H = t.shape[2]; v.D = t.shape[3];
    v.st = {t.stride[0], t.stride[2], t.stride[1]};
  }
  return v;
}

Status check_qk_shapes(const View& q, const View& k, const char* q_name, const char* k_name,
                       Form form) {
  MessageStream os;
  if (form == Form::dense && k.B != q.B) {
    os << k_name << ": batch expected " << q.B << " (as " << q_name << "), got " << k.B;
    return invalid(os.str());
  }
  if (k.D != q.D) {
    os << k_name << ": head_dim expected " << q.D << " (as " << q_name << "), got " << k.D;
    return invalid(os.str());
  }
  if (q.H % k.H != 0) {
    os << k_name << ": heads_kv = " << k.H << " must divide heads_q = " << q.H << " (GQA/MQA)";
    return invalid(os.str());
  }
  return Status::OK();
}

Status check_exact_shape(const Tensor& t, const char* name, DType dtype, const std::vector<int64_t>& shape,
                         const char* dims_desc, bool padded_rows, bool shared_first) {
  MessageStream os;
  bool empty = false;
  for (int64_t n : shape) empty |= n == 0;
  if (!t.defined() && !empty) return invalid(std::string(name) + ": expected a tensor, got null data");
  if (t.dtype != dtype) {
    os << name << ": expected dtype " << to_string(dtype) << ", got " << to_string(t.dtype);
    return Status(StatusCode::unsupported_type, os.str());
  }
  bool same = t.ndim == static_cast<int>(shape.size());
  for (size_t i = 0; same && i < shape.size(); ++i) same = t.shape[i] == shape[i];
  if (!same) {
    os << name << ": expected shape " << dims_desc << " = [";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << "], got " << shape_str(t);
    return invalid(os.str());
  }
  if (empty) return Status::OK();  // nothing to address: strides and pointer as check_operand
  // Side tensors are addressed densely: row-major, contiguous. With padded_rows the dims but the
  // last may step further (a cache's first tokens), never less, so no two entries share memory.
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] <= 1 || (shared_first && i == 0 && t.ndim > 1 && t.stride[0] == 0)) continue;
    const bool last = i == t.ndim - 1;
    if (padded_rows && !last ? t.stride[i] < expect : t.stride[i] != expect) {
      if (padded_rows && last)
        os << name << ": expected a contiguous last dim, got stride " << t.stride[i];
      else if (padded_rows)
        os << name << ": expected row-major strides with rows padded at most (stride of dim " << i
           << " >= " << expect << "), got " << t.stride[i];
      else
        os << name << ": expected a contiguous tensor, got stride " << t.stride[i] << " in dim " << i
           << " (expected " << expect << ")";
      return invalid(os.str());
    }
    expect = t.stride[i] * t.shape[i];
  }
  if (reinterpret_cast<uintptr_t>(t.data) % dtype_size(dtype) != 0) {
    os << name << ": data pointer must be " << dtype_size(dtype) << "-byte aligned";
    return invalid(os.str());
  }
  return Status::OK();
}

static std::string where(const Tensor& t) {
  return t.on_device ? "GPU memory of device " + std::to_string(t.device_index) : "host memory";
}

Status check_same_device(const Tensor& t, const char* name, const Tensor& ref,
                         const char* ref_name) {
  if (t.on_device != ref.on_device || (t.on_device && t.device_index != ref.device_index))
    return invalid(std::string(name) + ": expected " + where(ref) + " like " + ref_name +
                   ", got " + where(t));
  return Status::OK();
}

Status check_sinks(const Options& o, int64_t heads_q, const Tensor& ref, const char* ref_name) {
  if (!o.sinks.defined()) return Status::OK();
  if (Status st = check_exact_shape(o.sinks, "sinks", DType::f32, {heads_q}, "[heads_q]"); !st.ok()) return st;
  if (Status st = check_same_device(o.sinks, "sinks", ref, ref_name); !st.ok()) return st;
  if (o.sinks.on_device) return Status::OK();  // device values are the kernels' to read
  const float* z = static_cast<const float*>(o.sinks.data);
  for (int64_t h = 0; h < heads_q; ++h) {
    if (std::isnan(z[h]) || z[h] == std::numeric_limits<float>::infinity()) {
      MessageStream os;
      os << "sinks: expected finite logits or -inf (no sink), got " << z[h] << " for head " << h;
      return invalid(os.str());
    }
  }
  return Status::OK();
}

Status check_options(const Options& o) {
  MessageStream os;
  const int scheme = static_cast<int>(o.scheme);
  if (scheme < 0 || scheme > 2) {
    os << "scheme: unknown value " << scheme << " (expected paper, accurate or half)";
    return invalid(os.str());
  }
  const int layout = static_cast<int>(o.layout);
  if (layout < 0 || layout > 1) {
    os << "layout: unknown value " << layout << " (expected BHSD or BSHD)";
    return invalid(os.str());
  }
  const int backend = static_cast<int>(o.backend);
  if (backend < 0 || backend > 2) {
    os << "backend: unknown value " << backend << " (expected auto, cpu or gpu)";
    return invalid(os.str());
  }
  const int path = static_cast<int>(o.path);
  if (path < 0 || path > 3) {
    os << "path: unknown value " << path << " (expected auto, sm80, sm90 or decode)";
    return invalid(os.str());
  }
  if (!std::isfinite(o.scale) || o.scale < 0.f) {
    os << "scale: expected a finite value > 0 (0 means 1/sqrt(head_dim)), got " << o.scale;
    return invalid(os.str());
  }
  if (!std::isfinite(o.softcap) || o.softcap < 0.f) {
    os << "softcap: expected a finite value >= 0 (0: no soft-capping), got " << o.softcap;
    return invalid(os.str());
  }
  if (o.window_left < -1 || o.window_right < -1) {
    os << "window_left / window_right: expected -1 (no edge) or >= 0, got (" << o.window_left << ", "
       << o.window_right << ")";
    return invalid(os.str());
  }
  if (o.causal && o.window_right > 0) {
    os << "window_right: causal is window_right = 0, so with causal it must be -1 or 0, got "
       << o.window_right;
    return invalid(os.str());
  }
  if (o.block_n < 16 || o.block_n > 512 || o.block_n % 16 != 0) {
    os << "block_n: expected a multiple of 16 in [16, 512], got " << o.block_n;
    return invalid(os.str());
  }
  return Status::OK();
}

Status check_head_dim(int64_t d, bool gpu) {
  MessageStream os;
  if (gpu) {
    if (d != 64 && d != 128 && d != 256) {
      os << "head_dim: expected 64, 128 or 256 on the GPU, got " << d;
      return invalid(os.str());
    }
  } else if (d < 16 || d > 256 || d % 16 != 0) {
    os << "head_dim: expected a multiple of 16 in [16, 256] on the CPU backend, got " << d;
    return invalid(os.str());
  }
  return Status::OK();
}

Status check_cu_seqlens(const std::vector<int32_t>& cu, const char* name, int64_t total,
                        int max_seqlen, const char* max_name) {
  MessageStream os;
  if (cu.size() < 2) {
    os << name << ": expected at least 2 entries (nseq + 1), got " << cu.size();
    return invalid(os.str());
  }
  if (cu[0] != 0) {
    os << name << ": expected first value 0, got " << cu[0];
    return invalid(os.str());
  }
  int longest = 0;
  for (size_t i = 1; i < cu.size(); ++i) {
    if (cu[i] < cu[i - 1]) {
      os << name << ": expected non-decreasing values, got " << cu[i - 1] << " then " << cu[i]
         << " at index " << i;
      return invalid(os.str());
    }
    longest = std::max(longest, cu[i] - cu[i - 1]);
  }
  if (cu.back() != total) {
    os << name << ": expected last value " << total << " (the packed token count), got "
       << cu.back();
    return invalid(os.str());
  }
  if (longest > max_seqlen) {
    os << max_name << ": expected >= the longest sequence in " << name << " (" << longest
       << "), got " << max_seqlen;
    return invalid(os.str());
  }
  return Status::OK();
}

}  // namespace intfa::api
