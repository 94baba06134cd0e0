"""A decode loop over an INT8 KV cache (intfa.KVCache) against the same loop over a bf16 cache
with torch SDPA: per step, append one token's K/V and attend with one query per head (GQA).

Reports per step: GPU time of each kernel (torch.profiler, summed over the steps / steps) and
the host-inclusive wall time of an eager loop (what a Python decode loop without CUDA graphs
pays). The SDPA steps write the token into preallocated bf16 tensors and call
F.scaled_dot_product_attention(enable_gqa=True) on views of the filled part, with the flash and
the cuDNN backend (cuDNN builds a plan per new key length: its wall time is that, not the GPU).
For B > 1 also a ragged batch ("intfa ragged": sequence b's prompt is L0 * (b + 1) / B tokens,
per-sequence counts on the device), against the dense rows that attend all L0 tokens, and the
same ragged loop as one captured CUDA graph replayed per step ("intfa ragged graph": views of
the whole capacity, token inputs copied in; the profiler's GPU time then includes the copies).

  python3 bench/kv_cache_step.py [--shapes 16x8192,1x32768] [--steps 64] [--providers P,..] [--json FILE]
"""
import argparse
import json
import time


def run_loop(step, steps, torch):
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(3 + i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def kernel_ms(step, steps, torch):
    """GPU time per step by kernel name (torch.profiler), and the total."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0 and e.key not in ("cudaDeviceSynchronize",):
            per[e.key] = per.get(e.key, 0.0) + t / 1e3 / steps
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x8192,1x32768", help="batch x prompt tokens, comma separated")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--providers", default="", help="comma separated subset of the rows' providers (default: all)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import intfa

    card = torch.cuda.get_device_name()
    rows = []
    print(f"{card}: decode steps, Hq={a.heads} Hkv={a.heads_kv} D={a.hdim}, {a.steps} steps per loop")
    print(f"{'B':>3} {'tokens':>7} {'provider':<14} {'kernel ms/step':>15} {'wall ms/step':>13}  kernels")
    for shape in a.shapes.split(","):
        B, L0 = (int(x) for x in shape.split("x"))
        cap = L0 + 2 * a.steps + 8
        g = torch.Generator(device="cuda").manual_seed(1)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
        kp, vp = mk(B, a.heads_kv, L0, a.hdim), mk(B, a.heads_kv, L0, a.hdim)
        n_new = 2 * a.steps + 8
        qs, ks, vs = mk(n_new, B, a.heads, 1, a.hdim), mk(n_new, B, a.heads_kv, 1, a.hdim), mk(n_new, B, a.heads_kv, 1, a.hdim)

        # intfa: the prompt quantized once, then append + attention per step.
        cache = intfa.KVCache(kp, vp, cap)

        def intfa_step(i):
            cache.append(ks[i], vs[i])
            return cache.attention(qs[i], is_causal=True)

        # A ragged batch (B > 1): sequence b holds L0 * (b + 1) / B prompt tokens, counts on the
        # device (KVCache(lengths=)), one call per step over views of the longest.
        lens = [max(1, L0 * (b + 1) // B) for b in range(B)]
        ragged = intfa.KVCache(kp, vp, cap, lengths=lens) if B > 1 else None

        def ragged_step(i):
            ragged.append(ks[i], vs[i])
            return ragged.attention(qs[i], is_causal=True)

        # The same ragged batch with one CUDA graph for every step: captured once over views of
        # the whole capacity (max_seqlen_kv), replayed with each step's token copied in.
        graph_step = None
        if B > 1:
            gcache = intfa.KVCache(kp, vp, cap + 1, lengths=lens)
            warm = intfa.KVCache(kp, vp, cap + 1, lengths=lens)
            kt, vt, qt = ks[0].clone(), vs[0].clone(), qs[0].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                warm.append(kt, vt)
                warm.attention(qt, is_causal=True, max_seqlen_kv=cap + 1)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # capture runs nothing: lengths stay
                gcache.append(kt, vt)
                gcache.attention(qt, is_causal=True, max_seqlen_kv=cap + 1)

            def graph_step(i):
                kt.copy_(ks[i])
                vt.copy_(vs[i])
                qt.copy_(qs[i])
                graph.replay()

        # SDPA over a bf16 cache of the same capacity.
        kc = torch.empty(B, a.heads_kv, cap, a.hdim, device="cuda", dtype=torch.bfloat16)
        vc = torch.empty_like(kc)
        kc[:, :, :L0] = kp
        vc[:, :, :L0] = vp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_step_with(backend):
            state = {"L": L0}

            def step(i):
                L = state["L"]
                kc[:, :, L:L + 1] = ks[i]
                vc[:, :, L:L + 1] = vs[i]
                state["L"] = L + 1
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qs[i], kc[:, :, :L + 1], vc[:, :, :L + 1], enable_gqa=True)
            return step

        runs = [("intfa KVCache", intfa_step)] + ([("intfa ragged", ragged_step)] if ragged else []) + (
            [("intfa ragged graph", graph_step)] if graph_step else []) + [
            ("sdpa_flash", sdpa_step_with(SDPBackend.FLASH_ATTENTION)),
            ("sdpa_cudnn", sdpa_step_with(SDPBackend.CUDNN_ATTENTION))]
        keep = set(a.providers.split(",")) if a.providers else None
        for name, step in (r for r in runs if keep is None or r[0] in keep):
            per = kernel_ms(step, a.steps, torch)
            wall = run_loop(step, a.steps, torch)
            total = sum(per.values())
            top = ", ".join(f"{k[:40]} {v:.4f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4])
            print(f"{B:>3} {L0:>7} {name:<14} {total:>15.4f} {wall:>13.4f}  {top}")
            row = {"provider": name, "batch": B, "prompt": L0, "heads": a.heads, "heads_kv": a.heads_kv,
                   "hdim": a.hdim, "kernel_ms": total, "wall_ms": wall, "kernels": per}
            if name.startswith("intfa ragged"):
                row["prompt_lengths"] = lens
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": card, "bench": "kv_cache_step", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
