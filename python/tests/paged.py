"""Paged KV caches (QuantizedQKV.block_table) in NumPy: a paged copy of a contiguous cache, and
a sequence's tokens read back through its block table, to compare the two bit for bit (as
tests/kv_cache_test.cpp's PagedCopy does in C++); and the drivers of the PagedKVCache tests
(any framework), which compare it with a ragged KVCache."""

import numpy as np

import intfa
from ragged import entry, tok

# The bytes of pages that hold no sequence's tokens (their scales are NaN): read into a result,
# they would show.
GARBAGE = 127


def page_size(x):
    """The token dim of a paged QuantizedQKV's k8 pages."""
    return x.k8.shape[2 if x.layout == "BHSD" else 1]


def page_copy(x, page, spare, seed):
    """A paged copy of a contiguous QuantizedQKV x of NumPy arrays whose k8 (in x.layout) and
    k_scale hold C tokens, a multiple of `page`: sequence b's pages at block_table[b] of a pool
    of B * C / page + `spare` pages, in a shuffled order (the spare pages garbage, named by no
    entry). k8 pages [P, Hkv, page, D] (BSHD: [P, page, Hkv, D]), k_scale [P, Hkv, page], vt8
    [P, Hkv, D, page] seen in rows padded as quantize() pads vt8's. k_mean and v_scale are
    copies (an append into the copy grows its own V scales); the query parts are x's."""
    bhsd = x.layout == "BHSD"
    b, h, c = x.k_scale.shape
    d = x.k8.shape[-1]
    maxp = c // page
    pool = b * maxp + spare
    order = np.random.default_rng(seed).permutation(pool).astype(np.int32)
    table = order[:b * maxp].reshape(b, maxp).copy()
    k8 = np.full((pool, h, page, d) if bhsd else (pool, page, h, d), GARBAGE, np.int8)
    k_scale = np.full((pool, h, page), np.nan, np.float32)
    vt8 = np.full((pool, h, d, page + 16), GARBAGE, np.int8)[..., :page]
    for i in range(b):
        for j, p in enumerate(table[i]):
            t = slice(j * page, (j + 1) * page)
            k8[p] = x.k8[i, :, t] if bhsd else x.k8[i, t]
            k_scale[p] = x.k_scale[i, :, t]
            vt8[p] = x.vt8[i, ..., t]
    k_mean = None if x.k_mean is None else x.k_mean.copy()
    return x._replace(k8=k8, k_scale=k_scale, vt8=vt8, k_mean=k_mean, v_scale=x.v_scale.copy(),
                      block_table=table)


def drop_pages(x, counts):
    """x with the table entries of pages past sequence b's first counts[b] tokens (clamped to
    [0, max_pages * page_size]) set to -1: a call that reads or writes only those tokens never
    reads these entries."""
    table = x.block_table.copy()
    page = page_size(x)
    for i, n in enumerate(counts):
        table[i, (max(0, int(n)) + page - 1) // page:] = -1
    return x._replace(block_table=table)


def unpage(x, b, n):
    """Sequence b's first n tokens of a paged QuantizedQKV read back through its table, as a
    contiguous cache's batch entry b holds them: (k8 [1, Hkv, n, D] (BSHD: [1, n, Hkv, D]),
    k_scale [1, Hkv, n], vt8 [1, Hkv, D, n])."""
    page = page_size(x)
    pages = x.block_table[b, :(n + page - 1) // page]
    k8 = np.concatenate([x.k8[p] for p in pages], axis=1 if x.layout == "BHSD" else 0)
    k8 = k8[:, :n] if x.layout == "BHSD" else k8[:n]
    k_scale = np.concatenate([x.k_scale[p] for p in pages], axis=1)[:, :n]
    vt8 = np.concatenate([x.vt8[p] for p in pages], axis=2)[..., :n]
    return k8[None], k_scale[None], vt8[None]


def check_paged_parts(paged, ragged, host):
    """Each sequence's tokens read back through the PagedKVCache's block table, and its
    statistics: bit for bit those of the ragged KVCache's batch entry. host(a): a as NumPy."""
    layout = paged.layout
    x = paged.qkv()._replace(**{f: host(getattr(paged, f))
                                for f in ("k8", "k_scale", "vt8", "block_table")})
    for b, n in enumerate(paged.lengths_host):
        if n == 0:
            continue
        want = (tok(entry(ragged.k8, b), 0, n, layout), entry(ragged.k_scale, b)[..., :n],
                entry(ragged.vt8, b)[..., :n])
        for got, w in zip(unpage(x, b, n), want):
            np.testing.assert_array_equal(got, host(w))
    for f in ("k_mean", "v_scale"):
        if getattr(ragged, f) is not None:
            np.testing.assert_array_equal(host(getattr(paged, f)), host(getattr(ragged, f)))


def paged_vs_ragged(q, k, v, k_new, v_new, lengths, steps, exact, host, max_seqlen_kv=None,
                    path="auto", window_size=(-1, -1), sinks=None, **paged_args):
    """A PagedKVCache(k, v, lengths=lengths, **paged_args) and a ragged KVCache of its capacity
    over the same prompts, fed the same appends (steps: token counts, taken in order from k_new
    / v_new) and attended after each by those tokens' queries (causal on even steps, with LSE,
    a softmax scale on odd ones): outputs and LSE bit for bit (exact(got, want)), the same
    lengths and bytes (check_paged_parts, host(a): a as NumPy). max_seqlen_kv: both calls' key
    range (None: each cache's default, the longest sequence; the GPU tests pass the capacity,
    so that both launches split the same keys). path, window_size (its right
    edge -1 or 0: even steps are causal) and sinks: both caches' attention. Returns (paged,
    ragged)."""
    paged = intfa.PagedKVCache(k, v, lengths=lengths, **paged_args)
    layout = paged.layout
    ragged = intfa.KVCache(k, v, paged.capacity, lengths=lengths, layout=layout,
                           scheme=paged.scheme)
    check_paged_parts(paged, ragged, host)
    end = 0
    for s, n in enumerate(steps):
        kt, vt, qt = (tok(x, end, end + n, layout) for x in (k_new, v_new, q))
        end += n
        kw = dict(is_causal=s % 2 == 0, return_lse=True, scale=None if s % 2 == 0 else 0.2, path=path,
                  window_size=window_size, sinks=sinks)
        for cache in (paged, ragged):
            cache.append(kt, vt)
        out, lse = paged.attention(qt, max_seqlen_kv=max_seqlen_kv, **kw)
        want, want_lse = ragged.attention(qt, max_seqlen_kv=max_seqlen_kv, **kw)
        exact(out, want)
        exact(lse, want_lse)
        assert paged.lengths_host == host(paged.lengths).tolist() == host(ragged.lengths).tolist()
    check_paged_parts(paged, ragged, host)
    return paged, ragged
