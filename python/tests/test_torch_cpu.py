"""intfa with torch CPU tensors: the custom ops (eager, fake, torch.compile) on the CPU backend,
and the SDPA routing rules. Needs torch, not a GPU."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import intfa  # noqa: E402
from reference import attention_ref, rel_l2, varlen_ref  # noqa: E402


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
