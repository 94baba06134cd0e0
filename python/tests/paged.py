"""Paged KV caches (QuantizedQKV.block_table) in NumPy: a paged copy of a contiguous cache, and
a sequence's tokens read back through its block table, to compare the two bit for bit (as
tests/kv_cache_test.cpp's PagedCopy does in C++)."""

import numpy as np

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
