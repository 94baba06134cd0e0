"""intfa: INT8 FlashAttention.

Attention on integer tensor cores with a CPU reference backend. The entry points take torch
tensors (CPU or CUDA), CuPy arrays (CUDA) or NumPy arrays (CPU backend; bfloat16 through
ml_dtypes) through DLPack, without copies, and return results of the same framework.
`intfa.attention` follows torch.nn.functional.scaled_dot_product_attention's argument names so it
can stand in for it; with torch installed it is a torch.library custom op, so torch.compile
(fullgraph=True) and CUDA-graph capture work. See docs/PYTHON.md for every argument.

Errors from the C++ layer keep its message: ValueError for a bad shape, stride, size or option,
TypeError for a dtype, RuntimeError for a GPU path that is not built or a CUDA error.
"""

import heapq
import importlib
import importlib.util
import os
from typing import Any, NamedTuple

import numpy as _np

from . import _arrays
from ._arrays import NO_WINDOW as _NO_WINDOW
from ._arrays import lib as _lib

__all__ = [
    "attention", "attention_varlen", "quantize", "attention_int8", "attention_reference",
    "QuantizedQKV", "quantize_q", "append_kv", "KVCache", "PagedKVCache", "quantized_bytes",
    "build_info", "device_info", "resolve_gpu_path", "last_gpu_path",
    "patch_sdpa", "unpatch_sdpa", "sdpa_patched", "scaled_dot_product_attention",
    "sdpa_supported", "flash_attn_func", "flash_attn_varlen_func", "transformers_attention",
    "register_transformers", "__version__",
]

__version__ = _lib.build_info()["version"]

# torch is optional. When it is installed it is imported here, so that the custom ops exist
# before torch.compile traces a call (INTFA_NO_TORCH=1 skips this for NumPy-only processes).
_torch = None
torch_import_error = None
if os.environ.get("INTFA_NO_TORCH", "") not in ("1", "true", "yes") and \
        importlib.util.find_spec("torch") is not None:
    try:
        # import_module, not `from . import _torch`: that would find the None bound above.
        _torch = importlib.import_module(__name__ + "._torch")
    except Exception as e:  # a broken torch install must not break the NumPy API
        torch_import_error = e
        _torch = None


def _is_torch(x):
    return _torch is not None and isinstance(x, _torch.torch.Tensor)


def _frameworks(**arrays):
    """The adapter of the first array; TypeError naming any argument that is not an array."""
    fws = [_arrays.framework(a, name) for name, a in arrays.items()]
    return fws[0]


def attention(q, k, v, *, is_causal=False, window_size=_NO_WINDOW, sinks=None, scale=None,
              enable_gqa=False, layout="BHSD", scheme="accurate", return_lse=False, path="auto",
              softcap=None):
    """Attention softmax(scale * q k^T) v with INT8 GEMMs.

    q: [B, Hq, Sq, D] (layout "BHSD") or [B, Sq, Hq, D] ("BSHD"), float16 or bfloat16.
    k, v: [B, Hkv, Skv, D] (or BSHD), same dtype and device as q.
    is_causal: causal mask aligned to the bottom-right corner when Sq != Skv (query i sees
        keys j <= i + Skv - Sq); fully masked rows give 0 and LSE -inf.
    window_size: (left, right), sliding-window (local) attention as FlashAttention's: query i
        sees keys j with i + Skv - Sq - left <= j <= i + Skv - Sq + right; -1 leaves a side
        open, (-1, -1) is no window. Causal is right = 0, so with is_causal right must be -1 or
        0 (a Mistral-style local layer of W keys: is_causal=True, window_size=(W - 1, 0)).
    sinks: attention sinks (gpt-oss's; flash_attn's learnable_sink), one logit z_h per query
        head, [Hq], in the units of the scaled scores: each row's softmax denominator gains
        e^z_h (nothing is added to the output), out = sum_j e^s_j v_j / (e^z_h + sum_j e^s_j),
        and the LSE is log(e^z_h + sum_j e^s_j). A row that sees no key gives 0 and LSE z_h;
        z_h = -inf is no sink for that head. A float array of any framework or a list of
        numbers, converted to float32 on q's device. None (default): no sinks.
    scale: softmax scale; None means 1/sqrt(D).
    enable_gqa: allow Hq != Hkv (Hkv must divide Hq), as in torch SDPA.
    layout: "BHSD" (SDPA's) or "BSHD" (FlashAttention's); any strides with a contiguous last dim.
    scheme: "accurate" (default), "paper" or "half" (half: CPU backend only).
    return_lse: also return the log-sum-exp, float32 [B, Hq, Sq], natural log.
    path: GPU kernel family "auto", "sm80", "sm90" or "decode" (ignored on the CPU).
    softcap: logit soft-capping (Gemma 2's attn_logit_softcapping, flash_attn's softcap): each
        scaled score s becomes softcap * tanh(s / softcap) before the softmax (the LSE is that
        of the capped scores; sinks are not capped). None or 0.0: none. On the GPU every
        kernel runs it (sm80, decode, sm90, at every head dim they take), over paged caches too.

    B, Sq and Skv may be 0, as torch SDPA takes them: with Skv = 0 every row is 0 and its LSE
    -inf (or the head's sink).

    Returns out (like q, dtype of q) or (out, lse).
    """
    # The torch branch is what torch.compile traces: plain Python up to the custom op.
    window = _arrays.window_arg(window_size)
    if _is_torch(q):
        _arrays.check_gqa(q.shape, k.shape, layout, False, enable_gqa)
        z = _arrays.sinks_arg(_torch._FW, sinks, q)
        out, lse = _torch.attention_call(q, k, v, bool(is_causal), _arrays.scale_arg(scale),
                                       layout, scheme, path, bool(return_lse), *window, z,
                                       _arrays.softcap_arg(softcap))
    else:
        fw = _frameworks(q=q, k=k, v=v)
        _arrays.check_gqa(q.shape, k.shape, layout, False, enable_gqa)
        out, lse = _arrays.run_attention(fw, q, k, v, bool(is_causal), window,
                                         _arrays.sinks_arg(fw, sinks, q),
                                         _arrays.scale_arg(scale), layout, scheme, path,
                                         bool(return_lse), _arrays.softcap_arg(softcap))
    return (out, lse) if return_lse else out


def _max_seqlen(cu, given):
    if given is not None:
        return int(given)
    if len(cu.shape) != 1 or cu.shape[0] < 2:
        return 1  # cu_seqlens itself is malformed: the C++ layer says how
    return max(1, _arrays.framework(cu, "cu_seqlens").max_seqlen(cu))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q=None, max_seqlen_kv=None,
                     *, is_causal=False, window_size=_NO_WINDOW, sinks=None, scale=None,
                     enable_gqa=False, scheme="accurate", return_lse=False, path="auto",
                     softcap=None):
    """Attention over packed variable-length sequences (as flash_attn_varlen_func).

    q: [Tq, Hq, D], k and v: [Tkv, Hkv, D] (all sequences concatenated), float16/bfloat16.
    cu_seqlens_q, cu_seqlens_kv: int32 [nseq + 1] on q's device: 0, then running totals
        (sequence i is rows cu[i]:cu[i+1]; empty sequences allowed).
    max_seqlen_q, max_seqlen_kv: the longest sequence of each; None reads them from cu_seqlens
        (a device-to-host copy for GPU arrays: pass them under torch.compile or graph capture).
    Other arguments as in attention() (causal and window per sequence; sinks per query head and
    softcap as there). LSE is float32 [Hq, Tq]. Tq and Tkv may be 0 (every sequence empty).
    """
    if not _is_torch(q):
        _frameworks(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv)
    _arrays.check_gqa(q.shape, k.shape, "BHSD", True, enable_gqa)
    s = _arrays.scale_arg(scale)
    window = _arrays.window_arg(window_size)
    max_q = _max_seqlen(cu_seqlens_q, max_seqlen_q)
    max_kv = _max_seqlen(cu_seqlens_kv, max_seqlen_kv)
    fw = _torch._FW if _is_torch(q) else _arrays.framework(q, "q")
    z = _arrays.sinks_arg(fw, sinks, q)
    if _is_torch(q):
        out, lse = _torch.attention_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_q, max_kv,
                                              bool(is_causal), s, scheme, path, bool(return_lse),
                                              *window, z, _arrays.softcap_arg(softcap))
    else:
        out, lse = _arrays.run_attention_varlen(fw, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_q,
                                                max_kv, bool(is_causal), window, z, s, scheme,
                                                path, bool(return_lse),
                                                _arrays.softcap_arg(softcap))
    return (out, lse) if return_lse else out


class QuantizedQKV(NamedTuple):
    """What quantize() writes and attention_int8() reads (intfa.h's QuantizedQKV).

    Dense: q8 int8 like q, q_scale and lse_offset float32 [B, Hq, Sq], k8 int8 like k, k_scale
    float32 [B, Hkv, Skv], k_mean float32 [B, Hkv, D], vt8 int8 V transposed [B, Hkv, D, Skv]
    (a view with padded rows), v_scale float32 [B, Hkv, D]. Varlen: q8 [Tq, Hq, D],
    q_scale/lse_offset [Hq, Tq], k8 [Tkv, Hkv, D], k_scale [Hkv, Tkv], vt8 [Hkv, D, Tkv],
    k_mean/v_scale [nseq, Hkv, D]. Scheme "half" keeps v as given and has no vt8/v_scale.
    k_mean and v_scale may be one set for every sequence (a [Hkv, D] array expanded to [B, Hkv,
    D], batch stride 0) where they are only read: attention_int8, quantize_q, and append_kv with
    fixed_v_scale=True (shared pages; docs/KV_CACHE.md).
    seqused_kv (attention_int8 only, optional): int32 [B] (varlen: [nseq]) on q8's device, the
    keys each sequence attends to (its first seqused_kv[b], clamped to [0, Skv]; FlashAttention's
    seqused_k), read by the kernels: a batch of caches of different lengths in one call.
    block_table (optional): a paged KV cache (vLLM's block tables), int32 [B, max_pages] on
    q8's device: token t of sequence b is token t % page_size of page block_table[b][t //
    page_size] of a pool shared by the batch. k8 is then [num_pages, Hkv, page_size, D] (BSHD:
    [num_pages, page_size, Hkv, D]), k_scale [num_pages, Hkv, page_size], vt8 [num_pages, Hkv,
    D, >= page_size] (V^T within each page), with page_size a multiple of 16; k_mean and v_scale
    stay per sequence, [B, Hkv, D]. Read by attention_int8 and append_kv; dense queries, schemes
    paper and accurate. On the GPU, attention_int8 reads pages of a multiple of 128 tokens, or of
    16, 32 or 64 tokens, on every path (the decode path for at most 16 query rows per (batch,
    K/V head) after GQA packing, sm90 / sm80 for more: chunked prefill), and the table entries
    are not checked there: an entry outside the pool reads zeros and is written nowhere (the CPU
    backend raises ValueError).
    """
    scheme: str
    layout: str
    q8: Any
    q_scale: Any
    lse_offset: Any
    k8: Any
    k_scale: Any
    k_mean: Any
    vt8: Any = None
    v_scale: Any = None
    v: Any = None
    dtype: Any = None  # dtype of the quantized inputs: attention_int8's default output dtype
    cu_seqlens_q: Any = None
    cu_seqlens_kv: Any = None
    seqused_kv: Any = None
    block_table: Any = None


def quantize(q, k, v, *, cu_seqlens_q=None, cu_seqlens_kv=None, layout="BHSD",
             scheme="accurate"):
    """Quantizes fp16/bf16 q, k, v once (e.g. for an INT8 KV cache) into a QuantizedQKV.

    Dense inputs as in attention(); packed varlen inputs as in attention_varlen() with both
    cu_seqlens given. Rounding is bit-identical on every backend (see intfa.h).
    """
    arrays = dict(q=q, k=k, v=v)
    varlen = cu_seqlens_q is not None or cu_seqlens_kv is not None
    if varlen:
        arrays.update(cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv)
        arrays = {n: a for n, a in arrays.items() if a is not None}
        layout = "BHSD"  # packed tensors have one layout; the C++ layer ignores the option
    if not _is_torch(q):
        _frameworks(**arrays)
    if _is_torch(q):
        parts = dict(zip(_arrays.PART_NAMES, _torch.quantize_call(q, k, v, cu_seqlens_q,
                                                                cu_seqlens_kv, layout, scheme)))
        if scheme == "half":
            parts["vt8"] = parts["v_scale"] = None
    else:
        parts = _arrays.run_quantize(_arrays.framework(q, "q"), q, k, v, cu_seqlens_q,
                                     cu_seqlens_kv, layout, scheme)
    return QuantizedQKV(scheme=scheme, layout=layout, v=v if scheme == "half" else None,
                        dtype=q.dtype, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
                        **{n: parts.get(n) for n in _arrays.PART_NAMES})


def attention_int8(qkv, *, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None,
                   max_seqlen_kv=None, is_causal=False, window_size=_NO_WINDOW, sinks=None,
                   scale=None, out_dtype=None, return_lse=False, path="auto", seqused_kv=None,
                   block_table=None, softcap=None):
    """Attention on pre-quantized inputs (a QuantizedQKV from quantize(), or built by hand).

    cu_seqlens_q/kv, max_seqlen_q/kv: varlen only; default to those stored in qkv (and the
        longest sequence read from cu_seqlens).
    seqused_kv: int32 [B] (varlen: [nseq]) on q8's device: sequence b attends to its first
        seqused_kv[b] keys (clamped to [0, Skv]; causal and window_size are bottom-right
        against that count); what lies past them is never read into the result. Defaults to
        qkv.seqused_kv; None (both): every key.
    block_table: int32 [B, max_pages] on q8's device: qkv's k8, k_scale and vt8 are pages of a
        paged KV cache (see QuantizedQKV). Only the entries of pages that hold a sequence's
        keys (all, or its seqused_kv[b]) are read, and must name a page of the pool; the others
        may be anything (-1). Defaults to qkv.block_table; None (both): a contiguous cache.
        On the GPU: pages of a multiple of 128 tokens, or 16, 32 or 64 (see QuantizedQKV).
    sinks: as in attention() (converted to float32 on q8's device). With scheme accurate (or
        half) qkv.lse_offset must be defined (quantize() and quantize_q() with k_mean write it;
        KVCache's do): the smoothed scores are shifted by it and the sink is not, else a
        ValueError naming qkv.lse_offset.
    softcap: as in attention(); with accurate (or half) qkv.lse_offset must be defined too (the
        K-mean term enters the tanh), else a ValueError naming qkv.lse_offset.
    out_dtype: float16, bfloat16 or float32 (a dtype or its name); default: qkv.dtype, else
        float16. Other arguments as in attention(). Returns out like q8, or (out, lse).
    """
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else qkv.cu_seqlens_q
    cu_kv = cu_seqlens_kv if cu_seqlens_kv is not None else qkv.cu_seqlens_kv
    used = seqused_kv if seqused_kv is not None else qkv.seqused_kv
    table = block_table if block_table is not None else qkv.block_table
    varlen = cu_q is not None or cu_kv is not None
    max_q = max_kv = 0
    if varlen:
        if cu_q is not None:
            max_q = _max_seqlen(cu_q, max_seqlen_q)
        if cu_kv is not None:
            max_kv = _max_seqlen(cu_kv, max_seqlen_kv)
    if out_dtype is None:
        out_dtype = qkv.dtype if qkv.dtype is not None else "float16"
    s = _arrays.scale_arg(scale)
    window = _arrays.window_arg(window_size)
    if not _is_torch(qkv.q8):
        optional = {"seqused_kv": used, "block_table": table}
        _frameworks(q8=qkv.q8, **{n: a for n, a in optional.items() if a is not None})
    if _is_torch(qkv.q8):
        torch = _torch.torch
        if isinstance(out_dtype, str):
            out_dtype = getattr(torch, out_dtype)
        z = _arrays.sinks_arg(_torch._FW, sinks, qkv.q8)
        out, lse = _torch.attention_int8_call(
            qkv.q8, qkv.q_scale, qkv.lse_offset, qkv.k8, qkv.k_scale, qkv.k_mean, qkv.vt8,
            qkv.v_scale, qkv.v, cu_q, cu_kv, max_q, max_kv, qkv.scheme, qkv.layout,
            bool(is_causal), s, out_dtype, bool(return_lse), path, used, table, *window, z,
            _arrays.softcap_arg(softcap))
    else:
        parts = {n: getattr(qkv, n) for n in _arrays.PART_NAMES + ("v",)}
        parts["seqused_kv"] = used
        parts["block_table"] = table
        fw = _arrays.framework(qkv.q8, "qkv.q8")
        out, lse = _arrays.run_attention_int8(fw, parts, qkv.scheme, qkv.layout, cu_q, cu_kv,
                                              max_q, max_kv, bool(is_causal), window,
                                              _arrays.sinks_arg(fw, sinks, qkv.q8), s,
                                              _arrays.dtype_name(out_dtype), bool(return_lse),
                                              path, _arrays.softcap_arg(softcap))
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# INT8 KV cache for decoding
# ------------------------------------------------------------------------------------------------
def quantize_q(q, k_mean=None, *, scale=None, layout="BHSD", scheme="accurate"):
    """Quantizes a decode step's queries against a KV cache's statistics.

    q: [B, Hq, Sq, D] ("BHSD") or [B, Sq, Hq, D] ("BSHD"), float16/bfloat16.
    k_mean: the cache's K mean, float32 [B, Hkv, D] (Hkv divides Hq), for lse_offset with the
        accurate (and half) scheme; None skips lse_offset there (attention_int8 then treats it as
        0, which changes the LSE only). Paper has no K mean: its lse_offset is 0.
    scale: the softmax scale attention_int8 will use (None: 1/sqrt(D)); enters lse_offset only.

    Returns (q8, q_scale, lse_offset): int8 like q (dense), float32 [B, Hq, Sq], float32
    [B, Hq, Sq] or None. q8 and q_scale equal quantize()'s bit for bit for the same q.
    """
    s = _arrays.scale_arg(scale)
    if _is_torch(q):
        q8, q_scale, lse_offset = _torch.quantize_q_call(q, k_mean, s, layout, scheme)
        if lse_offset.dim() == 1 and lse_offset.shape[0] == 0:
            lse_offset = None
    else:
        arrays = dict(q=q) if k_mean is None else dict(q=q, k_mean=k_mean)
        fw = _frameworks(**arrays)
        q8, q_scale, lse_offset = _arrays.run_quantize_q(fw, q, k_mean, s, layout, scheme)
    return q8, q_scale, lse_offset


def _cache_parts(cache):
    parts = {n: getattr(cache, n) for n in ("k8", "k_scale", "k_mean", "vt8", "v_scale")}
    # A KVCache passed as the cache has no block_table: it is contiguous.
    parts["block_table"] = getattr(cache, "block_table", None)
    return parts


def append_kv(cache, k_new, v_new, pos, *, layout=None, fixed_v_scale=False):
    """Writes n new tokens into an INT8 KV cache in place, as tokens pos .. pos + n - 1.

    cache: a QuantizedQKV (e.g. a KVCache's, or quantize()'s) whose k8 [B, Hkv, C, D] (its
        layout), k_scale [B, Hkv, C] and vt8 [B, Hkv, D, >= C] hold C tokens; its k_mean
        (accurate) and v_scale are the statistics the new tokens are quantized with (a V
        channel's scale grows, in place, when a new value lies beyond it, and the bytes the
        cache holds in that channel are requantized).
        Schemes paper and accurate (half: RuntimeError). A paged cache (cache.block_table set,
        see QuantizedQKV) holds max_pages * page_size tokens per sequence:
        the tokens go to the pages its table names, and the entries of the pages an append
        writes or requantizes (those before pos + n) must name pages of the pool.
    k_new, v_new: [B, Hkv, n, D] or [B, n, Hkv, D] (layout), float16/bfloat16.
    pos: an int (0 <= pos, pos + n <= C), or a position per sequence: an int32 array [B] on
        k_new's device (sequence b's tokens go to pos[b] .. pos[b] + n - 1; read by the kernels,
        so unchecked: tokens that fall outside [0, C) are not written).
    layout: of k_new and v_new; None means cache.layout.
    fixed_v_scale: keep v_scale as it is: a new value beyond 127 levels of its scale saturates
        at +-127, and only the new tokens' bytes are written, so pages once written never
        change and may be shared by sequences with equal statistics (prefix caching). k_mean
        and v_scale may then be one set for every sequence, e.g. a [Hkv, D] tensor expanded to
        [B, Hkv, D] (batch stride 0; docs/KV_CACHE.md, "Shared pages").
    Returns None.
    """
    layout = cache.layout if layout is None else layout
    # An array of positions; an int (or a 0-d array) is one position.
    per_sequence = not isinstance(pos, int) and getattr(pos, "ndim", 0) != 0
    if not per_sequence:
        if isinstance(pos, (list, tuple)):
            raise TypeError(f"pos: expected an int, or an int32 array [B] on k_new's device (a "
                            f"position per sequence), got {type(pos).__name__}")
        pos = int(pos)
    parts = _cache_parts(cache)
    if _is_torch(k_new):
        for n in ("k8", "k_scale", "vt8", "v_scale"):
            if parts[n] is None:  # a part the scheme lacks (half): the C++ layer reports it
                parts[n] = k_new.new_empty((0,), dtype=_torch.torch.int8)
        if fixed_v_scale:  # ops that do not mutate v_scale (it may be expand()ed)
            call = (_torch.append_kv_fixed_ragged_call if per_sequence
                    else _torch.append_kv_fixed_call)
        else:
            call = _torch.append_kv_ragged_call if per_sequence else _torch.append_kv_call
        call(k_new, v_new, pos, parts["k8"], parts["k_scale"], parts["k_mean"], parts["vt8"],
             parts["v_scale"], cache.scheme, cache.layout, layout, parts["block_table"])
    else:
        optional = {"pos": pos if per_sequence else None,
                    "cache.block_table": parts["block_table"]}
        fw = _frameworks(k_new=k_new, v_new=v_new,
                         **{n: a for n, a in optional.items() if a is not None})
        _arrays.run_append_kv(fw, k_new, v_new, fw.arg(pos) if per_sequence else pos, parts,
                              cache.scheme, cache.layout, layout, fixed_v_scale)


class KVCache:
    """An INT8 KV cache of fixed capacity for decoding: the prompt's K and V quantized once,
    tokens appended in place, attention over the tokens held.

        cache = intfa.KVCache(k, v, capacity, layout="BHSD", scheme="accurate")
        cache.append(k_new, v_new)                     # n tokens at position cache.length
        out = cache.attention(q, is_causal=True)      # q: this step's queries

        ragged = intfa.KVCache(k, v, capacity, lengths=[37, 20])  # prompts of 37 and 20 tokens
        ragged.append(k_new, v_new)                    # sequence b's at position lengths[b]

    k, v: the prompt's keys and values, [B, Hkv, L0, D] ("BHSD") or [B, L0, Hkv, D] ("BSHD"),
    float16/bfloat16, torch (CPU or CUDA), CuPy or NumPy. The statistics come from the prompt:
    the K mean (accurate; fixed, and exact for softmax, which ignores any vector subtracted from
    every key) and the per-channel V scales (a V channel's scale grows when a later value lies
    beyond it, its stored values requantized; see docs/PYTHON.md). Schemes "accurate" and
    "paper".

    lengths (ragged mode): each sequence's prompt length, B ints (or an integer array of any
    framework), each in [1, L0]: sequence b's prompt is its first lengths[b] tokens of k and v
    (the rest is padding, never read), quantized on its own (its statistics as a cache of that
    sequence alone would have them). The sequences then advance at their own positions, the
    counts kept on the device (cache.lengths, read by the kernels): append() writes sequence
    b's tokens at lengths[b] and attention() lets it see its first lengths[b] tokens.

    Attributes: length (tokens held, a Python int; ragged: the longest sequence's), lengths
    (ragged: int32 [B] on the cache's device, each sequence's tokens; else None), capacity,
    scheme, layout, dtype (of the inputs), batch, heads_kv, head_dim, and the parts over all
    capacity tokens: k8 (layout), k_scale [B, Hkv, C], k_mean [B, Hkv, D] (None for paper),
    vt8 [B, Hkv, D, >= C], v_scale. Parts past a sequence's tokens hold no meaning.
    """

    def __init__(self, k, v, capacity, *, lengths=None, layout="BHSD", scheme="accurate"):
        fw, (b, hkv, n, dim) = _check_prompt(k, v, layout, scheme, "KVCache")
        if isinstance(capacity, bool) or int(capacity) != capacity:
            raise ValueError(f"capacity: expected an int, got {capacity!r}")
        capacity = int(capacity)
        if capacity < n:
            raise ValueError(f"capacity: expected at least the prompt's {n} tokens, got "
                             f"{capacity}")
        prompts = None if lengths is None else _host_lengths(lengths, 1, [n] * b, "lengths",
                                                              "the prompt's tokens")
        parts = _arrays.alloc_cache(fw, k, b, hkv, capacity, dim, layout, scheme)
        _quantize_prompts(fw, k, v, parts, n, prompts, layout, scheme)
        self.scheme, self.layout, self.dtype = scheme, layout, k.dtype
        self.batch, self.heads_kv, self.head_dim = b, hkv, dim
        self.capacity, self.length = capacity, n if prompts is None else max(prompts)
        self.lengths = None if prompts is None else fw.array(prompts, "int32", k)
        self.k8, self.k_scale = parts["k8"], parts["k_scale"]
        self.k_mean = parts.get("k_mean") if scheme != "paper" else None
        self.vt8, self.v_scale = parts["vt8"], parts["v_scale"]

    def __repr__(self):
        ragged = "" if self.lengths is None else f"lengths={self.lengths.tolist()}, "
        return (f"intfa.KVCache(length={self.length}, {ragged}capacity={self.capacity}, "
                f"batch={self.batch}, heads_kv={self.heads_kv}, head_dim={self.head_dim}, "
                f"layout={self.layout!r}, scheme={self.scheme!r})")

    def _all(self):
        """The cache over all capacity tokens (what append_kv writes into)."""
        return QuantizedQKV(scheme=self.scheme, layout=self.layout, q8=None, q_scale=None,
                            lse_offset=None, k8=self.k8, k_scale=self.k_scale,
                            k_mean=self.k_mean, vt8=self.vt8, v_scale=self.v_scale,
                            dtype=self.dtype)

    def append(self, k_new, v_new):
        """Appends n tokens ([B, Hkv, n, D] or [B, n, Hkv, D] in the cache's layout) at position
        length, quantized with the prompt's statistics; then length += n. Ragged: sequence b's
        at position lengths[b] (on the device), then lengths += n (in place, on the device) and
        length += n; the capacity is checked against length (the longest sequence)."""
        d = _arrays.dims(k_new.shape, self.layout, False)
        n = int(d[2]) if d is not None else 0
        if self.length + n > self.capacity:
            raise ValueError(
                f"KVCache.append: {n} new tokens do not fit: capacity {self.capacity}, length "
                f"{self.length}, n {n} (length + n = {self.length + n} > capacity)")
        lengths = self.lengths
        pos = self.length if lengths is None else lengths
        fw = self._direct(k_new, v_new)
        if fw is None:
            append_kv(self._all(), k_new, v_new, pos)
        else:  # the call append_kv() makes, without its generic steps
            parts = {"k8": self.k8, "k_scale": self.k_scale, "k_mean": self.k_mean,
                     "vt8": self.vt8, "v_scale": self.v_scale}
            _arrays.run_append_kv(fw, k_new, v_new, pos, parts, self.scheme, self.layout,
                                  self.layout)
        if lengths is not None:
            lengths += n  # in place: a framework op (a CUDA graph replays it)
        self.length += n

    def truncate(self, length):
        """Keeps the first `length` tokens (speculative decoding: drop the rejected draft tokens,
        whose slots the next append() overwrites). The statistics stay as they are: a V scale
        that grew for a dropped token keeps its growth. Ragged: `length` holds B lengths (ints,
        or an integer array of any framework), each at most that sequence's (read from the
        device); cache.lengths takes them (in place) and length their maximum."""
        if self.lengths is not None:
            held = self.lengths.tolist()
            kept = _host_lengths(length, 0, held, "KVCache.truncate", "each sequence's tokens")
            self.lengths[...] = _arrays.framework(self.lengths, "lengths").array(
                kept, "int32", self.lengths)
            self.length = max(kept)
            return
        if isinstance(length, bool) or int(length) != length or not 0 <= int(length) <= self.length:
            raise ValueError(f"KVCache.truncate: expected a length in [0, {self.length}] (the tokens "
                             f"held), got {length!r}")
        self.length = int(length)

    def sync_length(self):
        """Ragged: sets `length` (the host's bound, the views' default extent and the capacity
        check's) to the longest of `lengths` as the device holds them, and returns it. Call it
        after replaying captured steps, which advance `lengths` on the device only, before
        eager append() / attention() calls (reads the device: a synchronization)."""
        if self.lengths is None:
            raise ValueError("KVCache.sync_length: only a ragged cache (KVCache(lengths=)) keeps "
                             "its lengths on the device; a dense cache's length is the host's")
        self.length = max(int(n) for n in self.lengths.tolist())
        return self.length

    def _span(self, max_seqlen_kv):
        """The tokens attention reads views of: `length`, or (ragged) max_seqlen_kv."""
        if max_seqlen_kv is None:
            return self.length
        if self.lengths is None:
            raise ValueError("max_seqlen_kv: only a ragged cache (KVCache(lengths=)) takes it; a "
                             f"dense cache attends its length = {self.length} tokens")
        if isinstance(max_seqlen_kv, bool) or int(max_seqlen_kv) != max_seqlen_kv or \
                not 1 <= int(max_seqlen_kv) <= self.capacity:
            raise ValueError(f"max_seqlen_kv: expected an int in [1, capacity = {self.capacity}], "
                             f"got {max_seqlen_kv!r}")
        return int(max_seqlen_kv)

    def qkv(self, q8=None, q_scale=None, lse_offset=None, dtype=None, max_seqlen_kv=None):
        """A QuantizedQKV over the first `length` tokens (k8 and k_scale views; vt8 as it is,
        with capacity columns) with the given quantized queries, for attention_int8; ragged:
        with seqused_kv = lengths, over max_seqlen_kv tokens if given (see attention())."""
        span = self._span(max_seqlen_kv)
        return QuantizedQKV(scheme=self.scheme, layout=self.layout, q8=q8, q_scale=q_scale,
                            lse_offset=lse_offset,
                            k8=_arrays.first_tokens(self.k8, span, self.layout),
                            k_scale=self.k_scale[..., :span], k_mean=self.k_mean,
                            vt8=self.vt8, v_scale=self.v_scale,
                            dtype=self.dtype if dtype is None else dtype,
                            seqused_kv=self.lengths)

    def attention(self, q, *, is_causal=False, window_size=_NO_WINDOW, sinks=None, scale=None,
                  return_lse=False, path="auto", out_dtype=None, max_seqlen_kv=None,
                  softcap=None):
        """Attention of q ([B, Hq, Sq, D] or [B, Sq, Hq, D] in the cache's layout; Hq a multiple
        of Hkv) over the `length` tokens held. Causal is bottom-right aligned: query i sees keys
        j <= i + length - Sq, so the Sq queries of the last appended tokens see themselves and
        what precedes them; window_size against the same diagonal (a decode step with
        is_causal=True, window_size=(W - 1, 0) sees the last W tokens). out_dtype defaults to
        q's dtype. Other arguments (sinks and softcap included) as in attention().
        Ragged: sequence b over its lengths[b] tokens, causal and window against that count
        (query i sees keys j <= i + lengths[b] - Sq), through views of the first max_seqlen_kv tokens
        (default: length; counts past it are clamped to it). A CUDA graph captured with
        max_seqlen_kv=capacity replays at any lengths, since only the device reads them."""
        span = self._span(max_seqlen_kv)
        window = _arrays.window_arg(window_size)
        fw = self._direct(q)
        if fw is not None:
            s = _arrays.scale_arg(scale)
            z = _arrays.sinks_arg(fw, sinks, q)
            d = _arrays.dims(q.shape, self.layout, False)
            out_name = _out_dtype_name(q.dtype if out_dtype is None else out_dtype)
            # A malformed q, an out_dtype intfa does not write or sinks that need grad: the
            # generic path reports or takes them.
            if d is not None and min(d) >= 1 and out_name is not None and \
                    (z is None or self._direct(q, z) is not None):
                out, lse = self._attention_direct(fw, q, d, bool(is_causal), window, z, s,
                                                  bool(return_lse), path, out_name, span,
                                                  _arrays.softcap_arg(softcap))
                return (out, lse) if return_lse else out
        return _attend(self, q, is_causal, window, sinks, scale, return_lse, path, out_dtype,
                       softcap, max_seqlen_kv=max_seqlen_kv)

    # The eager fast path. A decode loop calls append() and attention() once per step with
    # little GPU work each, so their host time is the step's time. Plain eager calls on the
    # cache's own framework skip the generic path (a QuantizedQKV and views built per call, the
    # same checks repeated in every function, two binding calls for attention) and make the same
    # C++ calls on the same arrays: the same results and errors. Everything else (torch.compile,
    # dispatch modes, the profiler, tensors that need grad, subclasses, CuPy, mixed frameworks,
    # a malformed q) takes the generic path as before.
    def _direct(self, *arrays):
        """The framework adapter when append()/attention() on `arrays` may take the fast path:
        NumPy arrays, or torch tensors where the ops' implementations may run without the
        dispatcher (_torch._direct_ok), the cache's parts of the same type; else None."""
        parts = (self.k8, self.k_scale, self.k_mean, self.vt8, self.v_scale)
        kind = type(arrays[0])
        if kind is _np.ndarray:
            fw = _arrays.framework(arrays[0], "")
        elif _torch is not None and kind is _torch.torch.Tensor:
            if not _torch._direct_ok(arrays + parts):
                return None
            fw = _torch._FW
        else:
            return None
        for a in arrays + parts:
            if a is not None and type(a) is not kind:
                return None
        return fw

    def _attention_direct(self, fw, q, d, causal, window, sinks, scale, return_lse, path,
                          out_name, span, softcap=0.0):
        """attention() as quantize_q() and attention_int8() run it, in one binding call
        (_C.kv_attention): the same two C++ calls in that order on the same arrays, but for q8,
        q_scale and lse_offset (this call's scratch), which come from one allocation, and k8
        and k_scale, narrowed in C++ to the first `span` tokens as qkv()'s views are (and
        lengths, the cache's own int32 array or None, as qkv()'s seqused_kv). sinks: None or
        sinks_arg()'s array.
        d: q's (B, H, S, D). Returns (out, lse or None)."""
        b, h, sq, dim = (int(x) for x in d)
        # lse_offset needs the K mean (accurate); paper writes zeros (as in quantize_q()).
        with_offset = self.k_mean is not None or self.scheme == "paper"
        nbytes = _kv_scratch_bytes(b * h * sq, dim, with_offset)
        shape = _arrays.token_shape(b, h, sq, dim, self.layout)
        scratch = fw.empty((nbytes,), "uint8", q)
        out = fw.empty(shape, out_name, q)
        lse = fw.empty((b, h, sq), "float32", q) if return_lse else None
        arg = fw.arg
        with fw.device(q):
            _lib.kv_attention(arg(q), scratch, with_offset, arg(self.k8), arg(self.k_scale),
                              arg(self.k_mean), arg(self.vt8), arg(self.v_scale), span,
                              self.lengths, arg(out), lse, causal, window[0], window[1],
                              arg(sinks), scale, self.layout, self.scheme, path, fw.stream(q),
                              softcap)
        return out, lse


class PagedKVCache:
    """A paged INT8 KV cache for decoding: the prompts' K and V quantized once into pages of a
    pool shared by the batch, pages handed out as the sequences grow, attention through each
    sequence's block table (docs/PYTHON.md, "Paged KV caches").

        cache = intfa.PagedKVCache(k, v, num_pages, page_size=128, lengths=[37, 20])
        cache.append(k_new, v_new)                     # sequence b's at position lengths[b]
        out = cache.attention(q, is_causal=True)      # q: this step's queries
        cache.release(1)                               # sequence 1's pages back to the pool

    k, v: the prompts' keys and values, [B, Hkv, L0, D] ("BHSD") or [B, L0, Hkv, D] ("BSHD"),
    float16/bfloat16, torch (CPU or CUDA), CuPy or NumPy. lengths: each sequence's prompt
    length, B ints (or an integer array of any framework) in [1, L0] (default: all L0): sequence
    b's prompt is its first lengths[b] tokens (the rest is padding, never read), quantized on
    its own as KVCache(k, v, capacity, lengths=lengths) quantizes it (the same statistics and
    bytes). Schemes "accurate" and "paper".

    num_pages: the pool's pages; page_size: tokens per page, a multiple of 16 (GPU attention:
    a multiple of 128, or 16, 32 or 64); max_pages: the block table's width, the most pages a
    sequence holds (default: num_pages), so each sequence holds at most capacity = max_pages *
    page_size tokens. Pages are handed out on the host, lowest free index first:
    ceil(lengths[b] / page_size) per sequence for its prompt, then, before each append(), those
    its new tokens need. A ValueError (and nothing changed) when the pool has too few free pages
    or a sequence would pass its capacity.

    v_headroom (None, or a number >= 1): shared pages (prefix caching). By default each sequence
    has its own statistics and its V scales grow as values past them arrive (what append_kv
    does), so no page is shared. With v_headroom, the batch has one set (docs/KV_CACHE.md,
    "Shared pages"): k_mean the mean of every prompt token's K, v_scale the largest of the
    prompts' per-channel V scales times v_headroom, kept static (appends use fixed_v_scale: a V
    value past its scale saturates); k_mean and v_scale are then [Hkv, D] sets expanded to [B,
    Hkv, D] (batch stride 0). A page once written never changes, and share_prefix(dst, src,
    tokens) lets sequence dst start with src's first tokens without a copy: the pages are
    counted by reference and go back to the pool when no sequence holds them.

    Attributes: lengths (int32 [B] on the cache's device, each sequence's tokens, read by the
    kernels) and lengths_host (the same as a list of Python ints), length (the longest),
    block_table (int32 [B, max_pages] on the cache's device, -1 where no page is held), pages_free,
    num_pages, page_size, max_pages, capacity, scheme, layout, dtype (of the inputs), batch,
    heads_kv, head_dim, and the parts: the pool's pages k8 [num_pages, Hkv, page_size, D] (BSHD:
    [num_pages, page_size, Hkv, D]), k_scale [num_pages, Hkv, page_size] and vt8 [num_pages,
    Hkv, D, page_size], and the per-sequence statistics k_mean [B, Hkv, D] (None for paper) and
    v_scale [B, Hkv, D], and shared (whether v_headroom was given). Parts past a sequence's tokens
    hold no meaning.
    """

    def __init__(self, k, v, num_pages, *, page_size=128, max_pages=None, lengths=None,
                 layout="BHSD", scheme="accurate", v_headroom=None):
        fw, (b, hkv, n, dim) = _check_prompt(k, v, layout, scheme, "PagedKVCache")
        if v_headroom is not None and not (isinstance(v_headroom, (int, float)) and
                                           not isinstance(v_headroom, bool) and v_headroom >= 1):
            raise ValueError(f"v_headroom: expected None or a number >= 1 (the static V scales "
                             f"over the prompts' largest), got {v_headroom!r}")
        self.shared = v_headroom is not None
        page_size = _count_arg(page_size, "page_size", 16)
        num_pages = _count_arg(num_pages, "num_pages", 1)
        max_pages = num_pages if max_pages is None else _count_arg(max_pages, "max_pages", 1)
        prompts = None if lengths is None else _host_lengths(lengths, 1, [n] * b, "lengths",
                                                              "the prompt's tokens")
        held = [n] * b if prompts is None else prompts
        self.scheme, self.layout, self.dtype = scheme, layout, k.dtype
        self.batch, self.heads_kv, self.head_dim = b, hkv, dim
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.capacity = max_pages * page_size
        for i, m in enumerate(held):
            if m > self.capacity:
                raise ValueError(f"PagedKVCache: sequence {i}'s prompt of {m} tokens exceeds the "
                                 f"capacity max_pages * page_size = {self.capacity}")
        self._free = list(range(num_pages))  # a heap: the lowest free page first
        self._refs = [0] * num_pages  # the table entries naming each page (share_prefix)
        self._table = [[-1] * max_pages for _ in range(b)]
        self._first_held = [0] * b  # each sequence's first token still in a page (trim)
        self._allocate(held, "PagedKVCache (the prompts)")
        # The pool: V^T pages of exactly page_size columns (16-byte rows, as the GPU needs).
        self.k8 = fw.empty(_arrays.token_shape(num_pages, hkv, page_size, dim, layout), "int8",
                           k)
        self.k_scale = fw.empty((num_pages, hkv, page_size), "float32", k)
        self.vt8 = fw.empty((num_pages, hkv, dim, page_size), "int8", k)
        # The prompts quantized as KVCache(lengths=) does, into a contiguous scratch cache of
        # whole pages, whose pages are then copied into the pool's.
        span = -(-max(held) // page_size) * page_size
        parts = _arrays.alloc_cache(fw, k, b, hkv, span, dim, layout, scheme)
        for part in (self.k8, self.k_scale, self.vt8, parts["k8"], parts["k_scale"],
                     parts["vt8"]):
            part[...] = 0  # tokens no sequence holds: zeros, not uninitialized memory
        _quantize_prompts(fw, k, v, parts, n, prompts, layout, scheme)
        if self.shared:
            _share_statistics(fw, k, v, parts, held, min(n, span), layout, scheme, v_headroom)
        for i, row in enumerate(self._table):
            for j, page in enumerate(row[:-(-held[i] // page_size)]):
                t = slice(j * page_size, (j + 1) * page_size)
                self.k8[page] = parts["k8"][i, t] if layout == "BSHD" else parts["k8"][i, :, t]
                self.k_scale[page] = parts["k_scale"][i, :, t]
                self.vt8[page] = parts["vt8"][i, ..., t]
        self.k_mean = parts.get("k_mean") if scheme != "paper" else None
        self.v_scale = parts["v_scale"]
        self.lengths_host = list(held)
        self.lengths = fw.array(held, "int32", k)
        self.block_table = fw.array(self._table, "int32", k)

    @property
    def length(self):
        """The longest sequence's tokens (a Python int)."""
        return max(self.lengths_host)

    @property
    def pages_free(self):
        """The pool's pages that no sequence holds."""
        return len(self._free)

    def __repr__(self):
        return (f"intfa.PagedKVCache(lengths={self.lengths_host}, pages_free={self.pages_free}, "
                f"num_pages={self.num_pages}, page_size={self.page_size}, "
                f"max_pages={self.max_pages}, batch={self.batch}, heads_kv={self.heads_kv}, "
                f"head_dim={self.head_dim}, layout={self.layout!r}, scheme={self.scheme!r})")

    def _allocate(self, counts, what):
        """Pages for sequence b's first counts[b] tokens, taken from the free list into the
        host's table; returns the (b, j) entries set. A ValueError naming `what`, with nothing
        taken, when too few pages are free."""
        page = self.page_size
        wanted = [(b, j) for b, m in enumerate(counts)
                  for j in range(self._first_held[b] // page, -(-m // page)) if self._table[b][j] < 0]
        if len(wanted) > len(self._free):
            raise ValueError(f"{what}: needs {len(wanted)} more pages, {len(self._free)} free "
                             f"(num_pages = {self.num_pages})")
        for b, j in wanted:
            self._table[b][j] = heapq.heappop(self._free)
            self._refs[self._table[b][j]] = 1
        return wanted

    def _give_back(self, entries):
        """The host table's (b, j) entries set to -1; a page no entry names any more goes back to
        the free list."""
        for b, j in entries:
            page = self._table[b][j]
            self._refs[page] -= 1
            if self._refs[page] == 0:
                heapq.heappush(self._free, page)
            self._table[b][j] = -1

    def _write_table(self):
        """block_table (on the device) set to the host's table."""
        self.block_table[...] = _arrays.framework(self.block_table, "block_table").array(
            self._table, "int32", self.block_table)

    def qkv(self, q8=None, q_scale=None, lse_offset=None, dtype=None, max_seqlen_kv=None):
        """A QuantizedQKV over the pool (k8, k_scale, vt8 pages, block_table, seqused_kv =
        lengths) with the given quantized queries, for attention_int8 (or, without them,
        append_kv). max_seqlen_kv: the keys the table view spans, rounded up to whole pages
        (a view of the first columns; None: the whole table, capacity keys)."""
        table = self.block_table
        if max_seqlen_kv is not None:
            table = table[:, :self._table_pages(max_seqlen_kv)]
        return QuantizedQKV(scheme=self.scheme, layout=self.layout, q8=q8, q_scale=q_scale,
                            lse_offset=lse_offset, k8=self.k8, k_scale=self.k_scale,
                            k_mean=self.k_mean, vt8=self.vt8, v_scale=self.v_scale,
                            dtype=self.dtype if dtype is None else dtype,
                            seqused_kv=self.lengths, block_table=table)

    def _table_pages(self, max_seqlen_kv):
        """The table columns that span max_seqlen_kv keys (an int in [length, capacity])."""
        m = _arrays.host_ints([max_seqlen_kv])
        if m is None or not max(self.length, 1) <= m[0] <= self.capacity:
            raise ValueError(f"max_seqlen_kv: expected an int in [the longest sequence's length "
                             f"{self.length}, capacity {self.capacity}], got {max_seqlen_kv!r}")
        return -(-m[0] // self.page_size)

    def append(self, k_new, v_new):
        """Appends n tokens per sequence ([B, Hkv, n, D] or [B, n, Hkv, D] in the cache's
        layout), sequence b's at position lengths[b], quantized with its statistics (append_kv
        with per-sequence positions, through the block table); then lengths += n. The pages the
        new tokens need are taken from the pool first (block_table rewritten when any are). A
        ValueError, with nothing changed, when a sequence would pass its capacity or the pool
        has too few free pages; errors of append_kv give the pages back."""
        d = _arrays.dims(k_new.shape, self.layout, False)
        n = int(d[2]) if d is not None else 0
        for b, m in enumerate(self.lengths_host):
            if m + n > self.capacity:
                raise ValueError(
                    f"PagedKVCache.append: {n} new tokens do not fit sequence {b}: capacity "
                    f"{self.capacity} (max_pages {self.max_pages} * page_size "
                    f"{self.page_size}), length {m}, n {n} (length + n = {m + n} > capacity)")
        self._append_into_pages([m + n for m in self.lengths_host], "PagedKVCache.append",
                                 self.qkv(), k_new, v_new, self.lengths)
        self.lengths += n  # in place: a framework op
        self.lengths_host = [m + n for m in self.lengths_host]

    def append_to(self, b, k_new, v_new):
        """Appends n tokens to sequence b alone ([1, Hkv, n, D] or [1, n, Hkv, D] in the cache's
        layout) at position lengths[b], with its statistics (a request's own prompt after
        share_prefix, or a prompt chunk); then lengths[b] += n. Pages, errors and the state
        after an error as in append()."""
        b = self._sequence(b, "PagedKVCache.append_to", "b")
        d = _arrays.dims(k_new.shape, self.layout, False)
        n = int(d[2]) if d is not None else 0
        m = self.lengths_host[b]
        if m + n > self.capacity:
            raise ValueError(
                f"PagedKVCache.append_to: {n} new tokens do not fit sequence {b}: capacity "
                f"{self.capacity}, length {m} (length + n = {m + n} > capacity)")
        counts = list(self.lengths_host)
        counts[b] = m + n
        one = self.qkv()._replace(
            k_mean=None if self.k_mean is None else _arrays.batch_entry(self.k_mean, b),
            v_scale=_arrays.batch_entry(self.v_scale, b), seqused_kv=None,
            block_table=_arrays.batch_entry(self.block_table, b))
        self._append_into_pages(counts, "PagedKVCache.append_to", one, k_new, v_new, m)
        self.lengths[b] = m + n
        self.lengths_host[b] = m + n

    def share_prefix(self, dst, src, tokens):
        """Sequence dst starts with sequence src's first `tokens` tokens (a multiple of
        page_size, at most src's length): its table names src's pages for them, no bytes are
        copied, and append() / append_to() then write dst's tokens into pages of its own. Only
        for a cache with shared statistics (v_headroom), whose pages never change once written;
        dst must hold no tokens (a fresh release(dst)). The pages go back to the pool when
        neither sequence holds them any more (release, trim)."""
        dst = self._sequence(dst, "PagedKVCache.share_prefix", "dst")
        src = self._sequence(src, "PagedKVCache.share_prefix", "src")
        if not self.shared:
            raise ValueError("PagedKVCache.share_prefix: pages are shared only by a cache with one "
                             "set of static statistics (PagedKVCache(..., v_headroom=...)); this "
                             "cache grows each sequence's V scales")
        page = self.page_size
        count = _arrays.host_ints([tokens])
        m = self.lengths_host[src]
        if count is None or count[0] < page or count[0] % page or count[0] > m:
            raise ValueError(f"PagedKVCache.share_prefix: tokens: expected a positive multiple of "
                             f"page_size {page} up to sequence {src}'s length {m}, got {tokens!r}")
        tokens = count[0]
        if dst == src or self.lengths_host[dst] or any(e >= 0 for e in self._table[dst]):
            raise ValueError(f"PagedKVCache.share_prefix: dst: expected a sequence other than src "
                             f"that holds no tokens (release({dst}) first), got {dst} with length "
                             f"{self.lengths_host[dst]}")
        if self._first_held[src] > 0:
            raise ValueError(f"PagedKVCache.share_prefix: sequence {src} gave back its first "
                             f"{self._first_held[src]} tokens (trim); expected all of its prefix")
        for j in range(tokens // page):
            self._table[dst][j] = self._table[src][j]
            self._refs[self._table[src][j]] += 1
        self._write_table()
        self.lengths[dst] = tokens
        self.lengths_host[dst] = tokens
        self._first_held[dst] = 0

    def _append_into_pages(self, counts, what, cache, k_new, v_new, pos):
        """append_kv(cache, k_new, v_new, pos) after taking the pages that sequence b's first
        counts[b] tokens need (block_table rewritten when any are); an error gives them back."""
        taken = self._allocate(counts, what)
        try:
            if taken:
                self._write_table()
            append_kv(cache, k_new, v_new, pos, fixed_v_scale=self.shared)
        except BaseException:
            if taken:
                self._give_back(taken)
                self._write_table()
            raise

    def _sequence(self, b, what, name=None):
        """A sequence index argument (`name`, if given) as a Python int in [0, batch);
        ValueError otherwise."""
        index = _arrays.host_ints([b])
        if index is None or not 0 <= index[0] < self.batch:
            arg = f"{name}: " if name else ""
            raise ValueError(f"{what}: {arg}expected a sequence in [0, {self.batch}), got {b!r}")
        return index[0]

    def release(self, b):
        """Gives sequence b's pages back to the pool: its length becomes 0 and its table row -1.
        The sequence stays in the batch (its statistics as they were): a later append() writes
        its tokens from position 0, into pages taken again."""
        b = self._sequence(b, "PagedKVCache.release")
        self._give_back([(b, j) for j, page in enumerate(self._table[b]) if page >= 0])
        self._write_table()
        self.lengths[b] = 0
        self.lengths_host[b] = 0
        self._first_held[b] = 0

    def trim(self, keep):
        """Gives back the pages a local (sliding-window) layer reads no more: sequence b keeps its
        last `keep` tokens (from token lengths[b] - keep, down to the start of its page) and the
        pages wholly before them return to the pool, their block_table entries -1. A decode step
        with window_size=(W - 1, 0) reads the last W tokens of its cache after its append, so
        trim(W - 1) after each step holds at most W - 1 + page_size tokens per sequence (vLLM
        frees a sliding-window layer's blocks the same way). Later calls: append() works as before
        (the V sweep skips given-back pages); attention() checks on the host that the window of
        every query stays within the held tokens, else ValueError (a call whose first query would
        see a given-back token; without a window every token is seen). attention_int8 over qkv()
        does the same check on the CPU backend; on the GPU the kernels read no page before a
        window's first key block, and an entry of -1 reads zeros. release(b) takes sequence b back
        to no tokens. Returns the number of pages given back."""
        value = _arrays.host_ints([keep])
        if value is None or value[0] < 0:
            raise ValueError(f"PagedKVCache.trim: keep: expected an int >= 0 (tokens each sequence "
                             f"keeps), got {keep!r}")
        keep, page = value[0], self.page_size
        entries = []
        for b, m in enumerate(self.lengths_host):
            first = max(0, m - keep) // page * page
            if first > self._first_held[b]:
                entries += [(b, j) for j in range(first // page) if self._table[b][j] >= 0]
                self._first_held[b] = first
        if entries:
            self._give_back(entries)
            self._write_table()
        return len(entries)

    def _check_held(self, q, window_size):
        """attention()'s host check after trim(): every query's window starts at or after its
        sequence's first held token (query 0's first key, lengths[b] - Sq - left, is the lowest)."""
        if not any(self._first_held):
            return
        d = _arrays.dims(q.shape, self.layout, False)
        if d is None:
            return  # malformed q: attention_int8 reports it
        sq = int(d[2])
        left = _arrays.window_arg(window_size)[0]
        for b, first in enumerate(self._first_held):
            if first == 0:
                continue
            m = self.lengths_host[b]
            seen = 0 if left < 0 else max(0, m - sq - left)
            if seen < first:
                raise ValueError(
                    f"PagedKVCache.attention: sequence {b} holds tokens {first}..{m - 1} (trim() gave "
                    f"back the pages before them), but its first query sees tokens from {seen} "
                    f"(window_size {tuple(window_size)}, {sq} query rows, length {m}); expected a "
                    f"window whose left edge stays within the held tokens")

    def attention(self, q, *, is_causal=False, window_size=_NO_WINDOW, sinks=None, scale=None,
                  return_lse=False, path="auto", out_dtype=None, max_seqlen_kv=None,
                  softcap=None):
        """Attention of q ([B, Hq, Sq, D] or [B, Sq, Hq, D] in the cache's layout; Hq a multiple
        of Hkv): sequence b over its lengths[b] tokens, read through its block table; causal and
        window_size are bottom-right against that count (query i sees keys j <= i + lengths[b] -
        Sq), as a ragged KVCache's. out_dtype defaults to q's dtype. Other arguments (sinks and
        softcap included) as in attention().
        max_seqlen_kv: the key range of the call, rounded up to whole pages (a view of the
        table's first columns): None, the longest sequence's length, so that the kernels size
        their key-range splits for the tokens held, not for the table's capacity (a pool's
        max_pages is often far more than any sequence holds); an int in [length, capacity]
        fixes it (the results may differ in the last bits between ranges: the splits' partial
        sums are merged in another order).
        On the GPU: page_size a multiple of 128, or 16, 32 or 64, else RuntimeError; the decode
        path for at most 16 query rows per K/V head after GQA packing, the prefill kernels for
        more (chunks).
        After trim(): the window must stay within each sequence's held tokens (ValueError)."""
        self._check_held(q, window_size)
        span = max(self.length, 1) if max_seqlen_kv is None else max_seqlen_kv
        return _attend(self, q, is_causal, window_size, sinks, scale, return_lse, path,
                       out_dtype, softcap, max_seqlen_kv=span)


def _check_prompt(k, v, layout, scheme, cls):
    """A KV cache's prompt checked (scheme, layout, k's dims): (its framework adapter, (B, Hkv,
    L0, D)); errors name `cls`'s scheme rule and k's shape."""
    if scheme == "half":
        raise RuntimeError(f"scheme: {cls} takes 'accurate' and 'paper'; 'half' keeps V in "
                           "fp16/bf16, which append_kv does not quantize")
    fw = _frameworks(k=k, v=v)  # eager only (it allocates): no torch.compile concerns
    if layout not in _arrays.LAYOUTS:
        raise ValueError(f"layout: expected 'BHSD' or 'BSHD', got {layout!r}")
    d = _arrays.dims(k.shape, layout, False)
    if d is None:
        raise ValueError(f"k: expected 4 dims {_cache_dims(layout, 'L0')}, got shape "
                         f"{tuple(k.shape)}")
    d = tuple(int(x) for x in d)
    if min(d) < 1:
        raise ValueError(f"k: expected every size of {_cache_dims(layout, 'L0')} >= 1 (the "
                         f"prompt fixes the cache's statistics), got shape {tuple(k.shape)}")
    return fw, d


def _share_statistics(fw, k, v, parts, held, n, layout, scheme, headroom):
    """PagedKVCache(v_headroom=): the prompts' per-sequence statistics in `parts` replaced by one
    set for the batch, expanded to [B, Hkv, D] (batch stride 0): k_mean the mean of every prompt
    token's K (the sequences' means weighted by their lengths `held`; accurate only), v_scale the
    largest per-channel scale times `headroom`; then the prompts' first n tokens written again
    with the set (append_kv with fixed_v_scale: K against its mean, V by its scales)."""
    shape = tuple(parts["v_scale"].shape)
    w = _np.asarray(held, dtype=_np.float64)[:, None, None]
    vs = _np.asarray(parts["v_scale"].tolist(), dtype=_np.float32).max(axis=0)
    sets = {"v_scale": (vs * _np.float32(headroom)).astype(_np.float32)}
    if scheme == "accurate":
        km = _np.asarray(parts["k_mean"].tolist(), dtype=_np.float64)
        sets["k_mean"] = ((km * w).sum(axis=0) / w.sum()).astype(_np.float32)
    for name, values in sets.items():
        parts[name] = fw.broadcast(fw.array([values.tolist()], "float32", k), shape)
    cache = QuantizedQKV(scheme=scheme, layout=layout, q8=None, q_scale=None, lse_offset=None,
                         k8=parts["k8"], k_scale=parts["k_scale"],
                         k_mean=parts.get("k_mean") if scheme == "accurate" else None,
                         vt8=parts["vt8"], v_scale=parts["v_scale"])
    append_kv(cache, _arrays.first_tokens(k, n, layout), _arrays.first_tokens(v, n, layout), 0,
              fixed_v_scale=True)


def _quantize_prompts(fw, k, v, parts, n, prompts, layout, scheme):
    """The prompts k, v (L0 = n tokens) quantized into the first tokens of a cache's parts: all
    n at once (prompts None), or sequence b's first prompts[b] tokens on their own (ragged)."""
    if prompts is None:
        _quantize_prompt(fw, k, v, parts, n, layout, scheme)
        return
    entry = _arrays.batch_entry  # one quantize() per sequence, on batch-of-one views
    for i, m in enumerate(prompts):
        kb, vb = (_arrays.first_tokens(entry(x, i), m, layout) for x in (k, v))
        _quantize_prompt(fw, kb, vb, {p: entry(a, i) for p, a in parts.items()}, m, layout,
                         scheme)


def _attend(cache, q, is_causal, window_size, sinks, scale, return_lse, path, out_dtype,
            softcap=None, **views):
    """A cache's attention() through the public functions: quantize_q of q against its K mean,
    then attention_int8 over cache.qkv(..., **views) (out_dtype defaults to q's dtype). The
    lse_offset that quantize_q writes against the K mean (accurate; paper: zeros) is what
    attention_int8 needs for sinks and softcap."""
    q8, q_scale, lse_offset = quantize_q(q, cache.k_mean, scale=scale, layout=cache.layout,
                                         scheme=cache.scheme)
    return attention_int8(cache.qkv(q8, q_scale, lse_offset, q.dtype, **views),
                          is_causal=is_causal, window_size=window_size, sinks=sinks, scale=scale,
                          out_dtype=out_dtype, return_lse=return_lse, path=path, softcap=softcap)


def _quantize_prompt(fw, k, v, parts, n, layout, scheme):
    """quantize() of a prompt's k and v (n tokens) into the first n tokens of a cache's parts
    (as alloc_cache lays them out; their q parts are scratch)."""
    first = dict(parts)
    first["k8"] = _arrays.first_tokens(parts["k8"], n, layout)
    first["k_scale"] = parts["k_scale"][..., :n]
    q = _arrays.first_tokens(k, 1, layout)  # its quantized parts are scratch, then dropped
    if _is_torch(k):
        _torch.quantize_into_call(q, k, v, layout, scheme,
                                  *(first.get(p) for p in _arrays.PART_NAMES))
    else:
        _arrays.quantize_into(fw, q, k, v, None, None, first, layout, scheme)


def _count_arg(x, name, multiple):
    """A positive int argument (a multiple of `multiple`) as a Python int; a ValueError naming
    it otherwise."""
    value = _arrays.host_ints([x])
    if value is None or value[0] < 1 or value[0] % multiple:
        kind = "a positive int" if multiple == 1 else f"a positive multiple of {multiple}"
        raise ValueError(f"{name}: expected {kind}, got {x!r}")
    return value[0]


def _host_lengths(x, least, limits, what, limit_name):
    """A ragged cache's per-sequence lengths x (B ints, or an integer array) as a list of ints,
    entry b in [least, limits[b]]; a ValueError naming `what` otherwise."""
    values = _arrays.host_ints(x)
    if values is None or len(values) != len(limits) or \
            not all(least <= m <= top for m, top in zip(values, limits)):
        top = limits[0] if len(set(limits)) == 1 else limits
        raise ValueError(f"{what}: expected {len(limits)} ints (one per sequence), each in "
                         f"[{least}, {limit_name} {top}], got "
                         f"{values if values is not None else x!r}")
    return values


def _kv_scratch_bytes(rows, head_dim, with_offset):
    """Bytes of _C.kv_attention's scratch: q8 (rows x head_dim int8), q_scale and lse_offset
    (rows float32 each), each part rounded up to 256 bytes (intfa_ext.cpp, carve_q_parts)."""
    align = lambda n: (n + 255) // 256 * 256  # noqa: E731
    return align(rows * head_dim) + align(rows * 4) * (2 if with_offset else 1)


def _out_dtype_name(dtype):
    """The name of an output dtype attention_int8() writes (float16, bfloat16, float32), given
    as a name or a framework's dtype; None for anything else."""
    if not isinstance(dtype, str):
        try:
            dtype = _arrays.dtype_name(dtype)
        except Exception:  # not a dtype: the generic path reports it
            return None
    return dtype if dtype in ("float16", "bfloat16", "float32") else None


def _cache_dims(layout, tokens):
    return f"[B, Hkv, {tokens}, D]" if layout == "BHSD" else f"[B, {tokens}, Hkv, D]"


def attention_reference(q, k, v, *, is_causal=False, window_size=_NO_WINDOW, sinks=None,
                        scale=None, layout="BHSD", return_lse=False, softcap=None):
    """Exact attention in float64 on the CPU (intfa's accuracy oracle), for host arrays of any
    float dtype (NumPy or torch CPU). GQA is allowed; is_causal, window_size, sinks and softcap
    as in attention() (the sink logits are read as float32). Returns float64 out (and float64
    LSE)."""
    window = _arrays.window_arg(window_size)
    fw = _frameworks(q=q, k=k, v=v)
    z = _arrays.sinks_arg(fw, sinks, q)
    out = fw.empty(tuple(q.shape), "float64", q)
    rows = _arrays.rows_shape(q.shape, layout, False) if return_lse else None
    lse = fw.empty(rows, "float64", q) if rows else None
    _lib.attention_reference(fw.arg(q), fw.arg(k), fw.arg(v), fw.arg(out), fw.arg(lse),
                             bool(is_causal), window[0], window[1], fw.arg(z),
                             _arrays.scale_arg(scale), layout, _arrays.softcap_arg(softcap))
    return (out, lse) if return_lse else out


def quantized_bytes(batch, heads_q, heads_kv, seqlen_q, seqlen_kv, head_dim, scheme="accurate",
                    varlen=False, total_q=0, total_kv=0):
    """Bytes of the quantized tensors (intfa.h's quantized_bytes): the GPU workspace that
    attention() needs for this problem. For varlen, batch is the number of sequences."""
    return _lib.quantized_bytes(batch, heads_q, heads_kv, seqlen_q, seqlen_kv, head_dim,
                                scheme, varlen, total_q, total_kv)


def build_info():
    """{'version', 'cuda_built', 'cuda_archs'} of the compiled library."""
    return _lib.build_info()


def device_info(device_index=0):
    """{'present', 'name', 'major', 'minor', 'sm_count', 'memory_bytes', 'error'} of a GPU."""
    return _lib.device_info(device_index)


def resolve_gpu_path(path="auto", device_index=0):
    """The GPU path ('sm80', 'sm90' or 'decode') that `path` resolves to on a device ('auto': the
    prefill kernel, sm90 or sm80; calls with at most 16 query rows per K/V head then run the
    decode kernel); RuntimeError when
    none can run there (no GPU, not built, or the requested path is not compiled in)."""
    return _lib.resolve_gpu_path(path, device_index)


def last_gpu_path():
    """The kernel family ('sm80', 'sm90' or 'decode') that ran the calling thread's last GPU
    attention call (attention, attention_varlen, attention_int8, a KV cache's attention, the
    torch ops), e.g. to see what path="auto" chose; None before the thread's first. CPU calls,
    refused calls and calls with no rows or keys leave it as it was; CUDA graph replays run no
    host code, so it reports the call that was captured. (C++: Options::ran.)"""
    return _lib.last_gpu_path()


def _need_torch(what):
    if _torch is None:
        raise ImportError(f"intfa.{what} needs torch"
                          + (f" (importing it failed: {torch_import_error})"
                             if torch_import_error else ""))


def patch_sdpa():
    """Make torch.nn.functional.scaled_dot_product_attention use intfa for the calls it supports
    (see sdpa_supported) and torch for the rest. Idempotent; undo with unpatch_sdpa()."""
    _need_torch("patch_sdpa")
    _torch.patch_sdpa()


def unpatch_sdpa():
    """Restore torch's scaled_dot_product_attention."""
    _need_torch("unpatch_sdpa")
    _torch.unpatch_sdpa()


def sdpa_patched():
    """Context manager: patch_sdpa() inside the block, restored after."""
    _need_torch("sdpa_patched")
    return _torch.sdpa_patched()


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's signature: intfa where supported, else torch."""
    _need_torch("scaled_dot_product_attention")
    return _torch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                               is_causal, scale, enable_gqa)


def sdpa_supported(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """Whether patch_sdpa() routes this call to intfa (the rules are in docs/PYTHON.md)."""
    _need_torch("sdpa_supported")
    return _torch.sdpa_supported(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa)


def _flash_attn_args(dropout_p, alibi_slopes, causal, window_size, block_table=None):
    """FlashAttention-2's arguments that intfa does not take, refused by name; the window as
    FlashAttention reads it (causal sets its right edge to 0)."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: intfa computes inference attention, expected 0.0, got {dropout_p}")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not built in intfa (expected None)")
    if block_table is not None:
        raise NotImplementedError("block_table: intfa reads paged KV as an INT8 cache "
                                  "(intfa.PagedKVCache, attention_int8(block_table=)), not fp16/bf16 "
                                  "pages (expected None)")
    left, right = _arrays.window_arg(window_size)
    return (left, 0) if causal else (left, right)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    learnable_sink=None, scheme="accurate", path="auto"):
    """FlashAttention-2's flash_attn_func, computed by intfa: a drop-in for code written against
    flash_attn (`from intfa import flash_attn_func`).

    q: (batch, seqlen_q, nheads, headdim), k and v: (batch, seqlen_k, nheads_k, headdim) (nheads_k
    dividing nheads: GQA / MQA), float16 or bfloat16, on any device intfa runs on. causal is
    bottom-right aligned and, as in flash_attn, sets window_size's right edge to 0. Returns out
    (like q), or with return_attn_probs (out, softmax_lse, None): softmax_lse float32 (batch,
    nheads, seqlen_q); intfa never forms the probabilities, so the third item is None.
    deterministic is accepted and has no effect (the forward pass is deterministic). dropout_p
    must be 0; alibi_slopes is not built (NotImplementedError). softcap > 0 caps the scaled
    scores at softcap * tanh(s / softcap) (attention()'s softcap). learnable_sink
    (keyword; FlashAttention 4's name): one sink logit per query head, (nheads,), any float
    dtype, attention()'s sinks (softmax_lse then includes the sink, as FlashAttention 4's).
    scheme and path are intfa's (attention()).
    """
    window = _flash_attn_args(dropout_p, alibi_slopes, causal, window_size)
    r = attention(q, k, v, is_causal=causal, window_size=window, sinks=learnable_sink,
                  scale=softmax_scale, enable_gqa=True, layout="BSHD", scheme=scheme,
                  return_lse=bool(return_attn_probs), path=path, softcap=softcap)
    return (r[0], r[1], None) if return_attn_probs else r


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, learnable_sink=None,
                           scheme="accurate", path="auto"):
    """FlashAttention-2's flash_attn_varlen_func, computed by intfa (attention_varlen()).

    q: (total_q, nheads, headdim), k and v: (total_k, nheads_k, headdim), cu_seqlens_q / _k int32
    (batch + 1,) on q's device; causal and the window per sequence. softmax_lse is float32
    (nheads, total_q). block_table (fp16/bf16 pages) is not taken: intfa's paged caches are INT8
    (PagedKVCache). Otherwise (learnable_sink included) as flash_attn_func.
    """
    window = _flash_attn_args(dropout_p, alibi_slopes, causal, window_size, block_table)
    r = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         is_causal=causal, window_size=window, sinks=learnable_sink,
                         scale=softmax_scale, enable_gqa=True, scheme=scheme,
                         return_lse=bool(return_attn_probs), path=path, softcap=softcap)
    return (r[0], r[1], None) if return_attn_probs else r


def _packed_rows(query, key, attention_mask, kwargs):
    """The sequences of a padding-free packed batch (transformers' DataCollatorWithFlattening and
    the like) as (cu_q, cu_k, max_q, max_k) over the batch's flattened tokens (max_* None where
    attention_varlen is to read them from cu), or None for an ordinary batch. transformers
    passes them as cu_seq_lens_q / cu_seq_lens_k (with max_length_q / max_length_k), or only as
    position_ids that restart at 0 where a sequence starts; its flash path reads both the same
    way (position_ids only for one row of queries and keys alike, no cache). A padded batch's
    2D mask takes precedence, as there."""
    torch = _torch.torch
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and (cu_q is not None or cu_k is not None):
        if cu_q is None or cu_k is None:
            missing = "cu_seq_lens_k" if cu_k is None else "cu_seq_lens_q"
            raise ValueError(f"transformers_attention: {missing}: packed sequences need both "
                             f"cu_seq_lens_q and cu_seq_lens_k, got only one")
        cu_q, cu_k = (c.to(device=query.device, dtype=torch.int32) for c in (cu_q, cu_k))
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return (cu_q, cu_k, None if max_q is None else int(max_q),
                None if max_k is None else int(max_k))
    pos = kwargs.get("position_ids")
    if (attention_mask is not None or pos is None or not hasattr(pos, "dim") or pos.dim() != 2
            or query.shape[0] != 1 or pos.shape != (1, query.shape[2])):
        return None  # (3D position ids are M-RoPE's, not a packing)
    pos = pos[0].to(query.device)
    if bool((pos == torch.arange(pos.shape[0], device=pos.device) + pos[0]).all()):
        return None  # one sequence (positions may start past 0 over a cache)
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"transformers_attention: position_ids: restarting positions pack several sequences "
            f"in one row; over a cache of other keys (queries {query.shape[2]}, keys "
            f"{key.shape[2]}) that is not taken: expected as many keys as queries")
    starts = (pos == 0).nonzero().view(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.shape[0]])]).to(torch.int32)
    return cu, cu, None, None  # (attention_varlen reads the longest from cu)


def transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           sliding_window=None, s_aux=None, *, scheme="accurate", path="auto",
                           **kwargs):
    """An attention function for Hugging Face transformers' AttentionInterface (register it with
    register_transformers(); then attn_implementation="intfa"): transformers' calling convention
    over intfa.attention.

    query [B, Hq, Sq, D], key and value [B, Hkv, Skv, D] (torch, float16 / bfloat16; float32 is
    computed in bfloat16 and returned in float32); causal (bottom-right, so decode steps over a
    cache line up) as the module says (kwargs is_causal, else module.is_causal, else True);
    scaling the softmax scale; sliding_window W: each query sees its last W keys, window_size
    (W - 1, 0) (transformers' flash integration reads it the same way); s_aux: gpt-oss's sinks
    (one logit per query head). Returns (out [B, Sq, Hq, D], None): intfa forms no attention
    probabilities. attention_mask: None (what the mask function register_transformers() installs
    gives for a batch without padding), or a padded batch's 2D mask [B, L] (True / 1: a token),
    which runs as attention_varlen over the tokens alone (queries: the last Sq columns; each
    sequence causal against its own count, as transformers' flash path unpads), padded query
    rows giving zeros. Padding-free packed batches (one row of queries holding many sequences,
    transformers' DataCollatorWithFlattening) run as attention_varlen with each sequence causal
    against its own keys, as transformers' flash path runs them: from kwargs cu_seq_lens_q /
    cu_seq_lens_k (and max_length_q / max_length_k) when given, else from position_ids that
    restart at 0 where a sequence starts (one row, as many keys as queries). Logit soft-capping
    (kwarg softcap, Gemma 2's attn_logit_softcapping) is attention()'s softcap. A custom 4D mask
    is a NotImplementedError, as is dropout > 0 (intfa has no backward pass)."""
    _need_torch("transformers_attention")
    torch = _torch.torch
    if dropout:
        raise NotImplementedError(f"transformers_attention: dropout: intfa computes inference "
                                  f"attention (no backward pass), expected 0.0, got {dropout}")
    softcap = kwargs.get("softcap")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"transformers_attention: attention_mask: expected None or a padded batch's 2D mask "
            f"[batch, tokens] (register_transformers()' mask function gives them), got a "
            f"{tuple(attention_mask.shape)} mask: custom masks are not taken")
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    window = _NO_WINDOW
    if sliding_window is not None:
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        query, key, value = (x.to(torch.bfloat16) for x in (query, key, value))
    packed = _packed_rows(query, key, attention_mask, kwargs)
    if packed is not None:
        # Padding-free packing: the batch's rows are one token stream holding many sequences,
        # each causal against its own keys only (as transformers' flash path runs them).
        cu_q, cu_k, max_q, max_k = packed
        b, hq, sq, d = query.shape
        q_t, k_t, v_t = (x.transpose(1, 2).reshape(-1, x.shape[1], d) for x in (query, key, value))
        out = attention_varlen(q_t, k_t, v_t, cu_q, cu_k, max_q, max_k, is_causal=bool(causal),
                               window_size=window, sinks=s_aux, scale=scaling, enable_gqa=True,
                               scheme=scheme, path=path, softcap=softcap)
        return out.view(b, sq, hq, d).to(dtype), None
    if attention_mask is None:
        out = attention(query, key, value, is_causal=bool(causal), window_size=window, sinks=s_aux,
                        scale=scaling, enable_gqa=True, scheme=scheme, path=path,
                        softcap=softcap)
        return out.transpose(1, 2).to(dtype), None
    # A padded batch: its tokens packed (THD), sequence b's keys where mask[b] holds (a static
    # cache's K / V may run past the mask: cut to it), its queries where the last Sq columns do.
    mask = attention_mask.to(device=query.device, dtype=torch.bool)
    b, sq = query.shape[0], query.shape[2]
    key, value = key[:, :, :mask.shape[1]], value[:, :, :mask.shape[1]]
    qmask = mask[:, -sq:]
    q_t, k_t, v_t = query.transpose(1, 2)[qmask], key.transpose(1, 2)[mask], value.transpose(1, 2)[mask]
    counts_q, counts_k = qmask.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    cu_q, cu_k = (torch.nn.functional.pad(c.cumsum(0, dtype=torch.int32), (1, 0)) for c in (counts_q, counts_k))
    packed = attention_varlen(q_t, k_t, v_t, cu_q, cu_k, int(counts_q.max()), int(counts_k.max()),
                              is_causal=bool(causal), window_size=window, sinks=s_aux,
                              scale=scaling, enable_gqa=True, scheme=scheme, path=path,
                              softcap=softcap)
    out = packed.new_zeros(b, sq, *packed.shape[1:])
    out[qmask] = packed
    return out.to(dtype), None


def register_transformers(name="intfa"):
    """Registers transformers_attention with transformers' AttentionInterface under `name`, and
    transformers' FlashAttention mask function under the same name in its AttentionMaskInterface
    (None for a batch without padding, the 2D padding mask otherwise), so a model loaded or set
    with attn_implementation=name runs its attention on intfa: e.g. gpt-oss (sinks and sliding
    windows), Llama, Mistral, Qwen. Returns the name."""
    _need_torch("register_transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(name, transformers_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


if _torch is not None:
    _torch.intfa_attention = attention
