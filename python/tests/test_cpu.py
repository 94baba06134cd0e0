"""intfa through NumPy on the CPU backend: schemes, shapes, layouts, GQA, varlen, the quantized
path and the error messages the C++ layer reports."""

import numpy as np
import pytest

import intfa
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
    with pytest.raises(ValueError, match="dim 2 .seqlen. must be >= 1"):
        intfa.attention(q[:, :, :0], k, v)
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


def test_gpu_path_names_on_host_arrays():
    # NumPy arrays are host memory: the CPU backend serves them whatever the build; a GPU path
    # name is accepted and ignored there.
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, 1, 2, 2, 16, 16, 64)
    np.testing.assert_array_equal(intfa.attention(q, k, v, path="sm90"), intfa.attention(q, k, v))
    with pytest.raises(ValueError, match="path"):
        intfa.attention(q, k, v, path="sm70")
