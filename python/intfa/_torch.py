"""torch integration: intfa's entry points as torch.library custom ops, and the SDPA patch.

Custom ops with fake (meta) implementations make intfa opaque but shape-known to torch.compile,
so `torch.compile(fullgraph=True)` traces through intfa.attention without a graph break. The
real implementations allocate every output and the GPU workspace with torch (inside a CUDA graph
capture these come from the graph's private pool), launch on torch's current stream and never
synchronise the host, so the ops can be captured into CUDA graphs and replayed.
"""

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _arrays

_FW = _arrays.TorchArrays()
# torch.library.custom_op arrived in torch 2.4; older torch runs the same code eagerly.
HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def _lse_or_empty(lse, like):
    # An op returns a fixed number of tensors: an unrequested LSE is an empty one.
    return lse if lse is not None else like.new_empty((0,), dtype=torch.float32)


def _fake_lse(q, layout, varlen, return_lse):
    rows = _arrays.rows_shape(q.shape, layout, varlen) if return_lse else None
    return q.new_empty(rows if rows else (0,), dtype=torch.float32)


# The sliding window (window_size) travels as two ints in the attention ops, then the attention
# sinks as an optional tensor (float32 [Hq] on q's device; the public functions convert them),
# then the soft-capping value, all last with defaults, so that calls written for the ops without
# them stay valid.
def _attention_impl(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, layout: str,
                    scheme: str, path: str, return_lse: bool, window_left: int = -1,
                    window_right: int = -1, sinks: Optional[Tensor] = None,
                    softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    out, lse = _arrays.run_attention(_FW, q, k, v, is_causal, (window_left, window_right), sinks,
                                     scale, layout, scheme, path, return_lse, softcap)
    return out, _lse_or_empty(lse, q)


def _attention_fake(q, k, v, is_causal, scale, layout, scheme, path, return_lse, window_left=-1,
                    window_right=-1, sinks=None, softcap=0.0):
    return _FW.out_like(q), _fake_lse(q, layout, False, return_lse)


def _attention_varlen_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_kv: Tensor, max_seqlen_q: int, max_seqlen_kv: int,
                           is_causal: bool, scale: float, scheme: str, path: str,
                           return_lse: bool, window_left: int = -1, window_right: int = -1,
                           sinks: Optional[Tensor] = None,
                           softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    out, lse = _arrays.run_attention_varlen(_FW, q, k, v, cu_seqlens_q, cu_seqlens_kv,
                                            max_seqlen_q, max_seqlen_kv, is_causal,
                                            (window_left, window_right), sinks, scale, scheme,
                                            path, return_lse, softcap)
    return out, _lse_or_empty(lse, q)


def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                           is_causal, scale, scheme, path, return_lse, window_left=-1,
                           window_right=-1, sinks=None, softcap=0.0):
    return _FW.out_like(q), _fake_lse(q, "BHSD", True, return_lse)


def _parts_list(parts, like):
    # Fixed order and count (PART_NAMES); parts a scheme lacks (half: vt8, v_scale) are empty.
    empty = lambda: like.new_empty((0,), dtype=torch.int8)  # noqa: E731
    return [parts[n] if parts.get(n) is not None else empty() for n in _arrays.PART_NAMES]


def _quantize_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                   cu_seqlens_kv: Optional[Tensor], layout: str, scheme: str) -> List[Tensor]:
    parts = _arrays.run_quantize(_FW, q, k, v, cu_seqlens_q, cu_seqlens_kv, layout, scheme)
    return _parts_list(parts, q)


def _quantize_fake(q, k, v, cu_seqlens_q, cu_seqlens_kv, layout, scheme):
    varlen = cu_seqlens_q is not None or cu_seqlens_kv is not None
    nseq = None
    if varlen:
        nseq = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else 0
    return _parts_list(_arrays.alloc_quantized(_FW, q, k, layout, scheme, nseq), q)


def _attention_int8_impl(q8: Tensor, q_scale: Tensor, lse_offset: Optional[Tensor], k8: Tensor,
                         k_scale: Tensor, k_mean: Optional[Tensor], vt8: Optional[Tensor],
                         v_scale: Optional[Tensor], v: Optional[Tensor],
                         cu_seqlens_q: Optional[Tensor], cu_seqlens_kv: Optional[Tensor],
                         max_seqlen_q: int, max_seqlen_kv: int, scheme: str, layout: str,
                         is_causal: bool, scale: float, out_dtype: torch.dtype, return_lse: bool,
                         path: str, seqused_kv: Optional[Tensor] = None,
                         block_table: Optional[Tensor] = None, window_left: int = -1,
                         window_right: int = -1, sinks: Optional[Tensor] = None,
                         softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    parts = dict(q8=q8, q_scale=q_scale, lse_offset=lse_offset, k8=k8, k_scale=k_scale,
                 k_mean=k_mean, vt8=vt8, v_scale=v_scale, v=v, seqused_kv=seqused_kv,
                 block_table=block_table)
    out, lse = _arrays.run_attention_int8(_FW, parts, scheme, layout, cu_seqlens_q,
                                          cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, is_causal,
                                          (window_left, window_right), sinks, scale,
                                          _arrays.dtype_name(out_dtype), return_lse, path,
                                          softcap)
    return out, _lse_or_empty(lse, q8)


def _attention_int8_fake(q8, q_scale, lse_offset, k8, k_scale, k_mean, vt8, v_scale, v,
                         cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, scheme, layout,
                         is_causal, scale, out_dtype, return_lse, path, seqused_kv=None,
                         block_table=None, window_left=-1, window_right=-1, sinks=None,
                         softcap=0.0):
    varlen = cu_seqlens_q is not None or cu_seqlens_kv is not None
    out = q8.new_empty(q8.shape, dtype=out_dtype)
    return out, _fake_lse(q8, layout, varlen, return_lse)


def _quantize_q_impl(q: Tensor, k_mean: Optional[Tensor], scale: float, layout: str,
                     scheme: str) -> Tuple[Tensor, Tensor, Tensor]:
    q8, q_scale, lse_offset = _arrays.run_quantize_q(_FW, q, k_mean, scale, layout, scheme)
    # Always three tensors: an lse_offset that was not computed (no k_mean) is empty.
    return q8, q_scale, _lse_or_empty(lse_offset, q)


def _quantize_q_fake(q, k_mean, scale, layout, scheme):
    q8, q_scale, lse_offset = _arrays.quantize_q_parts(_FW, q, layout,
                                                       k_mean is not None or scheme == "paper")
    if q8 is None:  # malformed: the real implementation raises; these are never used
        q8 = q.new_empty((0,), dtype=torch.int8)
        q_scale = q.new_empty((0,), dtype=torch.float32)
    return q8, q_scale, _lse_or_empty(lse_offset, q)


def _append_kv_impls(fixed_v_scale):
    """The implementations of intfa::append_kv and append_kv_ragged (a position per sequence:
    int32 [B], the same call under another schema). fixed_v_scale: those of append_kv_fixed and
    append_kv_fixed_ragged, the same schemas with v_scale only read, so that it may be a set
    expand()ed over the batch (shared pages), which an op mutating it cannot take under
    torch.compile ("more than one element of the written-to tensor refers to a single memory
    location")."""
    def run(k_new, v_new, pos, k8, k_scale, k_mean, vt8, v_scale, scheme, cache_layout, layout,
            block_table):
        parts = dict(k8=k8, k_scale=k_scale, k_mean=k_mean, vt8=vt8, v_scale=v_scale,
                     block_table=block_table)
        _arrays.run_append_kv(_FW, k_new, v_new, pos, parts, scheme, cache_layout, layout,
                              fixed_v_scale)

    def dense(k_new: Tensor, v_new: Tensor, pos: int, k8: Tensor, k_scale: Tensor,
              k_mean: Optional[Tensor], vt8: Tensor, v_scale: Tensor, scheme: str,
              cache_layout: str, layout: str, block_table: Optional[Tensor] = None) -> None:
        run(k_new, v_new, pos, k8, k_scale, k_mean, vt8, v_scale, scheme, cache_layout, layout,
            block_table)

    def ragged(k_new: Tensor, v_new: Tensor, pos: Tensor, k8: Tensor, k_scale: Tensor,
               k_mean: Optional[Tensor], vt8: Tensor, v_scale: Tensor, scheme: str,
               cache_layout: str, layout: str, block_table: Optional[Tensor] = None) -> None:
        run(k_new, v_new, _FW.arg(pos), k8, k_scale, k_mean, vt8, v_scale, scheme, cache_layout,
            layout, block_table)

    return dense, ragged


_append_kv_impl, _append_kv_ragged_impl = _append_kv_impls(False)
_append_kv_fixed_impl, _append_kv_fixed_ragged_impl = _append_kv_impls(True)


def _append_kv_fake(k_new, v_new, pos, k8, k_scale, k_mean, vt8, v_scale, scheme, cache_layout,
                    layout, block_table=None):
    return None


def _quantize_into_impl(q: Tensor, k: Tensor, v: Tensor, layout: str, scheme: str, q8: Tensor,
                        q_scale: Tensor, lse_offset: Tensor, k8: Tensor, k_scale: Tensor,
                        k_mean: Tensor, vt8: Tensor, v_scale: Tensor) -> None:
    parts = dict(q8=q8, q_scale=q_scale, lse_offset=lse_offset, k8=k8, k_scale=k_scale,
                 k_mean=k_mean, vt8=vt8, v_scale=v_scale)
    _arrays.quantize_into(_FW, q, k, v, None, None, parts, layout, scheme)


def _quantize_into_fake(q, k, v, layout, scheme, q8, q_scale, lse_offset, k8, k_scale, k_mean,
                        vt8, v_scale):
    return None


# The op definitions own their torch.library registrations: keep them alive with the module.
_op_defs = []


def _register(name, impl, fake, mutates_args=()):
    """Registers intfa::<name> and returns its OpOverload (what torch.compile traces into one
    graph node), or the plain function where custom ops are missing."""
    if not HAVE_CUSTOM_OP:
        return impl
    op = torch.library.custom_op(f"intfa::{name}", mutates_args=mutates_args)(impl)
    op.register_fake(fake)
    _op_defs.append(op)
    return getattr(torch.ops.intfa, name).default


attention_op = _register("attention", _attention_impl, _attention_fake)
attention_varlen_op = _register("attention_varlen", _attention_varlen_impl,
                                _attention_varlen_fake)
quantize_op = _register("quantize", _quantize_impl, _quantize_fake)
attention_int8_op = _register("attention_int8", _attention_int8_impl, _attention_int8_fake)
quantize_q_op = _register("quantize_q", _quantize_q_impl, _quantize_q_fake)
# The KV cache's parts are written in place: the ops return nothing. append_kv also writes
# v_scale (a V channel's scale grows when a new value would clamp; vt8's columns are then
# requantized). A paged cache's block_table (an optional last argument) is only read.
append_kv_op = _register("append_kv", _append_kv_impl, _append_kv_fake,
                         mutates_args=("k8", "k_scale", "vt8", "v_scale"))
# The same with a position per sequence (pos: int32 [B] on the cache's device; a ragged cache).
append_kv_ragged_op = _register("append_kv_ragged", _append_kv_ragged_impl, _append_kv_fake,
                                mutates_args=("k8", "k_scale", "vt8", "v_scale"))
append_kv_fixed_op = _register("append_kv_fixed", _append_kv_fixed_impl, _append_kv_fake,
                               mutates_args=("k8", "k_scale", "vt8"))
append_kv_fixed_ragged_op = _register("append_kv_fixed_ragged", _append_kv_fixed_ragged_impl,
                                      _append_kv_fake, mutates_args=("k8", "k_scale", "vt8"))
quantize_into_op = _register("quantize_into", _quantize_into_impl, _quantize_into_fake,
                             mutates_args=("q8", "q_scale", "lse_offset", "k8", "k_scale",
                                           "k_mean", "vt8", "v_scale"))

# What could need the dispatcher to see the op: a Python dispatch mode (FakeTensorMode, a flop
# counter, ...) and the profiler (which names ops). Resolved once; a torch without the query
# leaves the dispatcher on (dispatch modes) or the name out of the trace (profiler).
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_profiler_enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)


def _direct_ok(args):
    """True when an op's implementation may run without the dispatcher: eager (not traced by
    torch.compile), no dispatch mode, no profiler, exact torch.Tensor arguments (no subclass
    such as FakeTensor), and no gradient needed. The op would then return the same tensors,
    without grad, and the dispatcher costs ~40 us of host time per call (H200 host,
    bench/py_overhead.py), more than the GPU work of a short attention call."""
    if _is_compiling() or _dispatch_stack_len is None or _dispatch_stack_len() > 0:
        return False
    if _profiler_enabled is not None and _profiler_enabled():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) is not Tensor or (grad and a.requires_grad)):
            return False
    return True


def _direct_or_op(op, impl):
    if op is impl:
        return impl

    def call(*args):
        return impl(*args) if _direct_ok(args) else op(*args)

    call.__name__ = impl.__name__
    return call


# What the package calls: the implementation directly in plain eager calls, else the op.
attention_call = _direct_or_op(attention_op, _attention_impl)
attention_varlen_call = _direct_or_op(attention_varlen_op, _attention_varlen_impl)
quantize_call = _direct_or_op(quantize_op, _quantize_impl)
attention_int8_call = _direct_or_op(attention_int8_op, _attention_int8_impl)
quantize_q_call = _direct_or_op(quantize_q_op, _quantize_q_impl)
append_kv_call = _direct_or_op(append_kv_op, _append_kv_impl)
append_kv_ragged_call = _direct_or_op(append_kv_ragged_op, _append_kv_ragged_impl)
append_kv_fixed_call = _direct_or_op(append_kv_fixed_op, _append_kv_fixed_impl)
append_kv_fixed_ragged_call = _direct_or_op(append_kv_fixed_ragged_op,
                                            _append_kv_fixed_ragged_impl)
quantize_into_call = _direct_or_op(quantize_into_op, _quantize_into_impl)


# ------------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention routing
# ------------------------------------------------------------------------------------------------
_GPU_HEAD_DIMS = (64, 128, 256)
# Query rows per K/V head below which the SDPA stand-in leaves a call to torch: intfa.attention
# quantizes all of K and V in every call, which a call of fewer rows than one 128-row tile per
# K/V head does not pay back (an H200 decode step, Sq = 1 with 4 query heads per K/V head:
# 0.50 ms end to end against 0.15 for SDPA in bf16, docs/BENCHMARKS.md). Such calls belong on
# intfa.attention_int8 over a quantized KV cache.
_MIN_ROWS_PER_KV_HEAD = 128
_original_sdpa = None
# intfa.attention, set by the package on import (this module is imported before it exists).
intfa_attention = None


def _is_plain_tensor(t):
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _rows_aligned(t):
    # The GPU kernels move 16-byte vectors along rows: a contiguous last dim, every stride that
    # is stepped along (size > 1) a multiple of 8 elements, and a 16-byte aligned pointer. The
    # pointer is not visible while torch.compile traces; tensors it allocates are aligned.
    if t.stride(-1) != 1:
        return False
    if not all(t.stride(i) % 8 == 0 for i in range(t.dim() - 1) if t.shape[i] > 1):
        return False
    return _is_compiling() or t.data_ptr() % 16 == 0


# torch.compiler.is_compiling, looked up once (torch.compile folds a call of it to True while
# it traces, whatever name calls it); None on a torch without it.
_compiler_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _is_compiling():
    return _compiler_is_compiling is not None and bool(_compiler_is_compiling())


def sdpa_supported(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False):
    """True when intfa can serve this F.scaled_dot_product_attention call with the same
    meaning: no mask, no dropout, CUDA fp16/bf16 4-d tensors of one device and dtype, head dim
    64, 128 or 256 (also for V), no gradient needed, and causal only when Sq == Skv (torch aligns the
    causal mask to the top-left corner, intfa to the bottom-right; they agree when square); and
    worth it: at least 128 query rows per K/V head (Sq * Hq / Hkv), since every call quantizes
    K and V."""
    if attn_mask is not None or dropout_p != 0.0:
        return False
    if not all(_is_plain_tensor(t) for t in (query, key, value)):
        return False
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return False
    if any(t.dtype != query.dtype or t.device != query.device or t.dim() != 4
           for t in (query, key, value)):
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or
                                    value.requires_grad):
        return False  # intfa has no backward pass
    b, hq, sq, d = query.shape
    bk, hk, skv, dk = key.shape
    if d not in _GPU_HEAD_DIMS or dk != d or tuple(value.shape) != (bk, hk, skv, d) or bk != b or hk < 1:
        return False
    if hk != hq and not (enable_gqa and hq % hk == 0):
        return False
    if is_causal and sq != skv:
        return False
    if sq * (hq // hk) < _MIN_ROWS_PER_KV_HEAD:
        return False  # a decode step: quantizing the whole K/V would cost more than attention
    if scale is not None and scale == 0.0:
        return False
    return all(_rows_aligned(t) for t in (query, key, value))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention with intfa serving the calls it supports (see
    sdpa_supported); every other call goes to torch's own implementation."""
    if sdpa_supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return intfa_attention(query, key, value, is_causal=is_causal, scale=scale,
                               enable_gqa=enable_gqa)
    original = _original_sdpa or torch.nn.functional.scaled_dot_product_attention
    kwargs = {}
    if scale is not None:
        kwargs["scale"] = scale
    if enable_gqa:
        kwargs["enable_gqa"] = enable_gqa  # only newer torch knows the argument
    return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, **kwargs)


def patch_sdpa():
    """Route torch.nn.functional.scaled_dot_product_attention through intfa (idempotent)."""
    global _original_sdpa
    if _original_sdpa is None:
        _original_sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention


def unpatch_sdpa():
    """Restore torch's own scaled_dot_product_attention (idempotent)."""
    global _original_sdpa
    if _original_sdpa is not None:
        torch.nn.functional.scaled_dot_product_attention = _original_sdpa
        _original_sdpa = None


@contextlib.contextmanager
def sdpa_patched():
    """Context manager form of patch_sdpa() / unpatch_sdpa()."""
    was_patched = _original_sdpa is not None
    patch_sdpa()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_sdpa()
