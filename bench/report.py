#!/usr/bin/env python3
"""Markdown table from a merged bench JSON (scripts/gpu-check / bench/compare.py output):
one row per (hdim, seq, causal), intfa kernel-only and end-to-end per scheme, the torch SDPA
baselines from the same run, and the ratios."""
import json
import sys


def main(path):
    d = json.load(open(path))
    rows = d["rows"]
    keys = sorted({(r["hdim"], r["seq"], r["causal"]) for r in rows}, key=lambda k: (-k[0], k[2], k[1]))
    schemes = sorted({r["scheme"] for r in rows if r["provider"] == "intfa"})

    def get(provider, key, scheme=None, e2e=None):
        for r in rows:
            if r["provider"] == provider and (r["hdim"], r["seq"], r["causal"]) == key and \
               (scheme is None or r["scheme"] == scheme) and (e2e is None or r["e2e"] == e2e):
                return r["tops"]
        return None

    head = ["D", "N", "causal"]
    for s in schemes:
        head += [f"intfa {s} kernel", f"intfa {s} e2e"]
    head += ["SDPA flash", "SDPA cuDNN", "kernel / flash", "kernel / cuDNN", "e2e / kernel"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [str(key[0]), str(key[1]), str(key[2])]
        for s in schemes:
            cells += [f"{get('intfa', key, s, False) or 0:.0f}", f"{get('intfa', key, s, True) or 0:.0f}"]
        fl, cu = get("sdpa_flash", key), get("sdpa_cudnn", key)
        k, e = get("intfa", key, "accurate", False), get("intfa", key, "accurate", True)
        cells += [f"{fl:.0f}" if fl else "-", f"{cu:.0f}" if cu else "-",
                  f"{k / fl:.2f}" if k and fl else "-", f"{k / cu:.2f}" if k and cu else "-",
                  f"{e / k:.2f}" if k and e else "-"]
        out.append("| " + " | ".join(cells) + " |")
    print(f"Card: {d['card']}; device-to-device copy {d.get('copy_gbs', 0):.0f} GB/s (read + write). "
          "TOPS = 4·B·H·N²·D / time (halved for causal), B=4, H=32, bf16 inputs, median of 20.\n")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
