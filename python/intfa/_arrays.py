"""The array frameworks intfa speaks (NumPy, torch, CuPy) and the calls into intfa._C.

Every entry point runs the same way whatever the framework: allocate the outputs (and, on the
GPU, the workspace) with the caller's framework, then hand DLPack views of everything to the C++
layer, which validates and raises ValueError / TypeError / RuntimeError with its own message.
Allocating here rather than in C++ keeps torch's memory inside torch's caching allocator, which
CUDA-graph capture needs, and keeps every call free of host synchronisation.
"""

import contextlib
import numbers

import numpy as np

from . import _C as _ext

_EXCEPTIONS = {"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError}


class _Raising:
    """intfa._C with its (error, value) results turned into exceptions: the binding returns
    errors instead of throwing them (see python/src/intfa_ext.cpp)."""

    def __getattr__(self, name):
        fn = getattr(_ext, name)

        def call(*args):
            error, value = fn(*args)
            if error is not None:
                raise _EXCEPTIONS.get(error[0], RuntimeError)(error[1])
            return value

        call.__name__ = name
        setattr(self, name, call)
        return call


lib = _Raising()

# The 16-bit float types intfa computes in; anything else is reported by the C++ layer.
FLOAT_INPUTS = ("float16", "bfloat16")
# Parts of a QuantizedQKV as intfa.h names them, in the order the torch op returns them.
PART_NAMES = ("q8", "q_scale", "lse_offset", "k8", "k_scale", "k_mean", "vt8", "v_scale")
LAYOUTS = ("BHSD", "BSHD")


def dims(shape, layout, varlen):
    """(batch, heads, tokens, head_dim) of a q/k/v shape, or None when the rank or layout is
    wrong (the C++ layer then reports exactly what is wrong)."""
    shape = tuple(shape)
    if varlen:
        return (1, shape[1], shape[0], shape[2]) if len(shape) == 3 else None
    if len(shape) != 4 or layout not in LAYOUTS:
        return None
    if layout == "BSHD":
        return (shape[0], shape[2], shape[1], shape[3])
    return tuple(shape)


def rows_shape(q_shape, layout, varlen):
    """Shape of the per-row tensors (LSE, q_scale): [B, H, S], or [H, T] for varlen."""
    d = dims(q_shape, layout, varlen)
    if d is None:
        return None
    return (d[1], d[2]) if varlen else (d[0], d[1], d[2])


def check_gqa(q_shape, k_shape, layout, varlen, enable_gqa):
    """torch SDPA needs enable_gqa=True for Hq != Hkv; intfa keeps that contract so it can stand
    in for SDPA without silently accepting what SDPA rejects."""
    dq, dk = dims(q_shape, layout, varlen), dims(k_shape, layout, varlen)
    if enable_gqa or dq is None or dk is None or dq[1] == dk[1]:
        return
    raise ValueError(
        f"k: heads_kv = {dk[1]} differs from heads_q = {dq[1]}; pass enable_gqa=True for "
        "grouped-query attention (as torch SDPA requires)")


def scale_arg(scale):
    """None -> 0.0, which the C++ layer reads as 1/sqrt(head_dim)."""
    if scale is None:
        return 0.0
    scale = float(scale)
    if scale == 0.0:
        raise ValueError("scale: expected a non-zero value or None (1/sqrt(head_dim)), got 0.0")
    return scale


def softcap_arg(softcap):
    """None -> 0.0 (no soft-capping); a number as a float (the C++ layer checks its range and
    names softcap)."""
    if softcap is None:
        return 0.0
    try:
        return float(softcap)
    except (TypeError, ValueError) as e:
        raise TypeError(f"softcap: expected a number or None, got {softcap!r}") from e


# window_size=(-1, -1): no window (FlashAttention's default). The entry points take this object
# as their default, which window_arg() passes on without looking inside.
NO_WINDOW = (-1, -1)
_INT32 = (-2 ** 31, 2 ** 31 - 1)


def window_arg(window_size):
    """FlashAttention's window_size=(left, right) as a pair of Python ints for the C++ layer.
    Their range (-1 or >= 0; right -1 or 0 with causal) is the C++ layer's to check; what it
    cannot see is refused here: not a pair of ints (TypeError; ValueError for another count),
    or an int that does not fit its 32-bit fields (ValueError)."""
    if window_size is NO_WINDOW:
        return NO_WINDOW
    if not isinstance(window_size, (tuple, list)):
        raise TypeError(f"window_size: expected a pair of ints (left, right), -1 leaving a side "
                        f"open, got {type(window_size).__name__} {window_size!r}")
    if len(window_size) != 2:
        raise ValueError(f"window_size: expected 2 ints (left, right), got {len(window_size)}: "
                         f"{tuple(window_size)!r}")
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in window_size):
        raise TypeError(f"window_size: expected ints (left, right), got "
                        f"{tuple(window_size)!r}")
    left, right = (int(n) for n in window_size)
    if not all(_INT32[0] <= n <= _INT32[1] for n in (left, right)):
        raise ValueError(f"window_size: expected 32-bit ints (left, right), got ({left}, {right})")
    return left, right


# Float dtypes a sinks array may come in (converted to float32 on q's device).
_SINK_DTYPES = ("float16", "bfloat16", "float32", "float64")


def sinks_arg(fw, sinks, like):
    """Attention sinks (Options::sinks: one logit per query head, [Hq]) as fw's contiguous
    float32 array on the device of `like` (q, or q8), a copy when they are not one already;
    None stays None (no sinks). They may be a float array of any framework (float16, bfloat16,
    float32, float64) or a list / tuple of numbers; anything else is a TypeError naming sinks.
    The shape is the C++ layer's to check (its ValueError names sinks)."""
    if sinks is None:
        return None
    if isinstance(sinks, (list, tuple)):
        try:
            sinks = np.asarray(sinks, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"sinks: expected numbers (one logit per query head), got "
                            f"{sinks!r}") from e
    elif type(sinks).__module__.split(".")[0] not in ("numpy", "torch", "cupy") or \
            not hasattr(sinks, "dtype"):
        raise TypeError(f"sinks: expected a float array of one logit per query head [Hq] "
                        f"(numpy.ndarray, torch.Tensor, cupy.ndarray) or a list of numbers, got "
                        f"{type(sinks).__module__}.{type(sinks).__qualname__}")
    elif not fw.is_float(sinks):
        raise TypeError(f"sinks: expected a float array (float16, bfloat16, float32 or "
                        f"float64), got {sinks.dtype}")
    return fw.float32_like(sinks, like)


def host_float32(x):
    """A float array of any framework as a float32 NumPy array (copied off the device)."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        x = x.detach().float().cpu().numpy()
    elif mod == "cupy":
        x = x.get()
    return np.asarray(x, dtype=np.float32, order="C")  # no copy when it is one already


def workspace_bytes(q_shape, k_shape, layout, scheme, varlen, nseq):
    """Bytes of GPU scratch the fp16/bf16 entry points quantize into, or None when the shapes
    are malformed (validation fails before any workspace is touched)."""
    dq, dk = dims(q_shape, layout, varlen), dims(k_shape, layout, varlen)
    if dq is None or dk is None or min(dq + dk) < 1 or (varlen and nseq < 1):
        return None
    batch = nseq if varlen else dq[0]
    return lib.quantized_bytes(batch, dq[1], dk[1], 0 if varlen else dq[2],
                               0 if varlen else dk[2], dq[3], scheme, varlen,
                               dq[2] if varlen else 0, dk[2] if varlen else 0)


def quantized_spec(q_shape, k_shape, layout, scheme, nseq):
    """{part: (storage_shape, dtype, columns)} of the QuantizedQKV that quantize() writes, as
    the C++ alloc_quantized() lays it out; `nseq` is None for dense inputs. A part whose rows are
    padded (vt8) is allocated as its storage and seen through its first `columns` columns
    (columns is None for the dense parts). None when the shapes are malformed (the C++ layer
    then reports them)."""
    varlen = nseq is not None
    dq, dk = dims(q_shape, layout, varlen), dims(k_shape, layout, varlen)
    if dq is None or dk is None or min(dq + dk) < 1 or (varlen and nseq < 1):
        return None
    # int(): under torch.compile's fake tensors sizes may be symbolic; this specialises them.
    b, hq, sq, d = (int(x) for x in dq)
    hk, skv = int(dk[1]), int(dk[2])
    parts = lib.quantized_layout(nseq if varlen else b, hq, hk, 0 if varlen else sq,
                                 0 if varlen else skv, d, scheme, layout, varlen,
                                 sq if varlen else 0, skv if varlen else 0)
    spec = {}
    for name, (shape, strides, dtype) in parts.items():
        storage = tuple(shape)
        columns = None
        if len(shape) > 1 and strides[-2] != shape[-1]:
            storage = tuple(shape[:-1]) + (strides[-2],)
            columns = shape[-1]
        spec[name] = (storage, dtype, columns)
    return spec


_NUMPY_DTYPE_NAMES = {}  # np.dtype -> its name, which NumPy computes in Python (~4 us)


def dtype_name(dtype):
    """A dtype of any framework (or its name) as intfa spells it: 'float16', 'bfloat16', ..."""
    if isinstance(dtype, str):
        return dtype
    if isinstance(dtype, np.dtype):
        name = _NUMPY_DTYPE_NAMES.get(dtype)
        if name is None:
            name = _NUMPY_DTYPE_NAMES[dtype] = dtype.name
        return name
    name = str(dtype)
    if name.startswith("torch."):
        return name[len("torch."):]
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------------------------
# Framework adapters: how to allocate, which stream, how to hand an array to DLPack.
# ------------------------------------------------------------------------------------------------
_NO_CONTEXT = contextlib.nullcontext()  # stateless: one serves every call


class NumpyArrays:
    """Host arrays: the CPU backend. bfloat16 comes from ml_dtypes."""

    name = "numpy"

    @staticmethod
    def np_dtype(name):
        if name == "bfloat16":
            try:
                import ml_dtypes
            except ImportError as e:
                raise TypeError("bfloat16 NumPy arrays need the ml_dtypes package "
                                "(pip install ml_dtypes)") from e
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)

    def dtype_of(self, x):
        return x.dtype.name

    def is_gpu(self, x):
        return False

    def empty(self, shape, dtype, like):
        return np.empty(shape, dtype=self.np_dtype(dtype))

    def array(self, values, dtype, like):
        return np.array(values, dtype=self.np_dtype(dtype))

    def broadcast(self, x, shape):
        return np.broadcast_to(x, shape)

    def out_like(self, q):
        dt = q.dtype.name if q.dtype.name in FLOAT_INPUTS else "float16"
        return np.empty(q.shape, dtype=self.np_dtype(dt))

    def arg(self, x):
        if x is None:
            return None
        # NumPy cannot export ml_dtypes' bfloat16 through DLPack: pass the bits as uint16 and
        # tell the binding what they are. NumPy's own types (isbuiltin 1) have other names, and
        # dtype.name costs ~4 us (NumPy computes it in Python).
        dt = x.dtype
        if dt.isbuiltin != 1 and dt.name == "bfloat16":
            return (x.view(np.uint16), "bfloat16")
        return x

    def stream(self, x):
        return 0

    def device(self, x):
        return _NO_CONTEXT

    def max_seqlen(self, cu):
        return int(np.max(np.diff(np.asarray(cu, dtype=np.int64)))) if len(cu) > 1 else 0

    def is_float(self, x):
        return dtype_name(x.dtype) in _SINK_DTYPES

    def float32_like(self, x, like):
        return host_float32(x)


class CupyArrays:
    """CuPy device arrays: the GPU backend on CuPy's current stream."""

    name = "cupy"

    def __init__(self):
        import cupy
        self.cp = cupy

    def dtype_of(self, x):
        return x.dtype.name

    def is_gpu(self, x):
        return True

    def empty(self, shape, dtype, like):
        with self.cp.cuda.Device(like.device.id):
            return self.cp.empty(shape, dtype=dtype)

    def array(self, values, dtype, like):
        with self.cp.cuda.Device(like.device.id):
            return self.cp.array(values, dtype=dtype)

    def broadcast(self, x, shape):
        return self.cp.broadcast_to(x, shape)

    def out_like(self, q):
        dt = q.dtype.name if q.dtype.name in FLOAT_INPUTS else "float16"
        return self.empty(q.shape, dt, q)

    def arg(self, x):
        return x

    def stream(self, x):
        return self.cp.cuda.get_current_stream().ptr

    def device(self, x):
        return self.cp.cuda.Device(x.device.id)

    def max_seqlen(self, cu):
        return int(self.cp.max(self.cp.diff(cu.astype(self.cp.int64)))) if len(cu) > 1 else 0

    def is_float(self, x):
        return dtype_name(x.dtype) in _SINK_DTYPES

    def float32_like(self, x, like):
        src = x if isinstance(x, self.cp.ndarray) else host_float32(x)
        with self.cp.cuda.Device(like.device.id):  # cupy.array copies onto this device
            return self.cp.array(src, dtype=self.cp.float32, order="C")


class TorchArrays:
    """torch tensors, CPU (reference backend) or CUDA (GPU backend on the current stream)."""

    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch
        # The raw cudaStream_t of a device's current stream without building a torch.cuda.Stream
        # (what torch.cuda.current_stream(d).cuda_stream reads; Inductor's generated code calls
        # it too); None on a torch without it.
        self._raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._get_device = getattr(torch._C, "_cuda_getDevice", None)

    def dtype_of(self, x):
        return dtype_name(x.dtype)

    def is_gpu(self, x):
        return x.is_cuda

    def empty(self, shape, dtype, like):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=like.device)

    def array(self, values, dtype, like):
        return self.torch.tensor(values, dtype=getattr(self.torch, dtype), device=like.device)

    def broadcast(self, x, shape):
        return x.expand(*shape)

    def out_like(self, q):
        # empty_like keeps q's strides when q is dense (e.g. a BSHD tensor seen as BHSD), so the
        # output reads like the input; the fake implementation calls this same function.
        if dtype_name(q.dtype) in FLOAT_INPUTS:
            return self.torch.empty_like(q)
        return self.torch.empty(q.shape, dtype=self.torch.float16, device=q.device)

    def arg(self, x):
        # The binding reads a plain torch.Tensor's pointer, shape and strides itself (no DLPack,
        # which is slow and refuses tensors that require grad); others go through DLPack, after
        # detach() for that reason. intfa only reads or fills the memory.
        if x is None or type(x) is self.torch.Tensor:
            return x
        return x.detach()

    def stream(self, x):
        if not x.is_cuda:
            return 0
        if self._raw_stream is not None:  # CUDA is initialised: x lives there
            return self._raw_stream(x.get_device())
        return self.torch.cuda.current_stream(x.device).cuda_stream

    def device(self, x):
        if x.is_cuda:
            current = (self._get_device() if self._get_device is not None
                       else self.torch.cuda.current_device())
            if x.get_device() != current:
                return self.torch.cuda.device(x.device)
        return _NO_CONTEXT

    def max_seqlen(self, cu):
        return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0

    def is_float(self, x):
        # is_floating_point(), not the dtype's name: torch.compile traces this.
        if isinstance(x, self.torch.Tensor):
            return x.is_floating_point()
        return dtype_name(x.dtype) in _SINK_DTYPES

    def float32_like(self, x, like):
        # A tensor keeps its autograd state (as q's does); torch.compile traces the copy.
        if not isinstance(x, self.torch.Tensor):
            x = self.torch.from_numpy(host_float32(x))
        return x.to(device=like.device, dtype=self.torch.float32).contiguous()


_ADAPTERS = {}


def framework(x, name):
    """The adapter for x's framework; TypeError for anything else."""
    mod = type(x).__module__.split(".")[0]
    if mod not in ("numpy", "torch", "cupy"):
        raise TypeError(f"{name}: expected a numpy.ndarray, torch.Tensor or cupy.ndarray, got "
                        f"{type(x).__module__}.{type(x).__qualname__}")
    if mod not in _ADAPTERS:
        _ADAPTERS[mod] = {"numpy": NumpyArrays, "torch": TorchArrays, "cupy": CupyArrays}[mod]()
    return _ADAPTERS[mod]


# ------------------------------------------------------------------------------------------------
# The calls. Each returns framework arrays; None stands for "not requested".
# ------------------------------------------------------------------------------------------------
def _workspace(fw, q, k, layout, scheme, varlen, nseq):
    """A GPU workspace from the caller's allocator, so the C++ layer allocates nothing."""
    if not fw.is_gpu(q):
        return None
    nbytes = workspace_bytes(q.shape, k.shape, layout, scheme, varlen, nseq)
    return fw.empty((nbytes,), "uint8", q) if nbytes else None


def _num_sequences(cu):
    return cu.shape[0] - 1 if cu is not None and len(cu.shape) == 1 else 0


def run_attention(fw, q, k, v, causal, window, sinks, scale, layout, scheme, path, return_lse,
                  softcap=0.0):
    """sinks: None, or what sinks_arg() gives (float32 [Hq] on q's device); softcap: what
    softcap_arg() gives."""
    out = fw.out_like(q)
    rows = rows_shape(q.shape, layout, False) if return_lse else None
    lse = fw.empty(rows, "float32", q) if rows else None
    ws = _workspace(fw, q, k, layout, scheme, False, 0)
    with fw.device(q):
        lib.attention(fw.arg(q), fw.arg(k), fw.arg(v), fw.arg(out), fw.arg(lse), causal,
                      window[0], window[1], fw.arg(sinks), scale, layout, scheme, "auto", path,
                      64, fw.stream(q), ws, softcap)
    return out, lse


def run_attention_varlen(fw, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, window, sinks, scale,
                         scheme, path, return_lse, softcap=0.0):
    out = fw.out_like(q)
    rows = rows_shape(q.shape, "BHSD", True) if return_lse else None
    lse = fw.empty(rows, "float32", q) if rows else None
    ws = _workspace(fw, q, k, "BHSD", scheme, True, _num_sequences(cu_q))
    with fw.device(q):
        lib.attention_varlen(fw.arg(q), fw.arg(k), fw.arg(v), fw.arg(cu_q), fw.arg(cu_kv),
                             max_q, max_kv, fw.arg(out), fw.arg(lse), causal, window[0],
                             window[1], fw.arg(sinks), scale, scheme, "auto", path, 64,
                             fw.stream(q), ws, softcap)
    return out, lse


def alloc_quantized(fw, q, k, layout, scheme, nseq):
    """{part: array} for quantize() ({} when the shapes are malformed). vt8 is a view of the
    first columns of its padded rows, the layout the C++ layer reads."""
    spec = quantized_spec(q.shape, k.shape, layout, scheme, nseq)
    if spec is None:
        return {}
    parts = {}
    for name, (storage, dtype, columns) in spec.items():
        a = fw.empty(storage, dtype, q)
        parts[name] = a if columns is None else a[..., :columns]
    return parts


def run_quantize(fw, q, k, v, cu_q, cu_kv, layout, scheme):
    varlen = cu_q is not None or cu_kv is not None
    parts = alloc_quantized(fw, q, k, layout, scheme, _num_sequences(cu_q) if varlen else None)
    quantize_into(fw, q, k, v, cu_q, cu_kv, parts, layout, scheme)
    return parts


def quantize_into(fw, q, k, v, cu_q, cu_kv, parts, layout, scheme):
    """quantize() into given parts ({name: array}; a KV cache passes views of its first tokens)."""
    with fw.device(q):
        lib.quantize(fw.arg(q), fw.arg(k), fw.arg(v), fw.arg(cu_q), fw.arg(cu_kv),
                     {n: fw.arg(a) for n, a in parts.items() if a is not None}, layout, scheme,
                     "auto", fw.stream(q))


# ------------------------------------------------------------------------------------------------
# INT8 KV cache
# ------------------------------------------------------------------------------------------------
def token_shape(b, h, s, d, layout):
    """The shape of a [B, H, S, D] tensor in `layout`."""
    return (b, s, h, d) if layout == "BSHD" else (b, h, s, d)


def first_tokens(x, n, layout):
    """The first n tokens of a k8-like array (a view)."""
    return x[:, :n] if layout == "BSHD" else x[:, :, :n]


def host_ints(x):
    """A 1-d sequence of ints (a list or tuple, or an integer array of any framework, read to
    the host) as a list of Python ints; None when x is not one."""
    values = x.tolist() if hasattr(x, "tolist") else x
    if not isinstance(values, (list, tuple)):
        return None
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in values):
        return None
    return [int(n) for n in values]


def batch_entry(x, b):
    """Batch entry b of an array, kept as a batch of one (a view)."""
    return x[b:b + 1]


def alloc_cache(fw, like, batch, heads_kv, capacity, head_dim, layout, scheme):
    """{part: array} of an empty KV cache of `capacity` tokens, laid out as quantize() lays out
    a problem with seqlen_kv = capacity (vt8 a view of its padded rows). The q parts (one query
    token per K/V head) are the scratch the prompt's quantize() writes."""
    q_shape = token_shape(batch, heads_kv, 1, head_dim, layout)
    k_shape = token_shape(batch, heads_kv, capacity, head_dim, layout)
    spec = quantized_spec(q_shape, k_shape, layout, scheme, None)
    parts = {}
    for name, (storage, dtype, columns) in spec.items():
        a = fw.empty(storage, dtype, like)
        parts[name] = a if columns is None else a[..., :columns]
    return parts


def quantize_q_parts(fw, q, layout, with_lse_offset):
    """(q8, q_scale, lse_offset or None) allocated for quantize_q, or Nones when q's shape is
    malformed (the C++ layer then reports it)."""
    rows = rows_shape(q.shape, layout, False)
    if rows is None or min(rows) < 1:
        return None, None, None
    d = dims(q.shape, layout, False)
    q8 = fw.empty(token_shape(*(int(x) for x in d), layout), "int8", q)
    rows = tuple(int(x) for x in rows)
    q_scale = fw.empty(rows, "float32", q)
    lse_offset = fw.empty(rows, "float32", q) if with_lse_offset else None
    return q8, q_scale, lse_offset


def run_quantize_q(fw, q, k_mean, scale, layout, scheme):
    # lse_offset needs the K mean (accurate, half); paper writes zeros.
    q8, q_scale, lse_offset = quantize_q_parts(fw, q, layout,
                                               k_mean is not None or scheme == "paper")
    parts = {"q8": q8, "q_scale": q_scale, "lse_offset": lse_offset}
    with fw.device(q):
        lib.quantize_q(fw.arg(q), fw.arg(k_mean),
                       {n: fw.arg(a) for n, a in parts.items() if a is not None}, scale, layout,
                       scheme, "auto", fw.stream(q))
    return q8, q_scale, lse_offset


def run_append_kv(fw, k_new, v_new, pos, cache_parts, scheme, cache_layout, layout,
                  fixed_v_scale=False):
    """pos: an int, or the positions of each sequence (int32 [B], read by the kernels) as
    fw.arg() passes an array: the binding calls the matching C++ overload."""
    with fw.device(k_new):
        lib.append_kv(fw.arg(k_new), fw.arg(v_new), pos,
                      {n: fw.arg(a) for n, a in cache_parts.items() if a is not None}, scheme,
                      cache_layout, layout, "auto", fw.stream(k_new), bool(fixed_v_scale))


def run_attention_int8(fw, parts, scheme, layout, cu_q, cu_kv, max_q, max_kv, causal, window,
                       sinks, scale, out_dtype, return_lse, path, softcap=0.0):
    q8 = parts["q8"]
    varlen = cu_q is not None or cu_kv is not None
    out = fw.empty(q8.shape, out_dtype, q8)
    rows = rows_shape(q8.shape, layout, varlen) if return_lse else None
    lse = fw.empty(rows, "float32", q8) if rows else None
    with fw.device(q8):
        lib.attention_int8({n: fw.arg(a) for n, a in parts.items()}, scheme, layout,
                           fw.arg(cu_q), fw.arg(cu_kv), max_q, max_kv, fw.arg(out), fw.arg(lse),
                           causal, window[0], window[1], fw.arg(sinks), scale, "auto", path,
                           64, fw.stream(q8), softcap)
    return out, lse
