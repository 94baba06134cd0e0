"""Ragged KV caches in any framework (NumPy, torch CPU or CUDA): a batch of prompts of different
lengths in one intfa.KVCache against one batch-1 KVCache per sequence, fed the same tokens."""

import intfa


def tok(x, a, b, layout="BHSD"):
    """Tokens a:b of a [B, H, S, D] (or BSHD) array."""
    return x[:, a:b] if layout == "BSHD" else x[:, :, a:b]


def entry(x, b):
    """Batch entry b, kept as a batch of one."""
    return x[b:b + 1]


def ragged_inputs(randn, b, hq, hkv, l0, new, d, lengths):
    """(q, k, v, k_new, v_new), BHSD: prompts k, v [b, hkv, l0, d] whose tokens past lengths[i]
    are large garbage (they would show in any statistic they entered), `new` tokens to append
    (one V value of sequence 1 beyond its prompt's range, so a V scale grows) and their queries
    [b, hq, new, d]. randn(shape, scale) gives float16 arrays of the framework under test."""
    k, v = randn((b, hkv, l0, d), 1.0) + 1, randn((b, hkv, l0, d), 1.0)
    for i, n in enumerate(lengths):
        k[i, :, n:] = randn((hkv, l0 - n, d), 50.0)
        v[i, :, n:] = randn((hkv, l0 - n, d), 50.0)
    k_new, v_new = randn((b, hkv, new, d), 1.0) + 1, randn((b, hkv, new, d), 1.0)
    v_new[1, 0, min(2, new - 1), :4] *= 6
    return randn((b, hq, new, d), 1.0), k, v, k_new, v_new


def in_layout(layout, *xs):
    """BHSD arrays in `layout` (views)."""
    return xs if layout == "BHSD" else tuple(x.swapaxes(1, 2) for x in xs)


def step_generic(cache, kt, vt, qt, **kw):
    """What a ragged KVCache's append() and attention() stand for, through the public functions:
    append_kv at the per-sequence positions, lengths += n, then quantize_q and attention_int8
    over qkv() (seqused_kv = lengths)."""
    n = kt.shape[1 if cache.layout == "BSHD" else 2]
    intfa.append_kv(cache, kt, vt, cache.lengths)
    cache.lengths += n
    cache.length += n
    q8, q_scale, lse_offset = intfa.quantize_q(qt, cache.k_mean, scale=kw.get("scale"),
                                               layout=cache.layout, scheme=cache.scheme)
    return intfa.attention_int8(cache.qkv(q8, q_scale, lse_offset, qt.dtype), **kw)


def ragged_vs_separate(q, k, v, k_new, v_new, lengths, steps, layout, scheme, same, exact,
                       generic=False, capacity=48, window_size=(-1, -1), sinks=None):
    """A ragged KVCache over prompts k, v (lengths[i] tokens of sequence i) and one KVCache per
    sequence over its own prompt tokens, fed the same appends (steps: token counts, taken in
    order from k_new / v_new) and attended with those tokens' queries (causal on even steps,
    GQA, with LSE; a softmax scale on odd ones). same(got, want) compares each sequence's output
    and LSE, exact(got, want) the cache parts each sequence holds. generic: drive the ragged
    cache through the public functions (step_generic) instead of its methods. window_size and
    sinks: every attention's (the window's right edge -1 or 0, as even steps are causal).
    Returns (ragged cache, separate caches)."""
    ragged = intfa.KVCache(k, v, capacity, lengths=lengths, layout=layout, scheme=scheme)
    seps = [intfa.KVCache(tok(entry(k, i), 0, n, layout), tok(entry(v, i), 0, n, layout),
                          capacity, layout=layout, scheme=scheme)
            for i, n in enumerate(lengths)]
    end = 0
    for s, n in enumerate(steps):
        kt, vt, qt = (tok(x, end, end + n, layout) for x in (k_new, v_new, q))
        end += n
        kw = dict(is_causal=s % 2 == 0, return_lse=True, scale=None if s % 2 == 0 else 0.2,
                  window_size=window_size, sinks=sinks)
        if generic:
            out, lse = step_generic(ragged, kt, vt, qt, **kw)
        else:
            ragged.append(kt, vt)
            out, lse = ragged.attention(qt, **kw)
        heads, rows = (qt.shape[1], qt.shape[2]) if layout == "BHSD" else (qt.shape[2], qt.shape[1])
        assert out.shape == qt.shape and tuple(lse.shape) == (len(lengths), heads, rows)
        for i, c in enumerate(seps):
            c.append(entry(kt, i), entry(vt, i))
            o, l = c.attention(entry(qt, i), **kw)
            same(entry(out, i), o)
            same(entry(lse, i), l)
        assert ragged.lengths.tolist() == [c.length for c in seps]
        assert ragged.length == max(c.length for c in seps)
    check_parts(ragged, seps, exact)
    return ragged, seps


def check_parts(ragged, seps, exact):
    """The tokens each sequence holds and its statistics: those of its own cache."""
    layout = ragged.layout
    for i, c in enumerate(seps):
        n = c.length
        exact(tok(entry(ragged.k8, i), 0, n, layout), tok(c.k8, 0, n, layout))
        exact(entry(ragged.k_scale, i)[..., :n], c.k_scale[..., :n])
        exact(entry(ragged.vt8, i)[..., :n], c.vt8[..., :n])
        exact(entry(ragged.v_scale, i), c.v_scale)
        if c.k_mean is not None:
            exact(entry(ragged.k_mean, i), c.k_mean)


class Sequence:
    """Sequence i of a ragged cache seen as a cache of its own (a `seps` entry of check_parts)."""

    def __init__(self, cache, i):
        self.length = int(cache.lengths[i])
        for name in ("k8", "k_scale", "k_mean", "vt8", "v_scale"):
            part = getattr(cache, name)
            setattr(self, name, None if part is None else entry(part, i))


def seq_view(x, b, n, layout):
    """Sequence b of a dense QuantizedQKV with its first n keys: a batch-1 problem."""
    parts = {f: entry(getattr(x, f), b) for f in ("q8", "q_scale", "lse_offset", "k_mean", "vt8",
                                                  "v_scale", "v") if getattr(x, f) is not None}
    parts["k8"] = tok(entry(x.k8, b), 0, n, layout)
    parts["k_scale"] = entry(x.k_scale, b)[..., :n]
    if x.v is not None:
        parts["v"] = tok(parts["v"], 0, n, layout)
    return x._replace(**parts)
