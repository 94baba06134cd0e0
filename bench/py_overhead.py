"""Host cost per call of the Python entry points on a CUDA device, layer by layer, against torch
SDPA: what a model pays per attention call when the GPU work is short (decode, short prompts).

Each figure is host microseconds per call: N back-to-back calls timed with perf_counter, then one
synchronize (the GPU work of a tiny shape is shorter than the host's, so the host time is what
limits). Layers, outermost first: intfa.attention / attention_int8 (the public functions), the
torch custom op, the op's implementation without the dispatcher, the framework adapter's call,
and the binding alone with its arguments prepared once. --profile prints cProfile's top entries
for intfa.attention.

  python3 bench/py_overhead.py [--calls 2000] [--profile]
"""
import argparse
import cProfile
import pstats
import time


def per_call_us(fn, calls, torch):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    import intfa
    from intfa import _arrays, _torch

    q, k, v = (torch.randn(1, 8, 128, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    qkv = intfa.quantize(q, k, v)
    fw = _torch._FW
    out = torch.empty_like(q)
    ws = torch.empty(intfa.quantized_bytes(1, 8, 8, 128, 128, 128), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    # The binding's arguments: ..., causal, window_left, window_right, sinks, scale, ...
    args = (q.detach(), k.detach(), v.detach(), out, None, False, -1, -1, None, 0.0, "BHSD",
            "accurate", "auto", "auto", 64, stream, ws)
    lib_attention = _arrays.lib.attention
    rows = [
        ("torch SDPA (bf16)", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("intfa.attention", lambda: intfa.attention(q, k, v)),
        ("  custom op", lambda: _torch.attention_op(q, k, v, False, 0.0, "BHSD", "accurate", "auto", False)),
        ("  op implementation", lambda: _torch._attention_impl(q, k, v, False, 0.0, "BHSD", "accurate", "auto",
                                                               False)),
        ("  _arrays.run_attention", lambda: _arrays.run_attention(fw, q, k, v, False, (-1, -1), None, 0.0,
                                                                  "BHSD", "accurate", "auto", False)),
        ("  binding, arguments ready", lambda: lib_attention(*args)),
        ("intfa.attention_int8", lambda: intfa.attention_int8(qkv)),
        ("intfa.quantize", lambda: intfa.quantize(q, k, v)),
    ]
    print(f"host us per call, {torch.cuda.get_device_name(0)}, B=1 H=8 N=128 D=128 bf16, {a.calls} calls")
    for name, fn in rows:
        print(f"{name:30s} {per_call_us(fn, a.calls, torch):8.1f}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            intfa.attention(q, k, v)
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
