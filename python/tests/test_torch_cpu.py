"""intfa with torch CPU tensors: the custom ops (eager, fake, torch.compile) on the CPU backend,
and the SDPA routing rules. Needs torch, not a GPU."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import intfa  # noqa: E402
from paged import (check_paged_parts, drop_pages, page_copy, paged_vs_ragged,  # noqa: E402
                   unpage)
from ragged import (Sequence, check_parts, in_layout, ragged_inputs,  # noqa: E402
                    ragged_vs_separate)
from reference import attention_ref, rel_l2, varlen_ref  # noqa: E402
from tiny_models import (against_float32, check_greedy_steps, check_packed_prompts,  # noqa: E402
                         error_without, left_padded, rel, tiny_gemma2, tiny_gpt_oss)


def rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_cpu_tensors(dtype):
    q, k, v = (rand(1, 4, 60, 64, dtype=dtype, seed=i) for i in range(3))
    k, v = k[:, :2], v[:, :2]
    out, lse = intfa.attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 60)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)


def test_same_result_as_numpy():
    q, k, v = (rand(2, 2, 33, 64, seed=i) for i in range(3))
    out_t = intfa.attention(q, k, v, is_causal=True, scheme="paper")
    out_n = intfa.attention(q.numpy(), k.numpy(), v.numpy(), is_causal=True, scheme="paper")
    np.testing.assert_array_equal(out_t.numpy(), out_n)


def test_requires_grad_inputs_are_read():
    q, k, v = (rand(1, 2, 16, 64, dtype=torch.float32, seed=i).half().requires_grad_()
               for i in range(3))
    out = intfa.attention(q, k, v)
    ref, _ = attention_ref(q, k, v)
    assert rel_l2(out, ref) < 3e-2
    if out.requires_grad:  # custom op: torch's autograd says there is no backward formula
        with pytest.raises(RuntimeError):
            out.float().sum().backward()


def test_errors_through_the_custom_op():
    q, k, v = (rand(1, 2, 16, 64, seed=i) for i in range(3))
    with pytest.raises(ValueError, match="k: head_dim expected 64 .as q., got 32"):
        intfa.attention(q, k[..., :32].contiguous(), v)
    with pytest.raises(TypeError, match="q: expected dtype float16 or bfloat16, got float32"):
        intfa.attention(q.float(), k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        intfa.attention(q, k[:, :1], v[:, :1])


def test_varlen_cpu_tensors():
    cu_q = torch.tensor([0, 10, 10, 50], dtype=torch.int32)
    cu_kv = torch.tensor([0, 20, 25, 45], dtype=torch.int32)
    q = rand(50, 2, 64, seed=1)
    k = rand(45, 2, 64, seed=2)
    v = rand(45, 2, 64, seed=3)
    out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, 40, 20, is_causal=True,
                                      return_lse=True)
    ref, ref_lse = varlen_ref(q, k, v, cu_q, cu_kv, causal=True)
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)


@pytest.mark.parametrize("scheme", ["accurate", "paper", "half"])
def test_quantize_and_attention_int8(scheme):
    q, k, v = (rand(1, 2, 40, 64, seed=i) for i in range(3))
    x = intfa.quantize(q, k, v, scheme=scheme)
    xn = intfa.quantize(q.numpy(), k.numpy(), v.numpy(), scheme=scheme)
    for name in ("q8", "q_scale", "k8", "k_scale", "k_mean", "vt8", "v_scale"):
        a, b = getattr(x, name), getattr(xn, name)
        assert (a is None) == (b is None), name
        if name == "vt8" and a is not None:  # columns past seqlen_kv are padding
            a, b = a[..., :40], b[..., :40]
        if a is not None:
            np.testing.assert_array_equal(a.numpy(), b, err_msg=name)
    out = intfa.attention_int8(x, is_causal=True)
    assert out.dtype == torch.float16
    want = intfa.attention(q, k, v, is_causal=True, scheme=scheme)
    assert torch.equal(out, want)


def _compile_check(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    return compiled(*args), fn(*args)


def test_torch_compile_fullgraph_cpu():
    def block(q, k, v):
        out, lse = intfa.attention(q * 1.5, k, v, is_causal=True, return_lse=True)
        return out.float().sum(-1), lse

    q, k, v = (rand(1, 2, 32, 64, seed=i) for i in range(3))
    (out_c, lse_c), (out_e, lse_e) = _compile_check(block, q, k, v)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)


def test_torch_compile_quantized_path_cpu():
    def fn(q, k, v):
        x = intfa.quantize(q, k, v)
        return intfa.attention_int8(x)

    q, k, v = (rand(1, 2, 32, 64, seed=i) for i in range(3))
    out_c, out_e = _compile_check(fn, q, k, v)
    assert torch.equal(out_c, out_e)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_cpu():
    q, k, v = (rand(1, 2, 24, 64, seed=i) for i in range(3))
    torch.library.opcheck(torch.ops.intfa.attention.default,
                          (q, k, v, True, 0.0, "BHSD", "accurate", "auto", True))
    torch.library.opcheck(torch.ops.intfa.attention.default,
                          (q, k, v, False, 0.2, "BHSD", "paper", "auto", False))


def test_sdpa_routing_rules_on_cpu():
    F = torch.nn.functional
    q, k, v = (rand(1, 2, 16, 64, seed=i) for i in range(3))
    # CPU tensors are never routed: torch serves them, with identical results.
    assert not intfa.sdpa_supported(q, k, v)
    torch_sdpa = F.scaled_dot_product_attention
    assert torch.equal(intfa.scaled_dot_product_attention(q, k, v, is_causal=True),
                       torch_sdpa(q, k, v, is_causal=True))
    with intfa.sdpa_patched():
        assert F.scaled_dot_product_attention is not torch_sdpa
        intfa.patch_sdpa()  # idempotent
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), torch_sdpa(q, k, v))
    assert F.scaled_dot_product_attention is torch_sdpa
    intfa.patch_sdpa()
    intfa.unpatch_sdpa()
    intfa.unpatch_sdpa()
    assert F.scaled_dot_product_attention is torch_sdpa


# ------------------------------------------------------------------------------------------------
# INT8 KV cache
# ------------------------------------------------------------------------------------------------
def _decode_inputs(hq=4, hkv=2, n0=37, total=43, seed=0):
    q = rand(1, hq, total, 64, seed=seed)
    k = rand(1, hkv, total, 64, seed=seed + 1) + 1
    v = rand(1, hkv, total, 64, seed=seed + 2)
    v[:, 0, n0 + 2, :4] *= 5  # a V value past the prompt's range: its channel's scale grows
    return q, k, v


def _decode(cache, q, k, v, n0, total):
    outs = []
    for t in range(n0, total):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(cache.attention(q[:, :, t:t + 1], is_causal=True, return_lse=True))
    return outs


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_kv_cache_torch_equals_numpy(scheme):
    q, k, v = _decode_inputs()
    ct = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48, scheme=scheme)
    cn = intfa.KVCache(k[:, :, :37].numpy(), v[:, :, :37].numpy(), 48, scheme=scheme)
    assert isinstance(ct.k8, torch.Tensor) and ct.dtype == torch.float16
    prompt_v_scale = ct.v_scale.clone()
    got = _decode(ct, q, k, v, 37, 43)
    assert not torch.equal(ct.v_scale, prompt_v_scale)  # the scaled token grew a scale
    want = _decode(cn, q.numpy(), k.numpy(), v.numpy(), 37, 43)
    for (o, l), (on, ln) in zip(got, want):
        assert isinstance(o, torch.Tensor) and o.dtype == torch.float16
        np.testing.assert_array_equal(o.numpy(), on)
        np.testing.assert_array_equal(l.numpy(), ln)
    n = ct.length
    np.testing.assert_array_equal(ct.k8[:, :, :n].numpy(), cn.k8[:, :, :n])
    np.testing.assert_array_equal(ct.k_scale[..., :n].numpy(), cn.k_scale[..., :n])
    np.testing.assert_array_equal(ct.vt8[..., :n].numpy(), cn.vt8[..., :n])
    np.testing.assert_array_equal(ct.v_scale.numpy(), cn.v_scale)
    ref, ref_lse = attention_ref(q[:, :, 42:], k, v, causal=True)
    assert rel_l2(got[-1][0], ref) < 0.05
    np.testing.assert_allclose(got[-1][1].numpy(), ref_lse, atol=5e-2)


def test_kv_cache_fast_path_torch(monkeypatch):
    # Plain eager tensors take KVCache's fast path (the binding called directly; attention in
    # one call, _C.kv_attention); a call that needs grad takes the generic path through the
    # custom ops, as torch.compile does (test_torch_compile_decode_step_cpu): the same bits.
    q, k, v = _decode_inputs()
    fast = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    slow = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    lib = intfa._arrays.lib
    kv_attention, calls, generic = lib.kv_attention, [], []
    monkeypatch.setattr(lib, "kv_attention", lambda *a: calls.append(1) or kv_attention(*a))
    append_kv = intfa.append_kv
    monkeypatch.setattr(intfa, "append_kv", lambda *a: generic.append(1) or append_kv(*a))
    for t in range(37, 43):
        kt, vt, qt = k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1]
        fast.append(kt, vt)
        slow.append(kt.clone().requires_grad_(), vt)
        out, lse = fast.attention(qt, is_causal=True, return_lse=True, scale=0.2)
        out_s, lse_s = slow.attention(qt.clone().requires_grad_(), is_causal=True,
                                      return_lse=True, scale=0.2)
        assert type(out) is torch.Tensor and not out.requires_grad
        assert torch.equal(out, out_s.detach()) and torch.equal(lse, lse_s.detach())
        out32 = fast.attention(qt, out_dtype=torch.float32)
        assert out32.dtype == torch.float32
        assert torch.equal(out32, intfa.attention_int8(
            slow.qkv(*intfa.quantize_q(qt, slow.k_mean), qt.dtype), out_dtype="float32"))
    assert len(calls) == 12 and len(generic) == 6
    n = fast.length
    assert torch.equal(fast.k8[:, :, :n], slow.k8[:, :, :n])
    assert torch.equal(fast.k_scale[..., :n], slow.k_scale[..., :n])
    assert torch.equal(fast.vt8[..., :n], slow.vt8[..., :n])
    assert torch.equal(fast.v_scale, slow.v_scale)


def test_quantize_q_torch():
    q, k, v = _decode_inputs()
    x = intfa.quantize(q, k, v)
    q8, q_scale, lse_offset = intfa.quantize_q(q, x.k_mean)
    assert torch.equal(q8, x.q8) and torch.equal(q_scale, x.q_scale)
    assert torch.equal(lse_offset, x.lse_offset)
    q8, q_scale, lse_offset = intfa.quantize_q(q)  # no K mean: no lse_offset
    assert torch.equal(q8, x.q8) and lse_offset is None
    with pytest.raises(TypeError, match="q: expected dtype float16 or bfloat16"):
        intfa.quantize_q(q.float(), x.k_mean)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_kv_cache_ops():
    q, k, v = _decode_inputs()
    cache = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    torch.library.opcheck(torch.ops.intfa.quantize_q.default,
                          (q, cache.k_mean, 0.0, "BHSD", "accurate"))
    torch.library.opcheck(torch.ops.intfa.quantize_q.default, (q, None, 0.2, "BHSD", "paper"))
    torch.library.opcheck(torch.ops.intfa.append_kv.default,
                          (k[:, :, 37:], v[:, :, 37:], 37, cache.k8, cache.k_scale,
                           cache.k_mean, cache.vt8, cache.v_scale, "accurate", "BHSD", "BHSD"))


def test_torch_compile_decode_step_cpu():
    # A decode step (append, then attention over the cache) under torch.compile(fullgraph=True):
    # the same bits and the same cache as eager. length is a Python int: each new length may
    # retrace.
    def step(cache, kt, vt, qt):
        cache.append(kt, vt)
        return cache.attention(qt, is_causal=True)

    q, k, v = _decode_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    cc = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    ce = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    for t in range(37, 41):
        args = (k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1])
        assert torch.equal(compiled(cc, *args), step(ce, *args))
        assert cc.length == ce.length == t + 1
    n = cc.length
    assert torch.equal(cc.k8[:, :, :n], ce.k8[:, :, :n])
    assert torch.equal(cc.vt8[..., :n], ce.vt8[..., :n])
    assert torch.equal(cc.v_scale, ce.v_scale)


# ------------------------------------------------------------------------------------------------
# Ragged batches
# ------------------------------------------------------------------------------------------------
def torch_randn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape, scale: (torch.randn(*shape, generator=g) * scale).half()


def exact(got, want):
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("generic", [False, True])
def test_ragged_kv_cache_torch(layout, generic):
    # As test_cpu's ragged test with torch CPU tensors: one cache of prompts of 30, 12 and 21
    # tokens equals one cache per sequence bit for bit; and the same bits as NumPy.
    lengths = [30, 12, 21]
    inputs = in_layout(layout, *ragged_inputs(torch_randn(50), 3, 4, 2, 30, 8, 64, lengths))
    steps = [1, 3, 1, 2]
    ragged, _ = ragged_vs_separate(*inputs, torch.tensor(lengths), steps, layout, "accurate",
                                   exact, exact, generic)
    assert ragged.lengths.dtype == torch.int32 and ragged.lengths.tolist() == [37, 19, 28]
    numpy, _ = ragged_vs_separate(*(x.numpy() for x in inputs), lengths, steps, layout,
                                  "accurate", np.testing.assert_array_equal,
                                  np.testing.assert_array_equal, generic)
    check_parts(ragged, [Sequence(numpy, i) for i in range(3)],
                lambda got, want: np.testing.assert_array_equal(got.numpy(), want))


def test_ragged_kv_cache_through_the_custom_ops():
    # Arguments that need grad take the generic path through the custom ops
    # (intfa::append_kv_ragged, intfa::attention_int8 with seqused_kv): the fast path's bits.
    lengths = [20, 9]
    q, k, v, kn, vn = ragged_inputs(torch_randn(51), 2, 4, 2, 20, 4, 64, lengths)
    fast = intfa.KVCache(k, v, 32, lengths=lengths)
    slow = intfa.KVCache(k, v, 32, lengths=lengths)
    for t in range(4):
        kt, vt, qt = (x[:, :, t:t + 1] for x in (kn, vn, q))
        fast.append(kt, vt)
        slow.append(kt.clone().requires_grad_(), vt)
        out, lse = fast.attention(qt, is_causal=True, return_lse=True)
        out_s, lse_s = slow.attention(qt.clone().requires_grad_(), is_causal=True,
                                      return_lse=True)
        assert torch.equal(out, out_s.detach()) and torch.equal(lse, lse_s.detach())
    assert torch.equal(fast.lengths, slow.lengths) and fast.lengths.tolist() == [24, 13]
    check_parts(fast, [Sequence(slow, i) for i in range(2)], exact)
    ragged = intfa.KVCache(k, v, 32, lengths=lengths)
    ragged.truncate(torch.tensor([3, 9]))
    assert ragged.lengths.tolist() == [3, 9] and ragged.length == 9


def test_attention_int8_seqused_kv_torch():
    q, k, v = rand(3, 4, 5, 64, seed=0), rand(3, 2, 40, 64, seed=1), rand(3, 2, 40, 64, seed=2)
    x = intfa.quantize(q, k, v)
    used = torch.tensor([40, 13, 27], dtype=torch.int32)
    out, lse = intfa.attention_int8(x, seqused_kv=used, is_causal=True, return_lse=True)
    xn = intfa.quantize(q.numpy(), k.numpy(), v.numpy())
    out_n, lse_n = intfa.attention_int8(xn, seqused_kv=used.numpy(), is_causal=True,
                                        return_lse=True)
    np.testing.assert_array_equal(out.numpy(), out_n)
    np.testing.assert_array_equal(lse.numpy(), lse_n)
    assert not torch.equal(out, intfa.attention_int8(x, is_causal=True))
    with pytest.raises(ValueError, match=r"seqused_kv.*\[batch\]"):
        intfa.attention_int8(x, seqused_kv=used[:2])
    with pytest.raises(TypeError, match="seqused_kv"):
        intfa.attention_int8(x, seqused_kv=used.long())


def test_torch_compile_attention_int8_seqused_kv_cpu():
    def fn(q, k, v, used):
        x = intfa.quantize(q, k, v)
        return intfa.attention_int8(x, seqused_kv=used, is_causal=True, return_lse=True)

    q, k, v = rand(2, 2, 4, 64, seed=0), rand(2, 2, 32, 64, seed=1), rand(2, 2, 32, 64, seed=2)
    used = torch.tensor([32, 9], dtype=torch.int32)
    (out_c, lse_c), (out_e, lse_e) = _compile_check(fn, q, k, v, used)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    assert not torch.equal(out_e, intfa.attention_int8(intfa.quantize(q, k, v), is_causal=True))


def test_torch_compile_ragged_decode_step_cpu():
    # A ragged decode step under torch.compile(fullgraph=True): append at the per-sequence
    # positions, lengths += 1 on the device, attention with seqused_kv: as eager.
    def step(cache, kt, vt, qt):
        cache.append(kt, vt)
        return cache.attention(qt, is_causal=True)

    lengths = [20, 9]
    q, k, v, kn, vn = ragged_inputs(torch_randn(52), 2, 4, 2, 20, 4, 64, lengths)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    cc = intfa.KVCache(k, v, 32, lengths=lengths)
    ce = intfa.KVCache(k, v, 32, lengths=lengths)
    for t in range(3):
        args = (kn[:, :, t:t + 1], vn[:, :, t:t + 1], q[:, :, t:t + 1])
        assert torch.equal(compiled(cc, *args), step(ce, *args))
        assert cc.lengths.tolist() == ce.lengths.tolist() == [21 + t, 10 + t]
        assert cc.length == ce.length == 21 + t
    check_parts(cc, [Sequence(ce, i) for i in range(2)], exact)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_ragged_ops():
    q, k, v = _decode_inputs()
    cache = intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
    pos = torch.tensor([37], dtype=torch.int32)
    torch.library.opcheck(torch.ops.intfa.append_kv_ragged.default,
                          (k[:, :, 37:], v[:, :, 37:], pos, cache.k8, cache.k_scale,
                           cache.k_mean, cache.vt8, cache.v_scale, "accurate", "BHSD", "BHSD"))
    x = intfa.quantize(q, k, v)
    torch.library.opcheck(torch.ops.intfa.attention_int8.default,
                          (x.q8, x.q_scale, x.lse_offset, x.k8, x.k_scale, x.k_mean, x.vt8,
                           x.v_scale, None, None, None, 0, 0, "accurate", "BHSD", True, 0.0,
                           torch.float16, True, "auto", torch.tensor([30], dtype=torch.int32)))


# ------------------------------------------------------------------------------------------------
# Paged caches: block_table (CPU backend)
# ------------------------------------------------------------------------------------------------
def _arrays_as(x, kind, convert):
    """x with its array fields of type `kind` converted (sharing memory)."""
    return x._replace(**{f: convert(a) for f, a in x._asdict().items() if isinstance(a, kind)})


def _paged_torch(x, spare, seed, counts=None):
    """paged.page_copy (NumPy) of a torch CPU QuantizedQKV, as torch tensors; with counts, the
    table entries past each sequence's count -1 (paged.drop_pages)."""
    paged = page_copy(_arrays_as(x, torch.Tensor, torch.Tensor.numpy), 16, spare, seed)
    if counts is not None:
        paged = drop_pages(paged, counts)
    return _arrays_as(paged, np.ndarray, torch.from_numpy)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_paged_attention_torch(scheme):
    # As test_cpu's paged test with torch CPU tensors: the contiguous call bit for bit, through
    # the eager path and the custom op (intfa::attention_int8 with block_table last), and the
    # NumPy call's bits.
    q, k, v = rand(3, 4, 5, 64, seed=0), rand(3, 2, 64, 64, seed=1), rand(3, 2, 64, 64, seed=2)
    x = intfa.quantize(q, k, v, scheme=scheme)
    used = torch.tensor([45, -3, 100], dtype=torch.int32)
    for counts in (None, used):
        paged = _paged_torch(x, 5, 4, None if counts is None else counts.tolist())
        for causal in (False, True):
            out, lse = intfa.attention_int8(paged, seqused_kv=counts, is_causal=causal,
                                            return_lse=True)
            want, want_lse = intfa.attention_int8(x, seqused_kv=counts, is_causal=causal,
                                                  return_lse=True)
            assert not out.isnan().any()
            assert torch.equal(out, want) and torch.equal(lse, want_lse)
            op_out, op_lse = torch.ops.intfa.attention_int8.default(
                paged.q8, paged.q_scale, paged.lse_offset, paged.k8, paged.k_scale,
                paged.k_mean, paged.vt8, paged.v_scale, None, None, None, 0, 0, scheme, "BHSD",
                causal, 0.0, torch.float16, True, "auto", counts, paged.block_table)
            assert torch.equal(op_out, want) and torch.equal(op_lse, want_lse)
            np_paged = _arrays_as(paged, torch.Tensor, torch.Tensor.numpy)
            np_out = intfa.attention_int8(np_paged, is_causal=causal,
                                          seqused_kv=None if counts is None else counts.numpy())
            np.testing.assert_array_equal(out.numpy(), np_out)
    with pytest.raises(TypeError, match="block_table"):
        intfa.attention_int8(paged, block_table=paged.block_table.long())
    # Every key of sequence 0, whose table holds 3 pages (45 keys) and -1.
    with pytest.raises(ValueError, match=r"block_table\[0\]\[3\]: expected a page"):
        intfa.attention_int8(paged)


def test_torch_compile_paged_attention_cpu():
    q, k, v = rand(2, 4, 3, 64, seed=3), rand(2, 2, 32, 64, seed=4), rand(2, 2, 32, 64, seed=5)
    x = intfa.quantize(q, k, v)
    paged = _paged_torch(x, 2, 5)

    def fn(table):
        return intfa.attention_int8(paged, block_table=table, is_causal=True, return_lse=True)

    (out_c, lse_c), (out_e, lse_e) = _compile_check(fn, paged.block_table)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    assert torch.equal(out_e, intfa.attention_int8(x, is_causal=True))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_paged_append_torch(per_sequence):
    # append_kv into a paged copy, eagerly and then through the custom ops (intfa::append_kv /
    # append_kv_ragged with block_table last): the contiguous cache's bytes read back through
    # the table (V scales that grow, a token past the 64 dropped), and attention's bits.
    q, k, v = rand(3, 2, 1, 64, seed=6), rand(3, 2, 64, 64, seed=7), rand(3, 2, 64, 64, seed=8)
    x = intfa.quantize(q, k, v)
    x.v_scale.view(-1)[::3] *= 0.05  # small scales: the new tokens grow them
    n = 2
    pos = torch.tensor([20, 5, 61], dtype=torch.int32)
    end = [min(64, p + 2 * n) for p in (pos.tolist() if per_sequence else [20] * 3)]
    paged = _paged_torch(x, 4, 6, end)
    k_new, v_new = rand(3, 2, 2 * n, 64, seed=9), rand(3, 2, 2 * n, 64, seed=10)
    before = x.v_scale.clone()
    for cache in (x, paged):
        at = pos if per_sequence else 20
        intfa.append_kv(cache, k_new[:, :, :n], v_new[:, :, :n], at)
        op = torch.ops.intfa.append_kv_ragged if per_sequence else torch.ops.intfa.append_kv
        op.default(k_new[:, :, n:], v_new[:, :, n:], at + n, cache.k8, cache.k_scale,
                   cache.k_mean, cache.vt8, cache.v_scale, "accurate", "BHSD", "BHSD",
                   cache.block_table)
    assert not torch.equal(x.v_scale, before)
    assert torch.equal(paged.v_scale, x.v_scale)
    np_paged = _arrays_as(paged, torch.Tensor, torch.Tensor.numpy)
    for b, e in enumerate(end):
        k8, k_scale, vt8 = unpage(np_paged, b, e)
        np.testing.assert_array_equal(k8, x.k8[b:b + 1, :, :e].numpy())
        np.testing.assert_array_equal(k_scale, x.k_scale[b:b + 1, :, :e].numpy())
        np.testing.assert_array_equal(vt8, x.vt8[b:b + 1, ..., :e].numpy())
    q8, q_scale, lse_offset = intfa.quantize_q(rand(3, 4, 1, 64, seed=11), x.k_mean)
    step = dict(q8=q8, q_scale=q_scale, lse_offset=lse_offset,
                seqused_kv=torch.tensor(end, dtype=torch.int32))
    out, lse = intfa.attention_int8(paged._replace(**step), return_lse=True)
    want, want_lse = intfa.attention_int8(x._replace(**step), return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(TypeError, match="cache.block_table"):
        intfa.append_kv(paged._replace(block_table=paged.block_table.long()), k_new[:, :, :1],
                        v_new[:, :, :1], 0)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_paged_ops():
    q, k, v = _decode_inputs()
    x = intfa.quantize(q[..., :32, :], k[..., :32, :], v[..., :32, :])
    paged = _paged_torch(x, 3, 7)
    table = paged.block_table
    torch.library.opcheck(torch.ops.intfa.attention_int8.default,
                          (paged.q8, paged.q_scale, paged.lse_offset, paged.k8, paged.k_scale,
                           paged.k_mean, paged.vt8, paged.v_scale, None, None, None, 0, 0,
                           "accurate", "BHSD", True, 0.0, torch.float16, True, "auto", None,
                           table))
    torch.library.opcheck(torch.ops.intfa.append_kv.default,
                          (k[:, :, 37:], v[:, :, 37:], 20, paged.k8, paged.k_scale,
                           paged.k_mean, paged.vt8, paged.v_scale, "accurate", "BHSD", "BHSD",
                           table))
    torch.library.opcheck(torch.ops.intfa.append_kv_ragged.default,
                          (k[:, :, 37:], v[:, :, 37:], torch.tensor([5], dtype=torch.int32),
                           paged.k8, paged.k_scale, paged.k_mean, paged.vt8, paged.v_scale,
                           "accurate", "BHSD", "BHSD", table))


# ------------------------------------------------------------------------------------------------
# PagedKVCache (test_cpu's drivers)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_kv_cache_torch(layout, page_size):
    # As test_cpu's PagedKVCache test with torch CPU tensors: a ragged KVCache's bits through
    # pages handed out as the sequences grow (appends of 1 to 16 tokens across page
    # boundaries); and the NumPy cache's pool, table and statistics byte for byte.
    lengths = [40, 15, 33]
    inputs = in_layout(layout, *ragged_inputs(torch_randn(60), 3, 4, 2, 40, 23, 64, lengths))
    steps, args = [1, 3, 1, 16, 2], dict(num_pages=12, page_size=page_size, layout=layout)
    paged, _ = paged_vs_ragged(*inputs, torch.tensor(lengths), steps, exact, torch.Tensor.numpy,
                               **args)
    assert paged.lengths.dtype == paged.block_table.dtype == torch.int32
    assert paged.lengths_host == [63, 38, 56]
    numpy, _ = paged_vs_ragged(*(x.numpy() for x in inputs), lengths, steps,
                               np.testing.assert_array_equal, np.asarray, **args)
    for f in ("k8", "k_scale", "vt8", "k_mean", "v_scale", "block_table", "lengths"):
        np.testing.assert_array_equal(getattr(paged, f).numpy(), getattr(numpy, f))


def test_paged_kv_cache_torch_pool_and_release():
    # The host's bookkeeping with torch tensors: a pool too small changes nothing; release()
    # writes the table and the length in place; the pages it frees serve the next append, which
    # then equals a ragged KVCache truncated to 0 for that sequence.
    lengths = [16, 10, 5]
    q, k, v, kn, vn = ragged_inputs(torch_randn(61), 3, 4, 2, 16, 11, 64, lengths)
    paged = intfa.PagedKVCache(k, v, 4, page_size=16, max_pages=2, lengths=lengths)
    table, lens = paged.block_table, paged.lengths
    with pytest.raises(ValueError, match=r"PagedKVCache.append: needs 2 more pages, 1 free "
                                         r"\(num_pages = 4\)"):
        paged.append(kn, vn)
    assert table.tolist() == [[0, -1], [1, -1], [2, -1]] and lens.tolist() == lengths
    paged.release(1)
    assert paged.block_table is table and paged.lengths is lens
    assert table.tolist() == [[0, -1], [-1, -1], [2, -1]] and lens.tolist() == [16, 0, 5]
    ragged = intfa.KVCache(k, v, 32, lengths=lengths)
    ragged.truncate([16, 0, 5])
    for cache in (paged, ragged):
        cache.append(kn, vn)
    assert table.tolist() == [[0, 1], [3, -1], [2, -1]] and paged.pages_free == 0
    out, lse = paged.attention(q, is_causal=True, return_lse=True)
    want, want_lse = ragged.attention(q, is_causal=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    check_paged_parts(paged, ragged, torch.Tensor.numpy)


# ------------------------------------------------------------------------------------------------
# Sliding-window attention (window_size)
# ------------------------------------------------------------------------------------------------
def test_window_torch_equals_numpy_and_float64():
    # torch CPU tensors through the custom ops' implementations: NumPy's bits for attention,
    # varlen and attention_int8, within the scheme's error of float64 softmax over the window.
    q, k, v = rand(2, 4, 70, 64, seed=70), rand(2, 2, 30, 64, seed=71), rand(2, 2, 30, 64, seed=72)
    kw = dict(is_causal=True, window_size=(3, 0), return_lse=True)
    out, lse = intfa.attention(q, k, v, enable_gqa=True, **kw)
    out_n, lse_n = intfa.attention(q.numpy(), k.numpy(), v.numpy(), enable_gqa=True, **kw)
    np.testing.assert_array_equal(out.numpy(), out_n)
    np.testing.assert_array_equal(lse.numpy(), lse_n)
    ref, ref_lse = attention_ref(q, k, v, causal=True, window=(3, 0))
    assert rel_l2(out, ref) < 3e-2
    assert torch.all(out[:, :, :40] == 0) and torch.all(torch.isneginf(lse[:, :, :40]))
    np.testing.assert_allclose(lse[:, :, 40:].numpy(), ref_lse[:, :, 40:], atol=5e-2)
    got = intfa.attention_int8(intfa.quantize(q, k, v), **kw)
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)
    cu_q = torch.tensor([0, 10, 10, 50], dtype=torch.int32)
    cu_kv = torch.tensor([0, 20, 25, 45], dtype=torch.int32)
    qp, kp, vp = rand(50, 2, 64, seed=73), rand(45, 2, 64, seed=74), rand(45, 2, 64, seed=75)
    kw = dict(is_causal=False, window_size=(4, 6), return_lse=True)
    out, lse = intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv, 40, 20, **kw)
    out_n, lse_n = intfa.attention_varlen(qp.numpy(), kp.numpy(), vp.numpy(), cu_q.numpy(),
                                          cu_kv.numpy(), **kw)
    np.testing.assert_array_equal(out.numpy(), out_n)
    ref, ref_lse = varlen_ref(qp, kp, vp, cu_q, cu_kv, window=(4, 6))
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)
    with pytest.raises(ValueError, match=r"window_right: causal is window_right = 0, so with "
                                         r"causal it must be -1 or 0, got 2"):
        intfa.attention(q, k, v, enable_gqa=True, is_causal=True, window_size=(3, 2))
    with pytest.raises(TypeError, match=r"window_size: expected ints \(left, right\)"):
        intfa.attention(q, k, v, enable_gqa=True, window_size=(torch.tensor(3), 0))


def test_torch_compile_window_cpu():
    # window_size under torch.compile(fullgraph=True): the two ints reach the custom ops (the
    # compiled graph's bits are eager's, whose implementations run without the dispatcher).
    def fn(q, k, v):
        out, lse = intfa.attention(q, k, v, is_causal=True, window_size=(5, 0), return_lse=True)
        x = intfa.quantize(q, k, v)
        return out, lse, intfa.attention_int8(x, window_size=(2, 3))

    q, k, v = (rand(1, 2, 32, 64, seed=i) for i in range(76, 79))
    got, want = _compile_check(fn, q, k, v)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.equal(want[0], intfa.attention(q, k, v, is_causal=True))
    assert torch.equal(want[2], intfa.attention(q, k, v, window_size=(2, 3)))

    def varlen(q, k, v, cu):
        return intfa.attention_varlen(q, k, v, cu, cu, 20, 20, window_size=(4, 1))

    cu = torch.tensor([0, 12, 32], dtype=torch.int32)
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    got, want = _compile_check(varlen, qp, kp, vp, cu)
    assert torch.equal(got, want)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_window():
    # The ops take the window as two ints last (defaults -1: calls without them stay valid).
    q, k, v = (rand(1, 2, 24, 64, seed=i) for i in range(3))
    torch.library.opcheck(torch.ops.intfa.attention.default,
                          (q, k, v, True, 0.0, "BHSD", "accurate", "auto", True, 7, 0))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    torch.library.opcheck(torch.ops.intfa.attention_varlen.default,
                          (qp, kp, vp, cu, cu, 14, 14, False, 0.0, "accurate", "auto", True, 3,
                           2))
    x = intfa.quantize(q, k, v)
    torch.library.opcheck(torch.ops.intfa.attention_int8.default,
                          (x.q8, x.q_scale, x.lse_offset, x.k8, x.k_scale, x.k_mean, x.vt8,
                           x.v_scale, None, None, None, 0, 0, "accurate", "BHSD", False, 0.0,
                           torch.float16, True, "auto", None, None, -1, 5))


def _decode_paths_agree(monkeypatch, q, k, v, check, variants=(), **attn):
    """Decode steps over torch KVCaches of the first 37 tokens of k, v (tokens 37 to 40 appended
    one at a time, each followed by attention(q's token, is_causal=True, return_lse=True,
    **attn)): the fast path, the generic path through the custom ops (a query that needs grad),
    torch.compile(fullgraph=True) of the step, a NumPy cache and the step with each of
    `variants` (dicts of arguments that replace attn's) give the same bits; check(t, out, lse)
    judges step t's result."""
    def step(cache, kt, vt, qt, **kw):
        cache.append(kt, vt)
        return cache.attention(qt, is_causal=True, return_lse=True, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    fast, slow, comp, *others = (intfa.KVCache(k[:, :, :37], v[:, :, :37], 48)
                                 for _ in range(3 + len(variants)))
    numpy = intfa.KVCache(k[:, :, :37].numpy(), v[:, :, :37].numpy(), 48)
    attn_np = {n: a.numpy() if isinstance(a, torch.Tensor) else a for n, a in attn.items()}
    lib = intfa._arrays.lib
    kv_attention, calls = lib.kv_attention, []
    monkeypatch.setattr(lib, "kv_attention", lambda *a: calls.append(1) or kv_attention(*a))
    for t in range(37, 41):
        kt, vt, qt = k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1]
        out, lse = step(fast, kt, vt, qt, **attn)
        runs = [step(slow, kt, vt, qt.clone().requires_grad_(), **attn),
                compiled(comp, kt, vt, qt, **attn)]
        runs += [step(c, kt, vt, qt, **{**attn, **var}) for c, var in zip(others, variants)]
        for got in runs:
            assert torch.equal(got[0].detach(), out) and torch.equal(got[1].detach(), lse)
        out_n, lse_n = step(numpy, kt.numpy(), vt.numpy(), qt.numpy(), **attn_np)
        np.testing.assert_array_equal(out.numpy(), out_n)
        np.testing.assert_array_equal(lse.numpy(), lse_n)
        check(t, out, lse)
    assert len(calls) == 8  # a fast-path step of the torch cache and one of the NumPy cache


def test_window_kv_cache_torch(monkeypatch):
    # A local layer's decode steps (is_causal, window_size=(W - 1, 0)) over a torch KVCache: the
    # fast path, the generic path through the custom ops (a query that needs grad) and
    # torch.compile(fullgraph=True) of the step give the same bits, a NumPy cache too.
    q, k, v = _decode_inputs()

    def check(t, out, lse):
        ref, _ = attention_ref(q[:, :, t:t + 1], k[:, :, t - 7:t + 1], v[:, :, t - 7:t + 1])
        assert rel_l2(out, ref) < 0.05

    _decode_paths_agree(monkeypatch, q, k, v, check, window_size=(7, 0))


def test_flash_attn_func_is_a_drop_in():
    # flash_attn's calling convention (BSHD, GQA, causal setting the window's right edge to 0,
    # return_attn_probs giving the LSE) mapped onto intfa.attention, bit for bit, and within the
    # scheme's error of float64 softmax (so the layout is read as flash_attn's).
    q, k, v = rand(2, 70, 4, 64, seed=80), rand(2, 90, 2, 64, seed=81), rand(2, 90, 2, 64, seed=82)
    out, lse, probs = intfa.flash_attn_func(q, k, v, causal=True, window_size=(20, 7),
                                            softmax_scale=0.1, return_attn_probs=True)
    assert probs is None and out.shape == q.shape and lse.shape == (2, 4, 70)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, window_size=(20, 0), scale=0.1,
                                     enable_gqa=True, layout="BSHD", return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = attention_ref(q, k, v, causal=True, scale=0.1, layout="BSHD", window=(20, 0))
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)
    assert torch.equal(intfa.flash_attn_func(q, k, v), intfa.attention(q, k, v, enable_gqa=True,
                                                                        layout="BSHD"))
    cu_q = torch.tensor([0, 10, 10, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 25, 45], dtype=torch.int32)
    qp, kp, vp = rand(50, 4, 64, seed=83), rand(45, 2, 64, seed=84), rand(45, 2, 64, seed=85)
    out, lse, _ = intfa.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 40, 20, window_size=(4, 6),
                                               return_attn_probs=True)
    assert lse.shape == (4, 50)
    want, want_lse = intfa.attention_varlen(qp, kp, vp, cu_q, cu_k, 40, 20, window_size=(4, 6),
                                            enable_gqa=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, _ = varlen_ref(qp, kp, vp, cu_q, cu_k, window=(4, 6))
    assert rel_l2(out, ref) < 3e-2


def test_calls_without_rows_or_keys():
    # As torch SDPA and flash_attn take them: no batch, no query rows, no keys (rows 0, LSE -inf
    # or the head's sink), a varlen batch whose key sequences are all empty; eager, through
    # flash_attn_func / flash_attn_varlen_func and under torch.compile.
    q, k0 = rand(2, 4, 5, 64, seed=90), rand(2, 2, 0, 64, seed=91)
    out, lse = intfa.attention(q, k0, k0, enable_gqa=True, return_lse=True)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, 4, 5) and torch.all(lse == -float("inf"))
    z = torch.tensor([0.5, -1.0, -float("inf"), 2.0])
    _, lse = intfa.attention(q, k0, k0, enable_gqa=True, return_lse=True, sinks=z)
    assert torch.equal(lse, z[None, :, None].expand(2, 4, 5))
    for qe, ke in ((rand(0, 4, 5, 64), rand(0, 2, 7, 64)), (rand(2, 4, 0, 64), rand(2, 2, 7, 64))):
        out, lse = intfa.attention(qe, ke, ke, enable_gqa=True, return_lse=True)
        assert out.shape == qe.shape and lse.shape == (qe.shape[0], 4, qe.shape[2])
    out = intfa.flash_attn_func(rand(2, 3, 4, 64), rand(2, 0, 2, 64), rand(2, 0, 2, 64))
    assert out.shape == (2, 3, 4, 64) and not out.any()
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    out, lse, _ = intfa.flash_attn_varlen_func(rand(5, 4, 64), rand(0, 2, 64), rand(0, 2, 64), cu_q,
                                               cu_k, 3, 0, return_attn_probs=True)
    assert out.shape == (5, 4, 64) and not out.any() and torch.all(lse == -float("inf"))
    compiled = torch.compile(lambda q, k: intfa.attention(q, k, k, enable_gqa=True), fullgraph=True)
    assert torch.equal(compiled(q, k0), torch.zeros_like(q))
    # Empty tensors still meet every other check.
    with pytest.raises(ValueError, match=r"heads_kv = 3 must divide heads_q = 4"):
        intfa.attention(rand(0, 4, 5, 64), rand(0, 3, 7, 64), rand(0, 3, 7, 64), enable_gqa=True)


def test_flash_attn_func_refuses_what_intfa_does_not_build():
    q = rand(1, 8, 2, 64)
    with pytest.raises(ValueError, match=r"dropout_p: intfa computes inference attention, "
                                         r"expected 0.0, got 0.1"):
        intfa.flash_attn_func(q, q, q, dropout_p=0.1)
    # softcap is built: attention()'s (flash_attn_varlen_func's likewise).
    assert torch.equal(intfa.flash_attn_func(q, q, q, softcap=0.5, causal=True),
                       intfa.attention(q, q, q, layout="BSHD", is_causal=True, softcap=0.5))
    cu8 = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert torch.equal(intfa.flash_attn_varlen_func(q[0], q[0], q[0], cu8, cu8, 5, 5, softcap=0.5),
                       intfa.attention_varlen(q[0], q[0], q[0], cu8, cu8, softcap=0.5))
    with pytest.raises(NotImplementedError, match=r"alibi_slopes: ALiBi is not built"):
        intfa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=r"block_table: intfa reads paged KV as an INT8"):
        intfa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8,
                                     block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"window_size: expected a pair of ints"):
        intfa.flash_attn_func(q, q, q, window_size=4)


# ------------------------------------------------------------------------------------------------
# Attention sinks (sinks=, flash_attn's learnable_sink)
# ------------------------------------------------------------------------------------------------
def _sinks(hq, seed, no_sink=None, dtype=torch.float32):
    """[hq] sink logits uniform in [0, 6) (multiples of 1/8, exact in bfloat16 too), head
    no_sink -inf."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 48, (hq,), generator=g).float() / 8
    if no_sink is not None:
        z[no_sink] = -float("inf")
    return z.to(dtype)


def test_sinks_torch_equals_numpy_and_float64():
    # torch CPU tensors through the custom ops' implementations: NumPy's bits for attention,
    # varlen and attention_int8 with sinks, within the scheme's error of float64 with a sink
    # column; sinks as a bfloat16 tensor, a NumPy array, a list or a Parameter that requires grad
    # (the op, as for q) give the bits of float32 sinks.
    q, k, v = rand(2, 8, 70, 64, seed=110), rand(2, 2, 30, 64, seed=111), rand(2, 2, 30, 64, seed=112)
    z = _sinks(8, 113, no_sink=3)
    kw = dict(is_causal=True, window_size=(9, 0), return_lse=True, enable_gqa=True)
    out, lse = intfa.attention(q, k, v, sinks=z, **kw)
    out_n, lse_n = intfa.attention(q.numpy(), k.numpy(), v.numpy(), sinks=z.numpy(), **kw)
    np.testing.assert_array_equal(out.numpy(), out_n)
    np.testing.assert_array_equal(lse.numpy(), lse_n)
    ref, ref_lse = attention_ref(q, k, v, causal=True, window=(9, 0), sinks=z)
    assert rel_l2(out, ref) < 3e-2
    assert torch.all(out[:, :, :40] == 0)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)
    for form in (z.bfloat16(), z.numpy(), z.tolist(), torch.nn.Parameter(z.bfloat16())):
        got = intfa.attention(q, k, v, sinks=form, **kw)
        assert torch.equal(got[0].detach(), out) and torch.equal(got[1].detach(), lse)
    kw.pop("enable_gqa")
    got = intfa.attention_int8(intfa.quantize(q, k, v), sinks=z, **kw)
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)
    oracle, oracle_lse = intfa.attention_reference(q, k, v, is_causal=True, window_size=(9, 0),
                                                   sinks=z.bfloat16(), return_lse=True)
    np.testing.assert_allclose(oracle.numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(oracle_lse.numpy(), ref_lse, rtol=0, atol=1e-12)
    cu_q = torch.tensor([0, 10, 10, 50], dtype=torch.int32)
    cu_kv = torch.tensor([0, 20, 25, 45], dtype=torch.int32)
    qp, kp, vp = rand(50, 8, 64, seed=114), rand(45, 2, 64, seed=115), rand(45, 2, 64, seed=116)
    kw = dict(is_causal=False, sinks=z, return_lse=True, enable_gqa=True)
    out, lse = intfa.attention_varlen(qp, kp, vp, cu_q, cu_kv, 40, 20, **kw)
    out_n, lse_n = intfa.attention_varlen(qp.numpy(), kp.numpy(), vp.numpy(), cu_q.numpy(),
                                          cu_kv.numpy(), **kw)
    np.testing.assert_array_equal(out.numpy(), out_n)
    np.testing.assert_array_equal(lse.numpy(), lse_n)
    ref, ref_lse = varlen_ref(qp, kp, vp, cu_q, cu_kv, sinks=z)
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)
    with pytest.raises(ValueError, match=r"^sinks: expected shape \[heads_q\] = \[8\], got \[4\]$"):
        intfa.attention(q, k, v, enable_gqa=True, sinks=z[:4])
    with pytest.raises(TypeError, match=r"^sinks: expected a float array \(float16, bfloat16, "
                                        r"float32 or float64\), got torch.int64$"):
        intfa.attention(q, k, v, enable_gqa=True, sinks=torch.arange(8))


def test_torch_compile_sinks_cpu():
    # sinks under torch.compile(fullgraph=True): the conversion (a bfloat16 tensor to float32)
    # is traced and the tensor reaches the custom ops as their last argument; the compiled
    # graph's bits are eager's.
    def fn(q, k, v, z):
        out, lse = intfa.attention(q, k, v, is_causal=True, window_size=(5, 0), sinks=z,
                                   return_lse=True)
        x = intfa.quantize(q, k, v)
        return out, lse, intfa.attention_int8(x, sinks=z * 2)

    q, k, v = (rand(1, 2, 32, 64, seed=i) for i in range(117, 120))
    z = _sinks(2, 120, dtype=torch.bfloat16)
    got, want = _compile_check(fn, q, k, v, z)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.equal(want[0], intfa.attention(q, k, v, is_causal=True, window_size=(5, 0)))
    assert torch.equal(want[2], intfa.attention(q, k, v, sinks=z.float() * 2))

    def varlen(q, k, v, cu, z):
        return intfa.attention_varlen(q, k, v, cu, cu, 20, 20, is_causal=True, sinks=z)

    cu = torch.tensor([0, 12, 32], dtype=torch.int32)
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    got, want = _compile_check(varlen, qp, kp, vp, cu, z)
    assert torch.equal(got, want)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_sinks():
    # The attention ops take sinks (float32 [Hq] on q's device) last, after the window
    # (default None: calls without them stay valid).
    q, k, v = (rand(1, 2, 24, 64, seed=i) for i in range(3))
    z = _sinks(2, 121)
    torch.library.opcheck(torch.ops.intfa.attention.default,
                          (q, k, v, True, 0.0, "BHSD", "accurate", "auto", True, -1, -1, z))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    torch.library.opcheck(torch.ops.intfa.attention_varlen.default,
                          (qp, kp, vp, cu, cu, 14, 14, False, 0.0, "accurate", "auto", True, 3,
                           2, z))
    x = intfa.quantize(q, k, v)
    torch.library.opcheck(torch.ops.intfa.attention_int8.default,
                          (x.q8, x.q_scale, x.lse_offset, x.k8, x.k_scale, x.k_mean, x.vt8,
                           x.v_scale, None, None, None, 0, 0, "accurate", "BHSD", True, 0.0,
                           torch.float16, True, "auto", None, None, 4, 0, z))
    with pytest.raises(TypeError, match=r"^sinks: expected dtype float32, got bfloat16$"):
        torch.ops.intfa.attention(q, k, v, False, 0.0, "BHSD", "accurate", "auto", False, -1,
                                  -1, z.bfloat16())


def test_sinks_kv_cache_torch(monkeypatch):
    # A decode loop with sinks over a torch KVCache (GQA 8 / 2): the fast path, the generic path
    # through the custom ops (a query that needs grad, or a sink Parameter that does) and
    # torch.compile(fullgraph=True) of the step give the same bits, a NumPy cache too, close to
    # float64 with a sink column.
    q, k, v = _decode_inputs(hq=8)
    z = _sinks(8, 122, no_sink=6)

    def check(t, out, lse):
        ref, ref_lse = attention_ref(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], sinks=z)
        assert rel_l2(out, ref) < 0.05
        np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)

    _decode_paths_agree(monkeypatch, q, k, v, check, [dict(sinks=torch.nn.Parameter(z.clone()))],
                        sinks=z)


def test_flash_attn_func_learnable_sink():
    # FlashAttention 4's learnable_sink (bfloat16 (nheads,) in its tests) on the drop-ins:
    # attention(sinks=...)'s bits, dense and varlen; softmax_lse includes the sink.
    q, k, v = rand(2, 70, 8, 64, seed=123), rand(2, 90, 2, 64, seed=124), rand(2, 90, 2, 64, seed=125)
    z = _sinks(8, 126, dtype=torch.bfloat16)
    out, lse, _ = intfa.flash_attn_func(q, k, v, causal=True, window_size=(20, 7),
                                        learnable_sink=z, return_attn_probs=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, window_size=(20, 0), sinks=z,
                                     enable_gqa=True, layout="BSHD", return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = attention_ref(q, k, v, causal=True, layout="BSHD", window=(20, 0), sinks=z)
    assert rel_l2(out, ref) < 3e-2
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=5e-2)
    cu_q = torch.tensor([0, 10, 10, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 25, 45], dtype=torch.int32)
    qp, kp, vp = rand(50, 8, 64, seed=127), rand(45, 2, 64, seed=128), rand(45, 2, 64, seed=129)
    out, lse, _ = intfa.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 40, 20, causal=True,
                                               learnable_sink=z, return_attn_probs=True)
    want, want_lse = intfa.attention_varlen(qp, kp, vp, cu_q, cu_k, 40, 20, is_causal=True,
                                            sinks=z, enable_gqa=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match=r"^sinks: expected shape \[heads_q\] = \[8\], got \[2\]$"):
        intfa.flash_attn_func(q, k, v, learnable_sink=z[:2])


def test_transformers_gpt_oss_runs_on_intfa():
    # register_transformers(): a gpt-oss model with attn_implementation="intfa" against the same
    # model in float32 (eager): logits within INT8 error (0.6% measured; the bfloat16 eager model
    # is 0.5% off), prefill and cached greedy generation (decode steps, bottom-right causal over
    # the cache) alike; dropping the sinks or the window from the call moves the logits tens of
    # percent, so both are used.
    model, ref, ids, err = against_float32(tiny_gpt_oss, 1, 2)
    for drop in ("s_aux", "sliding_window"):
        off = error_without(model, ref, ids, drop)
        assert off > max(0.15, 4 * err), f"without {drop}: {off} against {err}"
    check_greedy_steps(model, ref, ids[:1, :10])
    # A left-padded batch (the padding mask: attention_varlen over the tokens) generates what
    # each prompt generates alone.
    prompts = [ids[0, :12], ids[1, :7]]
    batch, mask = left_padded(prompts, 12)
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], **kw)
            assert torch.equal(both.sequences[i, 12:], alone.sequences[0, len(p):]), i
            for step, x in enumerate(alone.logits):
                assert rel(both.logits[step][i], x[0]) < 1e-2, (i, step)
    # Padding-free packing (position_ids restarting per prompt): each prompt as alone.
    check_packed_prompts(model, [ids[0, :12], ids[1, :7], ids[0, 20:29]])


def test_transformers_gemma2_runs_on_intfa():
    # A Gemma 2 model (soft-capped logits, sliding window) with attn_implementation="intfa"
    # against the same model in float32 (eager): logits within INT8 error (1.8% measured; the
    # bfloat16 eager model is 1.2% off), prefill and cached greedy generation; without the cap
    # (softcap dropped from the call) they move 79%.
    model, ref, ids, err = against_float32(tiny_gemma2, 3, 4)
    off = error_without(model, ref, ids, "softcap")
    assert off > max(0.1, 4 * err), f"without the cap: {off} against {err}"
    check_greedy_steps(model, ref, ids[:1, :10])


class Module:
    """What transformers_attention reads of transformers' attention module: is_causal."""
    is_causal = True


def transformers_inputs(batch, seed):
    """query [batch, 4, 24, 32], key / value [batch, 2, 24, 32] in bfloat16 (transformers'
    layout, GQA) and one sink logit per query head."""
    q, k, v = (rand(batch, 4 if i == 0 else 2, 24, 32, dtype=torch.bfloat16, seed=seed + i)
               for i in range(3))
    return q, k, v, torch.tensor([1.0, 2.0, -1.0, 3.0])


def test_transformers_attention_refusals():
    # transformers_attention is intfa.attention in transformers' layout (out [B, Sq, Hq, D]),
    # bit for bit; float32 runs in bfloat16; a mask, dropout are refused by name.
    q, k, v, z = transformers_inputs(2, 10)
    out, probs = intfa.transformers_attention(Module(), q, k, v, None, scaling=0.2,
                                              sliding_window=6, s_aux=z)
    assert probs is None and out.shape == (2, 24, 4, 32)
    want = intfa.attention(q, k, v, is_causal=True, window_size=(5, 0), sinks=z, scale=0.2,
                           enable_gqa=True)
    assert torch.equal(out, want.transpose(1, 2))
    out32, _ = intfa.transformers_attention(Module(), q.float(), k.float(), v.float(), None)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, intfa.attention(q, k, v, is_causal=True, enable_gqa=True)
                       .transpose(1, 2).float())
    with pytest.raises(NotImplementedError, match=r"attention_mask: expected None or a padded "
                                                  r"batch's 2D mask .* got a \(2, 1, 24, 24\) mask"):
        intfa.transformers_attention(Module(), q, k, v, torch.ones(2, 1, 24, 24, dtype=torch.bool))
    # A padded batch's 2D mask: sequence 0 left-padded by 5 tokens, sequence 1 by none; each
    # sequence's tokens alone through intfa.attention, bit for bit; its padded query rows zeros.
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, :5] = False
    out, _ = intfa.transformers_attention(Module(), q, k, v, mask, sliding_window=6, s_aux=z)
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5]))
    for i, first in ((0, 5), (1, 0)):
        alone = intfa.attention(q[i:i + 1, :, first:], k[i:i + 1, :, first:], v[i:i + 1, :, first:],
                                is_causal=True, window_size=(5, 0), sinks=z, enable_gqa=True)
        assert torch.equal(out[i:i + 1, first:], alone.transpose(1, 2))
    with pytest.raises(NotImplementedError, match=r"dropout: .* expected 0.0, got 0.1"):
        intfa.transformers_attention(Module(), q, k, v, None, dropout=0.1)
    # Gemma 2 passes its attn_logit_softcapping as softcap: attention()'s softcap.
    capped, _ = intfa.transformers_attention(Module(), q, k, v, None, softcap=5.0)
    assert torch.equal(capped, intfa.attention(q, k, v, is_causal=True, enable_gqa=True,
                                               softcap=5.0).transpose(1, 2))
    assert not torch.equal(capped, out32.to(torch.bfloat16))
    out_none, _ = intfa.transformers_attention(Module(), q, k, v, None, softcap=None)
    assert torch.equal(out_none, out32.to(torch.bfloat16))


def test_transformers_attention_packed_rows():
    # Padding-free packing: one row of 24 tokens holding sequences of 10, 0 and 14 tokens, given
    # as cu_seq_lens_q / cu_seq_lens_k or as position_ids restarting at 0. Each sequence's rows
    # are what intfa.attention gives it alone (bit for bit: the same per-sequence quantization);
    # without the packing the last 14 rows would see the first 10 tokens.
    q, k, v, z = transformers_inputs(1, 30)
    kw = dict(scaling=0.2, sliding_window=6, s_aux=z)
    cu = torch.tensor([0, 10, 10, 24], dtype=torch.int32)
    by_cu, _ = intfa.transformers_attention(Module(), q, k, v, None, cu_seq_lens_q=cu,
                                            cu_seq_lens_k=cu.long(), max_length_q=14,
                                            max_length_k=14, **kw)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    by_pos, _ = intfa.transformers_attention(Module(), q, k, v, None, position_ids=pos, **kw)
    assert by_cu.shape == (1, 24, 4, 32) and torch.equal(by_cu, by_pos)
    for lo, hi in ((0, 10), (10, 24)):
        alone = intfa.attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=True,
                                window_size=(5, 0), sinks=z, scale=0.2, enable_gqa=True)
        assert torch.equal(by_cu[:, lo:hi], alone.transpose(1, 2)), lo
    whole = intfa.attention(q, k, v, is_causal=True, window_size=(5, 0), sinks=z, scale=0.2,
                            enable_gqa=True).transpose(1, 2)
    assert not torch.equal(by_cu[:, 10:], whole[:, 10:])
    # Positions that do not restart (one sequence, maybe past a cache's start) are no packing;
    # neither are M-RoPE's 3D position ids. A first sequence that starts past 0 still ends
    # where the next position 0 is.
    for p in (torch.arange(24)[None], torch.arange(5, 29)[None], torch.arange(24).expand(3, 1, 24)):
        out, _ = intfa.transformers_attention(Module(), q, k, v, None, position_ids=p, **kw)
        assert torch.equal(out, whole)
    late = torch.cat([torch.arange(3, 13), torch.arange(14)])[None]
    out, _ = intfa.transformers_attention(Module(), q, k, v, None, position_ids=late, **kw)
    assert torch.equal(out, by_cu)
    # A 2D padding mask wins over position ids (transformers' flash path reads it first).
    out, _ = intfa.transformers_attention(Module(), q, k, v, torch.ones(1, 24, dtype=torch.bool),
                                          position_ids=pos, **kw)
    assert torch.equal(out, whole)
    with pytest.raises(ValueError, match=r"cu_seq_lens_k: packed sequences need both"):
        intfa.transformers_attention(Module(), q, k, v, None, cu_seq_lens_q=cu)
    with pytest.raises(NotImplementedError, match=r"position_ids: .* \(queries 4, keys 24\) .* "
                                                  r"expected as many keys as queries"):
        intfa.transformers_attention(Module(), q[:, :, 20:], k, v, None,
                                     position_ids=torch.tensor([[7, 8, 0, 1]]))


def test_append_kv_fixed_v_scale_shared_statistics_torch():
    # The NumPy test's case with torch tensors: statistics expanded from one sequence's (batch
    # stride 0), appended with fixed_v_scale eagerly and through intfa::append_kv_fixed (which
    # does not mutate v_scale): the bytes of a per-sequence copy, v_scale untouched; and a step
    # under torch.compile(fullgraph=True) with the expand()ed set: eager's bits.
    q, k, v = rand(3, 4, 1, 64, seed=31), rand(3, 2, 40, 64, seed=32), rand(3, 2, 40, 64, seed=33)
    x = intfa.quantize(q, k, v)
    km, vs = x.k_mean[:1].expand(3, -1, -1), x.v_scale[:1].expand(3, -1, -1)
    assert km.stride(0) == 0 and vs.stride(0) == 0
    shared = x._replace(k_mean=km, v_scale=vs)
    copied = x._replace(k8=x.k8.clone(), k_scale=x.k_scale.clone(), vt8=x.vt8.clone(),
                        k_mean=km.contiguous(), v_scale=vs.contiguous())
    k2, v2 = (k[:, :, 10:14] * 4).half(), (v[:, :, 10:14] * 4).half()
    before = vs.clone()
    intfa.append_kv(shared, k2[:, :, :2], v2[:, :, :2], 10, fixed_v_scale=True)
    torch.ops.intfa.append_kv_fixed.default(k2[:, :, 2:], v2[:, :, 2:], 12, shared.k8,
                                            shared.k_scale, shared.k_mean, shared.vt8,
                                            shared.v_scale, "accurate", "BHSD", "BHSD", None)
    intfa.append_kv(copied, k2, v2, 10, fixed_v_scale=True)
    for part in ("k8", "k_scale", "vt8"):
        assert torch.equal(getattr(shared, part), getattr(copied, part)), part
    assert torch.equal(vs, before) and torch.equal(copied.v_scale, before)
    assert (copied.vt8[..., 10:14].abs() == 127).any()  # saturated

    def step(cache, kt, vt, at, qt):
        intfa.append_kv(cache, kt, vt, at, fixed_v_scale=True)
        q8, q_scale, lse_offset = intfa.quantize_q(qt, cache.k_mean)
        return intfa.attention_int8(cache._replace(q8=q8, q_scale=q_scale, lse_offset=lse_offset,
                                                   k8=cache.k8[:, :, :at + 1],
                                                   k_scale=cache.k_scale[..., :at + 1]))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    twin = shared._replace(k8=shared.k8.clone(), k_scale=shared.k_scale.clone(),
                           vt8=shared.vt8.clone())
    args = (k[:, :, 14:15] * 3, v[:, :, 14:15] * 3, 14, q)
    assert torch.equal(compiled(shared, *args), step(twin, *args))
    assert torch.equal(shared.vt8, twin.vt8) and torch.equal(vs, before)


def test_paged_kv_cache_shared_prefix_torch():
    # PagedKVCache(v_headroom=) with share_prefix / append_to on torch tensors: the NumPy
    # cache's bits (expand() views for the shared statistics).
    q, k, v = rand(3, 4, 1, 64, seed=41), rand(3, 2, 60, 64, seed=42), rand(3, 2, 60, 64, seed=43)
    sk, sv = rand(1, 2, 10, 64, seed=44), rand(1, 2, 10, 64, seed=45)
    outs = []
    for to in (lambda x: x, lambda x: x.numpy()):
        cache = intfa.PagedKVCache(to(k), to(v), 24, page_size=16, max_pages=6,
                                   lengths=[60, 40, 20], v_headroom=2.0)
        cache.release(2)
        cache.share_prefix(2, 0, 32)
        cache.append_to(2, to(sk), to(sv))
        outs.append(np.asarray(cache.attention(to(q))))
    assert torch.equal(torch.from_numpy(outs[1]), torch.from_numpy(outs[0]))
