#!/usr/bin/env python3
"""Same-card baselines for `intfa bench`: torch SDPA (flash = FlashAttention-2, and cuDNN) in
bf16 at the standard shapes, timed with CUDA events (median of N after warm-up), plus the
device-to-device copy bandwidth. When the intfa Python package is importable, intfa is timed in
this same process too (provider "intfa_py": e2e = intfa.attention, kernel = attention_int8 on
inputs quantized once). Merges the C++ bench rows from --intfa JSON so one file holds the run, and
prints a table with ratios and % of the card's INT8 peak for the row's path (measured by
bench/sol_sm90.cu when --sol is given: wgmma for sm90 rows, mma.sync for sm80 rows).
--softcap X (logit soft-capping, Gemma 2's): intfa_py runs with softcap=X, and since SDPA has no
soft-capping the baseline is torch's flex_attention (compiled, bf16) with the cap as its
score_mod and bottom-right causal as its block mask (provider "flex"; the ratio column is
against it)."""
import argparse
import json
import sys


def time_ms(fn, reps, warmup=5):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, calls, reps):
    """Per-call median of CUDA-graph replays of `calls` back-to-back fn() calls (what
    `intfa bench --graph` does): no host enqueue in the time, as in a serving loop that replays
    graphs. One eager call first (lazy set-up stays out of the capture)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


# Measured INT8 mma.sync peak (m16n8k32, register-only loop) on these cards: anchors.md.
MMA_SYNC_INT8_PEAK = {"H100": 1294.0, "H200": 1294.0}


def flex_capped(q, k, v, cap, causal, gqa):
    """A call of torch's flex_attention (compiled once per shape) with scores capped at
    cap * tanh(s / cap) and, for causal, the bottom-right mask (query i sees keys j <= i + Skv -
    Sq), as intfa computes them; run once before timing."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sq, n = q.shape[2], k.shape[2]

    def capped(score, b, h, qi, ki):
        return cap * torch.tanh(score / cap)

    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, qi, ki: qi + (n - sq) >= ki, B=None, H=None, Q_LEN=sq,
                                 KV_LEN=n, device=q.device)
    flex = torch.compile(flex_attention)

    def run():
        return flex(q, k, v, score_mod=capped, block_mask=mask, enable_gqa=gqa)

    run()
    return run


def int8_peak(card):
    for name, peak in MMA_SYNC_INT8_PEAK.items():
        if name in card:
            return peak
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--hdim", default="128,64")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=0, help="K/V heads (GQA); 0: --heads")
    ap.add_argument("--seq-q", type=int, default=0,
                    help="query rows when fewer than the keys (--seq), e.g. 1 for a decode step; 0: square")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph", type=int, default=0,
                    help="time CUDA-graph replays of this many back-to-back calls (as `intfa bench --graph`); 0: each call alone")
    ap.add_argument("--intfa", action="append", default=[],
                    help="JSON written by `intfa bench --json` in this run (repeatable: one per path)")
    ap.add_argument("--json", help="merged output")
    ap.add_argument("--sol", help="JSON written by `intfa_sol --json` in this run (measured int8 peaks)")
    ap.add_argument("--softcap", type=float, default=0.0,
                    help="logit soft-capping for intfa; baseline: flex_attention with the cap")
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"compare.py: torch not importable ({e}); no baselines", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("compare.py: no CUDA device", file=sys.stderr)
        return 0
    card = torch.cuda.get_device_name(0)
    rows = []
    try:
        import intfa
        path = intfa.resolve_gpu_path("auto")
        if not isinstance(path, str):
            path = str(path)
    except Exception as e:  # no package or no GPU build: the C++ rows still come from --intfa
        print(f"compare.py: intfa Python package not used ({e})", file=sys.stderr)
        intfa, path = None, ""
    # Copy bandwidth (bytes read + written) for the quantization throughput comparison.
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), 10)
    copy_gbs = 2 * x.numel() / ms / 1e6
    del x, y
    hkv = a.heads_kv or a.heads
    timer = (lambda fn, reps: graph_time_ms(fn, a.graph, reps)) if a.graph else time_ms
    gqa = hkv != a.heads
    for d in [int(v) for v in a.hdim.split(",")]:
        for n in [int(v) for v in a.seq.split(",")]:
            sq = a.seq_q or n
            q = torch.randn(a.batch, a.heads, sq, d, dtype=torch.bfloat16, device="cuda")
            k, v = (torch.randn(a.batch, hkv, n, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            # Extra row fields naming a shape other than B x H x N x N.
            extra = dict(seq_q=sq) if sq != n else {}
            extra["batch"] = a.batch
            if a.graph:
                extra["graph_calls"] = a.graph
            if gqa:
                extra["heads_kv"] = hkv
            cap = a.softcap
            if cap:
                extra["softcap"] = cap
            qkv = None
            if intfa is not None:
                qkv = {sc: intfa.quantize(q, k, v, scheme=sc) for sc in ("accurate", "paper")}
            for causal in [int(v) for v in a.causal.split(",")]:
                # Square causal counts half the pairs (design.md); otherwise the pairs that
                # bottom-right causal masking leaves visible (as `intfa bench`).
                pairs = n * n * 0.5 if causal and sq == n else float(sq) * n
                if causal and sq != n:
                    pairs = float(sum(min(max(r + n - sq + 1, 0), n) for r in range(sq)))
                ops = 4.0 * a.batch * a.heads * pairs * d
                # The automatic path runs the decode kernel for at most 16 query rows per K/V head
                # (GQA heads packed into rows: these BHSD tensors always pack) and head dim 256 on
                # sm80; soft-capped prefill over these contiguous tensors runs the card's kernel.
                decode = d != 256 and sq * (a.heads // hkv) <= 16
                py_path = path and ("decode" if decode else "sm80" if d == 256 else path)
                for sc in (qkv or {}):
                    c = bool(causal)
                    kw8 = dict(softcap=cap) if cap else {}
                    runs = ((False, lambda: intfa.attention_int8(qkv[sc], is_causal=c, out_dtype=torch.bfloat16,
                                                                 **kw8)),
                            (True, lambda: intfa.attention(q, k, v, is_causal=c, scheme=sc, enable_gqa=gqa, **kw8)))
                    for e2e, fn in runs:
                        ms = timer(fn, a.reps)
                        rows.append(dict(provider="intfa_py", path=py_path, scheme=sc, seq=n, hdim=d, causal=causal,
                                         e2e=e2e, ms=round(ms, 4), tops=round(ops / ms / 1e9, 2), **extra))
                if cap:
                    # SDPA has no soft-capping: flex_attention with the cap as its score_mod (checked
                    # against intfa.attention_reference(softcap=) on the CPU: within 1e-6).
                    try:
                        ms = timer(flex_capped(q, k, v, cap, bool(causal), gqa), a.reps)
                    except Exception as e:  # noqa: BLE001 (inductor errors come in several types)
                        print(f"  flex d{d} n{n} causal{causal}: unavailable ({str(e).splitlines()[0][:80]})",
                              file=sys.stderr)
                        continue
                    rows.append(dict(provider="flex", path="", scheme="bf16", seq=n, hdim=d, causal=causal,
                                     e2e=True, ms=round(ms, 4), tops=round(ops / ms / 1e9, 2), **extra))
                    continue
                if causal and sq != n:
                    # torch aligns the causal mask top-left when Sq != Skv: another problem.
                    print(f"  sdpa d{d} n{n} causal with {sq} query rows: skipped (top-left mask)", file=sys.stderr)
                    continue
                for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(be):
                            kw = dict(enable_gqa=True) if gqa else {}
                            ms = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), **kw),
                                       a.reps)
                    except RuntimeError as e:
                        print(f"  {name} d{d} n{n} causal{causal}: unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
                        continue
                    rows.append(dict(provider=name, path="", scheme="bf16", seq=n, hdim=d, causal=causal,
                                     e2e=True, ms=round(ms, 4), tops=round(ops / ms / 1e9, 2), **extra))
            del q, k, v
    intfa_rows = []
    for fn in a.intfa:
        with open(fn) as f:
            intfa_rows += json.load(f)["rows"]
    allrows = intfa_rows + rows
    base = {(r["provider"], r["seq"], r["hdim"], r["causal"]): r["tops"] for r in rows}
    first = "flex" if a.softcap else "sdpa_flash"  # the first ratio column's baseline
    shape = f"B={a.batch} H={a.heads}" + (f" Hkv={hkv}" if gqa else "") + (f" Sq={a.seq_q}" if a.seq_q else "")
    shape += f"; graphs of {a.graph} calls" if a.graph else ""
    print(f"\n== {card}: TOPS ({shape}); copy bandwidth {copy_gbs:.0f} GB/s ==")
    peak = int8_peak(card)
    sol = {}
    if a.sol:
        with open(a.sol) as f:
            sol = json.load(f)
    # % of the measured peak of the row's own instruction: wgmma for sm90, mma.sync for sm80.
    def path_peak(r):
        if r.get("path") == "sm90":
            return sol.get("int8_wgmma_tops", 1979.0)
        return sol.get("int8_mma_sync_tops", peak)
    x_first = "x flex" if a.softcap else "x flash"
    print(f"{'provider':<10} {'path':<5} {'scheme':<9} {'e2e':<5} {'seq':>6} {'hdim':>4} {'causal':>6} {'TOPS':>8} {x_first:>8} {'x cudnn':>8} {'%int8pk':>8}")
    for r in allrows:
        key = (r["seq"], r["hdim"], r["causal"])
        fl, cu = base.get((first,) + key), base.get(("sdpa_cudnn",) + key)
        rf = f"{r['tops'] / fl:.2f}" if fl else "-"
        rc = f"{r['tops'] / cu:.2f}" if cu else "-"
        pk = f"{100 * r['tops'] / path_peak(r):.0f}%" if path_peak(r) and r["provider"].startswith("intfa") else "-"
        print(f"{r['provider']:<10} {r.get('path', ''):<5} {r.get('scheme', ''):<9} {str(r.get('e2e', '')):<5} {r['seq']:>6} {r['hdim']:>4} {r['causal']:>6} {r['tops']:>8.1f} {rf:>8} {rc:>8} {pk:>8}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": card, "copy_gbs": round(copy_gbs, 1), "int8_mma_sync_peak_tops": peak,
                       "speed_of_light": sol, "rows": allrows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
