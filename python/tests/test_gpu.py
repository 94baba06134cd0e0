"""intfa on the GPU with torch CUDA tensors (and CuPy when present): accuracy against float64 on
random shapes, GQA, varlen, causal Sq != Skv, LSE, bit-exact quantization against the CPU
backend, torch.compile(fullgraph=True), CUDA-graph capture and replay, a non-default stream and
the SDPA patch. Skipped without torch or without a CUDA device."""

import math
import random
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import intfa  # noqa: E402
from paged import drop_pages, page_copy, paged_vs_ragged  # noqa: E402
from ragged import (Sequence, check_parts, in_layout, ragged_inputs,  # noqa: E402
                    ragged_vs_separate, seq_view)
from reference import rel_l2  # noqa: E402
from tiny_models import (against_float32, check_greedy_steps, check_packed_prompts,  # noqa: E402
                         left_padded, rel, tiny_gemma2, tiny_gpt_oss)

TOL = {"accurate": 3e-2, "paper": 6e-2}
F = torch.nn.functional


def rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def ref_attention(q, k, v, causal=False, scale=None, layout="BHSD", window=(-1, -1), sinks=None):
    """float64 attention on the GPU: (out, lse); bottom-right causal and sliding window (left,
    right) (-1: an open side), -inf for empty rows. sinks ([Hq] logits): one more score column
    per row holding its head's logit, in the softmax and the LSE, dropped from the output
    (gpt-oss's reference); an empty row then gives 0 and its logit."""
    q, k, v = q.double(), k.double(), v.double()
    if layout == "BSHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    sq, skv = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    diag = torch.arange(sq, device=q.device)[:, None] + skv - sq
    j = torch.arange(skv, device=q.device)[None, :]
    left, right = window
    right = 0 if causal else right
    if right >= 0:
        s = s.masked_fill(j > diag + right, -math.inf)
    if left >= 0:
        s = s.masked_fill(j < diag - left, -math.inf)
    if sinks is not None:
        z = sinks.to(device=s.device, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.cat([s, z.expand(*s.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    out = p @ v
    if layout == "BSHD":
        out = out.transpose(1, 2)
    return out, lse


def make_qkv(b, hq, hkv, sq, skv, d, layout="BHSD", dtype=torch.float16, seed=0):
    if layout == "BHSD":
        shapes = (b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)
    else:
        shapes = (b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d)
    return [rand(*s, dtype=dtype, seed=seed + i) for i, s in enumerate(shapes)]


def lse_close(lse, ref_lse, atol=5e-2):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < atol


def test_build_has_cuda():
    assert intfa.build_info()["cuda_built"], "intfa was built without CUDA (nvcc not found?)"
    assert intfa.device_info()["present"]
    assert intfa.resolve_gpu_path() in ("sm80", "sm90")


def _random_configs(n, seed=1234):
    rnd = random.Random(seed)
    for _ in range(n):
        hkv = rnd.choice([1, 2, 4])
        yield dict(b=rnd.choice([1, 2, 3]), hq=hkv * rnd.choice([1, 2, 4]), hkv=hkv,
                   sq=rnd.randint(1, 700), skv=rnd.randint(1, 700), d=rnd.choice([64, 128]),
                   layout=rnd.choice(["BHSD", "BSHD"]), causal=rnd.random() < 0.5,
                   dtype=rnd.choice([torch.float16, torch.bfloat16]))


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("cfg", list(_random_configs(10)), ids=lambda c: "-".join(
    str(c[k]).replace("torch.", "") for k in ("b", "hq", "hkv", "sq", "skv", "d", "layout",
                                              "causal", "dtype")))
def test_random_shapes_match_float64(scheme, cfg):
    q, k, v = make_qkv(cfg["b"], cfg["hq"], cfg["hkv"], cfg["sq"], cfg["skv"], cfg["d"],
                       cfg["layout"], cfg["dtype"], seed=cfg["sq"])
    out, lse = intfa.attention(q, k, v, is_causal=cfg["causal"], enable_gqa=True,
                               layout=cfg["layout"], scheme=scheme, return_lse=True)
    assert out.is_cuda and out.dtype == q.dtype and out.shape == q.shape
    ref, ref_lse = ref_attention(q, k, v, cfg["causal"], layout=cfg["layout"])
    assert rel_l2(out, ref) < TOL[scheme]
    lse_close(lse, ref_lse)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("cfg", [
    dict(b=2, hq=4, hkv=2, sq=300, skv=300, causal=True, layout="BHSD", dtype=torch.float16),
    dict(b=1, hq=8, hkv=1, sq=77, skv=1000, causal=False, layout="BSHD", dtype=torch.bfloat16),
    dict(b=3, hq=8, hkv=2, sq=1, skv=513, causal=True, layout="BHSD", dtype=torch.bfloat16),
], ids=["causal-gqa", "mqa-bshd", "decode-step"])
def test_head_dim_256_matches_float64(scheme, cfg):
    """Head dim 256 end to end against float64: path auto (the sm80 kernel, on Hopper the sm90
    kernel for calls its split rule would not split and the decode kernel for decode steps) and,
    on Hopper, path sm90 (its head-dim-256 kernel, two value-channel passes) and, for the decode
    step, path decode (named on Hopper; its 134 KB of shared memory also fit an A100)."""
    q, k, v = make_qkv(cfg["b"], cfg["hq"], cfg["hkv"], cfg["sq"], cfg["skv"], 256,
                       cfg["layout"], cfg["dtype"], seed=256 + cfg["sq"])
    ref, ref_lse = ref_attention(q, k, v, cfg["causal"], layout=cfg["layout"])
    hopper = intfa.resolve_gpu_path() == "sm90"
    paths = ["auto"] + (["sm90"] if hopper else []) + (["decode"] if hopper and cfg["sq"] == 1 else [])
    for path in paths:
        out, lse = intfa.attention(q, k, v, is_causal=cfg["causal"], enable_gqa=True, layout=cfg["layout"],
                                   scheme=scheme, return_lse=True, path=path)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert rel_l2(out, ref) < TOL[scheme], path
        lse_close(lse, ref_lse)


def test_last_gpu_path_names_the_kernel_that_ran():
    """intfa.last_gpu_path(): the kernel family of the calling thread's last GPU attention call:
    each named path, path auto's decode kernel for a decode step (at head dim 128 and, on Hopper,
    256); unchanged by a CPU call; None in a new thread until its first GPU call."""
    hopper = intfa.resolve_gpu_path() == "sm90"
    for d in [128] + ([256] if hopper else []):
        q, k, v = make_qkv(1, 8, 2, 1, 700, d, seed=5 + d)  # a decode step: 4 rows per K/V head
        for path in ["sm80", "decode"] + (["sm90"] if hopper else []):
            intfa.attention(q, k, v, is_causal=True, enable_gqa=True, path=path)
            assert intfa.last_gpu_path() == path, (d, path)
        intfa.attention(q, k, v, is_causal=True, enable_gqa=True)
        assert intfa.last_gpu_path() == "decode", d
    intfa.attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True, enable_gqa=True)
    assert intfa.last_gpu_path() == "decode"
    seen = []
    t = threading.Thread(target=lambda: seen.append(intfa.last_gpu_path()))
    t.start()
    t.join()
    assert seen == [None]


@pytest.mark.parametrize("sq,skv", [(100, 300), (300, 100), (1, 513), (257, 256)])
def test_causal_sq_ne_skv_bottom_right(sq, skv):
    q, k, v = make_qkv(2, 4, 4, sq, skv, 128, seed=7)
    out, lse = intfa.attention(q, k, v, is_causal=True, return_lse=True)
    ref, ref_lse = ref_attention(q, k, v, causal=True)
    assert not torch.isnan(out).any()
    assert rel_l2(out, ref) < 3e-2
    lse_close(lse, ref_lse)
    if sq > skv:  # rows that see no key: exactly zero and -inf
        assert torch.all(out[:, :, :sq - skv] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :sq - skv]))


@pytest.mark.parametrize("hq,hkv", [(8, 1), (8, 2), (6, 3)])
def test_gqa_mqa(hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, 200, 333, 64, seed=3)
    out = intfa.attention(q, k, v, enable_gqa=True, is_causal=True)
    ref, _ = ref_attention(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2
    with pytest.raises(ValueError, match="enable_gqa"):
        intfa.attention(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal):
    lens_q, lens_kv = [17, 0, 300, 64, 5], [40, 9, 256, 64, 0]
    cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32, device="cuda")
    cu_kv = torch.tensor([0] + list(np.cumsum(lens_kv)), dtype=torch.int32, device="cuda")
    q = rand(sum(lens_q), 8, 128, seed=1)
    k = rand(sum(lens_kv), 2, 128, seed=2)
    v = rand(sum(lens_kv), 2, 128, seed=3)
    out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, max(lens_q), max(lens_kv),
                                      is_causal=causal, enable_gqa=True, return_lse=True)
    assert lse.shape == (8, sum(lens_q))
    for i in range(len(lens_q)):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, e = int(cu_kv[i]), int(cu_kv[i + 1])
        if a == b:
            continue
        if c == e:
            assert torch.all(out[a:b] == 0) and torch.all(torch.isneginf(lse[:, a:b]))
            continue
        ref, ref_lse = ref_attention(q[None, a:b].transpose(1, 2), k[None, c:e].transpose(1, 2),
                                     v[None, c:e].transpose(1, 2), causal)
        assert rel_l2(out[a:b], ref[0].transpose(0, 1)) < 3e-2, i
        lse_close(lse[:, a:b], ref_lse[0])


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("skv", [128, 100])
def test_quantize_bit_exact_with_cpu_backend(scheme, skv):
    q, k, v = make_qkv(2, 4, 2, 77, skv, 64, seed=5)
    k = k + 2  # a per-channel offset, which K smoothing removes
    xg = intfa.quantize(q, k, v, scheme=scheme)
    xc = intfa.quantize(q.cpu(), k.cpu(), v.cpu(), scheme=scheme)
    for name in ("q8", "q_scale", "k8", "k_scale", "k_mean", "v_scale"):
        assert torch.equal(getattr(xg, name).cpu(), getattr(xc, name)), name
    assert torch.equal(xg.vt8[..., :skv].cpu(), xc.vt8[..., :skv])
    # lse_offset = scale * q . mean(K) is a float dot product: equal up to summation order.
    torch.testing.assert_close(xg.lse_offset.cpu(), xc.lse_offset, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_attention_int8_equals_attention(scheme):
    q, k, v = make_qkv(1, 4, 4, 300, 300, 128, seed=9)
    x = intfa.quantize(q, k, v, scheme=scheme)
    out, lse = intfa.attention_int8(x, is_causal=True, return_lse=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, scheme=scheme, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("sq,causal", [(1, False), (4, True)])
def test_decode_steps(sq, causal):
    """Decode and speculative steps over a quantized KV: the decode kernel (what auto runs for at
    most 16 query rows per K/V head) against float64, auto equal to path="decode" bit for bit,
    the prefill kernel close to it; more rows than a decode tile on path="decode" are refused."""
    q, k, v = make_qkv(3, 16, 4, sq, 5000, 128, seed=21)
    x = intfa.quantize(q, k, v)
    out, lse = intfa.attention_int8(x, is_causal=causal, return_lse=True)
    ref, ref_lse = ref_attention(q, k, v, causal=causal)
    assert rel_l2(out, ref) < TOL["accurate"]
    lse_close(lse, ref_lse)
    dec, dec_lse = intfa.attention_int8(x, is_causal=causal, return_lse=True, path="decode")
    assert torch.equal(out, dec) and torch.equal(lse, dec_lse)
    prefill = intfa.attention_int8(x, is_causal=causal, path=intfa.resolve_gpu_path())
    assert rel_l2(prefill, dec) < 5e-3
    big = intfa.quantize(*make_qkv(1, 2, 2, 40, 40, 64, seed=2))
    with pytest.raises(RuntimeError, match="decode takes at most 16 query rows"):
        intfa.attention_int8(big, path="decode")


def test_calls_without_rows_or_keys_on_the_gpu():
    # Empty batch, no query rows, no keys (rows 0, LSE -inf or the sink: the GPU fill kernel),
    # and varlen without keys, eager and captured in a CUDA graph.
    q = rand(2, 4, 130, 128, seed=70)
    k0 = rand(2, 2, 0, 128)
    out, lse = intfa.attention(q, k0, k0, enable_gqa=True, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.all(lse == -math.inf)
    z = torch.tensor([0.5, -1.0, -math.inf, 2.0], device="cuda")
    out, lse = intfa.attention(rand(2, 130, 4, 128), rand(2, 0, 2, 128), rand(2, 0, 2, 128),
                               layout="BSHD", enable_gqa=True, return_lse=True, sinks=z)
    assert not out.any() and torch.equal(lse, z[None, :, None].expand(2, 4, 130))
    for qe, ke in ((rand(0, 4, 9, 64), rand(0, 2, 7, 64)), (rand(2, 4, 0, 64), rand(2, 2, 7, 64))):
        assert intfa.attention(qe, ke, ke, enable_gqa=True).shape == qe.shape
    cu_q = torch.tensor([0, 3, 3, 200], dtype=torch.int32, device="cuda")
    cu_k = torch.zeros(4, dtype=torch.int32, device="cuda")
    qv = rand(200, 4, 64, seed=71)
    out, lse = intfa.attention_varlen(qv, rand(0, 2, 64), rand(0, 2, 64), cu_q, cu_k, 197, 0,
                                      enable_gqa=True, return_lse=True)
    assert not out.any() and torch.all(lse == -math.inf)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = intfa.attention(q, k0, k0, enable_gqa=True)
    captured.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, torch.zeros_like(q))


def test_errors_on_the_gpu():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 96)
    with pytest.raises(ValueError, match="head_dim: expected 64, 128 or 256 on the GPU, got 96"):
        intfa.attention(q, k, v)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64)
    with pytest.raises(ValueError, match="dim"):
        intfa.attention(q, k[..., :32].contiguous(), v)
    with pytest.raises(TypeError, match="float32"):
        intfa.attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="k: expected GPU memory"):
        intfa.attention(q, k.cpu(), v)


# ------------------------------------------------------------------------------------------------
# torch.compile, CUDA graphs, streams
# ------------------------------------------------------------------------------------------------
class Attn(torch.nn.Module):
    def __init__(self, dim=512, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        # Strided views straight from the projections: BSHD memory seen as BHSD.
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in self.kv(x).view(b, s, 2, self.hkv, self.d).unbind(2))
        out = intfa.attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    m = Attn().cuda().half().eval()
    x = rand(2, 256, 512, seed=11)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, mode=mode)
        for i in range(3):  # cudagraph trees record on the second or third call
            xi = rand(2, 256, 512, seed=20 + i)
            got = compiled(xi).clone()
            assert rel_l2(got, m(xi)) < 1e-2
        assert rel_l2(compiled(x), eager) < 1e-2


def test_torch_compile_varlen_and_lse():
    torch._dynamo.reset()

    def fn(q, k, v, cu_q, cu_kv):
        out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, 128, 128, is_causal=True,
                                          return_lse=True)
        return out * 2, lse.exp()

    cu = torch.tensor([0, 100, 228], dtype=torch.int32, device="cuda")
    q, k, v = (rand(228, 2, 64, seed=i) for i in range(3))
    got = torch.compile(fn, fullgraph=True)(q, k, v, cu, cu)
    want = fn(q, k, v, cu, cu)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck")
def test_opcheck_cuda():
    q, k, v = make_qkv(1, 2, 2, 64, 80, 64)
    torch.library.opcheck(torch.ops.intfa.attention.default,
                          (q, k, v, True, 0.0, "BHSD", "accurate", "auto", True))


def test_direct_eager_call_equals_the_op_and_the_op_stays_visible():
    """Plain eager calls skip the dispatcher (and DLPack): same bits as the custom op; views,
    Parameters and tensors that require grad under no_grad read the same; the profiler still
    sees the op by name, and a call that needs a gradient still goes through the op."""
    q, k, v = make_qkv(2, 4, 2, 100, 130, 128, layout="BSHD", dtype=torch.bfloat16, seed=95)
    for causal in (False, True):
        out, lse = intfa.attention(q, k, v, is_causal=causal, enable_gqa=True, layout="BSHD",
                                   return_lse=True)
        ref, ref_lse = torch.ops.intfa.attention(q, k, v, causal, 0.0, "BSHD", "accurate", "auto", True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    qkv = intfa.quantize(q, k, v, layout="BSHD")
    a8 = intfa.attention_int8(qkv, is_causal=True)
    assert torch.equal(a8, intfa.attention(q, k, v, is_causal=True, enable_gqa=True, layout="BSHD"))
    # A strided view (every other head of a wider tensor), a Parameter, grad-requiring inputs.
    wide = rand(1, 8, 64, 64, dtype=torch.float16, seed=96)
    qv, kv_, vv = wide[:, ::2], wide[:, 1::2], wide[:, 1::2]
    base = intfa.attention(qv.contiguous(), kv_.contiguous(), vv.contiguous())
    assert torch.equal(intfa.attention(qv, kv_, vv), base)
    assert torch.equal(intfa.attention(torch.nn.Parameter(qv.contiguous(), requires_grad=False), kv_, vv), base)
    with torch.no_grad():
        assert torch.equal(intfa.attention(qv.contiguous().requires_grad_(), kv_, vv), base)
    out = intfa.attention(qv.contiguous().requires_grad_(), kv_, vv)
    assert torch.equal(out.detach(), base)
    if out.requires_grad:  # the op: torch's autograd says there is no backward formula
        with pytest.raises(RuntimeError):
            out.float().sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        intfa.attention(qv, kv_, vv)
    assert any("intfa::attention" in e.name for e in prof.events())


def test_cuda_graph_capture_and_replay():
    q, k, v = make_qkv(2, 4, 2, 256, 384, 128, seed=30)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    qv, kv, vv = (rand(256, 4, 64, seed=40 + i) for i in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch recommends
        intfa.attention(q, k, v, is_causal=True, enable_gqa=True)
        intfa.attention_varlen(qv, kv, vv, cu, cu, 156, 156)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = intfa.attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
        out_v = intfa.attention_varlen(qv, kv, vv, cu, cu, 156, 156)
    for seed in (50, 60):
        for dst, src in zip((q, k, v), make_qkv(2, 4, 2, 256, 384, 128, seed=seed)):
            dst.copy_(src)
        for i, dst in enumerate((qv, kv, vv)):
            dst.copy_(rand(256, 4, 64, seed=seed + i))
        g.replay()
        torch.cuda.synchronize()
        want, want_lse = intfa.attention(q, k, v, is_causal=True, enable_gqa=True,
                                         return_lse=True)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        assert torch.equal(out_v, intfa.attention_varlen(qv, kv, vv, cu, cu, 156, 156))
        ref, _ = ref_attention(q, k, v, causal=True)
        assert rel_l2(out, ref) < 3e-2


def test_non_default_stream_is_respected():
    q0, k, v = make_qkv(1, 8, 8, 1024, 1024, 128, seed=70)
    q_new = rand(*q0.shape, seed=71)
    want = intfa.attention(q_new, k, v)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()  # non-blocking: unordered with the legacy default stream
    q = q0.clone()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~tens of ms: the copy below lands late on s
        q.copy_(q_new)
        out = intfa.attention(q, k, v)  # must run on s, after the copy
    s.synchronize()
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------------
def test_patch_sdpa_routes_supported_calls_only():
    torch_sdpa = F.scaled_dot_product_attention
    q, k, v = make_qkv(2, 4, 4, 256, 256, 64, seed=80)
    with intfa.sdpa_patched():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                           intfa.attention(q, k, v, is_causal=True))
        kg, vg = k[:, :2], v[:, :2]
        assert torch.equal(F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True, scale=0.1),
                           intfa.attention(q, kg, vg, enable_gqa=True, scale=0.1))
        mask = torch.rand(256, 256, device="cuda") > 0.5
        fallbacks = [
            ((q, k, v), dict(attn_mask=mask)),
            ((q, k[:, :, :100], v[:, :, :100]), dict(is_causal=True)),  # top-left causal
            (make_qkv(1, 2, 2, 64, 64, 96), {}),  # head dim the GPU paths lack
            (make_qkv(2, 8, 2, 1, 512, 128), dict(enable_gqa=True)),  # decode: 4 rows per K/V head
            ((q.float(), k.float(), v.float()), {}),
        ]
        q2, k2, v2 = make_qkv(1, 2, 2, 200, 200, 256, seed=81)  # head dim 256 (sm90 on Hopper, else sm80)
        assert torch.equal(F.scaled_dot_product_attention(q2, k2, v2), intfa.attention(q2, k2, v2))
        for args, kw in fallbacks:
            assert not intfa.sdpa_supported(*args, **kw)
            assert torch.equal(F.scaled_dot_product_attention(*args, **kw),
                               torch_sdpa(*args, **kw))
        qg = q.detach().clone().requires_grad_()
        out = F.scaled_dot_product_attention(qg, k, v)  # training: torch, with a backward
        out.sum().backward()
        assert qg.grad is not None
    assert F.scaled_dot_product_attention is torch_sdpa


def test_patch_sdpa_under_torch_compile():
    torch._dynamo.reset()

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 1.0

    q, k, v = make_qkv(1, 4, 4, 128, 128, 128, dtype=torch.bfloat16, seed=90)
    with intfa.sdpa_patched():
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert torch.equal(got, intfa.attention(q, k, v, is_causal=True))


# ------------------------------------------------------------------------------------------------
# CuPy
# ------------------------------------------------------------------------------------------------
def test_cupy_arrays():
    cp = pytest.importorskip("cupy")
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, seed=100)
    qc, kc, vc = (cp.asarray(x.cpu().numpy()) for x in (q, k, v))
    with cp.cuda.Stream(non_blocking=True):
        out, lse = intfa.attention(qc, kc, vc, is_causal=True, return_lse=True)
        cp.cuda.get_current_stream().synchronize()
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16
    ref, ref_lse = ref_attention(q, k, v, causal=True)
    assert rel_l2(out, ref) < 3e-2
    lse_close(torch.as_tensor(cp.asnumpy(lse), device="cuda"), ref_lse)


# ------------------------------------------------------------------------------------------------
# INT8 KV cache
# ------------------------------------------------------------------------------------------------
def _tok(x, a, b, layout="BHSD"):
    return x[:, a:b] if layout == "BSHD" else x[:, :, a:b]


def _kv_inputs(d, layout, n0, total, seed):
    q, k, v = make_qkv(2, 4, 2, total, total, d, layout, seed=seed)
    k = k + 1  # a per-channel offset: the K mean matters
    v = v.clone()
    # A V value past the prompt's range at decode step 3: that channel's scale grows.
    grow = (slice(None), n0 + 2, 0, slice(0, 4)) if layout == "BSHD" else \
        (slice(None), 0, n0 + 2, slice(0, 4))
    v[grow] *= 5
    return q, k, v


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
@pytest.mark.parametrize("d,layout", [(64, "BHSD"), (128, "BSHD"), (256, "BHSD")])
def test_kv_cache_decode_matches_cpu(scheme, d, layout):
    """A KV cache on the GPU against the same cache on the CPU backend: a 37-token prompt, 5
    decode steps (GQA 4/2) and a causal chunk of 3; the cache parts bit-identical after every
    append, the outputs close, and both close to float64 attention."""
    n0, steps = 37, [1] * 5 + [3]
    total = n0 + sum(steps)
    q, k, v = _kv_inputs(d, layout, n0, total, seed=110)
    kc, vc = k.cpu(), v.cpu()
    g = intfa.KVCache(_tok(k, 0, n0, layout), _tok(v, 0, n0, layout), 64, layout=layout,
                      scheme=scheme)
    c = intfa.KVCache(_tok(kc, 0, n0, layout), _tok(vc, 0, n0, layout), 64, layout=layout,
                      scheme=scheme)
    assert g.k8.is_cuda and g.vt8.is_cuda
    v_scale0 = c.v_scale.clone()
    end = n0
    for n in steps:
        g.append(_tok(k, end, end + n, layout), _tok(v, end, end + n, layout))
        c.append(_tok(kc, end, end + n, layout), _tok(vc, end, end + n, layout))
        end += n
        assert g.length == c.length == end
        assert torch.equal(_tok(g.k8, 0, end, layout).cpu(), _tok(c.k8, 0, end, layout))
        assert torch.equal(g.k_scale[..., :end].cpu(), c.k_scale[..., :end])
        assert torch.equal(g.vt8[..., :end].cpu(), c.vt8[..., :end])
        assert torch.equal(g.v_scale.cpu(), c.v_scale)
        qt = _tok(q, end - n, end, layout)
        out, lse = g.attention(qt, is_causal=True, return_lse=True)
        out_c, lse_c = c.attention(qt.cpu(), is_causal=True, return_lse=True)
        assert out.is_cuda and out.dtype == q.dtype and out.shape == qt.shape
        assert rel_l2(out, out_c) < 2e-3
        # One P8 rounding flip (ex2.approx vs exp2) moves l by up to 1/255 of a short row:
        # the C++ GPU tests' LSE tolerance.
        assert ((lse.cpu() - lse_c).abs() <= 5e-3 * (1 + lse_c.abs())).all()
        ref, ref_lse = ref_attention(qt, _tok(k, 0, end, layout), _tok(v, 0, end, layout),
                                     causal=True, layout=layout)
        assert rel_l2(out, ref) < 0.05
        lse_close(lse, ref_lse)
    assert not torch.equal(c.v_scale, v_scale0)  # the large V value grew a scale


def test_quantize_q_on_the_gpu():
    q, k, v = make_qkv(2, 8, 2, 5, 300, 128, seed=120)
    k = k + 2
    x = intfa.quantize(q, k, v)
    q8, q_scale, lse_offset = intfa.quantize_q(q, x.k_mean)
    assert q8.is_cuda and torch.equal(q8, x.q8) and torch.equal(q_scale, x.q_scale)
    torch.testing.assert_close(lse_offset, x.lse_offset, rtol=1e-5, atol=1e-5)
    q8c, q_scale_c, lse_c = intfa.quantize_q(q.cpu(), x.k_mean.cpu())
    assert torch.equal(q8.cpu(), q8c) and torch.equal(q_scale.cpu(), q_scale_c)
    torch.testing.assert_close(lse_offset.cpu(), lse_c, rtol=1e-5, atol=1e-5)


def _capture_step(warm, cache, kt, vt, qt, **attn):
    """(graph, out): a decode step (append, then causal attention with `attn`) of `cache`
    captured in a CUDA graph, after a warm-up step of `warm` on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        warm.append(kt, vt)
        warm.attention(qt, is_causal=True, **attn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.append(kt, vt)
        out = cache.attention(qt, is_causal=True, **attn)
    return graph, out


def test_kv_cache_decode_step_in_a_cuda_graph():
    """quantize_q, append_kv and attention_int8 of one decode step captured in a CUDA graph:
    replay writes the cache and gives the eager result. (KVCache.length advances while the step
    is captured, in Python; the graph's work runs at replay.)"""
    n0 = 40
    q, k, v = make_qkv(1, 8, 2, n0 + 1, n0 + 1, 128, seed=130)
    kt, vt, qt = (_tok(x, n0, n0 + 1).clone() for x in (k, v, q))
    warm, cache, eager = (intfa.KVCache(k[:, :, :n0], v[:, :, :n0], 64) for _ in range(3))
    graph, out = _capture_step(warm, cache, kt, vt, qt)
    graph.replay()
    eager.append(kt, vt)
    want = eager.attention(qt, is_causal=True)
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert torch.equal(cache.k8[:, :, :n0 + 1], eager.k8[:, :, :n0 + 1])
    assert torch.equal(cache.vt8[..., :n0 + 1], eager.vt8[..., :n0 + 1])


def test_split_launches_in_a_cuda_graph():
    """Launches with key-range splits, whose combine kernel starts as a programmatic dependent of
    the attention kernel (sm_90), captured in a CUDA graph: a decode step over a 3000-token cache
    (the decode kernel's ranges) and a few-tile prompt call over 5000 keys (sm90's, or sm80's
    single pass elsewhere); each replay, with new inputs copied in, gives the eager bits."""
    n0 = 3000
    q, k, v = make_qkv(1, 8, 2, n0 + 1, n0 + 1, 128, seed=135)
    kt, vt, qt = (_tok(x, n0, n0 + 1).clone() for x in (k, v, q))
    warm, cache, eager = (intfa.KVCache(k[:, :, :n0], v[:, :, :n0], 4096) for _ in range(3))
    graph, out = _capture_step(warm, cache, kt, vt, qt, return_lse=True)
    graph.replay()
    eager.append(kt, vt)
    want = eager.attention(qt, is_causal=True, return_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    pq, pk, pv = make_qkv(1, 2, 2, 200, 5000, 128, seed=136)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        intfa.attention(pq, pk, pv, return_lse=True)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got, got_lse = intfa.attention(pq, pk, pv, return_lse=True)
    for seed in (137, 138):
        for dst, src in zip((pq, pk, pv), make_qkv(1, 2, 2, 200, 5000, 128, seed=seed)):
            dst.copy_(src)
        g.replay()
        want, want_lse = intfa.attention(pq, pk, pv, return_lse=True)
        torch.cuda.synchronize()
        assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
        assert rel_l2(got, ref_attention(pq, pk, pv)[0]) < 3e-2


def test_kv_cache_fast_path_on_the_gpu():
    """KVCache's eager fast path (the binding called directly, attention in one call, the
    current stream read raw) on a side stream, against the generic calls it stands for,
    append_kv() and quantize_q() + attention_int8() over qkv()'s views: the same bits."""
    n0 = 40
    q, k, v = make_qkv(2, 8, 2, n0 + 5, n0 + 5, 128, layout="BSHD", seed=160)
    k = k + 1
    fast = intfa.KVCache(_tok(k, 0, n0, "BSHD"), _tok(v, 0, n0, "BSHD"), 64, layout="BSHD")
    ref = intfa.KVCache(_tok(k, 0, n0, "BSHD"), _tok(v, 0, n0, "BSHD"), 64, layout="BSHD")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    got, want = [], []
    with torch.cuda.stream(side):
        for t in range(n0, n0 + 5):
            kt, vt, qt = (_tok(x, t, t + 1, "BSHD") for x in (k, v, q))
            fast.append(kt, vt)
            intfa.append_kv(ref, kt, vt, t)
            ref.length = t + 1
            kw = dict(is_causal=True, return_lse=True, scale=0.1 if t % 2 else None)
            got.append(fast.attention(qt, **kw))
            q8, q_scale, lse_offset = intfa.quantize_q(qt, ref.k_mean, scale=kw["scale"],
                                                       layout="BSHD")
            want.append(intfa.attention_int8(ref.qkv(q8, q_scale, lse_offset, qt.dtype), **kw))
    torch.cuda.synchronize()
    for (o, l), (ow, lw) in zip(got, want):
        assert o.is_cuda and torch.equal(o, ow) and torch.equal(l, lw)
    n = n0 + 5
    assert torch.equal(fast.k8[:, :n], ref.k8[:, :n])
    assert torch.equal(fast.k_scale[..., :n], ref.k_scale[..., :n])
    assert torch.equal(fast.vt8[..., :n], ref.vt8[..., :n])
    assert torch.equal(fast.v_scale, ref.v_scale)


def test_kv_cache_errors_on_the_gpu():
    q, k, v = make_qkv(1, 4, 2, 1, 40, 64, seed=140)
    cache = intfa.KVCache(k[:, :, :39], v[:, :, :39], 40)
    with pytest.raises(ValueError, match=r"capacity 40, length 39, n 2"):
        cache.append(k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="memory"):  # the cache is on the GPU, k_new not
        cache.append(k[:, :, :1].cpu(), v[:, :, :1].cpu())
    with pytest.raises(ValueError, match="head_dim: expected 64, 128 or 256 on the GPU, got 96"):
        intfa.KVCache(*make_qkv(1, 2, 2, 1, 8, 96)[1:], 16)


def test_kv_cache_cupy():
    cp = pytest.importorskip("cupy")
    q, k, v = make_qkv(1, 4, 2, 41, 41, 64, seed=150)
    qc, kc, vc = (cp.asarray(x.cpu().numpy()) for x in (q, k, v))
    cc = intfa.KVCache(kc[:, :, :40], vc[:, :, :40], 48)
    ct = intfa.KVCache(k[:, :, :40], v[:, :, :40], 48)
    cc.append(kc[:, :, 40:], vc[:, :, 40:])
    ct.append(k[:, :, 40:], v[:, :, 40:])
    out = cc.attention(qc[:, :, 40:], is_causal=True)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16
    want = ct.attention(q[:, :, 40:], is_causal=True)
    assert torch.equal(torch.as_tensor(cp.asnumpy(out), device="cuda"), want)
    assert torch.equal(torch.as_tensor(cp.asnumpy(cc.vt8[..., :41]), device="cuda"),
                       ct.vt8[..., :41])


# ------------------------------------------------------------------------------------------------
# Ragged batches (the CPU tests in test_cpu.py, with tolerances where launch shapes differ)
# ------------------------------------------------------------------------------------------------
def cuda_randn(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return lambda shape, scale: (torch.randn(*shape, generator=g, device="cuda") * scale).half()


def close(got, want):
    # A ragged batch and a batch of one are different launches, which may take different paths.
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def exact(got, want):
    assert torch.equal(got, want)


@pytest.mark.parametrize("d,layout", [(64, "BHSD"), (128, "BSHD")])
@pytest.mark.parametrize("generic", [False, True])
def test_ragged_kv_cache_on_the_gpu(d, layout, generic):
    """A ragged cache (prompts of 30, 12 and 21 tokens, garbage past each) against one cache per
    sequence, appends of 1 and 3 tokens, attention after each (causal or not, GQA, LSE): the
    lengths exact, the cache parts bit-identical (quantization is the same on every path), the
    outputs close; and the parts those of the same ragged cache on the CPU backend."""
    lengths, steps = [30, 12, 21], [1, 3, 1, 2]
    inputs = in_layout(layout, *ragged_inputs(cuda_randn(170), 3, 4, 2, 30, 8, d, lengths))
    g, _ = ragged_vs_separate(*inputs, lengths, steps, layout, "accurate", close, exact,
                              generic)
    assert g.lengths.is_cuda and g.lengths.dtype == torch.int32
    assert g.lengths.tolist() == [37, 19, 28] and g.length == 37
    c, _ = ragged_vs_separate(*(x.cpu() for x in inputs), lengths, steps, layout, "accurate",
                              exact, exact, generic)
    check_parts(g, [Sequence(c, i) for i in range(3)],
                lambda got, want: exact(got.cpu(), want))


def test_attention_int8_seqused_kv_on_the_gpu():
    """seqused_kv against one call per sequence over its first seqused_kv[b] keys (views of the
    same quantized tensors), and against float64 attention over those keys."""
    q, k, v = make_qkv(3, 8, 2, 4, 300, 128, seed=171)
    x = intfa.quantize(q, k, v)
    used = torch.tensor([300, 13, 170], dtype=torch.int32, device="cuda")
    for causal in (False, True):
        out, lse = intfa.attention_int8(x, seqused_kv=used, is_causal=causal, return_lse=True)
        for b, n in enumerate(used.tolist()):
            o, l = intfa.attention_int8(seq_view(x, b, n, "BHSD"), is_causal=causal,
                                        return_lse=True)
            close(out[b:b + 1], o)
            close(lse[b:b + 1], l)
            ref, ref_lse = ref_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                         causal=causal)
            assert rel_l2(out[b:b + 1], ref) < TOL["accurate"]
            lse_close(lse[b:b + 1], ref_lse)
    with pytest.raises(ValueError, match="seqused_kv"):
        intfa.attention_int8(x, seqused_kv=used.cpu())  # not on q8's device


def test_ragged_kv_cache_decode_step_in_a_cuda_graph():
    """A ragged decode step (append at the per-sequence positions, lengths += 1 on the device,
    attention with seqused_kv) captured in a CUDA graph: replay writes the cache, advances the
    lengths and gives the eager result."""
    lengths = [30, 12]
    q, k, v, kn, vn = ragged_inputs(cuda_randn(172), 2, 8, 2, 30, 1, 128, lengths)
    warm, cache, eager = (intfa.KVCache(k, v, 48, lengths=lengths) for _ in range(3))
    graph, out = _capture_step(warm, cache, kn, vn, q)
    assert cache.lengths.tolist() == lengths  # captured, not run
    graph.replay()
    eager.append(kn, vn)
    want = eager.attention(q, is_causal=True)
    torch.cuda.synchronize()
    assert cache.lengths.tolist() == eager.lengths.tolist() == [31, 13]
    assert torch.equal(out, want)
    check_parts(cache, [Sequence(eager, i) for i in range(2)], exact)


def test_ragged_kv_cache_graph_replays_at_growing_lengths():
    """One ragged decode step captured with views of the whole capacity (max_seqlen_kv), then
    replayed step after step with new tokens copied into the graph's inputs: each replay appends
    at the lengths the previous one left and attends over them, as an eager cache stepping the
    same tokens does (bit for bit with the same views; close to the default views, whose key
    ranges may differ). Includes a V scale that grows during a replay."""
    lengths, cap, steps = [30, 12], 48, 4
    q, k, v, kn, vn = ragged_inputs(cuda_randn(174), 2, 8, 2, 30, steps, 128, lengths)
    warm, cache, eager, plain = (intfa.KVCache(k, v, cap, lengths=lengths) for _ in range(4))
    kt, vt, qt = (x[:, :, :1].clone() for x in (kn, vn, q))
    graph, out = _capture_step(warm, cache, kt, vt, qt, max_seqlen_kv=cap)
    for s in range(steps):
        for buf, x in ((kt, kn), (vt, vn), (qt, q)):
            buf.copy_(x[:, :, s:s + 1])
        graph.replay()
        eager.append(kn[:, :, s:s + 1], vn[:, :, s:s + 1])
        want = eager.attention(q[:, :, s:s + 1], is_causal=True, max_seqlen_kv=cap)
        plain.append(kn[:, :, s:s + 1], vn[:, :, s:s + 1])
        near = plain.attention(q[:, :, s:s + 1], is_causal=True)
        torch.cuda.synchronize()
        assert cache.lengths.tolist() == eager.lengths.tolist() == [31 + s, 13 + s]
        assert torch.equal(out, want)
        close(out, near)
    check_parts(cache, [Sequence(eager, i) for i in range(2)], exact)
    assert cache.sync_length() == 30 + steps  # the host's bound catches up with the replays


def test_ragged_kv_cache_cupy():
    cp = pytest.importorskip("cupy")
    lengths = [30, 12]
    q, k, v, kn, vn = ragged_inputs(cuda_randn(173), 2, 4, 2, 30, 2, 64, lengths)
    qc, kc, vc, knc, vnc = (cp.asarray(x.cpu().numpy()) for x in (q, k, v, kn, vn))
    cc = intfa.KVCache(kc, vc, 48, lengths=cp.asarray(lengths))
    ct = intfa.KVCache(k, v, 48, lengths=lengths)
    cc.append(knc, vnc)
    ct.append(kn, vn)
    assert isinstance(cc.lengths, cp.ndarray) and cc.lengths.dtype == cp.int32
    assert cc.lengths.tolist() == [32, 14] and cc.length == 32
    out = cc.attention(qc, is_causal=True)
    want = ct.attention(q, is_causal=True)
    assert torch.equal(torch.as_tensor(cp.asnumpy(out), device="cuda"), want)
    cc.truncate([31, 14])
    assert cc.lengths.tolist() == [31, 14] and cc.length == 31


def _prefill_paths():
    """The prefill kernels this GPU runs (sm90 on Hopper, sm80 everywhere)."""
    return ["sm80"] + (["sm90"] if intfa.resolve_gpu_path() == "sm90" else [])


def _paged_on(x, device, page, spare, seed, counts):
    """paged.page_copy of a torch QuantizedQKV (any device) with the entries past counts -1, as
    torch tensors on `device`."""
    host = x._replace(**{f: a.cpu().numpy() for f, a in x._asdict().items() if isinstance(a, torch.Tensor)})
    paged = drop_pages(page_copy(host, page, spare, seed), counts)
    return paged._replace(**{f: torch.from_numpy(a).to(device) for f, a in paged._asdict().items()
                             if isinstance(a, np.ndarray)})


@pytest.mark.parametrize("scheme", ["accurate", "paper"])
def test_paged_kv_on_the_gpu(scheme):
    """A paged cache (256-token pages shuffled in a pool) on the GPU: append_kv at a position
    per sequence (V scales that grow) writes the CPU backend's bytes; attention_int8 (the decode
    path, and sm80 / sm90 when named) equals the contiguous cache's call on the same kernel bit
    for bit and is close to the CPU's."""
    q, k, v = make_qkv(3, 8, 2, 1, 1024, 128, seed=181)
    x = intfa.quantize(q, k, v, scheme=scheme)
    x.v_scale.view(-1)[::3] *= 0.05  # small scales: the new tokens grow them
    pos = torch.tensor([700, 255, 1023], dtype=torch.int32)
    end = [min(1024, p + 2) for p in pos.tolist()]
    gpu = _paged_on(x, "cuda", 256, 3, 7, end)
    cpu = _paged_on(x, "cpu", 256, 3, 7, end)
    k_new, v_new = rand(3, 2, 2, 128, seed=182), rand(3, 2, 2, 128, seed=183)
    intfa.append_kv(gpu, k_new, v_new, pos.cuda())
    intfa.append_kv(cpu, k_new.cpu(), v_new.cpu(), pos)
    intfa.append_kv(x, k_new, v_new, pos.cuda())
    for f in ("k8", "vt8", "v_scale"):
        assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), f
    assert torch.equal(gpu.k_scale.cpu().view(torch.int32), cpu.k_scale.view(torch.int32))
    used = torch.tensor(end, dtype=torch.int32)
    for causal in (False, True):
        step = dict(seqused_kv=used.cuda())
        out, lse = intfa.attention_int8(gpu._replace(**step), is_causal=causal, return_lse=True)
        want, want_lse = intfa.attention_int8(x._replace(**step), is_causal=causal, return_lse=True,
                                              path="decode")
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        # The CPU backend's 64-key blocks (the kernel's are 128): P8 rounds differently.
        emu = intfa.attention_int8(cpu._replace(seqused_kv=used), is_causal=causal)
        assert rel_l2(out.cpu(), emu) < 1e-2
        # The prefill kernels read pages too: the contiguous cache's bits on the same kernel.
        for path in _prefill_paths():
            out, lse = intfa.attention_int8(gpu._replace(**step), is_causal=causal, return_lse=True, path=path)
            want, want_lse = intfa.attention_int8(x._replace(**step), is_causal=causal, return_lse=True,
                                                  path=path)
            assert torch.equal(out, want) and torch.equal(lse, want_lse), path


@pytest.mark.parametrize("sq", [1, 40])
def test_paged_bshd_on_the_gpu(sq):
    """A paged BSHD cache (k8 pages [P, page, Hkv, D], 256-token pages shuffled in a pool) on the
    GPU: attention_int8 over it equals the contiguous BSHD cache's call bit for bit on every
    path that takes the call (decode for one query per sequence, sm80 and sm90 for 40, auto)."""
    q, k, v = make_qkv(3, 8, 2, sq, 1024, 128, layout="BSHD", seed=185 + sq)
    x = intfa.quantize(q, k, v, layout="BSHD")
    used = [700, 255, 1024]
    gpu = _paged_on(x, "cuda", 256, 3, 11, used)
    assert gpu.k8.shape[1:] == (256, 2, 128)
    step = dict(seqused_kv=torch.tensor(used, dtype=torch.int32, device="cuda"))
    paths = (["decode"] if sq * 4 <= 16 else []) + _prefill_paths() + ["auto"]
    for causal in (False, True):
        for path in paths:
            kw = dict(is_causal=causal, return_lse=True, path=path)
            out, lse = intfa.attention_int8(gpu._replace(**step), **kw)
            want, want_lse = intfa.attention_int8(x._replace(**step), **kw)
            assert torch.equal(out, want) and torch.equal(lse, want_lse), (causal, path)


def test_paged_kv_cache_on_the_gpu():
    """intfa.PagedKVCache on CUDA tensors (pages of 128 tokens; one query per sequence and step,
    Hq / Hkv = 4: the decode path), as test_cpu's test: prompts of 200, 127 and 129 tokens, a
    sequence crossing into a new page, a V scale that grows. Against a ragged KVCache of its
    capacity attended over views of that capacity (the paged call's key range): outputs and
    LSE bit for bit, the bytes read back through the table the same."""
    lengths = [200, 127, 129]
    inputs = ragged_inputs(cuda_randn(190), 3, 8, 2, 200, 3, 128, lengths)
    paged, _ = paged_vs_ragged(*inputs, lengths, [1, 1, 1], exact, lambda a: a.cpu().numpy(),
                               max_seqlen_kv=512, num_pages=8, page_size=128, max_pages=4)
    assert paged.lengths.is_cuda and paged.block_table.is_cuda
    assert paged.lengths_host == [203, 130, 132] and paged.pages_free == 2


@pytest.mark.parametrize("path", ["decode", "auto", "sm80"])
def test_paged_trim_local_layer_on_the_gpu(path):
    """A local layer's decode loop (window (W - 1, 0), W = 200; a gpt-oss-like GQA head group)
    over a PagedKVCache of 128-token pages that gives back the pages its window has passed
    (trim(W - 1) after every step) equals, bit for bit, the same loop over one that keeps every
    page: the kernels read no page before a window's first key block (their entries are -1 in
    the table), and the V sweep of a step whose scales grow skips them."""
    b, hq, hkv, d, w, n0, steps = 2, 16, 2, 64, 200, 600, 6
    q = rand(b, hq, steps, d, seed=80)
    k, v = rand(b, hkv, n0, d, seed=81), rand(b, hkv, n0, d, seed=82)
    k_new, v_new = rand(b, hkv, steps, d, seed=83), rand(b, hkv, steps, d, seed=84)
    v_new[:, :, 3] *= 8  # its V grows the scales: the sweep over the held pages
    full = intfa.PagedKVCache(k, v, 16, page_size=128, max_pages=8)
    trimmed = intfa.PagedKVCache(k, v, 16, page_size=128, max_pages=8)
    freed = trimmed.trim(w - 1)
    for t in range(steps):
        for cache in (full, trimmed):
            cache.append(k_new[:, :, t:t + 1], v_new[:, :, t:t + 1])
        kw = dict(is_causal=True, window_size=(w - 1, 0), return_lse=True, path=path)
        want = full.attention(q[:, :, t:t + 1], **kw)
        got = trimmed.attention(q[:, :, t:t + 1], **kw)
        exact(got[0], want[0])
        exact(got[1], want[1])
        freed += trimmed.trim(w - 1)
    assert freed == 3 * b and trimmed.pages_free == full.pages_free + freed
    assert torch.equal(trimmed.v_scale, full.v_scale)


def test_paged_kv_cache_chunked_prefill_on_the_gpu():
    """intfa.PagedKVCache on CUDA tensors fed a prompt's next chunks (40 and 17 tokens per
    sequence: 160 and 68 query rows per K/V head, which the prefill kernels read through the
    pages) around a decode step: against a ragged KVCache of its capacity on the same path (sm80,
    and sm90 on Hopper), outputs and LSE bit for bit; path auto runs the card's prefill kernel."""
    lengths = [200, 127, 129]
    q, k, v, k_new, v_new = ragged_inputs(cuda_randn(191), 3, 8, 2, 200, 58, 128, lengths)
    for path in _prefill_paths():
        paged, _ = paged_vs_ragged(q, k, v, k_new, v_new, lengths, [40, 1, 17], exact,
                                   lambda a: a.cpu().numpy(), max_seqlen_kv=512, path=path,
                                   num_pages=12, page_size=128, max_pages=4)
        assert paged.lengths_host == [258, 185, 187]
    chunk = q[:, :, :17]
    for causal in (False, True):
        auto = paged.attention(chunk, is_causal=causal, return_lse=True)
        named = paged.attention(chunk, is_causal=causal, return_lse=True, path=intfa.resolve_gpu_path())
        assert torch.equal(auto[0], named[0]) and torch.equal(auto[1], named[1])


@pytest.mark.parametrize("page", [16, 32, 64])
def test_paged_kv_cache_small_pages_on_the_gpu(page):
    """PagedKVCache with pages smaller than a key block (16, 32 or 64 tokens, vLLM's block sizes:
    each kernel's SmallPages form) on CUDA tensors, against a ragged KVCache of its capacity on
    the same path, outputs and LSE bit for bit: decode steps on the decode kernel (also with a
    sliding window and sinks), a prompt's chunks around a decode step on sm80 and (Hopper) sm90,
    a windowed chunk on sm90; path auto runs the card's kernel for the chunk."""
    lengths = [200, 127, 129]
    q, k, v, k_new, v_new = ragged_inputs(cuda_randn(192 + page), 3, 8, 2, 200, 58, 128, lengths)
    args = dict(max_seqlen_kv=512, num_pages=3 * 512 // page + 2, page_size=page, max_pages=512 // page)
    host = lambda a: a.cpu().numpy()  # noqa: E731
    paged_vs_ragged(q, k, v, k_new, v_new, lengths, [1, 3, 1], exact, host, path="decode", **args)
    z = torch.linspace(-1.0, 4.0, 8, device="cuda")
    paged_vs_ragged(q, k, v, k_new, v_new, lengths, [1, 1], exact, host, path="decode",
                    window_size=(60, 0), sinks=z, **args)
    prefill = ["sm80"] + (["sm90"] if intfa.resolve_gpu_path() == "sm90" else [])
    for path in prefill:
        paged, _ = paged_vs_ragged(q, k, v, k_new, v_new, lengths, [40, 1, 17], exact, host, path=path,
                                   **args)
    if prefill[-1] == "sm90":
        paged_vs_ragged(q, k, v, k_new, v_new, lengths, [40, 17], exact, host, path="sm90",
                        window_size=(70, 0), **args)
    chunk = q[:, :, :17]
    auto = paged.attention(chunk, is_causal=True, return_lse=True)
    named = paged.attention(chunk, is_causal=True, return_lse=True, path=prefill[-1])
    assert torch.equal(auto[0], named[0]) and torch.equal(auto[1], named[1])


def test_paged_kv_cache_shared_prefix_on_the_gpu():
    """PagedKVCache(v_headroom=) over 16-token pages with share_prefix / append_to on CUDA tensors
    against the same calls on the CPU backend: the pool, the table and the shared statistics
    equal bit for bit (the quantizers are exact), attention of a decode step and of a 17-row
    chunk within test_paged_kv_on_the_gpu's tolerance."""
    q = rand(3, 8, 17, 128, seed=51)
    k, v = rand(3, 2, 200, 128, seed=52), rand(3, 2, 200, 128, seed=53)
    sk, sv = rand(1, 2, 40, 128, seed=54), rand(1, 2, 40, 128, seed=55)
    caches = []
    for dev in ("cuda", "cpu"):
        cache = intfa.PagedKVCache(k.to(dev), v.to(dev), 40, page_size=16, max_pages=20,
                                   lengths=[200, 150, 60], v_headroom=2.0)
        cache.release(2)
        cache.share_prefix(2, 0, 128)
        cache.append_to(2, sk.to(dev), sv.to(dev))
        caches.append(cache)
    g, h = caches
    assert g.lengths_host == h.lengths_host == [200, 150, 168]
    for part in ("k8", "k_scale", "vt8", "k_mean", "v_scale", "block_table", "lengths"):
        assert torch.equal(getattr(g, part).cpu(), getattr(h, part)), part
    for rows in (1, 17):
        out_g = g.attention(q[:, :, :rows], is_causal=True)
        out_h = h.attention(q[:, :, :rows].cpu(), is_causal=True)
        assert rel_l2(out_g.cpu(), out_h) < 1e-2, rows


# ------------------------------------------------------------------------------------------------
# Sliding-window attention (window_size)
# ------------------------------------------------------------------------------------------------
def _window_vs_cpu(out, lse, out_c, lse_c, rows=lambda out: out):
    """A GPU call with a window against the CPU backend's with the same arguments: the output
    within test_paged_kv_on_the_gpu's tolerance (the CPU's 64-key blocks round P8 otherwise
    than the kernels' 128), the LSE within test_kv_cache_decode_matches_cpu's, the same rows
    without keys (0 and -inf). rows(out): out with its rows in the LSE's order (BHSD: out)."""
    assert rel_l2(out.cpu(), out_c) < 1e-2
    finite = torch.isfinite(lse_c)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert ((lse.cpu() - lse_c)[finite].abs() <= 5e-3 * (1 + lse_c[finite].abs())).all()
    assert torch.all(rows(out.cpu())[~finite] == 0)


# (B, Hq, Hkv, Sq, Skv, D, is_causal, window_size, scheme, layout) for the prefill kernels: a
# Mistral-style local layer, the diagonal alone, two-sided and right-only windows, rows that see
# no key (Sq > Skv), few tiles over a long KV (sm90 splits the keys into ranges).
GPU_WINDOWS = [(2, 4, 2, 1000, 1000, 128, True, (255, 0), "accurate", "BHSD"),
               (1, 2, 2, 300, 300, 64, True, (0, -1), "paper", "BSHD"),
               (2, 2, 1, 500, 700, 128, False, (100, 37), "accurate", "BHSD"),
               (1, 3, 3, 333, 250, 64, False, (-1, 50), "paper", "BHSD"),
               (1, 2, 1, 300, 100, 128, True, (30, -1), "accurate", "BSHD"),
               (1, 2, 1, 200, 5000, 128, True, (1000, 0), "accurate", "BHSD")]


@pytest.mark.parametrize("w", GPU_WINDOWS, ids=lambda w: "{3}x{4}-d{5}-{6}-{7[0]}_{7[1]}".format(*w))
def test_window_on_the_prefill_paths(w):
    """window_size on sm80, sm90 (Hopper) and auto against the CPU backend with the same window,
    and within the scheme's error of float64 softmax over the window's keys."""
    b, hq, hkv, sq, skv, d, causal, window, scheme, layout = w
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, layout, seed=sq + skv)
    kw = dict(is_causal=causal, window_size=window, enable_gqa=True, layout=layout,
              scheme=scheme, return_lse=True)
    out_c, lse_c = intfa.attention(q.cpu(), k.cpu(), v.cpu(), **kw)
    ref, ref_lse = ref_attention(q, k, v, causal, layout=layout, window=window)
    rows = (lambda out: out) if layout == "BHSD" else (lambda out: out.transpose(1, 2))
    for path in _prefill_paths() + ["auto"]:
        out, lse = intfa.attention(q, k, v, path=path, **kw)
        _window_vs_cpu(out, lse, out_c, lse_c, rows)
        assert rel_l2(out, ref) < TOL[scheme], path
        lse_close(lse, ref_lse)


@pytest.mark.parametrize("b,hq,hkv,sq,skv,causal,window", [
    (3, 16, 4, 1, 3000, True, (1023, 0)),  # GQA decode step over a long cache: key ranges
    (2, 16, 4, 4, 2000, True, (127, -1)),  # speculative step: 16 rows per K/V head
    (2, 4, 4, 3, 900, False, (200, 100)),  # two-sided
    (1, 2, 2, 16, 10, True, (3, 0))])      # Sq > Skv: rows that see no key
def test_window_on_the_decode_path(b, hq, hkv, sq, skv, causal, window):
    """window_size on the decode kernel (attention_int8 over a quantized KV; what auto runs for
    at most 16 query rows per K/V head) against the CPU backend and float64."""
    q, k, v = make_qkv(b, hq, hkv, sq, skv, 128, seed=skv + sq)
    kw = dict(is_causal=causal, window_size=window, return_lse=True)
    out, lse = intfa.attention_int8(intfa.quantize(q, k, v), path="decode", **kw)
    auto, auto_lse = intfa.attention_int8(intfa.quantize(q, k, v), **kw)
    assert torch.equal(out, auto) and torch.equal(lse, auto_lse)
    out_c, lse_c = intfa.attention_int8(intfa.quantize(q.cpu(), k.cpu(), v.cpu()), **kw)
    _window_vs_cpu(out, lse, out_c, lse_c)
    ref, ref_lse = ref_attention(q, k, v, causal, window=window)
    assert rel_l2(out, ref) < TOL["accurate"]
    lse_close(lse, ref_lse)


# Packed sequences for the varlen tests: one without queries, one without keys (sequence 4),
# Sq < Skv and Sq > Skv, a long one.
VARLEN_Q, VARLEN_KV = [1, 17, 0, 300, 129, 40], [5, 170, 9, 250, 0, 2000]


def _varlen_inputs(hq, seed):
    """(cu_q, cu_kv, q, k, v) on the GPU for VARLEN_Q / VARLEN_KV: hq query heads, 2 K/V heads,
    D = 128."""
    cu_q, cu_kv = (torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device="cuda")
                   for lens in (VARLEN_Q, VARLEN_KV))
    return (cu_q, cu_kv, rand(sum(VARLEN_Q), hq, 128, seed=seed),
            rand(sum(VARLEN_KV), 2, 128, seed=seed + 1), rand(sum(VARLEN_KV), 2, 128, seed=seed + 2))


def test_window_varlen_on_the_gpu():
    """window_size on packed sequences (each its own diagonal; a sequence without queries, one
    without keys, Sq < Skv and Sq > Skv) on every prefill path, against the CPU backend."""
    lens_q, lens_kv = VARLEN_Q, VARLEN_KV
    cu_q, cu_kv, q, k, v = _varlen_inputs(4, 201)
    for causal, window in ((True, (90, 0)), (False, (60, 20))):
        kw = dict(is_causal=causal, window_size=window, enable_gqa=True, return_lse=True)
        out_c, lse_c = intfa.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_kv.cpu(),
                                              **kw)
        for path in _prefill_paths() + ["auto"]:
            out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, max(lens_q), max(lens_kv),
                                              path=path, **kw)
            _window_vs_cpu(out, lse, out_c, lse_c, lambda out: out.transpose(0, 1))


def test_paged_kv_cache_window_on_the_gpu():
    """A PagedKVCache on CUDA tensors attending with a window (window_size=(99, 0), Hq / Hkv =
    4, pages of 128 tokens): a decode step (the decode path under auto) and prompt chunks of 40
    and 17 tokens (the prefill kernels read the pages: auto, sm80 and sm90 on Hopper) bit for
    bit a ragged KVCache of its capacity on the same path; then its windowed attention close to
    the same cache's on the CPU backend, and unlike the unwindowed one."""
    lengths, steps, window = [200, 127, 129], [1, 40, 17], (99, 0)
    inputs = ragged_inputs(cuda_randn(192), 3, 8, 2, 200, 58, 128, lengths)
    args = dict(max_seqlen_kv=512, window_size=window, num_pages=12, page_size=128,
                max_pages=4)
    cpu, _ = paged_vs_ragged(*(x.cpu() for x in inputs), lengths, steps, exact,
                             torch.Tensor.numpy, **args)
    chunk = inputs[0][:, :, :17]
    for path in ["auto"] + _prefill_paths():
        paged, _ = paged_vs_ragged(*inputs, lengths, steps, exact, lambda a: a.cpu().numpy(),
                                   path=path, **args)
        assert paged.lengths_host == cpu.lengths_host == [258, 185, 187]
        out, lse = paged.attention(chunk, is_causal=True, window_size=window, return_lse=True,
                                   path=path)
        out_c, lse_c = cpu.attention(chunk.cpu(), is_causal=True, window_size=window,
                                     return_lse=True)
        _window_vs_cpu(out, lse, out_c, lse_c)
        assert not torch.equal(out, paged.attention(chunk, is_causal=True, path=path))


def test_flash_attn_func_on_the_gpu():
    """flash_attn's calling convention on CUDA tensors: intfa.attention's bits (BSHD, GQA, the
    window with causal's right edge 0, the LSE), dense and varlen."""
    q, k, v = make_qkv(2, 8, 2, 300, 700, 128, "BSHD", seed=91)
    out, lse, probs = intfa.flash_attn_func(q, k, v, causal=True, window_size=(255, 3),
                                            return_attn_probs=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, window_size=(255, 0), enable_gqa=True,
                                     layout="BSHD", return_lse=True)
    assert probs is None and torch.equal(out, want) and torch.equal(lse, want_lse)
    cu_q = torch.tensor([0, 100, 100, 400], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 300, 450, 1000], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(92)
    qp, kp, vp = (torch.randn(n, h, 128, device="cuda", generator=g).half()
                  for n, h in ((400, 8), (1000, 2), (1000, 2)))
    out = intfa.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 300, 550, causal=True,
                                       window_size=(128, -1))
    want = intfa.attention_varlen(qp, kp, vp, cu_q, cu_k, 300, 550, is_causal=True,
                                  window_size=(128, 0), enable_gqa=True)
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------------
# Attention sinks (sinks=, flash_attn's learnable_sink)
# ------------------------------------------------------------------------------------------------
def _sinks(hq, seed, no_sink=None):
    """float32 [hq] sink logits on the GPU, uniform in [0, 8) (about the LSE of rows of a few to
    a few thousand keys: the sink takes a real share of each row); head no_sink -inf (none)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.rand(hq, generator=g, device="cuda") * 8
    if no_sink is not None:
        z[no_sink] = -math.inf
    return z


def _sinks_vs_float64(out, lse, ref, ref_lse, empty, scheme, rows=lambda out: out):
    """A GPU call with sinks against float64 with a sink column: within the scheme's error, the
    LSE within lse_close's; rows that see no key (`empty`, a mask in the LSE's shape and order)
    give 0 and their head's logit, to float32 rounding (-inf for a head without a sink)."""
    assert rel_l2(out, ref) < TOL[scheme]
    lse_close(lse, ref_lse)
    assert torch.all(rows(out)[empty] == 0)
    want = ref_lse[empty]
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse[empty]), finite)
    assert ((lse[empty][finite].double() - want[finite]).abs() <= 1e-5 * (1 + want[finite].abs())).all()


# (B, Hq, Hkv, Sq, Skv, D, is_causal, window_size, scheme, layout) for the prefill kernels: a
# gpt-oss layer (GQA 8 / 2 here, causal, a 128-key window), rows that see no key (Sq > Skv), a
# non-causal one, few tiles over a long KV (sm90 splits the keys into ranges: the sinks join in
# the combine kernel), grouped-query heads packed as rows of several tiles (non-causal BHSD).
GPU_SINKS = [(2, 8, 2, 1000, 1000, 128, True, (127, 0), "accurate", "BHSD"),
             (1, 8, 2, 300, 100, 64, True, (-1, -1), "paper", "BSHD"),
             (2, 4, 4, 500, 700, 128, False, (-1, -1), "accurate", "BHSD"),
             (1, 8, 2, 200, 5000, 128, True, (-1, -1), "accurate", "BHSD"),
             (1, 16, 2, 64, 2000, 128, False, (-1, -1), "accurate", "BHSD")]


@pytest.mark.parametrize("w", GPU_SINKS, ids=lambda w: "{1}-{2}-{3}x{4}-d{5}-{6}-{7[0]}_{7[1]}-{8}".format(*w))
def test_sinks_on_the_prefill_paths(w):
    """sinks on sm80, sm90 (Hopper) and auto against the CPU backend with the same sinks, and
    within the scheme's error of float64 with a sink column; attention_int8 of quantize() the
    bits of attention on each path."""
    b, hq, hkv, sq, skv, d, causal, window, scheme, layout = w
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, layout, seed=sq + skv + 1)
    z = _sinks(hq, sq, no_sink=1)
    kw = dict(is_causal=causal, window_size=window, sinks=z, enable_gqa=True, layout=layout,
              scheme=scheme, return_lse=True)
    out_c, lse_c = intfa.attention(q.cpu(), k.cpu(), v.cpu(), **kw)
    ref, ref_lse = ref_attention(q, k, v, causal, layout=layout, window=window, sinks=z)
    _, ref_lse0 = ref_attention(q, k, v, causal, layout=layout, window=window)
    rows = (lambda out: out) if layout == "BHSD" else (lambda out: out.transpose(1, 2))
    x = intfa.quantize(q, k, v, layout=layout, scheme=scheme)
    kw8 = dict(is_causal=causal, window_size=window, sinks=z, return_lse=True)
    for path in _prefill_paths() + ["auto"]:
        out, lse = intfa.attention(q, k, v, path=path, **kw)
        _window_vs_cpu(out, lse, out_c, lse_c, rows)
        _sinks_vs_float64(out, lse, ref, ref_lse, torch.isneginf(ref_lse0), scheme, rows)
        out8, lse8 = intfa.attention_int8(x, path=path, **kw8)
        assert torch.equal(out8, out) and torch.equal(lse8, lse), path


@pytest.mark.parametrize("b,hq,hkv,sq,skv,causal,window", [
    (2, 32, 8, 1, 4000, True, (-1, -1)),   # a GQA decode step over a long cache: key ranges
    (2, 32, 8, 1, 3000, True, (127, 0)),   # a gpt-oss local layer's decode step
    (2, 16, 4, 4, 2000, True, (-1, -1)),   # speculative step: 16 rows per K/V head
    (1, 2, 2, 16, 10, True, (3, 0))])      # Sq > Skv: rows that see no key
def test_sinks_on_the_decode_path(b, hq, hkv, sq, skv, causal, window):
    """sinks on the decode kernel (attention_int8 over a quantized KV; what auto runs for at
    most 16 query rows per K/V head, GQA heads packed as rows of one tile) against the CPU
    backend and float64 with a sink column; auto the bits of path="decode"."""
    q, k, v = make_qkv(b, hq, hkv, sq, skv, 128, seed=skv + sq + 1)
    z = _sinks(hq, skv, no_sink=hq - 1)
    kw = dict(is_causal=causal, window_size=window, sinks=z, return_lse=True)
    x = intfa.quantize(q, k, v)
    out, lse = intfa.attention_int8(x, path="decode", **kw)
    auto, auto_lse = intfa.attention_int8(x, **kw)
    assert torch.equal(out, auto) and torch.equal(lse, auto_lse)
    out_c, lse_c = intfa.attention_int8(intfa.quantize(q.cpu(), k.cpu(), v.cpu()), **kw)
    _window_vs_cpu(out, lse, out_c, lse_c)
    ref, ref_lse = ref_attention(q, k, v, causal, window=window, sinks=z)
    _, ref_lse0 = ref_attention(q, k, v, causal, window=window)
    _sinks_vs_float64(out, lse, ref, ref_lse, torch.isneginf(ref_lse0), "accurate")
    # The prefill kernels (which take any row count) fold the sinks in as the decode kernel does.
    for path in _prefill_paths():
        assert rel_l2(intfa.attention_int8(x, path=path, **kw)[0], out) < 1e-2, path


def test_minus_inf_sinks_on_the_gpu():
    """sinks = -inf for every head is no sink (numerics.h, fold_sink: scale 1, the LSE
    unchanged): on every path (the sm90 split kernels that sinks run included) the outputs and
    the LSE of the calls without sinks, bit for bit."""
    none = torch.full((8,), -math.inf, device="cuda")
    q, k, v = make_qkv(2, 8, 2, 300, 700, 128, seed=210)
    for scheme in ("accurate", "paper"):
        for causal in (False, True):
            kw = dict(is_causal=causal, enable_gqa=True, scheme=scheme, return_lse=True)
            for path in _prefill_paths() + ["auto"]:
                got = intfa.attention(q, k, v, sinks=none, path=path, **kw)
                want = intfa.attention(q, k, v, path=path, **kw)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (scheme, path)
    x = intfa.quantize(*make_qkv(2, 32, 8, 1, 3000, 128, seed=211))
    for path in ["decode", "auto"] + _prefill_paths():
        got = intfa.attention_int8(x, sinks=none.repeat(4), is_causal=True, return_lse=True, path=path)
        want = intfa.attention_int8(x, is_causal=True, return_lse=True, path=path)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), path


def test_sinks_varlen_on_the_gpu():
    """sinks on packed sequences (a sequence without queries, one without keys: its rows 0 and
    the logits, Sq < Skv and Sq > Skv, causal and windowed) on every prefill path, against the
    CPU backend and float64 per sequence."""
    lens_q, lens_kv = VARLEN_Q, VARLEN_KV
    cu_q, cu_kv, q, k, v = _varlen_inputs(8, 212)
    z = _sinks(8, 215, no_sink=0)
    nokeys = slice(int(cu_q[4]), int(cu_q[5]))
    for causal, window in ((True, (-1, -1)), (True, (90, 0)), (False, (-1, -1))):
        kw = dict(is_causal=causal, window_size=window, sinks=z, enable_gqa=True, return_lse=True)
        out_c, lse_c = intfa.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_kv.cpu(),
                                              **kw)
        for path in _prefill_paths() + ["auto"]:
            out, lse = intfa.attention_varlen(q, k, v, cu_q, cu_kv, max(lens_q), max(lens_kv),
                                              path=path, **kw)
            _window_vs_cpu(out, lse, out_c, lse_c, lambda out: out.transpose(0, 1))
            assert torch.all(out[nokeys] == 0)
            torch.testing.assert_close(lse[1:, nokeys], z[1:, None].expand(7, 129), rtol=1e-5,
                                       atol=1e-5)
            assert torch.all(torch.isneginf(lse[0, nokeys]))
            for i in (1, 3, 5):
                a, e = int(cu_q[i]), int(cu_q[i + 1])
                c, f = int(cu_kv[i]), int(cu_kv[i + 1])
                ref, ref_lse = ref_attention(q[None, a:e].transpose(1, 2), k[None, c:f].transpose(1, 2),
                                             v[None, c:f].transpose(1, 2), causal, window=window,
                                             sinks=z)
                assert rel_l2(out[a:e], ref[0].transpose(0, 1)) < TOL["accurate"], (path, i)
                lse_close(lse[:, a:e], ref_lse[0])


def test_kv_cache_sinks_on_the_gpu():
    """A gpt-oss-style decode loop (Hq=32, Hkv=8, one query per step, sinks, every other step a
    128-token window) over a KVCache on the GPU: the fast path the bits of quantize_q +
    attention_int8 over qkv(), close to the same cache on the CPU backend and to float64 with a
    sink column; a PagedKVCache (decode steps and prompt chunks) the bits of a ragged KVCache of
    its capacity on the same path."""
    n0, total = 300, 304
    q, k, v = make_qkv(2, 32, 8, total, total, 128, seed=216)
    z = _sinks(32, 217, no_sink=5)
    g = intfa.KVCache(_tok(k, 0, n0), _tok(v, 0, n0), 320)
    c = intfa.KVCache(_tok(k, 0, n0).cpu(), _tok(v, 0, n0).cpu(), 320)
    for t in range(n0, total):
        g.append(_tok(k, t, t + 1), _tok(v, t, t + 1))
        c.append(_tok(k, t, t + 1).cpu(), _tok(v, t, t + 1).cpu())
        qt = _tok(q, t, t + 1)
        window = (127, 0) if t % 2 else (-1, -1)
        kw = dict(is_causal=True, window_size=window, sinks=z, return_lse=True)
        out, lse = g.attention(qt, **kw)
        q8, q_scale, lse_offset = intfa.quantize_q(qt, g.k_mean)
        want, want_lse = intfa.attention_int8(g.qkv(q8, q_scale, lse_offset, qt.dtype), **kw)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        out_c, lse_c = c.attention(qt.cpu(), **kw)
        _window_vs_cpu(out, lse, out_c, lse_c)
        ref, ref_lse = ref_attention(qt, _tok(k, 0, t + 1), _tok(v, 0, t + 1), causal=True,
                                     window=window, sinks=z)
        assert rel_l2(out, ref) < 0.05
        lse_close(lse, ref_lse)
    lengths, steps = [200, 127, 129], [1, 40, 17]
    inputs = ragged_inputs(cuda_randn(218), 3, 8, 2, 200, 58, 128, lengths)
    z8 = _sinks(8, 219, no_sink=2)
    for path in ["auto"] + _prefill_paths():
        paged_vs_ragged(*inputs, lengths, steps, exact, lambda a: a.cpu().numpy(), path=path,
                        max_seqlen_kv=512, sinks=z8, window_size=(99, 0), num_pages=12,
                        page_size=128, max_pages=4)


def test_flash_attn_func_learnable_sink_on_the_gpu():
    """flash_attn's learnable_sink (bfloat16 (nheads,), as FlashAttention 4 takes it) on CUDA
    tensors: attention(sinks=...)'s bits, dense and varlen."""
    q, k, v = make_qkv(2, 8, 2, 300, 700, 128, "BSHD", dtype=torch.bfloat16, seed=220)
    z = _sinks(8, 221).bfloat16()
    out, lse, _ = intfa.flash_attn_func(q, k, v, causal=True, window_size=(127, 0),
                                        learnable_sink=z, return_attn_probs=True)
    want, want_lse = intfa.attention(q, k, v, is_causal=True, window_size=(127, 0), sinks=z,
                                     enable_gqa=True, layout="BSHD", return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    cu_q = torch.tensor([0, 100, 100, 400], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 300, 450, 1000], dtype=torch.int32, device="cuda")
    qp, kp, vp = rand(400, 8, 128, seed=222), rand(1000, 2, 128, seed=223), rand(1000, 2, 128, seed=224)
    out = intfa.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 300, 550, causal=True,
                                       learnable_sink=z)
    want = intfa.attention_varlen(qp, kp, vp, cu_q, cu_k, 300, 550, is_causal=True, sinks=z,
                                  enable_gqa=True)
    assert torch.equal(out, want)


def test_sinks_compile_graphs_and_errors_on_the_gpu():
    """sinks under torch.compile(fullgraph=True) (eager's bits) and in a captured CUDA graph
    (float32 logits on the device: replays read them, so a change between replays shows);
    sinks given on the host are copied to q's device; a wrong shape names sinks."""
    q, k, v = make_qkv(1, 8, 2, 256, 384, 128, seed=225)
    z = _sinks(8, 226)

    def fn(q, k, v, z):
        return intfa.attention(q, k, v, is_causal=True, enable_gqa=True, sinks=z, return_lse=True)

    torch._dynamo.reset()
    got, want = torch.compile(fn, fullgraph=True)(q, k, v, z), fn(q, k, v, z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    host = intfa.attention(q, k, v, is_causal=True, enable_gqa=True, sinks=z.cpu().numpy(),
                           return_lse=True)
    assert torch.equal(host[0], want[0]) and torch.equal(host[1], want[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(q, k, v, z)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = fn(q, k, v, z)
    for shift in (0.0, 3.0):
        z += shift
        graph.replay()
        torch.cuda.synchronize()
        want = fn(q, k, v, z)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    with pytest.raises(ValueError, match=r"^sinks: expected shape \[heads_q\] = \[8\], got \[2\]$"):
        intfa.attention(q, k, v, enable_gqa=True, sinks=z[:2])


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------
def test_transformers_gpt_oss_on_the_gpu():
    # register_transformers() with the model on the GPU (head dim 64, gpt-oss's own): the prompt
    # runs the prefill kernels (layer 0 a 8-token sliding window, layer 1 full causal, both with
    # sinks), cached greedy generation the decode path; a left-padded batch runs attention_varlen.
    # Against the same model in float32 (eager attention) on the GPU: logits within INT8 error.
    model, ref, ids, _ = against_float32(tiny_gpt_oss, 1, 2, device="cuda", head_dim=64)
    check_greedy_steps(model, ref, ids[:1, :10])
    with torch.no_grad():
        # Left-padded batch: each prompt's last logits as when it runs alone.
        prompts = [ids[0, :12], ids[1, :7]]
        batch, mask = left_padded(prompts, 12)
        both = model(batch, attention_mask=mask).logits[:, -1]
        for i, p in enumerate(prompts):
            assert rel(both[i], model(p[None]).logits[0, -1]) < 1e-2, i
    # Padding-free packing (position_ids restarting per prompt): each prompt as alone.
    check_packed_prompts(model, [ids[0, :12], ids[1, :7], ids[0, 20:29]])


# ------------------------------------------------------------------------------------------------
# Logit soft-capping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,causal,layout,scheme", [
    (128, True, "BHSD", "accurate"), (64, False, "BSHD", "accurate"), (256, True, "BHSD", "paper")])
def test_softcap_on_the_gpu(d, causal, layout, scheme):
    """softcap (Gemma 2's 50 on scores scaled up to reach it) on sm80 and auto against the CPU
    backend and float64; flash_attn_func and torch.compile give the same bits; a decode step
    (auto: the decode kernel at D <= 128, else sm80) against the CPU; on Hopper path sm90 (D <=
    128) is the kernel auto runs, bit for bit."""
    q, k, v = make_qkv(2, 8, 2, 300, 300, d, layout, seed=d + causal)
    q = q * 40  # scores of tens
    kw = dict(is_causal=causal, enable_gqa=True, layout=layout, scheme=scheme, return_lse=True,
              softcap=50.0)
    out_c, lse_c = intfa.attention(q.cpu(), k.cpu(), v.cpu(), **kw)
    ref = intfa.attention_reference(q.cpu(), k.cpu(), v.cpu(), is_causal=causal, layout=layout,
                                    softcap=50.0)
    plain = intfa.attention(q, k, v, is_causal=causal, enable_gqa=True, layout=layout,
                            scheme=scheme)
    rows = (lambda out: out) if layout == "BHSD" else (lambda out: out.transpose(1, 2))
    for path in ("sm80", "auto"):
        out, lse = intfa.attention(q, k, v, path=path, **kw)
        _window_vs_cpu(out, lse, out_c, lse_c, rows)
        err = rel_l2(out.cpu(), ref)
        assert err < TOL[scheme]
        assert rel_l2(plain.cpu(), ref) > max(0.1, 4 * err)
    del kw["return_lse"]
    compiled = torch.compile(lambda a, b, c: intfa.attention(a, b, c, **kw), fullgraph=True)
    assert torch.equal(compiled(q, k, v), intfa.attention(q, k, v, **kw))
    if layout == "BSHD":
        assert torch.equal(intfa.flash_attn_func(q, k, v, causal=causal, softcap=50.0,
                                                 scheme=scheme),
                           intfa.attention(q, k, v, **kw))
    step = [x[:, :, -1:] if layout == "BHSD" else x[:, -1:] for x in (q,)][0]
    x = intfa.quantize(step, k, v, layout=layout, scheme=scheme)
    one = intfa.attention_int8(x, is_causal=causal, softcap=50.0)
    x_c = intfa.quantize(step.cpu(), k.cpu(), v.cpu(), layout=layout, scheme=scheme)
    assert rel_l2(one.cpu(), intfa.attention_int8(x_c, is_causal=causal, softcap=50.0)) < 1e-2
    if d <= 128:  # the decode kernel's Softcap instantiations (auto takes the step there)
        dec = intfa.attention_int8(x, is_causal=causal, softcap=50.0, path="decode")
        assert torch.equal(dec, one)
    if intfa.resolve_gpu_path() == "sm90" and d <= 128:
        assert torch.equal(intfa.attention(q, k, v, path="sm90", **kw), intfa.attention(q, k, v, **kw))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_softcap_over_kv_caches_on_the_gpu(d):
    """softcap on a KVCache and on PagedKVCaches of 128- and 16-token pages (the decode, sm80 and
    sm90 kernels' Softcap instantiations, contiguous and paged) for a decode step and a 24-row
    chunk: the three caches' outputs and LSE bit for bit alike on the GPU (the same kernel
    numerics over the same keys and ranges; the step on path auto, the chunk on each prefill
    path, sm90 on Hopper at head dims 64 / 128), each against the CPU KVCache's within the
    GPU-vs-CPU tolerance, and the contiguous cache's chunk on path auto too."""
    b, hq, hkv, n0 = 2, 8, 2, 300
    k, v = rand(b, hkv, n0, d, seed=120 + d), rand(b, hkv, n0, d, seed=121 + d)
    caches = [intfa.KVCache(k, v, 512),
              intfa.PagedKVCache(k, v, 2 * 4, page_size=128, max_pages=4),
              intfa.PagedKVCache(k, v, 2 * 32, page_size=16, max_pages=32)]
    cpu = intfa.KVCache(k.cpu(), v.cpu(), 512)
    for sq in (1, 24):
        q = rand(b, hq, sq, d, seed=122 + d + sq) * 20
        kw = dict(is_causal=True, return_lse=True, softcap=30.0)
        want = cpu.attention(q.cpu(), **kw)
        paths = ["auto"] if sq == 1 else ["sm80"]
        if sq > 1 and d <= 128 and intfa.resolve_gpu_path() == "sm90":
            paths.append("sm90")
        for path in paths:
            got = [c.attention(q, path=path, **kw) for c in caches]
            for out, lse in got[1:]:
                exact(out, got[0][0])
                exact(lse, got[0][1])
            _window_vs_cpu(got[0][0], got[0][1], *want)
        _window_vs_cpu(*caches[0].attention(q, **kw), *want)
        plain = caches[0].attention(q, is_causal=True)
        assert rel_l2(plain.cpu(), want[0]) > 0.05


@pytest.mark.parametrize("head_dim", [64, 256])
def test_transformers_gemma2_on_the_gpu(head_dim):
    """A Gemma 2 model (soft-capped logits, a sliding window) on the GPU through
    register_transformers(): prefill on the sm90 (Hopper, head dim 64) or sm80 kernel's Softcap
    instantiations, cached greedy
    generation on the decode kernel's (head dim 64; 256 on Hopper, else sm80), against
    the same model in float32 (eager) on the GPU."""
    model, ref, ids, _ = against_float32(tiny_gemma2, 5, 6, device="cuda", head_dim=head_dim)
    check_greedy_steps(model, ref, ids[:1, :10])
