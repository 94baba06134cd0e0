#!/usr/bin/env python3
"""Accuracy of an INT8 decode cache with static V scales (append_kv(fixed_v_scale=True), what
shared pages need) against the default cache whose V scales grow, on any backend intfa runs
(NumPy arrays: the CPU backend), against float64 attention.

A prompt of L0 tokens is quantized by KVCache (quantize()), then `steps` tokens are appended one
by one; the appended tokens' V is drawn with `drift` x the prompt's standard deviation (traffic
past the prompt's range: growth keeps it, static scales saturate it). Static scales are the
prompt's times a headroom factor (the prompt re-written with them). Keys have four outlier
channels (x10), as LLM keys do. One query block of Sq rows attends causally to all tokens.
Prints rel. L2 against float64 and the count of saturated V bytes per (drift, headroom).

    python3 bench/kv_fixed_scale.py [--seed 5]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
import intfa  # noqa: E402
from reference import attention_ref, rel_l2  # noqa: E402

B, HQ, HKV, D, L0, STEPS, SQ = 2, 8, 2, 128, 512, 256, 4


def run(drift, headroom, seed):
    """rel. L2 and saturated bytes; headroom None: the default cache (scales grow)."""
    rng = np.random.default_rng(seed)
    cap = L0 + STEPS
    k = rng.standard_normal((B, HKV, cap, D)).astype(np.float32)
    k[..., :4] *= 10
    v = rng.standard_normal((B, HKV, cap, D)).astype(np.float32)
    v[:, :, L0:] *= drift
    q = rng.standard_normal((B, HQ, SQ, D)).astype(np.float32)
    k, v, q = k.astype(np.float16), v.astype(np.float16), q.astype(np.float16)
    cache = intfa.KVCache(k[:, :, :L0], v[:, :, :L0], cap)
    fixed = headroom is not None
    if fixed:
        cache.v_scale[...] *= headroom
        intfa.append_kv(cache, k[:, :, :L0], v[:, :, :L0], 0, fixed_v_scale=True)
    for t in range(L0, cap):
        intfa.append_kv(cache, k[:, :, t:t + 1], v[:, :, t:t + 1], t, fixed_v_scale=fixed)
    q8, q_scale, lse_offset = intfa.quantize_q(q, cache.k_mean)
    x = intfa.QuantizedQKV(scheme="accurate", layout="BHSD", q8=q8, q_scale=q_scale,
                           lse_offset=lse_offset, k8=cache.k8, k_scale=cache.k_scale,
                           k_mean=cache.k_mean, vt8=cache.vt8, v_scale=cache.v_scale,
                           dtype=np.float16)
    out = intfa.attention_int8(x, is_causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    saturated = int((np.abs(cache.vt8[..., L0:cap].astype(np.int32)) == 127).sum())
    return rel_l2(out, ref), saturated


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    heads = (1.0, 1.25, 2.0, 4.0)
    print(f"B={B} Hq={HQ} Hkv={HKV} D={D}, prompt {L0} + {STEPS} appended tokens, {SQ} query rows; "
          f"rel. L2 vs float64 (saturated V bytes of the {B * HKV * D * STEPS} appended)")
    print(f"{'V drift':>8} {'growing':>9} " + " ".join(f"{'static x' + str(h):>19}" for h in heads))
    for drift in (1.0, 1.5, 3.0):
        grow, _ = run(drift, None, args.seed)
        cells = [f"{e:.2e} ({s:>5})" for e, s in (run(drift, h, args.seed) for h in heads)]
        print(f"{drift:>8} {grow:9.2e} " + " ".join(f"{c:>19}" for c in cells))


if __name__ == "__main__":
    main()
