// intfa._C: the nanobind extension over the public C++ API. The only file that sees Python.
// Arrays come in through DLPack (NumPy, torch, CuPy) and are viewed, never copied. Outputs,
// LSE and the GPU workspace are allocated by the Python layer with the caller's framework (for
// torch that keeps every allocation in torch's caching allocator, as CUDA-graph capture needs),
// so this layer only translates arrays to intfa::Tensor and back.
//
// No C++ exception crosses this file: every function returns (error, value), where error is
// None or (exception name, message) and the Python layer raises it. A C++ exception thrown out
// of the module crashed the process on one of the GPU hosts (Python 3.12, g++ 13), and a
// returned error keeps the C++ message unchanged just as well.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "intfa/intfa.h"

namespace nb = nanobind;

namespace {

using intfa::DType;
using intfa::Status;
using intfa::StatusCode;
using intfa::Tensor;

#define INTFA_PY_TRY(expr)            \
  do {                                \
    Status _st = (expr);              \
    if (!_st.ok()) return failed(_st); \
  } while (0)

Status value_error(const std::string& msg) { return Status(StatusCode::invalid_argument, msg); }
Status type_error(const std::string& msg) { return Status(StatusCode::unsupported_type, msg); }

// invalid_argument -> ValueError, unsupported_type -> TypeError, not_available and
// device_error -> RuntimeError, each with the C++ message unchanged.
const char* exception_name(StatusCode code) {
  switch (code) {
    case StatusCode::invalid_argument: return "ValueError";
    case StatusCode::unsupported_type: return "TypeError";
    default: return "RuntimeError";
  }
}

nb::object failed(const Status& st) {
  return nb::make_tuple(nb::make_tuple(exception_name(st.code()), st.message()), nb::none());
}
nb::object done(nb::object value = nb::none()) { return nb::make_tuple(nb::none(), value); }

std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<Code>(dt.code)) {
    case Code::Int: base = "int"; break;
    case Code::UInt: base = "uint"; break;
    case Code::Float: base = "float"; break;
    case Code::Bfloat: base = "bfloat"; break;
    case Code::Complex: base = "complex"; break;
    case Code::Bool: return "bool";
    default: base = "dlpack-code" + std::to_string(dt.code) + "-"; break;
  }
  std::string s = base + std::to_string(dt.bits);
  if (dt.lanes != 1) s += "x" + std::to_string(dt.lanes);
  return s;
}

// DLPack dtype -> intfa::DType. `bf16_view` marks a bfloat16 buffer that NumPy can only export
// as uint16 (ml_dtypes' bfloat16 is not a DLPack type of NumPy).
bool to_dtype(nb::dlpack::dtype dt, bool bf16_view, DType* out) {
  using Code = nb::dlpack::dtype_code;
  if (dt.lanes != 1) return false;
  const auto code = static_cast<Code>(dt.code);
  if (bf16_view) {
    if (code != Code::UInt || dt.bits != 16) return false;
    *out = DType::bf16;
    return true;
  }
  if (code == Code::Float && dt.bits == 16) return *out = DType::f16, true;
  if (code == Code::Float && dt.bits == 32) return *out = DType::f32, true;
  if (code == Code::Float && dt.bits == 64) return *out = DType::f64, true;
  if (code == Code::Bfloat && dt.bits == 16) return *out = DType::bf16, true;
  if (code == Code::Int && dt.bits == 8) return *out = DType::i8, true;
  if (code == Code::UInt && dt.bits == 8) return *out = DType::u8, true;
  if (code == Code::Int && dt.bits == 32) return *out = DType::i32, true;
  return false;
}

// DLPack device types (dlpack.h): kDLCPU, kDLCUDA, kDLCUDAHost (pinned, host-addressable).
constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3;

// The DLPack views of one call. They must outlive the C++ call: a view may own the exporter's
// reference to the memory (torch, CuPy).
struct Views {
  std::vector<nb::ndarray<nb::ro>> in;
  std::vector<nb::ndarray<>> out;
  void keep(nb::ndarray<nb::ro>&& a) { in.push_back(std::move(a)); }
  void keep(nb::ndarray<>&& a) { out.push_back(std::move(a)); }
};

// What every import does last: a size-1 dim is never stepped along, so its stride carries no
// meaning, and exporters differ (torch's DLPack export sets it to 1): give it the value a dense
// layout would have, so the GPU's 16-byte stride checks judge only strides that are used. Empty
// arrays may carry no pointer: validation then reports the zero-sized dim rather than a missing
// tensor. Rank > 4: rank kept, sizes zero, so validation names the rank (as make_tensor does).
void finish_import(Tensor* t) {
  if (t->ndim <= 4)
    for (int i = t->ndim - 2; i >= 0; --i)
      if (t->shape[i] == 1) t->stride[i] = t->stride[i + 1] * t->shape[i + 1];
  if (t->data == nullptr && t->ndim > 0) {
    alignas(256) static char empty_marker;
    t->data = &empty_marker;
  }
}

// torch.Tensor without DLPack. torch's __dlpack__ is Python code (with the view's capsule about
// 9 us per tensor on an H200 host, bench/py_overhead.py; an attention_int8 call passes 11),
// while data_ptr, shape, stride, dtype and device are C-level attributes. Only exact
// torch.Tensor objects on the CPU or a CUDA device whose dtype intfa takes come this way; for
// anything else (subclasses such as FakeTensor, meta tensors, other dtypes) this returns false
// and DLPack imports the object, or reports what is wrong with it, as before. The caller's
// references keep the memory alive for the call, as the DLPack views would.
bool import_torch(nb::handle obj, Tensor* t) {
  static PyObject* tensor_type = nullptr;  // torch.Tensor, once one was seen
  static std::pair<PyObject*, DType> dtypes[7] = {};
  PyTypeObject* tp = Py_TYPE(obj.ptr());
  if (tensor_type == nullptr) {
    if (std::strcmp(tp->tp_name, "Tensor") != 0) return false;
    nb::object mod = nb::getattr(nb::handle(reinterpret_cast<PyObject*>(tp)), "__module__", nb::none());
    if (!nb::isinstance<nb::str>(mod) || std::strcmp(nb::borrow<nb::str>(mod).c_str(), "torch") != 0)
      return false;
    PyObject* torch = PyImport_GetModule(nb::str("torch").ptr());  // loaded: a torch.Tensor exists
    if (torch == nullptr) {
      PyErr_Clear();
      return false;
    }
    const std::pair<const char*, DType> names[7] = {
        {"float16", DType::f16}, {"bfloat16", DType::bf16}, {"float32", DType::f32}, {"float64", DType::f64},
        {"int8", DType::i8},     {"uint8", DType::u8},      {"int32", DType::i32}};
    bool ok = true;
    for (int i = 0; i < 7 && ok; ++i) {
      PyObject* d = PyObject_GetAttrString(torch, names[i].first);  // new reference, kept
      ok = d != nullptr;
      dtypes[i] = {d, names[i].second};
    }
    Py_DECREF(torch);
    if (!ok) {
      PyErr_Clear();
      return false;
    }
    tensor_type = reinterpret_cast<PyObject*>(tp);
    Py_INCREF(tensor_type);
  }
  if (reinterpret_cast<PyObject*>(tp) != tensor_type) return false;
  // Attribute and method names made once (a C string would be turned into a str per lookup);
  // methods called without binding them first (PyObject_CallMethodNoArgs); torch.Size and
  // stride() are tuples, read in place.
  static PyObject* const names = [] {
    PyObject* t = PyTuple_New(6);
    const char* n[6] = {"dtype", "is_cuda", "is_cpu", "shape", "stride", "data_ptr"};
    for (int i = 0; i < 6; ++i) PyTuple_SET_ITEM(t, i, PyUnicode_InternFromString(n[i]));
    return t;  // kept for the process
  }();
  static PyObject* const get_device = PyUnicode_InternFromString("get_device");
  auto name = [](int i) { return PyTuple_GET_ITEM(names, i); };
  auto clear = [&] {
    PyErr_Clear();
    *t = Tensor();
    return false;
  };
  nb::object dt = nb::steal(PyObject_GetAttr(obj.ptr(), name(0)));
  if (!dt.is_valid()) return clear();
  bool known = false;
  for (const auto& [d, code] : dtypes)
    if (d == dt.ptr()) {
      t->dtype = code;
      known = true;
    }
  if (!known) return false;
  nb::object cuda_obj = nb::steal(PyObject_GetAttr(obj.ptr(), name(1)));
  if (!cuda_obj.is_valid()) return clear();
  const bool cuda = cuda_obj.ptr() == Py_True;
  if (!cuda) {
    nb::object cpu = nb::steal(PyObject_GetAttr(obj.ptr(), name(2)));
    if (!cpu.is_valid()) return clear();
    if (cpu.ptr() != Py_True) return false;
  }
  nb::object shape = nb::steal(PyObject_GetAttr(obj.ptr(), name(3)));
  nb::object stride = nb::steal(PyObject_CallMethodNoArgs(obj.ptr(), name(4)));
  nb::object ptr = nb::steal(PyObject_CallMethodNoArgs(obj.ptr(), name(5)));
  if (!shape.is_valid() || !stride.is_valid() || !ptr.is_valid() ||
      !PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr()))
    return clear();
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.ptr());
  if (PyTuple_GET_SIZE(stride.ptr()) != ndim) return clear();
  t->ndim = static_cast<int>(ndim);
  if (ndim <= 4)
    for (Py_ssize_t i = 0; i < ndim; ++i) {
      t->shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
      t->stride[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(stride.ptr(), i));
    }
  t->data = PyLong_AsVoidPtr(ptr.ptr());
  t->on_device = cuda;
  t->device_index = 0;
  if (cuda) {
    nb::object dev = nb::steal(PyObject_CallMethodNoArgs(obj.ptr(), get_device));
    t->device_index = dev.is_valid() ? static_cast<int>(PyLong_AsLong(dev.ptr())) : -1;
  }
  if (PyErr_Occurred()) return clear();  // a size, stride or pointer that was not an int
  finish_import(t);
  return true;
}

// None -> undefined Tensor; an array, or (array, "bfloat16") for a NumPy bf16 buffer viewed as
// uint16 -> a Tensor viewing the same memory. `Array` is nb::ndarray<> for arrays intfa writes.
template <class Array>
Status import_as(nb::handle obj, const char* name, Views& views, Tensor* out) {
  *out = Tensor();
  if (!obj.is_valid() || obj.is_none()) return Status::OK();
  if (import_torch(obj, out)) return Status::OK();
  nb::handle src = obj;
  bool bf16_view = false;
  if (nb::isinstance<nb::tuple>(obj)) {
    nb::tuple t = nb::borrow<nb::tuple>(obj);
    if (t.size() != 2 || !nb::isinstance<nb::str>(t[1]) ||
        std::string(nb::borrow<nb::str>(t[1]).c_str()) != "bfloat16")
      return type_error(std::string(name) + ": expected an array, got a tuple");
    src = t[0];
    bf16_view = true;
  }
  Array a;
  if (!nb::try_cast(src, a, /*convert=*/false)) {
    const char* why = std::is_same_v<Array, nb::ndarray<>> ? " (writable)" : "";
    return type_error(std::string(name) + ": expected an array" + why +
                      " that supports DLPack (numpy.ndarray, torch.Tensor, cupy.ndarray), got " +
                      Py_TYPE(src.ptr())->tp_name);
  }
  Tensor t;
  if (!to_dtype(a.dtype(), bf16_view, &t.dtype))
    return type_error(std::string(name) + ": dtype " + dlpack_dtype_name(a.dtype()) +
                      " is not one intfa takes (float16/bfloat16 inputs; int8, float32 or int32 "
                      "side tensors)");
  const int dev = a.device_type();
  if (dev == kDLCUDA) {
    t.on_device = true;
    t.device_index = a.device_id();
  } else if (dev != kDLCPU && dev != kDLCUDAHost) {
    return value_error(std::string(name) + ": DLPack device type " + std::to_string(dev) +
                       " is not supported (expected CPU or CUDA memory)");
  }
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  t.ndim = static_cast<int>(a.ndim());
  if (t.ndim <= 4)
    for (int i = 0; i < t.ndim; ++i) {
      t.shape[i] = static_cast<int64_t>(a.shape(i));
      t.stride[i] = a.stride(i);
    }
  finish_import(&t);
  views.keep(std::move(a));
  *out = t;
  return Status::OK();
}

Status input(nb::handle obj, const char* name, Views& v, Tensor* t) {
  return import_as<nb::ndarray<nb::ro>>(obj, name, v, t);
}
Status output(nb::handle obj, const char* name, Views& v, Tensor* t) {
  return import_as<nb::ndarray<>>(obj, name, v, t);
}

template <class T, class Parse>
Status parse_name(const std::string& s, const char* name, const char* expected, Parse parse,
                  T* out) {
  if (parse(s, out)) return Status::OK();
  return value_error(std::string(name) + ": expected " + expected + ", got '" + s + "'");
}
Status parse_scheme_arg(const std::string& s, const char* name, intfa::Scheme* out) {
  return parse_name(s, name, "'paper', 'accurate' or 'half'", intfa::parse_scheme, out);
}
Status parse_layout_arg(const std::string& s, intfa::Layout* out) {
  return parse_name(s, "layout", "'BHSD' or 'BSHD'", intfa::parse_layout, out);
}
Status parse_path_arg(const std::string& s, intfa::GpuPath* out) {
  return parse_name(s, "path", "'auto', 'sm80', 'sm90' or 'decode'", intfa::parse_path, out);
}

// The kernel family that ran this thread's last GPU attention call (Options::ran; automatic:
// none yet), for last_gpu_path(). Each entry point's Options point here; the C++ call runs on
// the calling thread (call() only releases the GIL).
thread_local intfa::GpuPath g_ran = intfa::GpuPath::automatic;

// Keyword arguments shared by the entry points (see Options in intfa.h). window_left /
// window_right are Python's window_size, passed on as they come (-1, -1 for the calls that do
// not attend): Options' validation reports values out of range with its own message. sinks
// (the attention calls only; None or absent: no sinks) is imported into `views` as it comes
// (the Python layer made it float32 [Hq] on q's device): the C++ layer checks its shape,
// dtype and memory space and reports them naming `sinks`.
Status make_options(bool causal, int window_left, int window_right, double scale,
                    const std::string& layout, const std::string& scheme,
                    const std::string& backend, const std::string& path, int block_n,
                    uintptr_t stream, intfa::Options* o, Views* views = nullptr,
                    nb::handle sinks = nb::handle()) {
  o->causal = causal;
  o->window_left = window_left;
  o->window_right = window_right;
  o->scale = static_cast<float>(scale);
  Status st = parse_layout_arg(layout, &o->layout);
  if (st.ok()) st = parse_scheme_arg(scheme, "scheme", &o->scheme);
  if (st.ok())
    st = parse_name(backend, "backend", "'auto', 'cpu' or 'gpu'", intfa::parse_backend,
                    &o->backend);
  if (st.ok()) st = parse_path_arg(path, &o->path);
  if (st.ok() && views) st = input(sinks, "sinks", *views, &o->sinks);
  o->block_n = block_n;
  o->stream = reinterpret_cast<void*>(stream);
  o->ran = &g_ran;
  return st;
}

// Runs a C++ entry point without the GIL (the CPU backend is multi-threaded and GPU calls may
// wait on the driver).
template <class F>
nb::object call(F&& f) {
  Status st;
  {
    nb::gil_scoped_release release;
    st = f();
  }
  return st.ok() ? done() : failed(st);
}

nb::object attention(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                     bool causal, int window_left, int window_right, nb::handle sinks,
                     double scale, const std::string& layout, const std::string& scheme,
                     const std::string& backend, const std::string& path, int block_n,
                     uintptr_t stream, nb::handle workspace, double softcap) {
  Views views;
  intfa::Options o;
  Tensor tq, tk, tv, to, tl;
  INTFA_PY_TRY(make_options(causal, window_left, window_right, scale, layout, scheme, backend,
                            path, block_n, stream, &o, &views, sinks));
  o.softcap = static_cast<float>(softcap);
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k, "k", views, &tk));
  INTFA_PY_TRY(input(v, "v", views, &tv));
  INTFA_PY_TRY(output(out, "out", views, &to));
  INTFA_PY_TRY(output(lse, "lse", views, &tl));
  INTFA_PY_TRY(output(workspace, "workspace", views, &o.workspace));
  return call([&] { return intfa::attention(tq, tk, tv, to, tl.defined() ? &tl : nullptr, o); });
}

nb::object attention_varlen(nb::handle q, nb::handle k, nb::handle v, nb::handle cu_q,
                            nb::handle cu_kv, int max_q, int max_kv, nb::handle out,
                            nb::handle lse, bool causal, int window_left, int window_right,
                            nb::handle sinks, double scale, const std::string& scheme,
                            const std::string& backend, const std::string& path, int block_n,
                            uintptr_t stream, nb::handle workspace, double softcap) {
  Views views;
  intfa::Options o;
  Tensor tq, tk, tv, tcq, tckv, to, tl;
  INTFA_PY_TRY(make_options(causal, window_left, window_right, scale, "BHSD", scheme, backend,
                            path, block_n, stream, &o, &views, sinks));
  o.softcap = static_cast<float>(softcap);
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k, "k", views, &tk));
  INTFA_PY_TRY(input(v, "v", views, &tv));
  INTFA_PY_TRY(input(cu_q, "cu_seqlens_q", views, &tcq));
  INTFA_PY_TRY(input(cu_kv, "cu_seqlens_kv", views, &tckv));
  INTFA_PY_TRY(output(out, "out", views, &to));
  INTFA_PY_TRY(output(lse, "lse", views, &tl));
  INTFA_PY_TRY(output(workspace, "workspace", views, &o.workspace));
  return call([&] {
    return intfa::attention_varlen(tq, tk, tv, tcq, tckv, max_q, max_kv, to,
                                   tl.defined() ? &tl : nullptr, o);
  });
}

// The QuantizedQKV parts travel as a dict {name: array or None}; missing keys are undefined.
Status quantized_from(nb::dict parts, const std::string& scheme, const std::string& layout,
                      bool writable, Views& views, intfa::QuantizedQKV* x) {
  Status st = parse_scheme_arg(scheme, "qkv.scheme", &x->scheme);
  if (st.ok()) st = parse_layout_arg(layout, &x->layout);
  struct Field { const char* name; Tensor* t; };
  const Field fields[] = {{"q8", &x->q8},           {"q_scale", &x->q_scale},
                          {"lse_offset", &x->lse_offset}, {"k8", &x->k8},
                          {"k_scale", &x->k_scale}, {"k_mean", &x->k_mean},
                          {"vt8", &x->vt8},         {"v_scale", &x->v_scale}};
  for (const Field& f : fields) {
    if (!st.ok()) return st;
    // PyDict_GetItemString: a borrowed reference or null, no exception either way.
    nb::handle h(PyDict_GetItemString(parts.ptr(), f.name));
    st = writable ? output(h, f.name, views, f.t) : input(h, f.name, views, f.t);
  }
  // v (half scheme) is an input of quantize() and of attention_int8(), seqused_kv (the keys each
  // sequence attends to) and block_table (a paged cache's pages) inputs of attention_int8():
  // none is written.
  for (const Field& f : {Field{"v", &x->v}, Field{"seqused_kv", &x->seqused_kv},
                         Field{"block_table", &x->block_table}})
    if (st.ok())
      st = input(nb::handle(PyDict_GetItemString(parts.ptr(), f.name)), f.name, views, f.t);
  return st;
}

nb::object quantize(nb::handle q, nb::handle k, nb::handle v, nb::handle cu_q, nb::handle cu_kv,
                    nb::dict parts, const std::string& layout, const std::string& scheme,
                    const std::string& backend, uintptr_t stream) {
  Views views;
  intfa::Options o;
  Tensor tq, tk, tv, tcq, tckv;
  intfa::QuantizedQKV x;
  INTFA_PY_TRY(
      make_options(false, -1, -1, 0.0, layout, scheme, backend, "auto", 64, stream, &o));
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k, "k", views, &tk));
  INTFA_PY_TRY(input(v, "v", views, &tv));
  INTFA_PY_TRY(input(cu_q, "cu_seqlens_q", views, &tcq));
  INTFA_PY_TRY(input(cu_kv, "cu_seqlens_kv", views, &tckv));
  INTFA_PY_TRY(quantized_from(parts, scheme, layout, true, views, &x));
  return call([&] { return intfa::quantize(tq, tk, tv, tcq, tckv, o, x); });
}

nb::object attention_int8(nb::dict parts, const std::string& scheme, const std::string& layout,
                          nb::handle cu_q, nb::handle cu_kv, int max_q, int max_kv,
                          nb::handle out, nb::handle lse, bool causal, int window_left,
                          int window_right, nb::handle sinks, double scale,
                          const std::string& backend, const std::string& path, int block_n,
                          uintptr_t stream, double softcap) {
  Views views;
  intfa::Options o;
  Tensor tcq, tckv, to, tl;
  intfa::QuantizedQKV x;
  INTFA_PY_TRY(make_options(causal, window_left, window_right, scale, layout, scheme, backend,
                            path, block_n, stream, &o, &views, sinks));
  o.softcap = static_cast<float>(softcap);
  INTFA_PY_TRY(quantized_from(parts, scheme, layout, false, views, &x));
  INTFA_PY_TRY(input(cu_q, "cu_seqlens_q", views, &tcq));
  INTFA_PY_TRY(input(cu_kv, "cu_seqlens_kv", views, &tckv));
  INTFA_PY_TRY(output(out, "out", views, &to));
  INTFA_PY_TRY(output(lse, "lse", views, &tl));
  return call([&] {
    return intfa::attention_int8(x, tcq, tckv, max_q, max_kv, to, tl.defined() ? &tl : nullptr,
                                 o);
  });
}

// INT8 KV cache. quantize_q fills parts q8, q_scale and (if given) lse_offset for a decode
// step's q against the cache's K mean; append_kv writes k_new/v_new into the cache's k8,
// k_scale and vt8 at token pos (an int; or an int32 [B] array, a position per sequence: the
// C++ overload for ragged batches), reading its k_mean, v_scale and, for a paged cache, its
// block_table (the other parts are ignored).
nb::object quantize_q(nb::handle q, nb::handle k_mean, nb::dict parts, double scale,
                      const std::string& layout, const std::string& scheme,
                      const std::string& backend, uintptr_t stream) {
  Views views;
  intfa::Options o;
  Tensor tq, tm;
  intfa::QuantizedQKV x;
  INTFA_PY_TRY(
      make_options(false, -1, -1, scale, layout, scheme, backend, "auto", 64, stream, &o));
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k_mean, "k_mean", views, &tm));
  INTFA_PY_TRY(quantized_from(parts, scheme, layout, true, views, &x));
  return call([&] { return intfa::quantize_q(tq, tm, o, x); });
}

nb::object append_kv(nb::handle k_new, nb::handle v_new, nb::handle pos, nb::dict cache,
                     const std::string& scheme, const std::string& cache_layout,
                     const std::string& layout, const std::string& backend, uintptr_t stream,
                     bool fixed_v_scale) {
  Views views;
  intfa::Options o;
  Tensor tk, tv;
  intfa::QuantizedQKV x;
  INTFA_PY_TRY(
      make_options(false, -1, -1, 0.0, layout, scheme, backend, "auto", 64, stream, &o));
  o.fixed_v_scale = fixed_v_scale;
  INTFA_PY_TRY(parse_scheme_arg(scheme, "cache.scheme", &x.scheme));
  INTFA_PY_TRY(parse_layout_arg(cache_layout, &x.layout));
  INTFA_PY_TRY(input(k_new, "k_new", views, &tk));
  INTFA_PY_TRY(input(v_new, "v_new", views, &tv));
  struct Field { const char* name; Tensor* t; bool written; };
  const Field fields[] = {{"k8", &x.k8, true},          {"k_scale", &x.k_scale, true},
                          {"k_mean", &x.k_mean, false}, {"vt8", &x.vt8, true},
                          {"v_scale", &x.v_scale, false},
                          {"block_table", &x.block_table, false}};
  for (const Field& f : fields) {
    nb::handle h(PyDict_GetItemString(cache.ptr(), f.name));
    const std::string name = std::string("cache.") + f.name;
    INTFA_PY_TRY(f.written ? output(h, name.c_str(), views, f.t)
                           : input(h, name.c_str(), views, f.t));
  }
  if (!PyLong_Check(pos.ptr())) {
    Tensor tp;
    INTFA_PY_TRY(input(pos, "pos", views, &tp));
    return call([&] { return intfa::append_kv(tk, tv, tp, o, x); });
  }
  const long long at = PyLong_AsLongLong(pos.ptr());
  if (at == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return failed(value_error("pos: expected a token position that fits in 64 bits"));
  }
  return call([&] { return intfa::append_kv(tk, tv, int64_t(at), o, x); });
}

// The first n entries of an imported tensor along dim d: what importing the slice (x[:, :n] or
// x[:, :, :n]) would give. The size is clamped to [0, size] as slicing clamps it, and the
// strides of size-1 dims are normalised again from the new shape as finish_import does (dims
// of size > 1 keep the strides they have in the full tensor and in the slice alike).
void narrow_front(Tensor* t, int d, int64_t n) {
  if (!t->defined() || t->ndim > 4 || d < 0 || d >= t->ndim) return;
  t->shape[d] = std::min(std::max<int64_t>(n, 0), t->shape[d]);
  for (int i = t->ndim - 2; i >= 0; --i)
    if (t->shape[i] == 1) t->stride[i] = t->stride[i + 1] * t->shape[i + 1];
}

// The q side of kv_attention: q8 (int8, dense like q), q_scale and lse_offset (float32
// [B, H, S] over q's rows; lse_offset only if with_offset) carved out of one byte buffer, each
// part 256-byte aligned, in the dense layouts the Python layer would allocate them in (q8 in q's
// layout). The Python side sizes the buffer with the same rule (_kv_scratch_bytes in
// python/intfa/__init__.py); one allocation instead of three.
constexpr int64_t kScratchAlign = 256;
int64_t scratch_align(int64_t n) { return (n + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

Status carve_q_parts(const Tensor& q, const Tensor& scratch, bool with_offset, intfa::Layout layout,
                     intfa::QuantizedQKV* x) {
  if (q.ndim != 4) return value_error("q: expected 4 dims");  // the Python layer checked q
  const bool bshd = layout == intfa::Layout::BSHD;
  const int64_t rows[3] = {q.shape[0], q.shape[bshd ? 2 : 1], q.shape[bshd ? 1 : 2]};
  const int64_t n_rows = rows[0] * rows[1] * rows[2];
  const int64_t q8_bytes = scratch_align(n_rows * q.shape[3]);
  const int64_t row_bytes = scratch_align(n_rows * 4);
  const int64_t need = q8_bytes + row_bytes * (with_offset ? 2 : 1);
  if (scratch.ndim != 1 || scratch.dtype != DType::u8 || scratch.stride[0] != 1 ||
      scratch.shape[0] < need)
    return value_error("scratch: expected a dense uint8 array of at least " +
                       std::to_string(need) + " bytes");
  char* base = static_cast<char*>(scratch.data);
  x->q8 = intfa::make_tensor(base, DType::i8, 4, q.shape, scratch.on_device, scratch.device_index);
  x->q_scale = intfa::make_tensor(base + q8_bytes, DType::f32, 3, rows, scratch.on_device,
                                  scratch.device_index);
  finish_import(&x->q8);
  finish_import(&x->q_scale);
  if (with_offset) {
    x->lse_offset = intfa::make_tensor(base + q8_bytes + row_bytes, DType::f32, 3, rows,
                                       scratch.on_device, scratch.device_index);
    finish_import(&x->lse_offset);
  }
  return Status::OK();
}

// One eager decode step of intfa.KVCache.attention: quantize_q (q against k_mean into q8,
// q_scale and lse_offset carved from `scratch`), then attention_int8 over the first `length`
// tokens of the cache (k8 and k_scale given whole, over all capacity tokens, and narrowed here
// as the views k8[:, :, :length] (BSHD: k8[:, :length]) and k_scale[..., :length] would be),
// with seqused_kv as qkv() gives it (a ragged cache's lengths, else None) and the attention's
// sinks (None: none). The same two C++ calls with the same tensors as the quantize_q and attention_int8 functions
// above make, in that order, with the same errors: quantize_q's come first, then whatever the
// attention side reports (its path, its arrays, its validation). One argument parse, one
// import of each array and one GIL release instead of two; one scratch array instead of three.
nb::object kv_attention(nb::handle q, nb::handle scratch, bool with_offset, nb::handle k8,
                        nb::handle k_scale, nb::handle k_mean, nb::handle vt8,
                        nb::handle v_scale, int64_t length, nb::handle seqused_kv,
                        nb::handle out, nb::handle lse, bool causal, int window_left,
                        int window_right, nb::handle sinks, double scale,
                        const std::string& layout, const std::string& scheme,
                        const std::string& path, uintptr_t stream, double softcap) {
  Views views;
  // quantize_q's side, as quantize_q() above takes it.
  intfa::Options oq;
  Tensor tq, tm, ts;
  intfa::QuantizedQKV xq;
  INTFA_PY_TRY(
      make_options(false, -1, -1, scale, layout, scheme, "auto", "auto", 64, stream, &oq));
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k_mean, "k_mean", views, &tm));
  INTFA_PY_TRY(parse_scheme_arg(scheme, "qkv.scheme", &xq.scheme));
  INTFA_PY_TRY(parse_layout_arg(layout, &xq.layout));
  INTFA_PY_TRY(output(scratch, "scratch", views, &ts));
  INTFA_PY_TRY(carve_q_parts(tq, ts, with_offset, xq.layout, &xq));
  // attention_int8's side, as attention_int8() above takes it; an error here is reported only
  // if quantize_q succeeds (that call would have come first).
  intfa::Options oa;
  intfa::QuantizedQKV x = xq;  // q8, q_scale, lse_offset as quantize_q writes them
  Tensor to, tl;
  Status pending = make_options(causal, window_left, window_right, scale, layout, scheme, "auto",
                                path, 64, stream, &oa, &views, sinks);
  oa.softcap = static_cast<float>(softcap);
  struct Field { nb::handle h; const char* name; Tensor* t; };
  const Field fields[] = {{k8, "k8", &x.k8},
                          {k_scale, "k_scale", &x.k_scale},
                          {k_mean, "k_mean", &x.k_mean},
                          {vt8, "vt8", &x.vt8},
                          {v_scale, "v_scale", &x.v_scale},
                          {seqused_kv, "seqused_kv", &x.seqused_kv}};
  for (const Field& f : fields)
    if (pending.ok()) pending = input(f.h, f.name, views, f.t);
  if (pending.ok()) {
    narrow_front(&x.k8, x.layout == intfa::Layout::BSHD ? 1 : 2, length);
    narrow_front(&x.k_scale, 2, length);
    pending = output(out, "out", views, &to);
  }
  if (pending.ok()) pending = output(lse, "lse", views, &tl);
  Status st;
  {
    nb::gil_scoped_release release;
    st = intfa::quantize_q(tq, tm, oq, xq);
    if (st.ok()) st = pending;
    if (st.ok())
      st = intfa::attention_int8(x, Tensor(), Tensor(), 0, 0, to, tl.defined() ? &tl : nullptr, oa);
  }
  return st.ok() ? done() : failed(st);
}

nb::object attention_reference(nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                               nb::handle lse, bool causal, int window_left, int window_right,
                               nb::handle sinks, double scale, const std::string& layout,
                               double softcap) {
  Views views;
  intfa::Options o;
  Tensor tq, tk, tv, to, tl;
  INTFA_PY_TRY(make_options(causal, window_left, window_right, scale, layout, "accurate", "cpu",
                            "auto", 64, 0, &o, &views, sinks));
  o.softcap = static_cast<float>(softcap);
  INTFA_PY_TRY(input(q, "q", views, &tq));
  INTFA_PY_TRY(input(k, "k", views, &tk));
  INTFA_PY_TRY(input(v, "v", views, &tv));
  INTFA_PY_TRY(output(out, "out", views, &to));
  INTFA_PY_TRY(output(lse, "lse", views, &tl));
  return call([&] {
    return intfa::attention_reference(tq, tk, tv, to, tl.defined() ? &tl : nullptr, o);
  });
}

intfa::ProblemShape problem_shape(int batch, int heads_q, int heads_kv, int seqlen_q,
                                  int seqlen_kv, int head_dim, bool varlen, int64_t total_q,
                                  int64_t total_kv) {
  intfa::ProblemShape s;
  s.batch = batch;
  s.heads_q = heads_q;
  s.heads_kv = heads_kv;
  s.seqlen_q = seqlen_q;
  s.seqlen_kv = seqlen_kv;
  s.head_dim = head_dim;
  s.varlen = varlen;
  s.total_q = total_q;
  s.total_kv = total_kv;
  return s;
}

nb::object quantized_bytes(int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                           int head_dim, const std::string& scheme, bool varlen, int64_t total_q,
                           int64_t total_kv) {
  intfa::Scheme sch;
  INTFA_PY_TRY(parse_scheme_arg(scheme, "scheme", &sch));
  const intfa::ProblemShape s = problem_shape(batch, heads_q, heads_kv, seqlen_q, seqlen_kv,
                                              head_dim, varlen, total_q, total_kv);
  return done(nb::int_(intfa::quantized_bytes(s, sch)));
}

// The parts of the QuantizedQKV that alloc_quantized() lays out for a problem, as
// {name: (shape, strides, dtype)}, so the Python layer allocates exactly what the C++ layer
// expects (vt8's rows are padded: its strides say how far) without restating the rules.
nb::object quantized_layout(int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                            int head_dim, const std::string& scheme, const std::string& layout,
                            bool varlen, int64_t total_q, int64_t total_kv) {
  intfa::Scheme sch;
  intfa::Layout lay;
  INTFA_PY_TRY(parse_scheme_arg(scheme, "scheme", &sch));
  INTFA_PY_TRY(parse_layout_arg(layout, &lay));
  const intfa::ProblemShape s = problem_shape(batch, heads_q, heads_kv, seqlen_q, seqlen_kv,
                                              head_dim, varlen, total_q, total_kv);
  const size_t bytes = intfa::quantized_bytes(s, sch);
  // alloc_quantized only computes addresses: lay the parts out from a fake aligned base.
  auto* base = reinterpret_cast<char*>(uintptr_t(1) << 20);
  intfa::QuantizedQKV x;
  INTFA_PY_TRY(intfa::alloc_quantized(s, sch, lay, base, bytes, false, 0, &x));
  const std::pair<const char*, const Tensor*> parts[] = {
      {"q8", &x.q8},     {"q_scale", &x.q_scale}, {"lse_offset", &x.lse_offset},
      {"k8", &x.k8},     {"k_scale", &x.k_scale}, {"k_mean", &x.k_mean},
      {"vt8", &x.vt8},   {"v_scale", &x.v_scale}};
  nb::dict d;
  for (const auto& [name, t] : parts) {
    if (!t->defined()) continue;
    nb::list shape, strides;
    for (int i = 0; i < t->ndim; ++i) {
      shape.append(nb::int_(t->shape[i]));
      strides.append(nb::int_(t->stride[i]));
    }
    d[name] = nb::make_tuple(nb::tuple(shape), nb::tuple(strides),
                             nb::str(intfa::to_string(t->dtype)));
  }
  return done(d);
}

nb::object build_info() {
  const intfa::BuildInfo b = intfa::build_info();
  nb::dict d;
  d["version"] = nb::str(b.version.c_str());
  d["cuda_built"] = nb::bool_(b.cuda_built);
  d["cuda_archs"] = nb::str(b.cuda_archs.c_str());
  return done(d);
}

nb::object device_info(int device_index) {
  intfa::DeviceInfo info;
  {
    nb::gil_scoped_release release;
    info = intfa::device_info(device_index);
  }
  nb::dict d;
  d["present"] = nb::bool_(info.present);
  d["name"] = nb::str(info.name.c_str());
  d["major"] = nb::int_(info.major);
  d["minor"] = nb::int_(info.minor);
  d["sm_count"] = nb::int_(info.sm_count);
  d["memory_bytes"] = nb::int_(info.memory_bytes);
  d["error"] = nb::str(info.error.c_str());
  return done(d);
}

nb::object resolve_gpu_path(const std::string& path, int device_index) {
  intfa::GpuPath requested, resolved = intfa::GpuPath::automatic;
  INTFA_PY_TRY(parse_path_arg(path, &requested));
  Status st;
  {
    nb::gil_scoped_release release;
    st = intfa::resolve_gpu_path(requested, device_index, &resolved);
  }
  if (!st.ok()) return failed(st);
  return done(nb::str(intfa::to_string(resolved)));
}

nb::object last_gpu_path() {
  return done(g_ran == intfa::GpuPath::automatic ? nb::none() : nb::object(nb::str(intfa::to_string(g_ran))));
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "intfa C++ bindings (internal; use the intfa package). Each function returns "
            "(error, value): error is None or (exception name, message).";
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
        nb::arg("lse").none(), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("sinks").none(), nb::arg("scale"), nb::arg("layout"),
        nb::arg("scheme"), nb::arg("backend"), nb::arg("path"), nb::arg("block_n"),
        nb::arg("stream"), nb::arg("workspace").none(), nb::arg("softcap") = 0.0);
  m.def("attention_varlen", &attention_varlen, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("cu_seqlens_q"), nb::arg("cu_seqlens_kv"), nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_kv"), nb::arg("out"), nb::arg("lse").none(), nb::arg("causal"),
        nb::arg("window_left"), nb::arg("window_right"), nb::arg("sinks").none(),
        nb::arg("scale"), nb::arg("scheme"), nb::arg("backend"), nb::arg("path"),
        nb::arg("block_n"), nb::arg("stream"), nb::arg("workspace").none(),
        nb::arg("softcap") = 0.0);
  m.def("quantize", &quantize, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_kv").none(), nb::arg("parts"),
        nb::arg("layout"), nb::arg("scheme"), nb::arg("backend"), nb::arg("stream"));
  m.def("attention_int8", &attention_int8, nb::arg("parts"), nb::arg("scheme"),
        nb::arg("layout"), nb::arg("cu_seqlens_q").none(), nb::arg("cu_seqlens_kv").none(),
        nb::arg("max_seqlen_q"), nb::arg("max_seqlen_kv"), nb::arg("out"),
        nb::arg("lse").none(), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("sinks").none(), nb::arg("scale"), nb::arg("backend"),
        nb::arg("path"), nb::arg("block_n"), nb::arg("stream"), nb::arg("softcap") = 0.0);
  m.def("quantize_q", &quantize_q, nb::arg("q"), nb::arg("k_mean").none(), nb::arg("parts"),
        nb::arg("scale"), nb::arg("layout"), nb::arg("scheme"), nb::arg("backend"),
        nb::arg("stream"));
  m.def("append_kv", &append_kv, nb::arg("k_new"), nb::arg("v_new"), nb::arg("pos"),
        nb::arg("cache"), nb::arg("scheme"), nb::arg("cache_layout"), nb::arg("layout"),
        nb::arg("backend"), nb::arg("stream"), nb::arg("fixed_v_scale") = false);
  m.def("kv_attention", &kv_attention, nb::arg("q"), nb::arg("scratch"),
        nb::arg("with_lse_offset"), nb::arg("k8"), nb::arg("k_scale"), nb::arg("k_mean").none(),
        nb::arg("vt8").none(), nb::arg("v_scale").none(), nb::arg("length"),
        nb::arg("seqused_kv").none(), nb::arg("out"), nb::arg("lse").none(), nb::arg("causal"),
        nb::arg("window_left"), nb::arg("window_right"), nb::arg("sinks").none(),
        nb::arg("scale"), nb::arg("layout"), nb::arg("scheme"), nb::arg("path"),
        nb::arg("stream"), nb::arg("softcap") = 0.0);
  m.def("attention_reference", &attention_reference, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse").none(), nb::arg("causal"), nb::arg("window_left"),
        nb::arg("window_right"), nb::arg("sinks").none(), nb::arg("scale"), nb::arg("layout"),
        nb::arg("softcap") = 0.0);
  m.def("quantized_bytes", &quantized_bytes, nb::arg("batch"), nb::arg("heads_q"),
        nb::arg("heads_kv"), nb::arg("seqlen_q"), nb::arg("seqlen_kv"), nb::arg("head_dim"),
        nb::arg("scheme"), nb::arg("varlen"), nb::arg("total_q"), nb::arg("total_kv"));
  m.def("quantized_layout", &quantized_layout, nb::arg("batch"), nb::arg("heads_q"),
        nb::arg("heads_kv"), nb::arg("seqlen_q"), nb::arg("seqlen_kv"), nb::arg("head_dim"),
        nb::arg("scheme"), nb::arg("layout"), nb::arg("varlen"), nb::arg("total_q"),
        nb::arg("total_kv"));
  m.def("build_info", &build_info);
  m.def("device_info", &device_info, nb::arg("device_index") = 0);
  m.def("resolve_gpu_path", &resolve_gpu_path, nb::arg("path"), nb::arg("device_index"));
  m.def("last_gpu_path", &last_gpu_path);
}
