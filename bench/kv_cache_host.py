"""Host cost per decode step of intfa.KVCache (append one token, attend with one query per head)
at a tiny shape where the compute is negligible: what the Python layer and the binding cost per
call. CPU backend: NumPy arrays and torch CPU tensors; with --cuda also torch CUDA tensors (the
loop only enqueues: with this little GPU work its time is the host's).

Reports microseconds per step of KVCache.append, KVCache.attention and both, the best of
--repeats loops of --steps steps (host timings on a shared machine are noisy). A fresh cache
every 64 steps, made outside the timed part, keeps the attention's compute negligible. The CPU
backend would spawn a thread per CPU for each call; the script sets INTFA_NUM_THREADS=1 (one
thread serves these shapes).

  python3 bench/kv_cache_host.py [--steps 2000] [--repeats 5] [--cuda] [--json FILE]
"""
import argparse
import json
import os
import time

CHUNK = 64


def loop_us(make_cache, ks, vs, qs, steps, which, sync):
    """Microseconds per step of `steps` steps of 'append', 'attention' or 'step' (both)."""
    total = 0.0
    for start in range(0, steps, CHUNK):
        cache = make_cache()
        idx = range(start, min(start + CHUNK, steps))
        if which == "attention":
            cache.append(ks[start], vs[start])
        sync()
        t0 = time.perf_counter()
        if which == "append":
            for i in idx:
                cache.append(ks[i], vs[i])
        elif which == "attention":
            for i in idx:
                cache.attention(qs[i], is_causal=True)
        else:
            for i in idx:
                cache.append(ks[i], vs[i])
                cache.attention(qs[i], is_causal=True)
        sync()
        total += time.perf_counter() - t0
    return total / steps * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cuda", action="store_true", help="also torch CUDA tensors (head_dim 64)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.environ.setdefault("INTFA_NUM_THREADS", "1")
    import numpy as np
    import intfa

    B, H, L0 = 1, 1, 16
    rng = np.random.default_rng(0)

    def inputs(d):
        mk = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
        return (mk(B, H, L0, d), mk(B, H, L0, d), list(mk(a.steps, B, H, 1, d)),
                list(mk(a.steps, B, H, 1, d)), list(mk(a.steps, B, H, 1, d)))

    nosync = lambda: None  # noqa: E731
    cases = [("numpy", 16, inputs(16), nosync)]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        def tensors(arrays, device):
            one = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
            return tuple([one(y) for y in x] if isinstance(x, list) else one(x) for x in arrays)

        cases.append(("torch-cpu", 16, tensors(inputs(16), "cpu"), nosync))
        if a.cuda:
            cases.append(("torch-cuda", 64, tensors(inputs(64), "cuda"), torch.cuda.synchronize))

    rows = []
    print(f"KVCache host cost, B={B} Hq=Hkv={H}, prompt {L0}, {a.steps} steps, best of "
          f"{a.repeats}: us per step")
    print(f"{'arrays':<10} {'D':>3} {'append':>8} {'attention':>10} {'step':>8}")
    for name, d, (k, v, kl, vl, ql), sync in cases:
        make = lambda: intfa.KVCache(k, v, L0 + CHUNK)  # noqa: E731
        loop_us(make, kl, vl, ql, min(a.steps, 256), "step", sync)  # warm-up
        r = {w: min(loop_us(make, kl, vl, ql, a.steps, w, sync) for _ in range(a.repeats))
             for w in ("append", "attention", "step")}
        print(f"{name:<10} {d:>3} {r['append']:8.1f} {r['attention']:10.1f} {r['step']:8.1f}")
        rows.append(dict(arrays=name, head_dim=d, **r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
