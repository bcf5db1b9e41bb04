#!/usr/bin/env python3
"""results/raw/* → results/summary.md (and .json): each runtime's medians, then cmrm ÷ the others.

Rows: transformers.js in Chromium (1 and 2 threads), cmrm's page Session (1 thread, and 2 threads
with the threads build on the cross-origin isolated server; one Compare =
the unaltered and the steered answer decoded as one batch), PyTorch (1 and 2 threads) and cmrm's
CLI natively (1 and 2 threads; one answer). Ratios are speed ratios (> 1: cmrm is faster), from
the same run of this script's caller, so machine load affects both sides alike.
"""
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "results", "raw")


def last_json(path):
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def native_cmrm(path):
    """Medians over `cmrm generate --json` lines (the first one warms the page cache)."""
    runs = [json.loads(ln) for ln in open(path).read().splitlines() if ln.startswith("{")][1:]
    if not runs:
        return None
    med = lambda f: statistics.median(f(r) for r in runs)
    return {
        "image_encode_ms": med(lambda r: (r["stages"]["vision"]["seconds"] + r["stages"]["projector"]["seconds"]) * 1e3),
        "encode_plus_prefill_ms": med(
            lambda r: (r["stages"]["vision"]["seconds"] + r["stages"]["projector"]["seconds"] + r["stages"]["prefill"]["seconds"]) * 1e3
        ),
        "decode_tok_s": med(lambda r: r["decode_tokens_per_s"]),
        "new_tokens": med(lambda r: len(r["generated_ids"])),
    }


def main():
    get = lambda name: last_json(os.path.join(RAW, name + ".json")) if os.path.exists(os.path.join(RAW, name + ".json")) else None
    tjs1, tjs2, page, page2 = get("tjs-fp32-1t"), get("tjs-fp32-2t"), get("cmrm-f32-1t"), get("cmrm-f32-2t")
    torch1, torch2 = get("pytorch-f32-1t"), get("pytorch-f32-2t")
    nat = {t: native_cmrm(os.path.join(RAW, f"cmrm-native-f32-{t}t.jsonl")) for t in (1, 2)
           if os.path.exists(os.path.join(RAW, f"cmrm-native-f32-{t}t.jsonl"))}
    rows = ["| runtime | threads | image encode ms | image + prefill to the first token ms | decode tok/s (one answer) | both answers of a Compare ms |",
            "|---|---|---|---|---|---|"]
    summary = {}

    def row(name, threads, d, enc, pre, dec, pair):
        rows.append(f"| {name} | {threads} | {enc:.0f} | {pre:.0f} | {dec:.1f} | {pair:.0f} |")
        summary[f"{name} {threads}t"] = dict(image_encode_ms=enc, to_first_token_ms=pre, decode_tok_s=dec, compare_ms=pair)

    for d, t in ((tjs1, 1), (tjs2, 2)):
        if d and d.get("ok"):
            m = d["median"]
            # A Compare is two generate() calls.
            row("transformers.js wasm fp32", t, d, m["image_encode_ms"], m["encode_plus_prefill_ms"], m["decode_tok_s"], 2 * m["total_generate_ms"])
    for d, t in ((page, 1), (page2, 2)):
        if d and d.get("ok"):
            m = d["median"]
            # One Compare: setImage once, both prefills, both answers decoded as one batch; a
            # pane's decode rate is half the pair's tokens per second.
            row("cmrm page Session wasm f32", t, d, m["set_image_ms"], m["image_plus_prefills_ms"], m["pair_decode_tok_s"] / 2, m["total_pair_ms"])
    for d, t in ((torch1, 1), (torch2, 2)):
        if d:
            m = d["median"]
            row("PyTorch (transformers generate) f32", t, d, m["image_encode_ms"], m["encode_plus_prefill_ms"], m["decode_tok_s"], 2 * m["total_generate_ms"])
    for t, m in nat.items():
        if m:
            rows.append(f"| cmrm CLI native f32 | {t} | {m['image_encode_ms']:.0f} | {m['encode_plus_prefill_ms']:.0f} | {m['decode_tok_s']:.1f} | |")
            summary[f"cmrm native {t}t"] = m

    ratios = []
    for pg, tj, t in ((page, tjs1, 1), (page2, tjs2, 2)):
        if not (pg and pg.get("ok") and tj and tj.get("ok")):
            continue
        p, j = pg["median"], tj["median"]
        what = f"page vs transformers.js, {t} thread{'s' if t > 1 else ''}"
        ratios += [
            (f"{what}: image encode (speed)", j["image_encode_ms"] / p["set_image_ms"]),
            (f"{what}: image + prefill to the first token (one tjs answer vs both panes)", j["encode_plus_prefill_ms"] / p["image_plus_prefills_ms"]),
            (f"{what}: decode per answer (speed)", (p["pair_decode_tok_s"] / 2) / j["decode_tok_s"]),
            (f"{what}: a whole Compare, time ÷ two tjs generations (goal ≤ 0.6)", p["total_pair_ms"] / (2 * j["total_generate_ms"])),
        ]
    for t, d in ((1, torch1), (2, torch2)):
        if d and nat.get(t):
            ratios.append((f"cmrm native vs PyTorch, {t} thread(s): decode (speed)", nat[t]["decode_tok_s"] / d["median"]["decode_tok_s"]))
            ratios.append((f"cmrm native vs PyTorch, {t} thread(s): image + prefill (speed)", d["median"]["encode_plus_prefill_ms"] / nat[t]["encode_plus_prefill_ms"]))
    md = "\n".join(rows) + "\n\n" + "\n".join(f"- {k}: **{v:.2f}**" for k, v in ratios) + "\n"
    if page:
        md += f"\ncmrm's page: unaltered answer equal to transformers' greedy tokens: {page.get('reference_tokens_match')}\n"
    summary["ratios"] = dict(ratios)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(HERE, "results", "summary.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
