"""Float64 attention in NumPy: the independent oracle the Python tests compare against."""

import numpy as np


def to_f64(x):
    """Any array (NumPy incl. ml_dtypes bfloat16, torch, CuPy) as a float64 NumPy array."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        x = x.detach().to("cpu").double().numpy()
    elif mod == "cupy":
        x = x.get()
    return np.asarray(x).astype(np.float64)


def attention_ref(q, k, v, causal=False, scale=None, layout="BHSD", window=(-1, -1), sinks=None):
    """(out, lse) in float64. GQA by head repetition; the causal mask aligns to the bottom-right
    corner (query i sees keys j <= i + Skv - Sq), and so does the sliding window (left, right):
    keys i + Skv - Sq - left <= j <= i + Skv - Sq + right, -1 an open side; fully masked rows
    give 0 and -inf. sinks ([Hq] logits, or None): gpt-oss's attention sinks as its reference
    computes them, one more score column per row of head h holding sinks[h], softmax over the
    row, that column dropped; so it enters the denominator and the LSE only (a row that sees no
    key gives 0 and LSE sinks[h]; -inf is no sink)."""
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    if layout == "BSHD":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    hq, hk = q.shape[1], k.shape[1]
    k = np.repeat(k, hq // hk, axis=1)
    v = np.repeat(v, hq // hk, axis=1)
    sq, skv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    left, right = window
    right = 0 if causal else right
    diag = np.arange(sq)[:, None] + skv - sq
    j = np.arange(skv)[None, :]
    if right >= 0:
        s = np.where(j <= diag + right, s, -np.inf)
    if left >= 0:
        s = np.where(j >= diag - left, s, -np.inf)
    if sinks is not None:
        z = np.broadcast_to(to_f64(sinks)[None, :, None, None], s.shape[:3] + (1,))
        s = np.concatenate([s, z], axis=-1)
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        p = p[..., :-1]  # the sink's column: in l, not in the output
    out = np.einsum("bhij,bhjd->bhid", p, v) / np.where(l > 0, l, 1.0)
    with np.errstate(divide="ignore"):
        lse = (np.log(l) + m_safe)[..., 0]
    if layout == "BSHD":
        out = out.transpose(0, 2, 1, 3)
    return out, lse


def varlen_ref(q, k, v, cu_q, cu_kv, causal=False, scale=None, window=(-1, -1), sinks=None):
    """Packed [T, H, D] inputs: per-sequence attention_ref; returns (out [Tq,Hq,D], lse [Hq,Tq])."""
    q, k, v = to_f64(q), to_f64(k), to_f64(v)
    cu_q, cu_kv = np.asarray(to_f64(cu_q), np.int64), np.asarray(to_f64(cu_kv), np.int64)
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for i in range(len(cu_q) - 1):
        a, b = cu_q[i], cu_q[i + 1]
        c, e = cu_kv[i], cu_kv[i + 1]
        if b == a:
            continue
        if e == c:  # no keys: the whole sequence is masked (LSE: the sink's logit, if any)
            if sinks is not None:
                lse[:, a:b] = to_f64(sinks)[:, None]
            continue
        o, l = attention_ref(q[None, a:b].transpose(0, 2, 1, 3), k[None, c:e].transpose(0, 2, 1, 3),
                             v[None, c:e].transpose(0, 2, 1, 3), causal, scale, window=window,
                             sinks=sinks)
        out[a:b] = o[0].transpose(1, 0, 2)
        lse[:, a:b] = l[0]
    return out, lse


def rel_l2(x, ref):
    x, ref = to_f64(x), to_f64(ref)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))
