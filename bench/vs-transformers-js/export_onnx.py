#!/usr/bin/env python3
"""Export models/mid-llava to ONNX in the layout transformers.js expects for LLaVA.

Usage (from bench/vs-transformers-js/; .venv-export = $PYTHON's packages + onnx, onnxruntime, onnxscript, see run.sh):
    .venv-export/bin/python export_onnx.py [--q8]

Writes models/mid-llava/onnx/:
  vision_encoder.onnx        pixel_values [B,3,224,224] f32            -> image_features [B,196,576]
  embed_tokens.onnx          input_ids [B,S] i64                        -> inputs_embeds [B,S,576]
  decoder_model_merged.onnx  inputs_embeds [B,S,576], attention_mask [B,P+S] i64, position_ids [B,S] i64,
                             num_logits_to_keep [] i64, past_key_values.{i}.{key,value} [B,3,P,64]
                             -> logits [B,K,V], present.{i}.{key,value} [B,3,P+S,64]
  (--q8: the same three with suffix _quantized: ORT dynamic quantization, uint8 weights, MatMul/Gather)

Optimum (optimum-onnx 0.1.0, the current release) has no LLaVA export config and requires
transformers<4.58, so the graphs are exported here with torch.onnx (TorchScript exporter, opset 17)
from small wrappers. The decoder is a single graph with past length P >= 0 (P = 0 on the first call),
which is how transformers.js feeds `decoder_model_merged` (empty past tensors, no use_cache_branch).
It uses HF's own modules (RMSNorm, MLP, q/k/v/o projections, SigLIP encoder, projector); only the
attention glue (RoPE, KV concat, GQA, causal mask) is written out. Every graph is checked against
transformers with onnxruntime (CPU): max |diff| and identical greedy tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17


class VisionEncoder(nn.Module):
    """SigLIP tower -> hidden_states[vision_feature_layer] (no post_layernorm), strategy 'full' -> projector."""

    def __init__(self, llava: LlavaForConditionalGeneration):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.proj = llava.model.multi_modal_projector
        self.layer = llava.config.vision_feature_layer
        assert llava.config.vision_feature_select_strategy == "full"

    def forward(self, pixel_values):
        hs = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
        return self.proj(hs)


class EmbedTokens(nn.Module):
    def __init__(self, llava):
        super().__init__()
        self.embed = llava.model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder(nn.Module):
    """Qwen2 decoder + tied lm_head with an explicit KV cache (HF Qwen2 math, eager attention)."""

    def __init__(self, llava):
        super().__init__()
        tc = llava.config.text_config
        lm = llava.model.language_model
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = llava.lm_head
        self.nh, self.nkv = tc.num_attention_heads, tc.num_key_value_heads
        self.hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        theta = tc.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.int64).float() / self.hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = self.hd**-0.5

    def forward(self, inputs_embeds, attention_mask, position_ids, num_logits_to_keep, *past):
        B, T = inputs_embeds.shape[0], inputs_embeds.shape[1]
        past_len = past[0].shape[2]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B,1,T,hd]
        total = past_len + T
        kpos = torch.arange(total, device=inputs_embeds.device)
        qpos = torch.arange(T, device=inputs_embeds.device) + past_len
        allowed = (kpos[None, :] <= qpos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32))
        g = self.nh // self.nkv
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
            k = a.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            v = a.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            kk = k[:, :, None].expand(B, self.nkv, g, total, self.hd).reshape(B, self.nh, total, self.hd)
            vv = v[:, :, None].expand(B, self.nkv, g, total, self.hd).reshape(B, self.nh, total, self.hd)
            s = torch.matmul(q, kk.transpose(2, 3)) * self.scale + mask
            p = torch.softmax(s, dim=-1)
            o = torch.matmul(p, vv).transpose(1, 2).reshape(B, T, self.nh * self.hd)
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h)
        # num_logits_to_keep: 0 -> all positions, k > 0 -> the last k (transformers.js sets 1 when generating)
        keep = torch.where(num_logits_to_keep > 0, num_logits_to_keep, T)
        idx = torch.arange(T - keep, T, device=h.device)
        logits = self.lm_head(torch.index_select(h, 1, idx))
        return (logits, *presents)


def save_single_file(path: str) -> None:
    """Re-save without external data (each graph is < 2 GB): transformers.js then needs no .onnx_data."""
    m = onnx.load(path, load_external_data=True)
    for f in os.listdir(os.path.dirname(path)):
        if f.startswith(os.path.basename(path)) and f != os.path.basename(path):
            os.remove(os.path.join(os.path.dirname(path), f))
    onnx.save_model(m, path, save_as_external_data=False)
    onnx.checker.check_model(path)


def export_all(llava, onnx_dir: str) -> None:
    tc = llava.config.text_config
    L, nkv = tc.num_hidden_layers, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    S = llava.config.vision_config.image_size
    kw = dict(opset_version=OPSET, dynamo=False, do_constant_folding=True)

    t0 = time.time()
    torch.onnx.export(VisionEncoder(llava).eval(), (torch.randn(1, 3, S, S),),
                      os.path.join(onnx_dir, "vision_encoder.onnx"), input_names=["pixel_values"],
                      output_names=["image_features"],
                      dynamic_axes={"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}}, **kw)
    torch.onnx.export(EmbedTokens(llava).eval(), (torch.tensor([[1, 2, 3]], dtype=torch.int64),),
                      os.path.join(onnx_dir, "embed_tokens.onnx"), input_names=["input_ids"],
                      output_names=["inputs_embeds"],
                      dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                    "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}, **kw)
    P, T = 5, 3
    past = []
    past_names, present_names = [], []
    dyn = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "num_logits"}}
    for i in range(L):
        for kv in ("key", "value"):
            past.append(torch.randn(1, nkv, P, hd))
            past_names.append(f"past_key_values.{i}.{kv}")
            present_names.append(f"present.{i}.{kv}")
            dyn[past_names[-1]] = {0: "batch_size", 2: "past_sequence_length"}
            dyn[present_names[-1]] = {0: "batch_size", 2: "total_sequence_length"}
    args = (torch.randn(1, T, tc.hidden_size), torch.ones(1, P + T, dtype=torch.int64),
            torch.arange(P, P + T, dtype=torch.int64)[None], torch.tensor(1, dtype=torch.int64), *past)
    torch.onnx.export(Decoder(llava).eval(), args, os.path.join(onnx_dir, "decoder_model_merged.onnx"),
                      input_names=["inputs_embeds", "attention_mask", "position_ids", "num_logits_to_keep", *past_names],
                      output_names=["logits", *present_names], dynamic_axes=dyn, **kw)
    for n in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        save_single_file(os.path.join(onnx_dir, f"{n}.onnx"))
    print(f"export: {time.time() - t0:.1f} s", flush=True)


def quantize_q8(onnx_dir: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for n, ops in (("vision_encoder", ["MatMul"]), ("embed_tokens", ["Gather"]),
                   ("decoder_model_merged", ["MatMul"])):
        quantize_dynamic(os.path.join(onnx_dir, f"{n}.onnx"), os.path.join(onnx_dir, f"{n}_quantized.onnx"),
                         op_types_to_quantize=ops, weight_type=QuantType.QUInt8, per_channel=False,
                         reduce_range=False, extra_options={"EnableSubgraph": True})
        print(f"q8: {n}_quantized.onnx {os.path.getsize(os.path.join(onnx_dir, f'{n}_quantized.onnx')) / 1e6:.1f} MB")


def check(llava, model_dir: str, spec: dict, suffix: str = "") -> dict:
    """Compare the ONNX graphs (onnxruntime CPU) with transformers; greedy 32 tokens must match (fp32)."""
    onnx_dir = os.path.join(model_dir, "onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {n: ort.InferenceSession(os.path.join(onnx_dir, f"{n}{suffix}.onnx"), so, providers=["CPUExecutionProvider"])
            for n in ("vision_encoder", "embed_tokens", "decoder_model_merged")}
    proc = AutoProcessor.from_pretrained(model_dir)
    prompt = spec["prompt_format"].format(q=spec["bench"]["question"])
    enc = proc(images=Image.open(os.path.join(HERE, spec["bench"]["image"])), text=prompt, return_tensors="pt")
    n_new = spec["bench"]["max_new_tokens"]
    tc = llava.config.text_config
    with torch.inference_mode():
        ref_feat = llava.model.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=-1,
                                                  vision_feature_select_strategy="full")
        ref_feat = ref_feat.pooler_output if hasattr(ref_feat, "pooler_output") else ref_feat
        ref_feat = torch.cat(list(ref_feat), 0) if isinstance(ref_feat, (list, tuple)) else ref_feat
        ref_out = llava(**enc)
        ref_gen = llava.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    ref_tokens = ref_gen[0, enc["input_ids"].shape[1]:].tolist()

    feat = sess["vision_encoder"].run(None, {"pixel_values": enc["pixel_values"].numpy()})[0]
    ids = enc["input_ids"].numpy()
    emb = sess["embed_tokens"].run(None, {"input_ids": ids})[0]
    emb[ids == llava.config.image_token_id] = feat.reshape(-1, feat.shape[-1])
    L, nkv = tc.num_hidden_layers, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, nkv, 0, hd), np.float32) for i in range(L) for kv in ("key", "value")}
    T = ids.shape[1]
    feeds = dict(inputs_embeds=emb, attention_mask=np.ones((1, T), np.int64),
                 position_ids=np.arange(T, dtype=np.int64)[None], num_logits_to_keep=np.array(0, np.int64), **past)
    outs = sess["decoder_model_merged"].run(None, feeds)
    names = [o.name for o in sess["decoder_model_merged"].get_outputs()]
    logits_all = outs[0]
    res = dict(
        suffix=suffix or "fp32",
        max_abs_diff_image_features=float(np.abs(feat - ref_feat.numpy().reshape(feat.shape)).max()),
        max_abs_diff_prefill_logits=float(np.abs(logits_all - ref_out.logits.numpy()).max()),
    )
    # greedy decode with the cache (min_new_tokens semantics: EOS suppressed, as in the benchmarks)
    eos = llava.generation_config.eos_token_id
    tokens, cur = [], outs
    pos = T
    for step in range(n_new):
        lg = cur[0][0, -1].copy()
        lg[eos] = -np.inf
        tok = int(lg.argmax())
        tokens.append(tok)
        if step == n_new - 1:
            break
        pres = dict(zip(names[1:], cur[1:]))
        feeds = dict(inputs_embeds=sess["embed_tokens"].run(None, {"input_ids": np.array([[tok]], np.int64)})[0],
                     attention_mask=np.ones((1, pos + 1), np.int64), position_ids=np.array([[pos]], np.int64),
                     num_logits_to_keep=np.array(1, np.int64),
                     **{n.replace("present.", "past_key_values."): v for n, v in pres.items()})
        cur = sess["decoder_model_merged"].run(None, feeds)
        pos += 1
    res["greedy_tokens_match"] = tokens == ref_tokens
    if not suffix:
        # For the in-browser check (www/bench.js ?pixels=hf): HF pixel_values + HF greedy tokens.
        enc["pixel_values"].numpy().astype("<f4").tofile(os.path.join(HERE, "assets", "bench.pixel_values.f32"))
        with open(os.path.join(HERE, "assets", "reference.json"), "w") as f:
            json.dump(dict(note="transformers f32 greedy (min_new_tokens = max_new_tokens) on the HF processor's "
                                "pixel_values (assets/bench.pixel_values.f32, [1,3,224,224] little-endian f32)",
                           input_ids=enc["input_ids"][0].tolist(), tokens=ref_tokens), f)
            f.write("\n")
    res["n_matching_prefix"] = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
    res["tokens"] = tokens
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "models", "mid-llava"))
    ap.add_argument("--q8", action="store_true", help="also write *_quantized.onnx (transformers.js dtype 'q8')")
    ap.add_argument("--check-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = json.load(open(os.path.join(HERE, "mid-llava.spec.json")))
    llava = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    onnx_dir = os.path.join(a.model, "onnx")
    os.makedirs(onnx_dir, exist_ok=True)
    if not a.check_only:
        with torch.no_grad():
            export_all(llava, onnx_dir)
        if a.q8:
            quantize_q8(onnx_dir)
    results = [check(llava, a.model, spec)]
    if a.q8 or os.path.exists(os.path.join(onnx_dir, "decoder_model_merged_quantized.onnx")):
        results.append(check(llava, a.model, spec, "_quantized"))
    for r in results:
        print(json.dumps(r))
    files = {f: os.path.getsize(os.path.join(onnx_dir, f)) for f in sorted(os.listdir(onnx_dir))}
    print(json.dumps({"onnx_files": files}))
    ok = results[0]["greedy_tokens_match"] and results[0]["max_abs_diff_prefill_logits"] < 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
