#!/usr/bin/env python3
"""Native PyTorch/transformers baseline on the same checkpoint, prompt, image and token count as the page.

Usage: $PYTHON bench_torch.py --threads 2 [--runs 3] [--tokens 32]
Prints one JSON line. Same method as www/bench.js: HF processor -> model.generate(greedy,
min_new_tokens = max_new_tokens = 32) with a streamer that timestamps every new token; warm-up runs,
then --runs timed runs; medians. (--warmup, default 5 like the page.)
  image_encode_ms        the vision tower + projector call inside generate (get_image_features)
  encode_plus_prefill_ms generate() start -> first new token (embed + image encode + merge + prefill + select)
  decode_tok_s           (N-1) / (time of token N - time of token 1)
Also a model-only loop without generate(): raw_prefill_with_image_ms, raw_decode_tok_s.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (same count as the page)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' default, sdpa)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = json.load(open(os.path.join(HERE, "mid-llava.spec.json")))
    n_new = a.tokens or spec["bench"]["max_new_tokens"]
    model_dir = os.path.join(HERE, "models", spec["name"])

    t0 = time.perf_counter()
    proc = AutoProcessor.from_pretrained(model_dir)
    kw = {"attn_implementation": a.attn} if a.attn else {}
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    load_ms = (time.perf_counter() - t0) * 1e3

    enc_ms = [0.0]
    inner = model.model
    orig = inner.get_image_features

    @functools.wraps(orig)  # generate() inspects this signature to route pixel_values
    def timed_get_image_features(*args, **kwargs):
        s = time.perf_counter()
        r = orig(*args, **kwargs)
        enc_ms[0] += (time.perf_counter() - s) * 1e3
        return r

    inner.get_image_features = timed_get_image_features

    class Stamps:
        def __init__(self):
            self.n_put, self.t = 0, []

        def put(self, value):
            self.n_put += 1
            if self.n_put > 1:  # the first put is the prompt
                self.t.append(time.perf_counter())

        def end(self):
            pass

    image = Image.open(os.path.join(HERE, spec["bench"]["image"]))
    prompt = spec["prompt_format"].format(q=spec["bench"]["question"])
    runs = []
    for r in range(a.warmup + a.runs):
        tp = time.perf_counter()
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        preprocess_ms = (time.perf_counter() - tp) * 1e3
        st = Stamps()
        enc_ms[0] = 0.0
        with torch.inference_mode():
            tg = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=st)
            te = time.perf_counter()
        toks = out[0, inputs["input_ids"].shape[1]:].tolist()
        n = len(st.t)
        runs.append(dict(
            run=r, warmup=r < a.warmup, prompt_tokens=int(inputs["input_ids"].shape[1]), new_tokens=len(toks),
            preprocess_ms=preprocess_ms, image_encode_ms=enc_ms[0], encode_plus_prefill_ms=(st.t[0] - tg) * 1e3,
            decode_ms=(st.t[-1] - st.t[0]) * 1e3, decode_tok_s=(n - 1) / (st.t[-1] - st.t[0]),
            total_generate_ms=(te - tg) * 1e3, tokens=toks,
        ))
    # Model-only loop (no generate() machinery): prefill forward with pixel_values (logits of the last
    # position only, as generate does), then N-1 single-token forwards with the cache; argmax in between.
    raw = []
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        for r in range(a.warmup + a.runs):
            t0 = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            lg = out.logits[:, -1]
            lg[:, eos] = float("-inf")
            tok = lg.argmax(-1, keepdim=True)
            cache = out.past_key_values
            mask = inputs["attention_mask"]
            toks = [int(tok)]
            t2 = time.perf_counter()
            for _ in range(n_new - 1):
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                lg = out.logits[:, -1]
                lg[:, eos] = float("-inf")
                tok = lg.argmax(-1, keepdim=True)
                toks.append(int(tok))
            t3 = time.perf_counter()
            raw.append(dict(run=r, warmup=r < a.warmup, prefill_with_image_ms=(t1 - t0) * 1e3,
                            decode_tok_s=(n_new - 1) / (t3 - t2), tokens_match_generate=toks == runs[-1]["tokens"]))
    raw_timed = [x for x in raw if not x["warmup"]]
    timed = [x for x in runs if not x["warmup"]]
    med = {k: statistics.median(x[k] for x in timed)
           for k in ("image_encode_ms", "encode_plus_prefill_ms", "decode_tok_s", "preprocess_ms", "total_generate_ms")}
    med["raw_prefill_with_image_ms"] = statistics.median(x["prefill_with_image_ms"] for x in raw_timed)
    med["raw_decode_tok_s"] = statistics.median(x["decode_tok_s"] for x in raw_timed)
    print(json.dumps(dict(
        ok=True, warmup_runs=a.warmup, timed_runs=a.runs, label=f"pytorch-f32-{a.threads}t", runtime=f"transformers {transformers.__version__} torch {torch.__version__}",
        threads=a.threads, torch_num_threads=torch.get_num_threads(), attn_implementation=model.config._attn_implementation,
        n_params=sum(p.numel() for p in model.parameters()), load_ms=load_ms, median=med,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, runs=runs, raw_loop_runs=raw,
    )))


if __name__ == "__main__":
    main()
