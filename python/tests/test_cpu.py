"""intfa through NumPy on the CPU backend: schemes, shapes, layouts, GQA, varlen, the quantized
path and the error messages the C++ layer reports."""

import re

import numpy as np
import pytest

import intfa
from paged import check_paged_parts, drop_pages, page_copy, paged_vs_ragged, unpage
from ragged import (check_parts, entry, in_layout, ragged_inputs, ragged_vs_separate, seq_view,
                    tok)
from reference import attention_ref, rel_l2, varlen_ref

SCHEMES = ("accurate", "paper", "half")
# rel. L2 bounds against float64 for N(0,1) inputs at these small sizes (measured well below).
TOL = {"accurate": 3e-2, "half": 3e-2, "paper": 6e-2}


def randn(rng, shape, dtype=np.float16):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, b, hq, hkv, sq, skv, d, layout="BHSD", dtype=np.float16):
    if layout == "BHSD":
        shapes = (b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)
    else:
        shapes = (b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d)
    return [randn(rng, s, dtype) for s in shapes]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_causal_fp16_matches_float64(scheme):
    # The acceptance check: causal, B=1, H=2, S=300, D=64, fp16, rel. L2 < 3e-2.
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 2, 2, 300, 300, 64)
    out = intfa.attention(q, k, v, is_causal=True, scheme=scheme)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16 and out.shape == q.shape
    ref, _ = attention_ref(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "b,hq,hkv,sq,skv,d,layout,causal",
    [
        (2, 2, 2, 17, 17, 64, "BHSD", False),
        (1, 3, 3, 1, 127, 128, "BHSD", True),
        (1, 2, 2, 127, 33, 32, "BSHD", False),
        (1, 2, 1, 40, 100, 16, "BSHD", True),  # causal Sq < Skv: bottom-right aligned
        (1, 1, 1, 70, 300, 256, "BHSD", True),
        (2, 4, 2, 65, 65, 48, "BHSD", True),
    ])
def test_shapes(scheme, b, hq, hkv, sq, skv, d, layout, causal):
    rng = np.random.default_rng(sq * 1000 + skv)
    q, k, v = qkv(rng, b, hq, hkv, sq, skv, d, layout)
    out, lse = intfa.attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv, layout=layout,
                               scheme=scheme, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, layout=layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == np.float32
    assert rel_l2(out, ref) < TOL[scheme]
    np.testing.assert_allclose(lse, ref_lse, atol=5e-2, rtol=0)


def test_fully_masked_rows_give_zero_and_minus_inf():
    # Causal with Sq > Skv: the first Sq - Skv queries see no key.
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 2, 2, 50, 20, 64)
    out, lse = intfa.attention(q, k, v, is_causal=True, return_lse=True)
    assert np.all(out[:, :, :30] == 0)
    assert np.all(np.isneginf(lse[:, :, :30]))
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert not np.any(np.isnan(out.astype(np.float32)))
    assert rel_l2(out[:, :, 30:], ref[:, :, 30:]) < 3e-2
    np.testing.assert_allclose(lse[:, :, 30:], ref_lse[:, :, 30:], atol=5e-2)


def test_empty_batch_queries_or_keys():
    # As torch SDPA takes them: no batch or no query rows give empty outputs; no keys give rows
    # 0 and LSE -inf; varlen batches whose sequences are all empty likewise.
    rng = np.random.default_rng(12)
    for b, sq, skv in ((0, 5, 7), (2, 0, 7), (2, 5, 0)):
        q, k, v = qkv(rng, b, 4, 2, sq, skv, 64)
        out, lse = intfa.attention(q, k, v, enable_gqa=True, return_lse=True, layout="BHSD")
        assert out.shape == q.shape and lse.shape == (b, 4, sq)
        assert np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v, cu_q, cu_kv = packed(rng, [3, 0, 4], [0, 0, 0], 4, 2, 64)
    out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, enable_gqa=True, return_lse=True)
    assert out.shape == (7, 4, 64) and np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v, cu_q, cu_kv = packed(rng, [0, 0], [5, 2], 4, 2, 64)
    assert intfa.attention_varlen(q, k, v, cu_q, cu_kv, enable_gqa=True).shape == (0, 4, 64)


def test_scale():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 2, 2, 64, 80, 64)
    out = intfa.attention(q, k, v, scale=0.3)
    ref, _ = attention_ref(q, k, v, scale=0.3)
    assert rel_l2(out, ref) < 3e-2
    default = intfa.attention(q, k, v)
    explicit = intfa.attention(q, k, v, scale=1 / 8)
    np.testing.assert_array_equal(default, explicit)


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa(hkv):
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 2, 4, hkv, 33, 47, 64)
    out = intfa.attention(q, k, v, enable_gqa=True, is_causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2
    with pytest.raises(ValueError, match="enable_gqa"):
        intfa.attention(q, k, v)


def test_layouts_and_strided_views_agree():
    # BSHD data, and the same memory seen as BHSD through a transposed (non-contiguous) view:
    # DLPack hands the strides through, no copy is made, and the results are identical.
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 2, 3, 3, 29, 41, 64, layout="BSHD")
    out_bshd = intfa.attention(q, k, v, layout="BSHD", is_causal=True)
    views = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    assert not views[0].flags.c_contiguous
    out_bhsd = intfa.attention(*views, layout="BHSD", is_causal=True)
    np.testing.assert_array_equal(out_bshd.transpose(0, 2, 1, 3), out_bhsd)
    contiguous = [np.ascontiguousarray(x) for x in views]
    np.testing.assert_array_equal(out_bhsd, intfa.attention(*contiguous, is_causal=True))


def test_read_only_inputs():
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    for x in (q, k, v):
        x.setflags(write=False)
    out = intfa.attention(q, k, v)
    ref, _ = attention_ref(q, k, v)
    assert rel_l2(out, ref) < 3e-2


def test_bfloat16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, 1, 2, 2, 100, 100, 64, dtype=ml_dtypes.bfloat16)
    out, lse = intfa.attention(q, k, v, is_causal=True, return_lse=True)
    assert out.dtype == ml_dtypes.bfloat16
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse, ref_lse, atol=5e-2)


# ------------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------------
def packed(rng, lens_q, lens_kv, hq, hkv, d, dtype=np.float16):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_kv = np.concatenate([[0], np.cumsum(lens_kv)]).astype(np.int32)
    q = randn(rng, (cu_q[-1], hq, d), dtype)
    k = randn(rng, (cu_kv[-1], hkv, d), dtype)
    v = randn(rng, (cu_kv[-1], hkv, d), dtype)
    return q, k, v, cu_q, cu_kv


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(scheme, causal):
    rng = np.random.default_rng(8)
    # An empty query sequence, one with no keys (fully masked), Sq < Skv and Sq > Skv.
    q, k, v, cu_q, cu_kv = packed(rng, [5, 0, 70, 30, 4], [9, 3, 64, 20, 0], 4, 2, 64)
    out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, is_causal=causal, enable_gqa=True,
                                      scheme=scheme, return_lse=True)
    ref, ref_lse = varlen_ref(q, k, v, cu_q, cu_kv, causal=causal)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert rel_l2(out, ref) < TOL[scheme]
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=5e-2)
    np.testing.assert_array_equal(out[cu_q[4]:], 0)  # the sequence without keys


def test_varlen_explicit_max_seqlen_and_errors():
    rng = np.random.default_rng(9)
    q, k, v, cu_q, cu_kv = packed(rng, [10, 20], [15, 25], 2, 2, 64)
    a = intfa.attention_varlen(q, k, v, cu_q, cu_kv)
    b = intfa.attention_varlen(q, k, v, cu_q, cu_kv, 20, 25)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        intfa.attention_varlen(q, k, v, cu_q, cu_kv, 19, 25)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype int32, got float32"):
        intfa.attention_varlen(q, k, v, cu_q.astype(np.float32), cu_kv)
    with pytest.raises(TypeError, match="cu_seqlens_kv: dtype int64"):
        intfa.attention_varlen(q, k, v, cu_q, cu_kv.astype(np.int64))
    bad = cu_q.copy()
    bad[-1] = 29
    with pytest.raises(ValueError, match="cu_seqlens_q: expected last value 30"):
        intfa.attention_varlen(q, k, v, bad, cu_kv)
    with pytest.raises(ValueError, match="enable_gqa"):
        intfa.attention_varlen(q, k[:, :1], v[:, :1], cu_q, cu_kv)


# ------------------------------------------------------------------------------------------------
# quantize + attention_int8
# ------------------------------------------------------------------------------------------------
def quantize_rows_ref(x):
    """intfa.h's rounding rule per last-dim row: (int8 values, fp32 scales)."""
    x = x.astype(np.float32)
    amax = np.abs(x).max(axis=-1)
    safe = np.where(amax == 0, np.float32(1), amax)
    scale = np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax == 0, np.float32(1), np.float32(127) / safe).astype(np.float32)
    q8 = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    return q8, scale


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_quantize_then_attention_int8_equals_attention(scheme, layout):
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, 2, 4, 2, 45, 70, 64, layout)
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    assert x.scheme == scheme and x.layout == layout and x.dtype == np.float16
    assert x.q8.shape == q.shape and x.q8.dtype == np.int8 and x.k8.shape == k.shape
    assert x.q_scale.shape == (2, 4, 45) and x.k_scale.shape == (2, 2, 70)
    if scheme == "half":
        assert x.vt8 is None and x.v is v
    else:
        # V transposed; columns past seqlen_kv (if any) are the kernels' padding.
        assert x.vt8.shape[:3] == (2, 2, 64) and x.vt8.shape[3] >= 70
        assert x.v_scale.shape == (2, 2, 64)
    out, lse = intfa.attention_int8(x, is_causal=True, return_lse=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, layout=layout, scheme=scheme,
                                     enable_gqa=True, return_lse=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    out32 = intfa.attention_int8(x, is_causal=True, out_dtype="float32")
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, want.astype(np.float32), atol=2e-3)


def test_quantize_rounding_rule_paper():
    # Q and K per token, V per tensor, all by the documented rule, bit for bit.
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, 1, 2, 2, 33, 50, 64)
    q[0, 0, 3] = 0  # an all-zero row gets scale 1
    x = intfa.quantize(q, k, v, scheme="paper")
    q8, qs = quantize_rows_ref(q)
    k8, ks = quantize_rows_ref(k)
    np.testing.assert_array_equal(x.q8, q8)
    np.testing.assert_array_equal(x.q_scale, qs)
    assert x.q_scale[0, 0, 3] == 1
    np.testing.assert_array_equal(x.k8, k8)
    np.testing.assert_array_equal(x.k_scale, ks)
    vt8, vs = quantize_rows_ref(v.reshape(1, 2, 1, -1))
    np.testing.assert_array_equal(x.vt8[..., :50], vt8.reshape(v.shape).transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(x.v_scale, np.broadcast_to(vs, (1, 2, 64)))


def test_quantize_rounding_rule_accurate():
    # K smoothed by its per-channel mean (fp64 sum, rounded to fp16), V per channel.
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, 1, 2, 2, 20, 40, 64)
    k = (k + 3).astype(np.float16)
    x = intfa.quantize(q, k, v, scheme="accurate")
    kmean = (k.astype(np.float64).sum(axis=2) / k.shape[2]).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(x.k_mean, kmean.astype(np.float32))
    k8, ks = quantize_rows_ref(k.astype(np.float32) - kmean.astype(np.float32)[:, :, None, :])
    np.testing.assert_array_equal(x.k8, k8)
    np.testing.assert_array_equal(x.k_scale, ks)
    vt8, vs = quantize_rows_ref(v.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(x.vt8[..., :40], vt8)
    np.testing.assert_array_equal(x.v_scale, vs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_varlen(scheme):
    rng = np.random.default_rng(13)
    q, k, v, cu_q, cu_kv = packed(rng, [7, 30, 12], [9, 40, 12], 2, 1, 64)
    x = intfa.quantize(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, scheme=scheme)
    assert x.q_scale.shape == (2, 49) and x.k_scale.shape == (1, 61)
    assert x.k_mean.shape == (3, 1, 64)
    if scheme != "half":
        assert x.vt8.shape[:2] == (1, 64) and x.vt8.shape[2] >= 61
    out = intfa.attention_int8(x, is_causal=True)
    want = intfa.attention_varlen(q, k, v, cu_q, cu_kv, is_causal=True, enable_gqa=True,
                                  scheme=scheme)
    np.testing.assert_array_equal(out, want)


def test_attention_int8_errors():
    rng = np.random.default_rng(14)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    x = intfa.quantize(q, k, v)
    with pytest.raises(ValueError, match="k_scale"):
        intfa.attention_int8(x._replace(k_scale=x.k_scale[:, :, :8]))
    with pytest.raises(TypeError, match="q8"):
        intfa.attention_int8(x._replace(q8=x.q8.astype(np.int32)))
    with pytest.raises(TypeError, match="out"):
        intfa.attention_int8(x, out_dtype="float64")


# ------------------------------------------------------------------------------------------------
# errors and the rest of the API
# ------------------------------------------------------------------------------------------------
def test_errors_keep_the_cpp_messages():
    rng = np.random.default_rng(15)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    with pytest.raises(ValueError, match="head_dim expected 64 .as q., got 32") as e:
        intfa.attention(q, k[..., :32], v)
    assert "dim" in str(e.value)
    with pytest.raises(ValueError, match="v: head_dim"):
        intfa.attention(q, k, v[..., :32])
    with pytest.raises(TypeError, match="q: expected dtype float16 or bfloat16, got float32"):
        intfa.attention(q.astype(np.float32), k, v)
    with pytest.raises(TypeError, match="k: expected dtype float16 or bfloat16, got float32"):
        intfa.attention(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        intfa.attention(q[0], k, v)
    with pytest.raises(ValueError, match="v: seqlen expected 16"):
        intfa.attention(q, k, v[:, :, :8])
    with pytest.raises(ValueError, match="head_dim: expected a multiple of 16"):
        intfa.attention(q[..., :8], k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="layout: expected 'BHSD' or 'BSHD'"):
        intfa.attention(q, k, v, layout="SBHD")
    with pytest.raises(ValueError, match="scheme: expected"):
        intfa.attention(q, k, v, scheme="fp8")
    with pytest.raises(ValueError, match="scale"):
        intfa.attention(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match="scale: expected a finite value"):
        intfa.attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="k: expected a numpy.ndarray"):
        intfa.attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match="dtype int64"):
        intfa.attention(q, k, v.astype(np.int64))
    with pytest.raises(ValueError, match="dim 1 .heads. must be >= 1, got 0"):
        intfa.attention(q[:, :0], k[:, :0], v[:, :0])  # (no query rows is fine: empty_batch_...)
    with pytest.raises(ValueError, match="k: heads_kv = 3 must divide heads_q = 2"):
        k3 = np.concatenate([k, k[:, :1]], axis=1)
        intfa.attention(q, k3, k3, enable_gqa=True)


def test_attention_reference():
    rng = np.random.default_rng(16)
    q, k, v = qkv(rng, 1, 4, 2, 30, 50, 64)
    out, lse = intfa.attention_reference(q, k, v, is_causal=True, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


def test_info_and_sizes():
    info = intfa.build_info()
    assert info["version"] == intfa.__version__
    assert isinstance(info["cuda_built"], bool)
    dev = intfa.device_info()
    assert set(dev) >= {"present", "name", "major", "minor", "error"}
    n = intfa.quantized_bytes(2, 8, 2, 100, 200, 64)
    assert n >= 2 * 8 * 100 * 64 + 2 * 2 * 200 * 64 * 2
    assert n % 256 == 0
    if not dev["present"]:
        with pytest.raises(RuntimeError):
            intfa.resolve_gpu_path()


def test_last_gpu_path_unchanged_by_cpu_calls():
    # last_gpu_path() reports GPU calls only (test_gpu.py): a CPU call leaves it as it was.
    rng = np.random.default_rng(18)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    before = intfa.last_gpu_path()
    assert before in (None, "sm80", "sm90", "decode")
    intfa.attention(q, k, v, path="sm90")
    assert intfa.last_gpu_path() == before


def test_gpu_path_names_on_host_arrays():
    # NumPy arrays are host memory: the CPU backend serves them whatever the build; a GPU path
    # name is accepted and ignored there.
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    np.testing.assert_array_equal(intfa.attention(q, k, v, path="sm90"), intfa.attention(q, k, v))
    with pytest.raises(ValueError, match="path: expected 'auto', 'sm80', 'sm90' or 'decode', got 'sm70'"):
        intfa.attention(q, k, v, path="sm70")


# ------------------------------------------------------------------------------------------------
# INT8 KV cache: quantize_q, append_kv, KVCache
# ------------------------------------------------------------------------------------------------
def tokens(x, a, b, layout="BHSD"):
    """Tokens a:b of a [B, H, S, D] (or BSHD) array."""
    return x[:, a:b] if layout == "BSHD" else x[:, :, a:b]


def kv_rule_ref(k_new, v_new, k_mean, v_scale):
    """append_kv's documented rule in NumPy (BHSD): K' = K - k_mean by the per-token rule; V^T
    columns by clamp(round_half_even(v * fp32(1 / v_scale))) (when no scale grows)."""
    km = np.float32(0) if k_mean is None else k_mean[:, :, None, :]
    k8, ks = quantize_rows_ref(k_new.astype(np.float32) - km)
    inv = np.where(v_scale >= np.float32(2.0 ** -100), np.float32(1) / v_scale, np.float32(1))
    vt = v_new.astype(np.float32).transpose(0, 1, 3, 2) * inv.astype(np.float32)[..., None]
    return k8, ks, np.clip(np.rint(vt), -127, 127).astype(np.int8)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_quantize_q_equals_quantize(scheme, layout):
    rng = np.random.default_rng(20)
    q, k, v = qkv(rng, 2, 4, 2, 23, 50, 64, layout)
    k = (k + 2).astype(np.float16)  # a per-channel offset: lse_offset is far from 0
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    q8, q_scale, lse_offset = intfa.quantize_q(q, x.k_mean, layout=layout, scheme=scheme)
    assert isinstance(q8, np.ndarray) and q8.dtype == np.int8 and q8.shape == q.shape
    assert q_scale.shape == lse_offset.shape == (2, 4, 23)
    np.testing.assert_array_equal(q8, x.q8)
    np.testing.assert_array_equal(q_scale, x.q_scale)
    np.testing.assert_array_equal(lse_offset, x.lse_offset)  # exact on the CPU
    if scheme == "paper":
        assert np.all(lse_offset == 0)
    # Without the K mean there is no lse_offset (paper has none to compute: zeros).
    q8n, q_scale_n, lse_n = intfa.quantize_q(q, layout=layout, scheme=scheme)
    np.testing.assert_array_equal(q8n, x.q8)
    np.testing.assert_array_equal(q_scale_n, x.q_scale)
    assert (lse_n is None) == (scheme != "paper")
    # The softmax scale enters lse_offset only.
    q8s, _, lse_s = intfa.quantize_q(q, x.k_mean, scale=0.3, layout=layout, scheme=scheme)
    np.testing.assert_array_equal(q8s, x.q8)
    np.testing.assert_allclose(lse_s, x.lse_offset * (0.3 * 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_kv_cache_prompt_equals_quantize(scheme, layout):
    rng = np.random.default_rng(21)
    q, k, v = qkv(rng, 2, 4, 2, 37, 37, 64, layout)
    k = (k + 1).astype(np.float16)
    cache = intfa.KVCache(k, v, 100, layout=layout, scheme=scheme)
    assert (cache.length, cache.capacity, cache.scheme, cache.layout) == (37, 100, scheme, layout)
    assert cache.dtype == np.float16
    assert (cache.batch, cache.heads_kv, cache.head_dim) == (2, 2, 64)
    assert cache.k8.shape == ((2, 100, 2, 64) if layout == "BSHD" else (2, 2, 100, 64))
    assert cache.k_scale.shape == (2, 2, 100)
    assert cache.vt8.shape[:3] == (2, 2, 64) and cache.vt8.shape[3] >= 100
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    np.testing.assert_array_equal(tokens(cache.k8, 0, 37, layout), x.k8)
    np.testing.assert_array_equal(cache.k_scale[..., :37], x.k_scale)
    np.testing.assert_array_equal(cache.vt8[..., :37], x.vt8[..., :37])
    np.testing.assert_array_equal(cache.v_scale, x.v_scale)
    if scheme == "paper":
        assert cache.k_mean is None
    else:
        np.testing.assert_array_equal(cache.k_mean, x.k_mean)
    # Attention over the prompt through the cache: the same bits as the fp16 entry point.
    out, lse = cache.attention(q, is_causal=True, return_lse=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, enable_gqa=True, layout=layout,
                                     scheme=scheme, return_lse=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    assert "length=37" in repr(cache) and "capacity=100" in repr(cache)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_kv_cache_append_follows_the_rule(scheme, layout):
    # Appended K is quantized by the per-token rule against the prompt's K mean (bit for bit
    # what quantize() does with that mean); appended V within the prompt's range by
    # v * (1 / v_scale), the scales unchanged. Token by token equals all at once.
    rng = np.random.default_rng(22)
    _, k, v = qkv(rng, 1, 2, 2, 1, 45, 64, layout)
    k = (k + 2).astype(np.float16)
    v = np.concatenate([tokens(v, 0, 37, layout),
                        (tokens(v, 37, 45, layout) * 0.5).astype(np.float16)],
                       axis=1 if layout == "BSHD" else 2)
    one = intfa.KVCache(tokens(k, 0, 37, layout), tokens(v, 0, 37, layout), 48, layout=layout,
                        scheme=scheme)
    block = intfa.KVCache(tokens(k, 0, 37, layout), tokens(v, 0, 37, layout), 45,
                          layout=layout, scheme=scheme)
    v_scale = one.v_scale.copy()
    for t in range(37, 45):
        one.append(tokens(k, t, t + 1, layout), tokens(v, t, t + 1, layout))
    block.append(tokens(k, 37, 45, layout), tokens(v, 37, 45, layout))
    assert one.length == block.length == 45
    np.testing.assert_array_equal(one.v_scale, v_scale)
    to_bhsd = (lambda a: a.transpose(0, 2, 1, 3)) if layout == "BSHD" else (lambda a: a)
    k8, ks, vt8 = kv_rule_ref(to_bhsd(tokens(k, 37, 45, layout)),
                              to_bhsd(tokens(v, 37, 45, layout)), one.k_mean, v_scale)
    for c in (one, block):
        np.testing.assert_array_equal(to_bhsd(tokens(c.k8, 37, 45, layout)), k8)
        np.testing.assert_array_equal(c.k_scale[..., 37:45], ks)
        np.testing.assert_array_equal(c.vt8[..., 37:45], vt8)
    np.testing.assert_array_equal(tokens(one.k8, 0, 45, layout), tokens(block.k8, 0, 45, layout))
    np.testing.assert_array_equal(one.vt8[..., :45], block.vt8[..., :45])
    # The appended K equals quantize()'s K of the whole sequence when its K mean is the prompt's
    # (the paper scheme has no mean: always).
    if scheme == "paper":
        x = intfa.quantize(k, k, v, layout=layout, scheme=scheme)
        np.testing.assert_array_equal(tokens(one.k8, 0, 45, layout), x.k8)
        np.testing.assert_array_equal(one.k_scale[..., :45], x.k_scale)


def test_kv_cache_v_scale_grows_for_values_beyond_the_prompt():
    # A new V value past a channel's range grows that channel's scale (the columns held are
    # requantized to it) instead of clamping: attention stays accurate.
    rng = np.random.default_rng(23)
    q, k, v = qkv(rng, 1, 2, 2, 1, 38, 64)
    v[0, 0, 37, :8] *= 6  # channels 0..7 of head 0: beyond the prompt's range
    cache = intfa.KVCache(k[:, :, :37], v[:, :, :37], 64)
    before = cache.v_scale.copy()
    cache.append(k[:, :, 37:], v[:, :, 37:])
    vf = v.astype(np.float32)
    amax = np.abs(vf[0, 0, :, :8]).max(axis=0)
    assert np.all(cache.v_scale[0, 0, :8] >= amax / 127)
    grew = cache.v_scale != before
    assert grew[0, 0, :8].any()
    np.testing.assert_array_equal(cache.v_scale[~grew], before[~grew])
    # Every value held dequantizes to within one step of its scale (none clamped).
    deq = cache.vt8[..., :38].astype(np.float32) * cache.v_scale[..., None]
    err = np.abs(deq - vf.transpose(0, 1, 3, 2))
    assert np.all(err <= cache.v_scale[..., None] * 1.01)
    out = cache.attention(q, is_causal=True)
    ref = intfa.attention_reference(q, k, v, is_causal=True)
    assert rel_l2(out, ref) < 3e-2


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("hq,hkv,layout", [(2, 2, "BHSD"), (4, 2, "BHSD"), (4, 2, "BSHD")])
def test_kv_cache_decode_loop(scheme, hq, hkv, layout):
    # A 37-token prompt, then 5 decode steps (append one token, attend with its query), then a
    # chunk of 3 tokens at once (causal, bottom-right: each query sees itself and its past),
    # against float64 attention over the full float inputs up to that step.
    rng = np.random.default_rng(24)
    n0, steps = 37, 5
    total = n0 + steps + 3
    q, k, v = qkv(rng, 2, hq, hkv, total, total, 64, layout)
    cache = intfa.KVCache(tokens(k, 0, n0, layout), tokens(v, 0, n0, layout), 64,
                          layout=layout, scheme=scheme)
    tol = 0.05  # measured <= 0.017 for both schemes
    end = n0
    for n in [1] * steps + [3]:
        cache.append(tokens(k, end, end + n, layout), tokens(v, end, end + n, layout))
        end += n
        assert cache.length == end
        qt = tokens(q, end - n, end, layout)
        out, lse = cache.attention(qt, is_causal=True, return_lse=True)
        assert out.shape == qt.shape and out.dtype == np.float16
        assert lse.shape == (2, hq, n)
        ref, ref_lse = intfa.attention_reference(qt, tokens(k, 0, end, layout),
                                                 tokens(v, 0, end, layout), is_causal=True,
                                                 layout=layout, return_lse=True)
        assert rel_l2(out, ref) < tol, (end, rel_l2(out, ref))
        np.testing.assert_allclose(lse, ref_lse, atol=5e-2)
    assert cache.length == total
    out32 = cache.attention(tokens(q, total - 1, total, layout), out_dtype="float32", scale=0.1)
    ref = intfa.attention_reference(tokens(q, total - 1, total, layout), k, v, scale=0.1,
                                    layout=layout)
    assert out32.dtype == np.float32 and rel_l2(out32, ref) < tol


def test_kv_cache_truncate_for_speculative_steps():
    # A speculative step: 4 draft tokens appended and attended, 1 accepted, the other 3 dropped;
    # then the next token goes where the first rejected one was. The cache then holds what a
    # cache given only the kept tokens holds (values within the prompt's V range: no scale grew).
    rng = np.random.default_rng(31)
    n0 = 40
    q, k, v = qkv(rng, 1, 4, 2, n0 + 8, n0 + 8, 64, "BHSD")
    k[:, :, n0:] *= 0.5
    v[:, :, n0:] *= 0.5
    spec = intfa.KVCache(k[:, :, :n0], v[:, :, :n0], 64)
    plain = intfa.KVCache(k[:, :, :n0], v[:, :, :n0], 64)
    spec.append(k[:, :, n0:n0 + 4], v[:, :, n0:n0 + 4])
    out = spec.attention(q[:, :, n0:n0 + 4], is_causal=True)
    assert out.shape == (1, 4, 4, 64)
    spec.truncate(n0 + 1)
    assert spec.length == n0 + 1
    spec.append(k[:, :, n0 + 5:n0 + 6], v[:, :, n0 + 5:n0 + 6])
    plain.append(k[:, :, n0:n0 + 1], v[:, :, n0:n0 + 1])
    plain.append(k[:, :, n0 + 5:n0 + 6], v[:, :, n0 + 5:n0 + 6])
    L = n0 + 2
    np.testing.assert_array_equal(spec.k8[:, :, :L], plain.k8[:, :, :L])
    np.testing.assert_array_equal(spec.k_scale[..., :L], plain.k_scale[..., :L])
    np.testing.assert_array_equal(spec.vt8[..., :L], plain.vt8[..., :L])
    np.testing.assert_array_equal(spec.v_scale, plain.v_scale)
    qt = q[:, :, n0 + 5:n0 + 6]
    np.testing.assert_array_equal(spec.attention(qt), plain.attention(qt))
    for bad in (-1, L + 1, 1.5, True):
        with pytest.raises(ValueError, match=r"KVCache.truncate: expected a length in \[0, 42\]"):
            spec.truncate(bad)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("b,layout", [(1, "BHSD"), (2, "BHSD"), (1, "BSHD"), (2, "BSHD")])
def test_kv_cache_fast_path_equals_the_generic_calls(scheme, b, layout, monkeypatch):
    # KVCache.append() and attention() call the binding directly for plain arrays (attention:
    # one call, _C.kv_attention, with the cache's arrays whole): the same bits as what they
    # stand for, append_kv() and quantize_q() + attention_int8() over qkv()'s views.
    rng = np.random.default_rng(28)
    n0, total = 30, 37
    q, k, v = qkv(rng, b, 4, 2, total, total, 64, layout)
    k = (k + 1).astype(np.float16)
    v[tuple([slice(None)] * 3 + [slice(0, 4)])] *= 3  # some V values past the prompt's range
    fast = intfa.KVCache(tokens(k, 0, n0, layout), tokens(v, 0, n0, layout), 40, layout=layout,
                         scheme=scheme)
    ref = intfa.KVCache(tokens(k, 0, n0, layout), tokens(v, 0, n0, layout), 40, layout=layout,
                        scheme=scheme)
    lib = intfa._arrays.lib
    kv_attention, calls = lib.kv_attention, []
    monkeypatch.setattr(lib, "kv_attention", lambda *a: calls.append(1) or kv_attention(*a))
    end = n0
    for i, n in enumerate([1, 1, 2, 1, 1, 1]):
        kt, vt = tokens(k, end, end + n, layout), tokens(v, end, end + n, layout)
        fast.append(kt, vt)
        intfa.append_kv(ref, kt, vt, end)
        end += n
        ref.length = end
        kw = dict(is_causal=i % 2 == 0, scale=None if i < 3 else 0.2,
                  out_dtype=[None, "float32", np.float32, None, "float16", None][i])
        qt = tokens(q, end - n, end, layout)
        got = fast.attention(qt, return_lse=i != 2, **kw)
        q8, q_scale, lse_offset = intfa.quantize_q(qt, ref.k_mean, scale=kw["scale"],
                                                   layout=layout, scheme=scheme)
        want = intfa.attention_int8(ref.qkv(q8, q_scale, lse_offset, qt.dtype),
                                    return_lse=i != 2, **kw)
        if i == 2:
            got, want = (got,), (want,)
        for g, w in zip(got, want):
            assert type(g) is np.ndarray and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
        assert fast.length == end
        np.testing.assert_array_equal(tokens(fast.k8, 0, end, layout),
                                      tokens(ref.k8, 0, end, layout))
        np.testing.assert_array_equal(fast.k_scale[..., :end], ref.k_scale[..., :end])
        np.testing.assert_array_equal(fast.vt8[..., :end], ref.vt8[..., :end])
        np.testing.assert_array_equal(fast.v_scale, ref.v_scale)
    assert len(calls) == 6
    # What the fast path leaves to the generic one: a malformed q and an out_dtype intfa does
    # not write report the same errors as before.
    with pytest.raises(ValueError, match="scale: expected a non-zero value"):
        fast.attention(qt, scale=0.0)
    with pytest.raises(TypeError, match="out"):
        fast.attention(qt, out_dtype="int8")
    with pytest.raises(ValueError, match="q"):
        fast.attention(qt[0])
    assert len(calls) == 6


def test_kv_cache_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(25)
    q, k, v = qkv(rng, 1, 4, 2, 41, 41, 64, dtype=ml_dtypes.bfloat16)
    cache = intfa.KVCache(k[:, :, :40], v[:, :, :40], 41)
    cache.append(k[:, :, 40:], v[:, :, 40:])
    out = cache.attention(q[:, :, 40:], is_causal=True)
    assert out.dtype == ml_dtypes.bfloat16
    ref = intfa.attention_reference(q[:, :, 40:], k, v, is_causal=True)
    assert rel_l2(out, ref) < 0.05


def test_append_kv_low_level():
    # append_kv on quantize()'s result: tokens overwritten in place at any position.
    rng = np.random.default_rng(26)
    q, k, v = qkv(rng, 1, 2, 2, 8, 40, 64)
    x = intfa.quantize(q, k, v)
    k2 = (k * 0.5).astype(np.float16)
    v2 = (v * 0.5).astype(np.float16)
    assert intfa.append_kv(x, k2[:, :, 10:13], v2[:, :, 10:13], 10) is None
    k8, ks, vt8 = kv_rule_ref(k2[:, :, 10:13], v2[:, :, 10:13], x.k_mean, x.v_scale)
    np.testing.assert_array_equal(x.k8[:, :, 10:13], k8)
    np.testing.assert_array_equal(x.k_scale[..., 10:13], ks)
    np.testing.assert_array_equal(x.vt8[..., 10:13], vt8)
    # BSHD new tokens into a BHSD cache.
    x2 = intfa.quantize(q, k, v)
    intfa.append_kv(x2, k2[:, :, 10:13].transpose(0, 2, 1, 3).copy(),
                    v2[:, :, 10:13].transpose(0, 2, 1, 3).copy(), 10, layout="BSHD")
    np.testing.assert_array_equal(x2.k8, x.k8)
    np.testing.assert_array_equal(x2.vt8[..., :40], x.vt8[..., :40])
    # A KVCache is a cache too: append_kv writes its buffers, only append() moves length.
    a = intfa.KVCache(k[:, :, :30], v[:, :, :30], 40)
    b = intfa.KVCache(k[:, :, :30], v[:, :, :30], 40)
    intfa.append_kv(a, k2[:, :, 30:33], v2[:, :, 30:33], 30)
    b.append(k2[:, :, 30:33], v2[:, :, 30:33])
    assert a.length == 30 and b.length == 33
    np.testing.assert_array_equal(a.k8[:, :, :33], b.k8[:, :, :33])
    np.testing.assert_array_equal(a.vt8[..., :33], b.vt8[..., :33])


def test_append_kv_fixed_v_scale_with_shared_statistics():
    # One set of statistics for the batch (NumPy broadcast views, batch stride 0) and
    # fixed_v_scale: the bytes a per-sequence copy of the set gives, values past a scale
    # saturated, v_scale never written; attention the same bits. Without fixed_v_scale the
    # shared scales are refused (append_kv would grow them per sequence).
    rng = np.random.default_rng(31)
    q, k, v = qkv(rng, 3, 4, 2, 1, 40, 64)
    x = intfa.quantize(q, k, v)
    km = np.broadcast_to(x.k_mean[:1], x.k_mean.shape)
    vs = np.broadcast_to(x.v_scale[:1], x.v_scale.shape)
    assert km.strides[0] == 0 and vs.strides[0] == 0
    shared = x._replace(k_mean=km, v_scale=vs)
    copied = x._replace(k8=x.k8.copy(), k_scale=x.k_scale.copy(), vt8=x.vt8.copy(),
                        k_mean=np.ascontiguousarray(km), v_scale=np.ascontiguousarray(vs))
    k2 = (k[:, :, 10:13] * 4).astype(np.float16)
    v2 = (v[:, :, 10:13] * 4).astype(np.float16)
    for c in (shared, copied):
        assert intfa.append_kv(c, k2, v2, 10, fixed_v_scale=True) is None
    for part in ("k8", "k_scale", "vt8"):
        np.testing.assert_array_equal(getattr(shared, part), getattr(copied, part))
    np.testing.assert_array_equal(copied.v_scale, vs)
    assert (np.abs(copied.vt8[..., 10:13].astype(np.int32)) == 127).any()  # saturated
    outs = []
    for c in (shared, copied):
        q8, q_scale, lse_offset = intfa.quantize_q(q, c.k_mean)
        outs.append(intfa.attention_int8(c._replace(q8=q8, q_scale=q_scale,
                                                    lse_offset=lse_offset)))
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match=r"cache.v_scale: a batch stride of 0 .*fixed_v_scale"):
        intfa.append_kv(shared, k2, v2, 10)


def test_kv_cache_errors():
    rng = np.random.default_rng(27)
    q, k, v = qkv(rng, 1, 4, 2, 1, 40, 64)
    cache = intfa.KVCache(k[:, :, :38], v[:, :, :38], 40)
    with pytest.raises(ValueError, match=r"capacity 40, length 38, n 3"):
        cache.append(k[:, :, :3], v[:, :, :3])
    assert cache.length == 38
    cache.append(k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match=r"capacity 40, length 40, n 1"):
        cache.append(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="capacity: expected at least the prompt's 38 tokens"):
        intfa.KVCache(k[:, :, :38], v[:, :, :38], 37)
    with pytest.raises(ValueError, match="k: expected 4 dims"):
        intfa.KVCache(k[0], v[0], 40)
    with pytest.raises(ValueError, match="layout"):
        intfa.KVCache(k, v, 40, layout="SBHD")
    with pytest.raises(ValueError, match="scheme"):
        intfa.KVCache(k, v, 40, scheme="fp8")
    # half keeps V unquantized: append_kv is not available for it (RuntimeError).
    with pytest.raises(RuntimeError, match="half"):
        intfa.KVCache(k, v, 40, scheme="half")
    xh = intfa.quantize(q, k, v, scheme="half")
    with pytest.raises(RuntimeError, match="append_kv takes paper and accurate"):
        intfa.append_kv(xh, k[:, :, :1], v[:, :, :1], 0)
    # The C++ layer's messages: wrong heads, dtype, a position past the cache.
    small = intfa.KVCache(k[:, :, :8], v[:, :, :8], 16)
    with pytest.raises(ValueError, match="cache.k8: expected batch, heads and head_dim"):
        small.append(q[:, :, :1], q[:, :, :1])
    with pytest.raises(TypeError, match="k_new: expected dtype float16 or bfloat16"):
        small.append(k[:, :, :1].astype(np.float32), v[:, :, :1])
    x = intfa.quantize(q, k, v)
    with pytest.raises(ValueError, match="pos: expected 0 <= pos"):
        intfa.append_kv(x, k[:, :, :2], v[:, :, :2], 39)
    with pytest.raises(TypeError, match="q: expected dtype float16 or bfloat16"):
        small.attention(q.astype(np.float32))
    with pytest.raises(ValueError, match="k_mean"):
        intfa.quantize_q(q, x.k_mean[:, :, :32])
    with pytest.raises(TypeError, match="k_mean: expected a numpy.ndarray"):
        intfa.quantize_q(q, x.k_mean.tolist())


# ------------------------------------------------------------------------------------------------
# Ragged batches: seqused_kv, append_kv at a position per sequence, KVCache(lengths=...)
# ------------------------------------------------------------------------------------------------
def np_randn(rng):
    return lambda shape, scale: (rng.standard_normal(shape) * scale).astype(np.float16)


def exact(got, want):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("generic", [False, True])
def test_ragged_kv_cache_equals_separate_caches(scheme, layout, generic, monkeypatch):
    # Prompts of 30, 12 and 21 tokens (garbage past each) in one cache, then appends of 1 and 3
    # tokens with attention (causal or not, GQA, LSE) after each: bit for bit what one cache per
    # sequence holds and computes. generic: through append_kv(pos=lengths), quantize_q and
    # attention_int8(seqused_kv) instead of the methods' fast path (one _C.kv_attention call).
    rng = np.random.default_rng(40)
    lengths = [30, 12, 21]
    q, k, v, kn, vn = in_layout(layout, *ragged_inputs(np_randn(rng), 3, 4, 2, 30, 8, 64,
                                                        lengths))
    lib = intfa._arrays.lib
    kv_attention, calls = lib.kv_attention, []
    monkeypatch.setattr(lib, "kv_attention", lambda *a: calls.append(1) or kv_attention(*a))
    steps = [1, 3, 1, 2, 1]
    ragged, seps = ragged_vs_separate(q, k, v, kn, vn, lengths, steps, layout, scheme, exact,
                                      exact, generic)
    assert len(calls) == len(steps) * (3 if generic else 4)
    assert type(ragged.lengths) is np.ndarray and ragged.lengths.dtype == np.int32
    assert ragged.lengths.tolist() == [38, 20, 29] and ragged.length == 38
    # Sequence 1's large V value grew its scale, in its own cache and in the ragged one.
    fresh = intfa.KVCache(tok(entry(k, 1), 0, 12, layout), tok(entry(v, 1), 0, 12, layout), 48,
                          layout=layout, scheme=scheme)
    assert not np.array_equal(seps[1].v_scale, fresh.v_scale)


def test_ragged_kv_cache_max_seqlen_kv():
    # Views of the whole capacity (what a CUDA graph replayed at growing lengths needs) give what
    # the default views of the longest sequence give; only ragged caches take the argument.
    rng = np.random.default_rng(43)
    lengths = [20, 9]
    q, k, v, kn, vn = ragged_inputs(np_randn(rng), 2, 4, 2, 20, 2, 64, lengths)
    ragged = intfa.KVCache(k, v, 32, lengths=lengths)
    ragged.append(kn, vn)
    want, want_lse = ragged.attention(q, is_causal=True, return_lse=True)
    for span in (22, 27, 32):
        out, lse = ragged.attention(q, is_causal=True, return_lse=True, max_seqlen_kv=span)
        exact(out, want)
        exact(lse, want_lse)
        assert ragged.qkv(max_seqlen_kv=span).k_scale.shape[-1] == span
    # Shorter views clamp the counts (sequence 0 holds 22 tokens).
    out = ragged.attention(q, max_seqlen_kv=12)
    x = ragged.qkv(*intfa.quantize_q(q, ragged.k_mean), dtype=q.dtype)
    ref = intfa.attention_int8(seq_view(x._replace(seqused_kv=None), 0, 12, "BHSD"))
    exact(out[:1], ref)
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError, match="max_seqlen_kv"):
            ragged.attention(q, max_seqlen_kv=bad)
    dense = intfa.KVCache(k, v, 32)
    with pytest.raises(ValueError, match="max_seqlen_kv: only a ragged cache"):
        dense.attention(q, max_seqlen_kv=32)


def test_ragged_kv_cache_sync_length():
    # Steps replayed from a CUDA graph advance `lengths` on the device only (here: in place, as
    # the captured `lengths += n` does); sync_length() brings the host's bound up to them.
    rng = np.random.default_rng(44)
    q, k, v, kn, vn = ragged_inputs(np_randn(rng), 2, 4, 2, 20, 2, 64, [20, 9])
    ragged = intfa.KVCache(k, v, 32, lengths=[20, 9])
    ragged.lengths += 3
    assert ragged.length == 20
    assert ragged.sync_length() == 23 and ragged.length == 23
    with pytest.raises(ValueError, match="sync_length: only a ragged cache"):
        intfa.KVCache(k, v, 32).sync_length()


def test_ragged_kv_cache_truncate():
    # A speculative step in a ragged batch: 3 draft tokens per sequence appended and attended,
    # sequence 0 keeps 1 and sequence 1 all 3; then one more token each. The cache then holds
    # what caches given only the kept tokens hold (values within the prompts' V range).
    rng = np.random.default_rng(41)
    randn = np_randn(rng)
    lengths, keep = [20, 9], [1, 3]
    q, k, v, _, _ = ragged_inputs(randn, 2, 4, 2, 20, 4, 64, lengths)
    kn, vn = randn((2, 2, 4, 64), 0.5) + 1, randn((2, 2, 4, 64), 0.3)
    ragged = intfa.KVCache(k, v, 32, lengths=lengths)
    ragged.append(kn[:, :, :3], vn[:, :, :3])
    ragged.attention(q[:, :, :3], is_causal=True)
    ragged.truncate([20 + keep[0], 9 + keep[1]])
    assert ragged.lengths.tolist() == [21, 12] and ragged.length == 21
    ragged.append(kn[:, :, 3:], vn[:, :, 3:])
    seps = []
    for i, n in enumerate(lengths):
        c = intfa.KVCache(k[i:i + 1, :, :n], v[i:i + 1, :, :n], 32)
        c.append(kn[i:i + 1, :, :keep[i]], vn[i:i + 1, :, :keep[i]])
        c.append(kn[i:i + 1, :, 3:], vn[i:i + 1, :, 3:])
        seps.append(c)
    check_parts(ragged, seps, exact)
    out, lse = ragged.attention(q[:, :, 3:], is_causal=True, return_lse=True)
    for i, c in enumerate(seps):
        o, l = c.attention(q[i:i + 1, :, 3:], is_causal=True, return_lse=True)
        exact(out[i:i + 1], o)
        exact(lse[i:i + 1], l)
    # Each length in [0, that sequence's]; one per sequence; ints (an array of any framework).
    for bad in ([23, 13], [22, -1], [3], [1, 2, 3], 5, [1.5, 2], [True, 1], np.zeros((1, 2))):
        with pytest.raises(ValueError, match=r"KVCache.truncate: expected 2 ints \(one per "
                                             r"sequence\), each in \[0, each sequence's tokens "
                                             r"\[22, 13\]\]"):
            ragged.truncate(bad)
    assert ragged.lengths.tolist() == [22, 13] and ragged.length == 22
    lengths_array = ragged.lengths
    ragged.truncate(np.array([0, 5]))
    assert ragged.lengths is lengths_array  # written in place
    assert ragged.lengths.tolist() == [0, 5] and ragged.length == 5
    # A sequence without keys: its rows give 0 and an LSE of -inf.
    out, lse = ragged.attention(q[:, :, 3:], return_lse=True)
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    seps[1].truncate(5)
    exact(out[1:], seps[1].attention(q[1:, :, 3:]))


def test_ragged_kv_cache_errors():
    rng = np.random.default_rng(42)
    q, k, v = qkv(rng, 2, 4, 2, 1, 10, 64)
    for bad in ([0, 5], [11, 5], [5], [5, 5, 5], [2.5, 3], [True, 2], np.array([[1, 2]]), "ab",
                7):
        with pytest.raises(ValueError, match=r"lengths: expected 2 ints \(one per sequence\), "
                                             r"each in \[1, the prompt's tokens 10\]"):
            intfa.KVCache(k, v, 16, lengths=bad)
    ragged = intfa.KVCache(k, v, 12, lengths=np.array([10, 4]))
    assert ragged.lengths.dtype == np.int32 and ragged.lengths.tolist() == [10, 4]
    assert "length=10, lengths=[10, 4], capacity=12" in repr(ragged)
    # The capacity is checked on the host against length, the longest sequence's.
    with pytest.raises(ValueError, match=r"capacity 12, length 10, n 3"):
        ragged.append(k[:, :, :3], v[:, :, :3])
    # What the C++ layer rejects leaves the lengths as they were.
    with pytest.raises(ValueError, match="cache.k8: expected batch, heads and head_dim"):
        ragged.append(q, q)
    assert ragged.lengths.tolist() == [10, 4] and ragged.length == 10
    ragged.append(k[:, :, :2], v[:, :, :2])
    assert ragged.lengths.tolist() == [12, 6] and ragged.length == 12
    with pytest.raises(ValueError, match=r"capacity 12, length 12, n 1"):
        ragged.append(k[:, :, :1], v[:, :, :1])
    assert intfa.KVCache(k, v, 12).lengths is None


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_attention_int8_seqused_kv(scheme, layout):
    # Sequence b attends to its first seqused_kv[b] keys (causal: bottom-right against that
    # count): bit for bit one call per sequence over those keys; garbage past them never counts.
    rng = np.random.default_rng(43)
    q, k, v = qkv(rng, 3, 4, 2, 5, 40, 64, layout)
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    used = np.array([40, 13, 27], dtype=np.int32)
    for causal in (False, True):
        out, lse = intfa.attention_int8(x, seqused_kv=used, is_causal=causal, return_lse=True)
        for b, n in enumerate(used.tolist()):
            o, l = intfa.attention_int8(seq_view(x, b, n, layout), is_causal=causal,
                                        return_lse=True)
            exact(entry(out, b), o)
            exact(entry(lse, b), l)
        # The field of QuantizedQKV does the same; the keyword overrides it.
        exact(intfa.attention_int8(x._replace(seqused_kv=used), is_causal=causal), out)
        exact(intfa.attention_int8(x._replace(seqused_kv=used * 0), seqused_kv=used,
                                   is_causal=causal), out)
    # Counts are clamped to [0, Skv]: none is every key, a negative one no key (0, -inf).
    out, lse = intfa.attention_int8(x, seqused_kv=np.array([99, -3, 27], np.int32),
                                    return_lse=True)
    want, want_lse = intfa.attention_int8(x, return_lse=True)
    exact(entry(out, 0), entry(want, 0))
    assert np.all(entry(out, 1) == 0) and np.all(lse[1] == -np.inf)
    # The C++ layer's checks, naming the argument.
    with pytest.raises(TypeError, match="seqused_kv"):
        intfa.attention_int8(x, seqused_kv=used.astype(np.int64))
    with pytest.raises(TypeError, match="seqused_kv"):
        intfa.attention_int8(x, seqused_kv=used.astype(np.float32))
    with pytest.raises(ValueError, match=r"seqused_kv.*\[batch\]"):
        intfa.attention_int8(x, seqused_kv=used[:2])
    with pytest.raises(TypeError, match="seqused_kv: expected a numpy.ndarray"):
        intfa.attention_int8(x, seqused_kv=used.tolist())


def test_append_kv_per_sequence_positions():
    # pos int32 [B]: sequence b's tokens at pos[b]..., as one append per sequence; tokens past
    # the cache are dropped (read by the kernels, so not checked on the host).
    rng = np.random.default_rng(44)
    q, k, v = qkv(rng, 2, 2, 2, 8, 40, 64)
    k2, v2 = (k * 0.5).astype(np.float16), (v * 0.5).astype(np.float16)
    names = ("k8", "k_scale", "k_mean", "vt8", "v_scale")
    for pos in ([5, 20], [38, 0]):
        x, y = intfa.quantize(q, k, v), intfa.quantize(q, k, v)
        assert intfa.append_kv(x, k2[:, :, :3], v2[:, :, :3], np.array(pos, np.int32)) is None
        for b, p in enumerate(pos):
            n = min(3, 40 - p)
            intfa.append_kv(y._replace(**{f: entry(getattr(y, f), b) for f in names}),
                            entry(k2, b)[:, :, :n], entry(v2, b)[:, :, :n], p)
        for f in names:
            exact(getattr(x, f)[..., :40] if f == "vt8" else getattr(x, f),
                  getattr(y, f)[..., :40] if f == "vt8" else getattr(y, f))
    x = intfa.quantize(q, k, v)
    with pytest.raises(TypeError, match="pos"):
        intfa.append_kv(x, k2[:, :, :1], v2[:, :, :1], np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match=r"pos.*\[batch\]"):
        intfa.append_kv(x, k2[:, :, :1], v2[:, :, :1], np.array([1, 2, 3], np.int32))
    with pytest.raises(TypeError, match="pos: expected an int, or an int32 array"):
        intfa.append_kv(x, k2[:, :, :1], v2[:, :, :1], [1, 2])


# ------------------------------------------------------------------------------------------------
# Paged caches: block_table (CPU backend)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_paged_attention_equals_contiguous(scheme, layout):
    # quantize()'s cache copied into pages of 16 tokens (a shuffled order, spare garbage pages):
    # the contiguous call's outputs and LSE bit for bit, causal or not, with every key or ragged
    # counts (the table entries past a sequence's count -1: never read).
    rng = np.random.default_rng(47)
    q, k, v = qkv(rng, 3, 4, 2, 5, 64, 64, layout)
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    paged = page_copy(x, 16, spare=5, seed=1)
    used = np.array([45, -3, 100], np.int32)
    for causal in (False, True):
        for counts in (None, used):
            p = paged if counts is None else drop_pages(paged, counts)
            out, lse = intfa.attention_int8(p, seqused_kv=counts, is_causal=causal,
                                            return_lse=True)
            want, want_lse = intfa.attention_int8(x, seqused_kv=counts, is_causal=causal,
                                                  return_lse=True)
            assert not np.isnan(out.astype(np.float32)).any()
            exact(out, want)
            exact(lse, want_lse)
        # The keyword does what the field does, and overrides it (a table of -1 would fail).
        unmapped = drop_pages(paged, [0, 0, 0])
        for field in (None, unmapped.block_table):
            exact(intfa.attention_int8(paged._replace(block_table=field), is_causal=causal,
                                       block_table=paged.block_table),
                  intfa.attention_int8(x, is_causal=causal))
    # A table that maps the pages in another order reads other keys.
    assert not np.array_equal(intfa.attention_int8(paged, block_table=paged.block_table[::-1]),
                              intfa.attention_int8(x))


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_paged_append_equals_contiguous(scheme, layout, per_sequence):
    # append_kv into a paged copy writes what it writes into the contiguous cache, read back
    # through the table (K rows and scales, V^T columns, V scales), with V scales that grow (the
    # held columns requantized, page by page); one position for all or one per sequence (a token
    # past the 64 dropped). Table entries past the pages an append touches are -1. Attention
    # over the result: the same bits.
    rng = np.random.default_rng(48)
    q, k, v = qkv(rng, 3, 2, 2, 1, 64, 64, layout)
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    x.v_scale.reshape(-1)[::3] *= 0.05  # small scales: the new tokens grow them
    n, at = 3, np.array([20, 5, 62], np.int32) if per_sequence else 20
    end = [min(64, int(p) + n) for p in (at if per_sequence else [at] * 3)]
    paged = drop_pages(page_copy(x, 16, spare=4, seed=2), end)
    k_new, v_new = in_layout(layout, randn(rng, (3, 2, n, 64)), randn(rng, (3, 2, n, 64)))
    before = x.v_scale.copy()
    for cache in (x, paged):
        assert intfa.append_kv(cache, k_new, v_new, at) is None
    assert not np.array_equal(x.v_scale, before)
    exact(paged.v_scale, x.v_scale)
    for b, e in enumerate(end):
        k8, k_scale, vt8 = unpage(paged, b, e)
        exact(k8, tok(entry(x.k8, b), 0, e, layout))
        exact(k_scale, entry(x.k_scale, b)[..., :e])
        exact(vt8, entry(x.vt8, b)[..., :e])
    q_new, = in_layout(layout, randn(rng, (3, 4, 2, 64)))  # GQA, two query rows
    q8, q_scale, lse_offset = intfa.quantize_q(q_new, x.k_mean if scheme == "accurate" else None,
                                               layout=layout, scheme=scheme)
    step = dict(q8=q8, q_scale=q_scale, lse_offset=lse_offset,
                seqused_kv=np.array(end, np.int32))
    for causal in (False, True):
        out, lse = intfa.attention_int8(paged._replace(**step), is_causal=causal,
                                        return_lse=True)
        want, want_lse = intfa.attention_int8(x._replace(**step), is_causal=causal,
                                              return_lse=True)
        exact(out, want)
        exact(lse, want_lse)


def test_paged_errors():
    # The C++ layer's checks of a paged call, naming block_table (cache.block_table for
    # append_kv), the entry and the pool.
    rng = np.random.default_rng(49)
    q, k, v = qkv(rng, 2, 2, 2, 1, 32, 64)
    x = intfa.quantize(q, k, v)
    paged = page_copy(x, 16, spare=1, seed=3)  # a pool of 5 pages
    table = paged.block_table
    assert intfa.attention_int8(paged).shape == q.shape
    with pytest.raises(TypeError, match="block_table: expected dtype int32, got float32"):
        intfa.attention_int8(paged, block_table=table.astype(np.float32))
    with pytest.raises(TypeError, match="block_table: dtype int64"):
        intfa.attention_int8(paged, block_table=table.astype(np.int64))
    with pytest.raises(TypeError, match="block_table: expected a numpy.ndarray"):
        intfa.attention_int8(paged, block_table=table.tolist())
    with pytest.raises(ValueError, match=r"block_table: expected \[batch = 2, max_pages >= 1\]"):
        intfa.attention_int8(paged, block_table=table[:1])
    past = table.copy()
    past[1, 1] = 5
    with pytest.raises(ValueError, match=r"block_table\[1\]\[1\]: expected a page in \[0, 5\)"):
        intfa.attention_int8(paged, block_table=past)
    with pytest.raises(ValueError, match="k_scale"):  # contiguous scales with pages
        intfa.attention_int8(paged._replace(k_scale=x.k_scale))
    with pytest.raises(ValueError, match="page_size .the token dim of the pages. must be a "
                                         "multiple of 16, got 8"):
        intfa.attention_int8(paged._replace(k8=paged.k8[:, :, :8]))
    k_new, v_new = k[:, :, :1], v[:, :, :1]
    with pytest.raises(ValueError, match=r"block_table\[1\]\[0\]: expected a page in \[0, 5\)"):
        intfa.append_kv(drop_pages(paged, [32, 0]), k_new, v_new, 0)
    with pytest.raises(TypeError, match="cache.block_table: expected dtype int32"):
        intfa.append_kv(paged._replace(block_table=table.astype(np.float32)), k_new, v_new, 0)
    with pytest.raises(TypeError, match="cache.block_table: expected a numpy.ndarray"):
        intfa.append_kv(paged._replace(block_table=table.tolist()), k_new, v_new, 0)
    with pytest.raises(ValueError, match=r"pos: expected 0 <= pos and pos \+ new tokens \(1\) "
                                         r"<= the cache's 32 tokens, got pos 32"):
        intfa.append_kv(paged, k_new, v_new, 32)


# ------------------------------------------------------------------------------------------------
# PagedKVCache: a paged cache whose pages the host hands out (drivers in paged.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_kv_cache_equals_ragged_kv_cache(scheme, layout, page_size):
    # Prompts of 40, 15 and 33 tokens (garbage past each) in pages of 16 or 32 tokens, appends
    # of 1, 3, 1, 16 and 2 tokens that cross page boundaries (a V scale grows: the held columns
    # requantized page by page), attention after each (GQA): bit for bit what a ragged KVCache
    # holds and computes. Pages go out lowest first, each sequence's in its table's first
    # entries, no page twice.
    rng = np.random.default_rng(50)
    lengths = [40, 15, 33]
    inputs = in_layout(layout, *ragged_inputs(np_randn(rng), 3, 4, 2, 40, 23, 64, lengths))
    paged, _ = paged_vs_ragged(*inputs, lengths, [1, 3, 1, 16, 2], exact, np.asarray,
                               num_pages=12, page_size=page_size, layout=layout, scheme=scheme)
    assert paged.lengths_host == [63, 38, 56] and paged.length == 63
    assert type(paged.lengths) is np.ndarray and paged.lengths.dtype == np.int32
    assert type(paged.block_table) is np.ndarray and paged.block_table.dtype == np.int32
    held = [-(-n // page_size) for n in paged.lengths_host]
    rows = paged.block_table.tolist()
    assert [sum(p >= 0 for p in row[:m]) + sum(p < 0 for p in row[m:])
            for row, m in zip(rows, held)] == [12] * 3
    assert sorted(p for row in rows for p in row if p >= 0) == list(range(sum(held)))
    assert paged.pages_free == 12 - sum(held)
    assert paged.capacity == 12 * page_size and paged.max_pages == 12


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_paged_trim_local_layer(scheme):
    # A local layer's decode loop (window (W - 1, 0)) over a PagedKVCache that gives back the pages
    # its window has passed (trim(W - 1) after every step) is, bit for bit, the same loop over one
    # that keeps every page, through V scales that grow (the sweep skips given-back pages); the
    # pool gets the pages back; a call whose window reaches a given-back token, or one without a
    # window, is a ValueError; release() takes a sequence back to none.
    rng = np.random.default_rng(95)
    b, hq, hkv, d, page, w, n0, steps = 2, 4, 2, 64, 16, 20, 40, 12
    q, k, v = qkv(rng, b, hq, hkv, steps, n0, d)
    _, k_new, v_new = qkv(rng, b, hq, hkv, 1, steps, d)
    v_new[:, :, 7] *= 8  # a step whose V grows its scales: the sweep over the held pages
    full = intfa.PagedKVCache(k, v, 20, page_size=page, max_pages=8, scheme=scheme)
    trimmed = intfa.PagedKVCache(k, v, 20, page_size=page, max_pages=8, scheme=scheme)
    freed = 0
    for t in range(steps):
        for cache in (full, trimmed):
            cache.append(k_new[:, :, t:t + 1], v_new[:, :, t:t + 1])
        kw = dict(is_causal=True, window_size=(w - 1, 0), return_lse=True)
        want, got = full.attention(q[:, :, t:t + 1], **kw), trimmed.attention(q[:, :, t:t + 1], **kw)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        freed += trimmed.trim(w - 1)
    m = n0 + steps  # 52 tokens: the last 19 start at 33, in page 2
    assert freed == 2 * b and trimmed.pages_free == full.pages_free + freed
    assert [row[:3] for row in trimmed.block_table.tolist()] == [[-1, -1, row[2]] for row in
                                                                 full.block_table.tolist()]
    np.testing.assert_array_equal(trimmed.v_scale, full.v_scale)
    qs = q[:, :, :1]
    with pytest.raises(ValueError, match=r"sequence 0 holds tokens 32\.\.51 \(trim\(\) gave back"):
        trimmed.attention(qs, is_causal=True)
    with pytest.raises(ValueError, match=r"first query sees tokens from 31 \(window_size \(20, 0\)"):
        trimmed.attention(qs, is_causal=True, window_size=(20, 0))
    trimmed.attention(qs, is_causal=True, window_size=(19, 0))  # from 32: held
    with pytest.raises(ValueError, match=r"keep: expected an int >= 0"):
        trimmed.trim(-1)
    assert m == trimmed.length
    trimmed.release(0)
    assert trimmed.lengths_host == [0, m] and trimmed.block_table.tolist()[0] == [-1] * 8
    trimmed.append(k_new[:, :, :1], v_new[:, :, :1])  # sequence 0 from token 0 again
    trimmed.attention(qs, is_causal=True, window_size=(18, 0))


def test_paged_kv_cache_pool_release_and_errors():
    # A pool of 5 pages of 16 tokens, at most 3 per sequence: steps compared with a ragged
    # KVCache; a pool too small or a sequence too long is a ValueError that changes nothing, as
    # is an error of append_kv (the pages taken for it go back); release() frees a sequence's
    # pages (KVCache.truncate to 0 for it), which the growth of the others then takes.
    rng = np.random.default_rng(51)
    lengths = [16, 10, 5]
    q, k, v, kn, vn = ragged_inputs(np_randn(rng), 3, 4, 2, 16, 40, 64, lengths)
    paged = intfa.PagedKVCache(k, v, 5, page_size=16, max_pages=3, lengths=lengths)
    ragged = intfa.KVCache(k, v, 48, lengths=lengths)
    assert paged.block_table.tolist() == [[0, -1, -1], [1, -1, -1], [2, -1, -1]]
    assert paged.pages_free == 2 and paged.capacity == 48
    assert ("intfa.PagedKVCache(lengths=[16, 10, 5], pages_free=2, num_pages=5, page_size=16, "
            "max_pages=3, batch=3") in repr(paged)

    def step(a, b):  # tokens a:b into both caches, then their queries' attention compared
        for cache in (paged, ragged):
            cache.append(kn[:, :, a:b], vn[:, :, a:b])
        out, lse = paged.attention(q[:, :, a:b], is_causal=True, return_lse=True)
        want, want_lse = ragged.attention(q[:, :, a:b], is_causal=True, return_lse=True)
        exact(out, want)
        exact(lse, want_lse)
        check_paged_parts(paged, ragged, np.asarray)

    step(0, 1)  # lengths 17, 11, 6: sequence 0 takes page 3
    assert paged.block_table.tolist() == [[0, 3, -1], [1, -1, -1], [2, -1, -1]]
    before = [a.copy() for a in (paged.block_table, paged.lengths, paged.k8, paged.k_scale,
                                 paged.vt8, paged.v_scale)]
    with pytest.raises(ValueError, match=r"PagedKVCache.append: needs 3 more pages, 1 free "
                                         r"\(num_pages = 5\)"):
        paged.append(kn[:, :, 1:17], vn[:, :, 1:17])
    with pytest.raises(ValueError, match=r"PagedKVCache.append: 32 new tokens do not fit "
                                         r"sequence 0: capacity 48 \(max_pages 3 \* page_size "
                                         r"16\), length 17, n 32 \(length \+ n = 49"):
        paged.append(kn[:, :, 1:33], vn[:, :, 1:33])
    with pytest.raises(TypeError, match="k_new: expected dtype float16 or bfloat16"):
        paged.append(kn[:, :, 1:7].astype(np.float32), vn[:, :, 1:7])  # would take page 4
    for got, want in zip((paged.block_table, paged.lengths, paged.k8, paged.k_scale, paged.vt8,
                          paged.v_scale), before):
        exact(got, want)
    assert paged.lengths_host == [17, 11, 6] and paged.pages_free == 1
    paged.release(0)
    ragged.truncate([0, 11, 6])
    assert paged.block_table.tolist() == [[-1, -1, -1], [1, -1, -1], [2, -1, -1]]
    assert paged.lengths.tolist() == paged.lengths_host == [0, 11, 6] and paged.pages_free == 3
    out, lse = paged.attention(q[:, :, :1], return_lse=True)  # no keys: 0 and -inf
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    step(1, 17)  # 16, 27, 22: sequence 0 takes page 0 again, 1 and 2 take 3 (its old) and 4
    assert paged.block_table.tolist() == [[0, -1, -1], [1, 3, -1], [2, 4, -1]]
    assert paged.pages_free == 0
    with pytest.raises(ValueError, match=r"needs 1 more pages, 0 free \(num_pages = 5\)"):
        paged.append(kn[:, :, 17:18], vn[:, :, 17:18])
    paged.release(2)
    ragged.truncate([16, 27, 0])
    step(17, 18)  # 17, 28, 1: pages 2 and 4 back, 0 takes 2 and 2 takes 4
    assert paged.block_table.tolist() == [[0, 2, -1], [1, 3, -1], [4, -1, -1]]
    for bad in (3, -1, True, 1.5, "0", None):
        with pytest.raises(ValueError, match=r"PagedKVCache.release: expected a sequence in "
                                             r"\[0, 3\)"):
            paged.release(bad)
    # The constructor's checks.
    for bad in (24, 0, 8, 16.0, True, None):
        with pytest.raises(ValueError, match="page_size: expected a positive multiple of 16"):
            intfa.PagedKVCache(k, v, 8, page_size=bad)
    for name in ("num_pages", "max_pages"):
        args = {"num_pages": 8, "page_size": 16, name: 0}
        with pytest.raises(ValueError, match=f"{name}: expected a positive int, got 0"):
            intfa.PagedKVCache(k, v, **args)
    with pytest.raises(RuntimeError, match="scheme: PagedKVCache takes 'accurate' and 'paper'"):
        intfa.PagedKVCache(k, v, 8, page_size=16, scheme="half")
    with pytest.raises(ValueError, match=r"lengths: expected 3 ints \(one per sequence\)"):
        intfa.PagedKVCache(k, v, 8, page_size=16, lengths=[0, 5, 5])
    with pytest.raises(ValueError, match="k: expected 4 dims"):
        intfa.PagedKVCache(k[0], v[0], 8, page_size=16)
    with pytest.raises(ValueError, match=r"PagedKVCache \(the prompts\): needs 3 more pages, 2 "
                                         r"free \(num_pages = 2\)"):
        intfa.PagedKVCache(k, v, 2, page_size=16, lengths=lengths)
    with pytest.raises(ValueError, match=r"PagedKVCache: sequence 0's prompt of 40 tokens "
                                         r"exceeds the capacity max_pages \* page_size = 32"):
        intfa.PagedKVCache(kn, vn, 8, page_size=16, max_pages=2)
    # Without lengths every sequence holds all L0 tokens, as a dense KVCache's.
    whole = intfa.PagedKVCache(kn, vn, 9, page_size=16, layout="BHSD")
    assert whole.lengths_host == [40] * 3 and whole.block_table[:, :3].tolist() == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8]]
    check_paged_parts(whole, intfa.KVCache(kn, vn, 144, lengths=[40] * 3), np.asarray)
    exact(whole.attention(q[:, :, :2], is_causal=True),
          intfa.KVCache(kn, vn, 144).attention(q[:, :, :2], is_causal=True))


# ------------------------------------------------------------------------------------------------
# Sliding-window attention: window_size=(left, right), FlashAttention's
# ------------------------------------------------------------------------------------------------
# (Sq, Skv, is_causal, window_size): causal with a left edge, one key per row, two-sided and
# right-only non-causal windows, Sq > Skv with rows that see no key (causal, and a right edge
# alone), a left edge alone, and one past every key.
WINDOWS = [(64, 64, True, (15, -1)), (64, 64, True, (0, 0)), (40, 90, False, (5, 9)),
           (33, 90, False, (-1, 4)), (70, 30, True, (3, 0)), (50, 20, False, (-1, 2)),
           (50, 45, False, (12, -1)), (20, 20, True, (500, -1))]
# LSE bounds against float64: a row of a few keys has the error of its few scores, not the
# averaged one of a long row (tests/window_test.cpp: 1.5x the unwindowed bounds).
WINDOW_LSE_TOL = {"accurate": 4e-2, "half": 4e-2, "paper": 6e-2}


def window_id(w):
    sq, skv, causal, (left, right) = w
    return f"{sq}x{skv}{'-causal' if causal else ''}-({left},{right})"


def check_window(out, lse, ref, ref_lse, scheme, rows_first=False):
    """A windowed call's out and LSE against float64 ones: within the scheme's error, and the
    rows that see no key 0 and -inf on both sides. Rows are out's leading dims, LSE's order
    (BHSD out and [B, H, S] LSE; rows_first: varlen's [T, H, D] out and [H, T] LSE)."""
    assert rel_l2(out, ref) < TOL[scheme]
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=WINDOW_LSE_TOL[scheme])
    empty = ~finite.T if rows_first else ~finite
    assert np.all(out[empty] == 0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("w", WINDOWS, ids=window_id)
def test_window_matches_masked_softmax(scheme, w):
    # Each window in both layouts with GQA: within the scheme's error of a float64 softmax over
    # the window's keys (reference.py), which the exact oracle (attention_reference) equals.
    sq, skv, causal, window = w
    rng = np.random.default_rng(sq * 1000 + skv)
    for layout in ("BHSD", "BSHD"):
        q, k, v = qkv(rng, 2, 4, 2, sq, skv, 64, layout)
        out, lse = intfa.attention(q, k, v, is_causal=causal, window_size=window,
                                   enable_gqa=True, layout=layout, scheme=scheme,
                                   return_lse=True)
        ref, ref_lse = attention_ref(q, k, v, causal=causal, layout=layout, window=window)
        assert out.shape == q.shape and lse.shape == (2, 4, sq)
        check_window(in_layout(layout, out)[0], lse, in_layout(layout, ref)[0], ref_lse, scheme)
        oracle, oracle_lse = intfa.attention_reference(q, k, v, is_causal=causal,
                                                       window_size=window, layout=layout,
                                                       return_lse=True)
        np.testing.assert_allclose(oracle, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(oracle_lse, ref_lse, rtol=0, atol=1e-12)


def test_window_rows_that_see_no_key():
    # Causal (3, 0) with Sq = 70 > Skv = 30: the first 40 queries' windows end before key 0.
    rng = np.random.default_rng(60)
    q, k, v = qkv(rng, 1, 2, 2, 70, 30, 64)
    out, lse = intfa.attention(q, k, v, is_causal=True, window_size=(3, 0), return_lse=True)
    assert np.all(out[:, :, :40] == 0) and np.all(np.isneginf(lse[:, :, :40]))
    assert np.all(np.isfinite(lse[:, :, 40:])) and np.all(np.any(out[:, :, 40:] != 0, axis=-1))


def test_open_windows_are_the_unwindowed_calls():
    # (-1, -1) is no window on every entry point, (-1, 0) is causal, and edges past every key
    # change nothing: bit for bit.
    rng = np.random.default_rng(61)
    q, k, v = qkv(rng, 2, 4, 2, 37, 90, 64)
    for causal in (False, True):
        kw = dict(is_causal=causal, enable_gqa=True, return_lse=True)
        want = intfa.attention(q, k, v, **kw)
        for window in [(-1, -1), [-1, -1], (127, -1), (-1, 0) if causal else (-1, 90)]:
            for got, w in zip(intfa.attention(q, k, v, window_size=window, **kw), want):
                exact(got, w)
    for got, w in zip(intfa.attention(q, k, v, window_size=(-1, 0), enable_gqa=True,
                                      return_lse=True),
                      intfa.attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)):
        exact(got, w)
    x = intfa.quantize(q, k, v)
    exact(intfa.attention_int8(x, window_size=(-1, -1)), intfa.attention_int8(x))
    exact(intfa.attention_reference(q, k, v, window_size=(-1, -1)),
          intfa.attention_reference(q, k, v))
    qp, kp, vp, cu_q, cu_kv = packed(rng, [5, 30], [9, 40], 2, 2, 64)
    exact(intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv, window_size=(-1, -1)),
          intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv))
    cache = intfa.KVCache(k, v, 96)
    exact(cache.attention(q[:, :, :3], window_size=(-1, -1)), cache.attention(q[:, :, :3]))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("causal,window", [(True, (7, 0)), (False, (3, 5)), (False, (-1, 2))])
def test_window_varlen_and_attention_int8(scheme, causal, window):
    # Varlen: the window against each sequence's own diagonal (an empty query sequence, one
    # with no keys, Sq < Skv and Sq > Skv), float64 per sequence. attention_int8 of quantize()
    # with the window: attention's bits, dense and packed.
    rng = np.random.default_rng(62)
    q, k, v, cu_q, cu_kv = packed(rng, [5, 0, 70, 30, 4], [9, 3, 64, 20, 0], 4, 2, 64)
    kw = dict(is_causal=causal, window_size=window, return_lse=True)
    out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, enable_gqa=True, scheme=scheme, **kw)
    ref, ref_lse = varlen_ref(q, k, v, cu_q, cu_kv, causal=causal, window=window)
    check_window(out, lse, ref, ref_lse, scheme, rows_first=True)
    x = intfa.quantize(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, scheme=scheme)
    for got, want in zip(intfa.attention_int8(x, **kw), (out, lse)):
        exact(got, want)
    qd, kd, vd = qkv(rng, 2, 4, 2, 30, 50, 64)
    x = intfa.quantize(qd, kd, vd, scheme=scheme)
    for got, want in zip(intfa.attention_int8(x, **kw),
                         intfa.attention(qd, kd, vd, enable_gqa=True, scheme=scheme, **kw)):
        exact(got, want)


def cache_decode_loop(monkeypatch, q, k, v, scheme, step):
    """A KVCache of the first 40 tokens of k, v (BHSD) fed tokens 40 to 45 (1, 1, 1, then 3 at
    a time), each step attended by those tokens' queries qt with the keywords and against the
    float64 (out, lse) that step(i, qt, end) gives (end: the tokens held): within the decode
    loop's tolerance of it, and the fast path's bits (one _C.kv_attention call) those of what it
    stands for, quantize_q of qt against the cache's K mean and attention_int8 over qkv()."""
    cache = intfa.KVCache(tokens(k, 0, 40), tokens(v, 0, 40), 64, scheme=scheme)
    lib = intfa._arrays.lib
    kv_attention, calls = lib.kv_attention, []
    monkeypatch.setattr(lib, "kv_attention", lambda *a: calls.append(1) or kv_attention(*a))
    end = 40
    for i, n in enumerate([1, 1, 1, 3]):
        cache.append(tokens(k, end, end + n), tokens(v, end, end + n))
        end += n
        qt = tokens(q, end - n, end)
        kw, (ref, ref_lse) = step(i, qt, end)
        out, lse = cache.attention(qt, **kw)
        assert rel_l2(out, ref) < 0.05, (end, rel_l2(out, ref))
        np.testing.assert_allclose(lse, ref_lse, atol=5e-2)
        q8, q_scale, lse_offset = intfa.quantize_q(qt, cache.k_mean, scheme=scheme)
        want, want_lse = intfa.attention_int8(cache.qkv(q8, q_scale, lse_offset, qt.dtype), **kw)
        exact(out, want)
        exact(lse, want_lse)
    assert len(calls) == 4


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_window_kv_cache_decode_step_sees_the_last_w_keys(scheme, monkeypatch):
    # A Mistral-style local layer (is_causal, window_size=(W - 1, 0)) over a KV cache: a decode
    # step's query sees the cache's last W tokens (float64 attention over those alone, within
    # the decode loop's tolerance), a chunk of 3 queries each its own last W; the fast path (one
    # _C.kv_attention call) gives the bits of quantize_q + attention_int8 over qkv().
    rng = np.random.default_rng(63)
    w = 16
    q, k, v = qkv(rng, 2, 4, 2, 46, 46, 64)

    def step(i, qt, end):
        kw = dict(is_causal=True, window_size=(w - 1, 0), return_lse=True)
        if qt.shape[2] == 1:
            return kw, attention_ref(qt, tokens(k, end - w, end), tokens(v, end - w, end))
        return kw, attention_ref(qt, tokens(k, 0, end), tokens(v, 0, end), causal=True,
                                 window=(w - 1, 0))

    cache_decode_loop(monkeypatch, q, k, v, scheme, step)


def ragged_and_paged(generic, seed, hq, **attn):
    """A ragged KVCache (prompts of 30, 12 and 21 tokens, GQA hq / 2) attending with `attn` is,
    bit for bit, one cache per sequence (through its methods, or the public functions when
    generic); without generic a PagedKVCache (16-token pages) with it is the ragged cache bit for
    bit. Returns the ragged cache (holding 38, 20 and 29 tokens) and queries of one token."""
    lengths, steps = [30, 12, 21], [1, 3, 1, 2, 1]
    inputs = ragged_inputs(np_randn(np.random.default_rng(seed)), 3, hq, 2, 30, 8, 64, lengths)
    ragged, _ = ragged_vs_separate(*inputs, lengths, steps, "BHSD", "accurate", exact, exact,
                                   generic, **attn)
    if not generic:
        paged_vs_ragged(*inputs, lengths, steps, exact, np.asarray, num_pages=12, page_size=16,
                        **attn)
    return ragged, inputs[0][:, :, :1]


@pytest.mark.parametrize("generic", [False, True])
def test_window_ragged_and_paged_caches(generic):
    # A window's diagonal is each sequence's own count (seqused_kv): a ragged KVCache attending
    # with window_size=(6, 0) is, bit for bit, one cache per sequence (through its methods or
    # the public functions); a PagedKVCache with it is the ragged cache bit for bit.
    ragged, q = ragged_and_paged(generic, 64, 4, window_size=(6, 0))
    # The sequences hold 38, 20 and 29 tokens: the window cuts each.
    assert not np.array_equal(ragged.attention(q, is_causal=True, window_size=(6, 0)),
                              ragged.attention(q, is_causal=True))


def entry_points(q, k, v):
    """{name: call(**keywords)} of every entry point that attends, over q, k, v (BHSD, one
    sequence of 16 queries and 16 keys, GQA allowed): attention, attention_varlen (the same
    tokens packed), attention_int8 (of quantize()), KVCache and PagedKVCache (of the prompt k,
    v) .attention and attention_reference."""
    x = intfa.quantize(q, k, v)
    cu = np.array([0, 16], np.int32)
    cache = intfa.KVCache(k, v, 20)
    paged = intfa.PagedKVCache(k, v, 2, page_size=16)
    packed = [a[0].swapaxes(0, 1) for a in (q, k, v)]
    return {
        "attention": lambda **kw: intfa.attention(q, k, v, enable_gqa=True, **kw),
        "attention_varlen": lambda **kw: intfa.attention_varlen(*packed, cu, cu, enable_gqa=True,
                                                                **kw),
        "attention_int8": lambda **kw: intfa.attention_int8(x, **kw),
        "KVCache.attention": lambda **kw: cache.attention(q, **kw),
        "PagedKVCache.attention": lambda **kw: paged.attention(q, **kw),
        "attention_reference": lambda **kw: intfa.attention_reference(q, k, v, **kw),
    }


def test_window_errors():
    # Range errors are the C++ layer's (ValueError, its message) on every entry point; what it
    # cannot see (not a pair of ints, past 32 bits) is refused in Python.
    rng = np.random.default_rng(65)
    for name, call in entry_points(*qkv(rng, 1, 2, 2, 16, 16, 64)).items():
        with pytest.raises(ValueError, match=r"^window_left / window_right: expected -1 \(no "
                                             r"edge\) or >= 0, got \(-2, 0\)$"):
            call(window_size=(-2, 0))
        with pytest.raises(ValueError, match=r"got \(3, -7\)$"):
            call(window_size=(3, -7))
        with pytest.raises(ValueError, match=r"^window_right: causal is window_right = 0, so "
                                             r"with causal it must be -1 or 0, got 3$"):
            call(is_causal=True, window_size=(4, 3))
        with pytest.raises(TypeError, match=r"^window_size: expected a pair of ints \(left, "
                                            r"right\), -1 leaving a side open, got int 5$"):
            call(window_size=5)
        with pytest.raises(TypeError, match=r"got NoneType None$"):
            call(window_size=None)
        with pytest.raises(ValueError, match=r"^window_size: expected 2 ints \(left, right\), "
                                             r"got 3: \(1, 2, 3\)$"):
            call(window_size=(1, 2, 3))
        for bad in ((1.5, 0), (True, 0), (4, "0")):
            with pytest.raises(TypeError, match=r"^window_size: expected ints \(left, right\), "
                                                r"got \("):
                call(window_size=bad)
        with pytest.raises(ValueError, match=r"^window_size: expected 32-bit ints \(left, "
                                             r"right\), got \(4294967296, 0\)$"):
            call(window_size=(2 ** 32, 0))
        exact(call(is_causal=True, window_size=(np.int64(3), np.int32(0))),  # NumPy ints
              call(is_causal=True, window_size=[3, 0]))


# ------------------------------------------------------------------------------------------------
# Attention sinks: sinks=[Hq] logits (gpt-oss's sinks, FlashAttention 4's learnable_sink)
# ------------------------------------------------------------------------------------------------
def sink_logits(rng, hq, no_sink=None):
    """float32 [hq] sink logits uniform in [0, 6): about the LSE of rows of a few to a few
    hundred keys, so the sink takes a real share of each row; head no_sink gets -inf (none)."""
    z = rng.uniform(0.0, 6.0, hq).astype(np.float32)
    if no_sink is not None:
        z[no_sink] = -np.inf
    return z


# (Sq, Skv, is_causal, window_size): square causal, Sq > Skv causal (its first 40 rows see no
# key), a sliding window, non-causal Sq < Skv.
SINK_CASES = [(64, 64, True, (-1, -1)), (70, 30, True, (-1, -1)), (50, 80, True, (15, 0)),
              (40, 90, False, (-1, -1))]


def sink_case_id(c):
    sq, skv, causal, (left, right) = c
    return f"{sq}x{skv}{'-causal' if causal else ''}" + (f"-({left},{right})" if left >= 0 else "")


def test_sinks_reference_is_a_softmax_with_a_sink_column():
    # gpt-oss's reference written out (transformers' gpt_oss eager attention): the sink as one
    # more column of each row's scores, softmax over the row, the column dropped. The float64
    # oracle (attention_reference) gives that output and the log of the whole denominator.
    rng = np.random.default_rng(90)
    q, k, v = qkv(rng, 1, 4, 2, 5, 7, 16)
    z = np.array([1.5, -np.inf, 0.25, 3.0], np.float32)
    out, lse = intfa.attention_reference(q, k, v, is_causal=True, sinks=z, return_lse=True)
    qd, kd, vd = (x.astype(np.float64) for x in (q, k, v))
    for h in range(4):
        for i in range(5):
            keys = range(i + 7 - 5 + 1)  # causal, bottom-right
            scores = [qd[0, h, i] @ kd[0, h // 2, j] / 4.0 for j in keys] + [float(z[h])]
            m = max(scores)
            e = np.exp(np.array(scores) - m)
            probs = e / e.sum()
            want = sum(p * vd[0, h // 2, j] for p, j in zip(probs[:-1], keys))
            np.testing.assert_allclose(out[0, h, i], want, rtol=0, atol=1e-12)
            np.testing.assert_allclose(lse[0, h, i], m + np.log(e.sum()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", ("float64",) + SCHEMES)
@pytest.mark.parametrize("c", SINK_CASES, ids=sink_case_id)
def test_sinks_match_the_numpy_oracle(scheme, c):
    # Sinks (GQA 8 / 2, both layouts, a head without a sink) against reference.py's float64
    # softmax with a sink column: the float64 oracle (attention_reference) to rounding;
    # intfa.attention within the scheme's error, as the window tests bound it, and
    # attention_int8 of quantize() its bits. Rows that see no key give 0 and an LSE of their
    # head's logit (-inf for the head without one), the oracle's exactly.
    sq, skv, causal, window = c
    rng = np.random.default_rng(92 + sq)
    z = sink_logits(rng, 8, no_sink=2)
    for layout in ("BHSD", "BSHD"):
        q, k, v = qkv(rng, 2, 8, 2, sq, skv, 64, layout)
        kw = dict(is_causal=causal, window_size=window, sinks=z, layout=layout, return_lse=True)
        ref, ref_lse = attention_ref(q, k, v, causal=causal, layout=layout, window=window,
                                     sinks=z)
        _, lse0 = attention_ref(q, k, v, causal=causal, layout=layout, window=window)
        empty = np.isneginf(lse0)  # rows that see no key
        if scheme == "float64":
            out, lse = intfa.attention_reference(q, k, v, **kw)
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
            np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-12)
            exact(lse[empty], ref_lse[empty])
            assert np.all(in_layout(layout, out)[0][empty] == 0)
            continue
        out, lse = intfa.attention(q, k, v, enable_gqa=True, scheme=scheme, **kw)
        assert rel_l2(out, ref) < TOL[scheme]
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=WINDOW_LSE_TOL[scheme])
        assert np.all(in_layout(layout, out)[0][empty] == 0)
        np.testing.assert_allclose(lse[empty], ref_lse[empty], rtol=1e-6, atol=1e-6)
        x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
        del kw["layout"]
        for got, want in zip(intfa.attention_int8(x, **kw), (out, lse)):
            exact(got, want)


def test_minus_inf_sinks_are_no_sinks():
    # sinks = -inf for every head is no sink: the outputs and LSEs of every entry point bit for
    # bit (the INT8 emulation skips the fold for a -inf sink, as fold_sink leaves the GPU's).
    rng = np.random.default_rng(93)
    q, k, v = qkv(rng, 2, 8, 2, 70, 30, 64)
    none = np.full(8, -np.inf, np.float32)

    def same(got, want):
        exact(got[0], want[0])
        exact(got[1], want[1])

    for scheme in SCHEMES:
        kw = dict(is_causal=True, enable_gqa=True, scheme=scheme, return_lse=True)
        same(intfa.attention(q, k, v, sinks=none, **kw), intfa.attention(q, k, v, **kw))
        x = intfa.quantize(q, k, v, scheme=scheme)
        same(intfa.attention_int8(x, is_causal=True, sinks=[-np.inf] * 8, return_lse=True),
             intfa.attention_int8(x, is_causal=True, return_lse=True))
    kw = dict(is_causal=True, return_lse=True)
    same(intfa.attention_reference(q, k, v, sinks=none, **kw),
         intfa.attention_reference(q, k, v, **kw))
    qp, kp, vp, cu_q, cu_kv = packed(rng, [5, 0, 30, 4], [9, 3, 20, 0], 8, 2, 64)
    same(intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv, sinks=none, enable_gqa=True, **kw),
         intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv, enable_gqa=True, **kw))
    cache = intfa.KVCache(k, v, 40)
    same(cache.attention(q[:, :, :2], sinks=none, **kw), cache.attention(q[:, :, :2], **kw))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sinks_lse_is_the_logaddexp_of_the_sink(scheme):
    # With the same scores and keys a sink changes only the denominator: lse_sink =
    # logaddexp(lse, z) and out_sink = out * exp(lse - lse_sink), for the float64 oracle to
    # rounding and for intfa to float32 rounding (the output to its fp16 rounding); rows that
    # see no key: logaddexp(-inf, z) = z and 0.
    rng = np.random.default_rng(94)
    q, k, v = qkv(rng, 1, 8, 2, 70, 30, 64)
    z = sink_logits(rng, 8, no_sink=7)
    zz = z[None, :, None].astype(np.float64)
    for window in ((-1, -1), (9, 0)):
        kw = dict(is_causal=True, window_size=window, return_lse=True)
        out0, lse0 = intfa.attention_reference(q, k, v, **kw)
        out, lse = intfa.attention_reference(q, k, v, sinks=z, **kw)
        np.testing.assert_allclose(lse, np.logaddexp(lse0, zz), rtol=0, atol=1e-12)
        with np.errstate(invalid="ignore"):
            factor = np.nan_to_num(np.exp(lse0 - lse))[..., None]
        np.testing.assert_allclose(out, out0 * factor, rtol=0, atol=1e-12)
        out0, lse0 = intfa.attention(q, k, v, enable_gqa=True, scheme=scheme, **kw)
        out, lse = intfa.attention(q, k, v, enable_gqa=True, scheme=scheme, sinks=z, **kw)
        np.testing.assert_allclose(lse, np.logaddexp(lse0.astype(np.float64), zz), rtol=1e-6,
                                   atol=2e-6)
        with np.errstate(invalid="ignore"):
            factor = np.nan_to_num(np.exp(lse0.astype(np.float64) - lse))[..., None]
        np.testing.assert_allclose(out.astype(np.float64), out0.astype(np.float64) * factor,
                                   rtol=2e-3, atol=1e-4)


def test_sinks_rows_that_see_no_key():
    # Causal Sq = 70 > Skv = 30 and a window (3, 0) over it: the first 40 queries see no key;
    # with a sink they give 0 and an LSE of their head's logit (-inf without a sink), on every
    # entry point.
    rng = np.random.default_rng(95)
    q, k, v = qkv(rng, 1, 8, 2, 70, 30, 64)
    z = sink_logits(rng, 8, no_sink=1)
    want = np.broadcast_to(z[None, :, None], (1, 8, 40))
    cache = intfa.KVCache(k, v, 32)
    for window in ((-1, -1), (3, 0)):
        kw = dict(is_causal=True, window_size=window, sinks=z, return_lse=True)
        for out, lse in (intfa.attention(q, k, v, enable_gqa=True, **kw),
                         intfa.attention_int8(intfa.quantize(q, k, v), **kw),
                         cache.attention(q, **kw),
                         intfa.attention_reference(q, k, v, **kw)):
            assert np.all(out[:, :, :40] == 0)
            np.testing.assert_allclose(lse[:, :, :40], want, rtol=1e-6, atol=1e-6)
            assert np.all(np.isfinite(lse[:, :, 40:]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sinks_varlen_and_attention_int8(scheme):
    # Varlen with sinks (an empty query sequence, one without keys: its rows 0 and LSE z, Sq <
    # Skv and Sq > Skv, causal and windowed) within the scheme's error of float64 per sequence;
    # attention_int8 of quantize() the same bits.
    rng = np.random.default_rng(96)
    q, k, v, cu_q, cu_kv = packed(rng, [5, 0, 70, 30, 4], [9, 3, 64, 20, 0], 8, 2, 64)
    z = sink_logits(rng, 8, no_sink=4)
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (True, (7, 0))):
        kw = dict(is_causal=causal, window_size=window, sinks=z, return_lse=True)
        out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, enable_gqa=True, scheme=scheme,
                                          **kw)
        ref, ref_lse = varlen_ref(q, k, v, cu_q, cu_kv, causal=causal, window=window, sinks=z)
        assert rel_l2(out, ref) < TOL[scheme]
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=WINDOW_LSE_TOL[scheme])
        assert np.all(out[105:] == 0)  # the sequence without keys: 0 and the logits
        np.testing.assert_allclose(lse[:, 105:], np.broadcast_to(z[:, None], (8, 4)),
                                   rtol=1e-6, atol=1e-6)
        x = intfa.quantize(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, scheme=scheme)
        for got, want in zip(intfa.attention_int8(x, **kw), (out, lse)):
            exact(got, want)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_sinks_kv_cache_decode(scheme, monkeypatch):
    # A gpt-oss-style decode loop over a KVCache (GQA 8 / 2, sinks, causal, every other step a
    # sliding window of 16 tokens): within the decode loop's tolerance of float64 with a sink
    # column over the tokens the step sees; the fast path (one _C.kv_attention call) the bits
    # of quantize_q + attention_int8 over qkv() (whose lse_offset the sinks need: accurate).
    rng = np.random.default_rng(97)
    q, k, v = qkv(rng, 2, 8, 2, 46, 46, 64)
    z = sink_logits(rng, 8, no_sink=0)

    def step(i, qt, end):
        window = (15, 0) if i % 2 else (-1, -1)
        return (dict(is_causal=True, window_size=window, sinks=z, return_lse=True),
                attention_ref(qt, tokens(k, 0, end), tokens(v, 0, end), causal=True,
                              window=window, sinks=z))

    cache_decode_loop(monkeypatch, q, k, v, scheme, step)


@pytest.mark.parametrize("generic", [False, True])
def test_sinks_ragged_and_paged_caches(generic):
    # Sinks (with a window) and per-sequence key counts (seqused_kv): a ragged KVCache is, bit
    # for bit, one cache per sequence (through its methods or the public functions); a
    # PagedKVCache is the ragged cache bit for bit.
    z = sink_logits(np.random.default_rng(98), 8, no_sink=3)
    ragged, q = ragged_and_paged(generic, 99, 8, sinks=z, window_size=(6, 0))
    assert not np.array_equal(ragged.attention(q, is_causal=True, sinks=z),
                              ragged.attention(q, is_causal=True))


def test_sinks_any_float_dtype_or_numbers():
    # float64, float16, bfloat16 (ml_dtypes) arrays, lists and tuples of numbers: float32 on
    # q's device, the same bits as float32 logits of the same values (multiples of 1/4 here).
    rng = np.random.default_rng(99)
    q, k, v = qkv(rng, 1, 4, 2, 20, 24, 64)
    z = np.array([0.5, 2.25, -np.inf, 4.0], np.float32)
    kw = dict(is_causal=True, enable_gqa=True, return_lse=True)
    want = intfa.attention(q, k, v, sinks=z, **kw)
    forms = [z.astype(np.float64), z.astype(np.float16), z.tolist(), tuple(z.tolist()),
             [0.5, 2.25, float("-inf"), 4]]
    try:
        import ml_dtypes
        forms.append(z.astype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    for form in forms:
        for got, w in zip(intfa.attention(q, k, v, sinks=form, **kw), want):
            exact(got, w)
    kw = dict(is_causal=True, return_lse=True)
    ref = intfa.attention_reference(q, k, v, sinks=z, **kw)
    for got, w in zip(intfa.attention_reference(q, k, v, sinks=z.astype(np.float16), **kw), ref):
        exact(got, w)


def test_sinks_errors():
    # A wrong shape (the C++ layer's ValueError), a non-float array or what is not an array
    # (TypeError), NaN / +inf on the CPU backend, all naming sinks, on every entry point; the
    # accurate scheme's lse_offset that sinks need (qkv.lse_offset) when attention_int8 lacks it.
    rng = np.random.default_rng(100)
    q, k, v = qkv(rng, 1, 4, 2, 16, 16, 64)
    x = intfa.quantize(q, k, v)
    calls = entry_points(q, k, v)
    calls["flash_attn_func"] = lambda sinks: intfa.flash_attn_func(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), learnable_sink=sinks)
    for name, call in calls.items():
        for bad, shape in ((np.zeros(3, np.float32), "[3]"), (np.zeros(8, np.float32), "[8]"),
                           (np.zeros((1, 4), np.float32), "[1, 4]"), ([1.0, 2.0], "[2]"),
                           (np.float32(1.0), "[]")):
            with pytest.raises(ValueError, match=r"^sinks: expected shape \[heads_q\] = \[4\], "
                                                 r"got " + re.escape(shape) + "$"):
                call(sinks=bad)
        with pytest.raises(TypeError, match=r"^sinks: expected a float array \(float16, "
                                            r"bfloat16, float32 or float64\), got int32$"):
            call(sinks=np.arange(4, dtype=np.int32))
        with pytest.raises(TypeError, match=r"^sinks: expected a float array of one logit per "
                                            r"query head \[Hq\] .* got builtins.str$"):
            call(sinks="0,1,2,3")
        with pytest.raises(TypeError, match=r"^sinks: expected numbers \(one logit per query "
                                            r"head\), got \['a', 'b'\]$"):
            call(sinks=["a", "b"])
        for value, shown in ((np.nan, "nan"), (np.inf, "inf")):
            z = np.zeros(4, np.float32)
            z[2] = value
            with pytest.raises(ValueError, match=r"^sinks: expected finite logits or -inf \(no "
                                                 r"sink\), got " + shown + " for head 2$"):
                call(sinks=z)
    z = sink_logits(rng, 4)
    q8, q_scale, lse_offset = intfa.quantize_q(q)  # accurate without the K mean: no lse_offset
    assert lse_offset is None
    with pytest.raises(ValueError, match=r"^qkv.lse_offset: sinks with scheme accurate need it"):
        intfa.attention_int8(x._replace(q8=q8, q_scale=q_scale, lse_offset=None), sinks=z)
    intfa.attention_int8(x._replace(q8=q8, q_scale=q_scale, lse_offset=None))  # fine without
    # paper's scores are not shifted: no lse_offset needed.
    xp = intfa.quantize(q, k, v, scheme="paper")
    exact(intfa.attention_int8(xp._replace(lse_offset=None), sinks=z),
          intfa.attention_int8(xp, sinks=z))


def test_paged_kv_cache_shared_prefix_pages():
    # PagedKVCache(v_headroom=): one set of statistics (batch stride 0; v_scale the prompts'
    # largest x 2), share_prefix() hands sequence 0's first two pages to a released sequence 2,
    # append_to() writes 2's own tokens, append() a step for all: the shared pages never change,
    # sequence 2's attention equals a contiguous cache of its tokens with the same set (bits),
    # and the pages go back to the pool when no sequence holds them.
    rng = np.random.default_rng(41)
    page, hkv, d = 16, 2, 64
    q, k, v = qkv(rng, 3, 4, hkv, 1, 60, d)
    cache = intfa.PagedKVCache(k, v, 24, page_size=page, max_pages=6, lengths=[60, 40, 20],
                               v_headroom=2.0)
    assert cache.shared and cache.v_scale.strides[0] == 0 and cache.k_mean.strides[0] == 0
    own = intfa.KVCache(k, v, 64, lengths=[60, 40, 20])  # per-sequence statistics
    np.testing.assert_array_equal(cache.v_scale[1], own.v_scale.max(axis=0) * np.float32(2))
    for b, m in enumerate([60, 40, 20]):
        ref, _ = attention_ref(q[b:b + 1], k[b:b + 1, :, :m], v[b:b + 1, :, :m])
        assert rel_l2(cache.attention(q)[b:b + 1], ref) < TOL["accurate"]
    free = cache.pages_free
    cache.release(2)
    assert cache.pages_free == free + 2
    cache.share_prefix(2, 0, 2 * page)
    assert cache.lengths_host[2] == 2 * page and cache.pages_free == free + 2
    assert list(cache.block_table[2, :2]) == list(cache.block_table[0, :2])
    shared = [int(x) for x in cache.block_table[0, :2]]
    before = cache.k8[shared].copy(), cache.vt8[shared].copy(), cache.k_scale[shared].copy()
    sk, sv = (randn(rng, (1, hkv, 10, d)) for _ in range(2))
    cache.append_to(2, sk, sv)
    nk, nv = (randn(rng, (3, hkv, 1, d)) * 3 for _ in range(2))  # some V past the scales
    cache.append(nk.astype(np.float16), nv.astype(np.float16))
    assert cache.lengths_host == [61, 41, 2 * page + 11]
    for got, want in zip((cache.k8[shared], cache.vt8[shared], cache.k_scale[shared]), before):
        np.testing.assert_array_equal(got, want)
    # Sequence 2 as a contiguous cache: the prefix, its own tokens, the step's token.
    step_k, step_v = nk[2:3].astype(np.float16), nv[2:3].astype(np.float16)
    toks = [np.concatenate(x, axis=2)
            for x in ((k[:1, :, :2 * page], sk, step_k), (v[:1, :, :2 * page], sv, step_v))]
    n = toks[0].shape[2]
    cont = intfa.QuantizedQKV(scheme="accurate", layout="BHSD", q8=None, q_scale=None,
                              lse_offset=None, k8=np.zeros((1, hkv, 64, d), np.int8),
                              k_scale=np.zeros((1, hkv, 64), np.float32),
                              k_mean=cache.k_mean[2:3], vt8=np.zeros((1, hkv, d, 64), np.int8),
                              v_scale=cache.v_scale[2:3])
    intfa.append_kv(cont, toks[0], toks[1], 0, fixed_v_scale=True)
    q8, q_scale, lse_offset = intfa.quantize_q(q[2:3], cont.k_mean)
    want = intfa.attention_int8(cont._replace(q8=q8, q_scale=q_scale, lse_offset=lse_offset,
                                              k8=cont.k8[:, :, :n], k_scale=cont.k_scale[..., :n]))
    np.testing.assert_array_equal(cache.attention(q)[2:3], want)
    # The key range: by default the longest sequence's pages (a view of the table's first
    # columns); the whole table gives the same bits on the CPU backend.
    np.testing.assert_array_equal(cache.attention(q), cache.attention(q, max_seqlen_kv=cache.capacity))
    with pytest.raises(ValueError, match=r"max_seqlen_kv: expected an int in \[the longest"):
        cache.attention(q, max_seqlen_kv=cache.length - 1)
    # Pages by reference: sequence 0's release keeps the two shared ones; 2's frees them.
    free = cache.pages_free
    cache.release(0)
    assert cache.pages_free == free + 4 - 2
    cache.release(2)
    assert cache.pages_free == free + 4 + 1
    # Errors name what is wrong.
    with pytest.raises(ValueError, match="tokens: expected a positive multiple of page_size 16"):
        cache.share_prefix(0, 1, 20)
    with pytest.raises(ValueError, match="dst: expected a sequence other than src that holds no"):
        cache.share_prefix(1, 1, 16)
    growing = intfa.PagedKVCache(k, v, 24, page_size=page, max_pages=6)
    growing.release(2)
    with pytest.raises(ValueError, match="shared only by a cache with one set of static"):
        growing.share_prefix(2, 0, 16)
    with pytest.raises(ValueError, match="v_headroom: expected None or a number >= 1"):
        intfa.PagedKVCache(k, v, 24, page_size=page, v_headroom=0.5)


# ------------------------------------------------------------------------------------------------
# Logit soft-capping (softcap=)
# ------------------------------------------------------------------------------------------------
def test_softcap_reference_is_the_capped_softmax():
    # Gemma 2's attention written out: scores scale q.k, capped at softcap * tanh(s / softcap),
    # softmax over the visible keys. The float64 oracle gives that output and LSE.
    rng = np.random.default_rng(96)
    q, k, v = qkv(rng, 1, 4, 2, 5, 7, 16)
    q *= 4  # scores of several units, so a cap of 1.5 moves them
    out, lse = intfa.attention_reference(q, k, v, is_causal=True, softcap=1.5, return_lse=True)
    qd, kd, vd = (x.astype(np.float64) for x in (q, k, v))
    for h in range(4):
        for i in range(5):
            keys = range(i + 7 - 5 + 1)  # causal, bottom-right
            scores = np.array([1.5 * np.tanh(qd[0, h, i] @ kd[0, h // 2, j] / 4.0 / 1.5)
                               for j in keys])
            e = np.exp(scores - scores.max())
            want = sum(p * vd[0, h // 2, j] for p, j in zip(e / e.sum(), keys))
            np.testing.assert_allclose(out[0, h, i], want, rtol=0, atol=1e-12)
            np.testing.assert_allclose(lse[0, h, i], scores.max() + np.log(e.sum()), rtol=0,
                                       atol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_softcap_attention_within_scheme_error(scheme):
    # attention / attention_varlen with softcap against the float64 oracle with it, within the
    # scheme's error (GQA, both layouts, causal and a window), and far from the uncapped call;
    # K with a per-channel offset (the smoothed schemes must put the K-mean term back before the
    # tanh). attention_int8 of quantize() gives attention's bits; attention_varlen each
    # sequence's attention() bits (sequences without keys: zeros).
    rng = np.random.default_rng(97)
    for layout in ("BHSD", "BSHD"):
        q, k, v = qkv(rng, 2, 8, 2, 70, 90, 64, layout)
        q *= 3
        if scheme != "paper":  # a per-channel offset (paper's own error grows with it)
            k += np.float16(2.0) * rng.standard_normal(64).astype(np.float16)
        for window in ((-1, -1), (20, 0)):
            kw = dict(is_causal=True, window_size=window, layout=layout, return_lse=True)
            ref, ref_lse = intfa.attention_reference(q, k, v, softcap=5.0, **kw)
            out, lse = intfa.attention(q, k, v, enable_gqa=True, scheme=scheme, softcap=5.0, **kw)
            plain = intfa.attention(q, k, v, enable_gqa=True, scheme=scheme, **kw)[0]
            err = rel_l2(out, ref)
            assert err < TOL[scheme]
            assert rel_l2(plain, ref) > max(0.1, 4 * err)
            # (scores three times the window tests' and an offset K: twice their LSE bound)
            np.testing.assert_allclose(lse, ref_lse, atol=2 * WINDOW_LSE_TOL[scheme])
            x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
            del kw["layout"]
            for got, want in zip(intfa.attention_int8(x, softcap=5.0, **kw), (out, lse)):
                exact(got, want)
    qp, kp, vp, cu_q, cu_kv = packed(rng, [5, 0, 30, 4], [9, 3, 20, 0], 8, 2, 64)
    kw = dict(is_causal=True, enable_gqa=True, return_lse=True)
    out, lse = intfa.attention_varlen(qp * 3, kp, vp, cu_q, cu_kv, scheme=scheme, softcap=2.0, **kw)
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_kv[:-1], cu_kv[1:]):
        if q1 == q0 or k1 == k0:
            assert np.all(out[q0:q1] == 0)
            continue
        one = [x[None].transpose(0, 2, 1, 3) for x in (qp[q0:q1] * 3, kp[k0:k1], vp[k0:k1])]
        want, want_lse = intfa.attention(*one, scheme=scheme, softcap=2.0, **kw)
        exact(out[q0:q1], want[0].transpose(1, 0, 2))
        exact(lse[:, q0:q1], want_lse[0])


def test_softcap_errors():
    rng = np.random.default_rng(98)
    q, k, v = qkv(rng, 1, 2, 2, 8, 8, 32)
    for bad in (-1.0, float("nan"), float("inf")):
        for call in (intfa.attention, intfa.attention_reference):
            with pytest.raises(ValueError, match=r"^softcap: expected a finite value >= 0 "
                                                 r"\(0: no soft-capping\), got"):
                call(q, k, v, softcap=bad)
    with pytest.raises(TypeError, match=r"softcap: expected a number or None, got 'x'"):
        intfa.attention(q, k, v, softcap="x")
    x = intfa.quantize(q, k, v)
    with pytest.raises(ValueError, match=r"^qkv.lse_offset: softcap with scheme accurate needs it"):
        intfa.attention_int8(x._replace(lse_offset=None), softcap=5.0)


def test_softcap_over_kv_caches():
    # KVCache.attention(softcap=) (its one-call fast path) is quantize_q + attention_int8(softcap=)
    # over its tokens, bit for bit, and a PagedKVCache of the same prompts (the generic path)
    # gives the same bits; the cap changes the result.
    rng = np.random.default_rng(99)
    q, k, v = qkv(rng, 2, 8, 2, 3, 150, 64)
    q *= 6
    cache = intfa.KVCache(k, v, 256)
    paged = intfa.PagedKVCache(k, v, 2 * 10, page_size=16, max_pages=16)
    kw = dict(is_causal=True, return_lse=True, softcap=4.0)
    out, lse = cache.attention(q, **kw)
    q8, q_scale, lse_offset = intfa.quantize_q(q, cache.k_mean)
    for got, want in zip(intfa.attention_int8(cache.qkv(q8, q_scale, lse_offset, q.dtype), **kw),
                         (out, lse)):
        exact(got, want)
    for got, want in zip(paged.attention(q, **kw), (out, lse)):
        exact(got, want)
    assert rel_l2(cache.attention(q, is_causal=True), out) > 0.05
