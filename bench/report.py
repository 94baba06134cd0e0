#!/usr/bin/env python3
"""Markdown table from a merged bench JSON (scripts/gpu-check / bench/compare.py output):
one row per (hdim, seq, causal), intfa kernel-only and end-to-end per scheme for the main path
(sm90 when the run has it, else sm80), the other path's accurate kernel for comparison, the
torch SDPA baselines from the same run, the ratios and the % of the measured int8 peak."""
import json
import sys


def main(path):
    d = json.load(open(path))
    rows = d["rows"]
    keys = sorted({(r["hdim"], r["seq"], r["causal"]) for r in rows}, key=lambda k: (-k[0], k[2], k[1]))
    paths = {r.get("path") for r in rows if r["provider"] == "intfa"}
    main_path = "sm90" if "sm90" in paths else "sm80"
    other = [p for p in sorted(paths) if p != main_path]
    schemes = sorted({r["scheme"] for r in rows if r["provider"] == "intfa" and r.get("path") == main_path})
    sol = d.get("speed_of_light") or {}
    peak = sol.get("int8_wgmma_tops" if main_path == "sm90" else "int8_mma_sync_tops")

    def get(provider, key, scheme=None, e2e=None, path=None):
        for r in rows:
            if r["provider"] == provider and (r["hdim"], r["seq"], r["causal"]) == key and \
               (scheme is None or r["scheme"] == scheme) and (e2e is None or r["e2e"] == e2e) and \
               (provider != "intfa" or r.get("path") == (path or main_path)):
                return r["tops"]
        return None

    head = ["D", "N", "causal"]
    for s in schemes:
        head += [f"{main_path} {s} kernel", f"{main_path} {s} e2e"]
    head += [f"{p} accurate kernel" for p in other]
    head += ["SDPA flash", "SDPA cuDNN", "kernel / flash", "kernel / cuDNN", "e2e / kernel"]
    if peak:
        head += ["% int8 peak"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [str(key[0]), str(key[1]), str(key[2])]
        for s in schemes:
            cells += [f"{get('intfa', key, s, False) or 0:.0f}", f"{get('intfa', key, s, True) or 0:.0f}"]
        cells += [f"{get('intfa', key, 'accurate', False, p) or 0:.0f}" for p in other]
        fl, cu = get("sdpa_flash", key), get("sdpa_cudnn", key)
        k, e = get("intfa", key, "accurate", False), get("intfa", key, "accurate", True)
        cells += [f"{fl:.0f}" if fl else "-", f"{cu:.0f}" if cu else "-",
                  f"{k / fl:.2f}" if k and fl else "-", f"{k / cu:.2f}" if k and cu else "-",
                  f"{e / k:.2f}" if k and e else "-"]
        if peak:
            cells += [f"{100 * k / peak:.0f}%" if k else "-"]
        out.append("| " + " | ".join(cells) + " |")
    print(f"Card: {d['card']}; device-to-device copy {d.get('copy_gbs', 0):.0f} GB/s (read + write). "
          "TOPS = 4·B·H·N²·D / time (halved for causal), B=4, H=32, bf16 inputs, median of 20. "
          f"Main path {main_path}" + (f", % of its measured int8 peak ({peak:.0f} TOP/s)" if peak else "") + ".\n")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
