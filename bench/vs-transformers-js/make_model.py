#!/usr/bin/env python3
"""Build the random-weight `mid-llava` checkpoint (HF format) described by mid-llava.spec.json.

Usage (from bench/vs-transformers-js/):
    python make_model.py (the oracle's pinned packages: tests/fixtures/oracle/requirements.txt)      # -> models/mid-llava/, assets/bench.png

Same recipe as oracle/make_models.py (Qwen2-style byte-level BPE, LlavaConfig with SigLIP + Qwen2,
deterministic re-init with one torch.Generator over parameters in sorted-name order, hub key layout
`vision_tower.vision_model.*`, rope_theta duplicated into text_config), scaled up. The tokenizer corpus
is oracle's CORPUS plus a seeded synthetic corpus, so that BPE reaches a few thousand tokens.
Deterministic: same spec + same package versions -> byte-identical model.safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# The oracle's tokenizer corpus, Qwen2 split regex and chat template (tests/fixtures/oracle).
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "fixtures", "oracle"))
from make_models import CORPUS as BASE_CORPUS, QWEN2_PATTERN, QWEN_CHAT_TEMPLATE, reinit, sha256, to_hub_key_layout  # noqa: E402,F401


def synthetic_corpus(seed: int, n_sentences: int, n_pseudo_words: int) -> list[str]:
    """Seeded sentences mixing the base corpus' words with pronounceable pseudo-words."""
    rng = random.Random(seed)
    base_words = sorted({w.strip(".,?:!").lower() for p in BASE_CORPUS for w in p.split() if w.strip(".,?:!")})
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr", "ch", "sp"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "ie", "oo"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "x"]
    pseudo = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                             for _ in range(rng.randint(1, 3))) for _ in range(n_pseudo_words)})
    vocab = base_words + pseudo
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(vocab) for _ in range(rng.randint(5, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ","])
        out.append(s)
    return out


def train_tokenizer(tspec: dict) -> Tokenizer:
    specials = tspec["special_tokens"]
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tspec["vocab_size_total"] - len(specials),
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sc = tspec["synthetic_corpus"]
    corpus = BASE_CORPUS + synthetic_corpus(sc["seed"], sc["n_sentences"], sc["n_pseudo_words"])
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def build_config(spec: dict, vocab_size: int, ids: dict) -> LlavaConfig:
    v = dict(spec["vision"])
    v.pop("kind")
    vision_config = SiglipVisionConfig(num_channels=3, vision_use_head=False, **v)
    t = dict(spec["text"])
    t.pop("kind")
    rope_theta = t.pop("rope_theta")
    text_config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_act="silu",
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=None,
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        use_cache=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=t["num_hidden_layers"],
        **t,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids["image"],
        image_seq_length=spec["image_seq_length"],
        projector_hidden_act=spec["projector_hidden_act"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        vision_feature_layer=spec["vision_feature_layer"],
        multimodal_projector_bias=True,
        tie_word_embeddings=spec["text"]["tie_word_embeddings"],
    )


def make_bench_image(path: str) -> None:
    """A deterministic 320x240 RGB PNG (gradient + shapes); the processor resizes it to 224x224."""
    w, h = 320, 240
    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = (int(255 * x / (w - 1)), int(255 * y / (h - 1)), 128)
    d = ImageDraw.Draw(img)
    d.rectangle([40, 40, 140, 140], fill=(220, 20, 30))
    d.ellipse([170, 60, 290, 180], fill=(20, 160, 60))
    d.line([0, 230, 319, 150], fill=(10, 10, 200), width=6)
    img.save(path, optimize=False)


def main() -> int:
    spec = json.load(open(os.path.join(HERE, "mid-llava.spec.json")))
    out = os.path.join(HERE, "models", spec["name"])
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.makedirs(os.path.join(HERE, "assets"), exist_ok=True)
    make_bench_image(os.path.join(HERE, spec["bench"]["image"]))

    tok = train_tokenizer(spec["tokenizer"])
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    assert vocab_size == spec["tokenizer"]["vocab_size_total"], vocab_size
    ids = dict(eos=tok.token_to_id("<|im_end|>"), pad=tok.token_to_id("<|endoftext|>"), image=tok.token_to_id("<image>"))
    htok = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    htok.chat_template = QWEN_CHAT_TEMPLATE
    htok.padding_side = "left"

    config = build_config(spec, vocab_size, ids)
    torch.manual_seed(spec["seed"])
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    reinit(model, spec["seed"], lm_head_gain=None, **spec["init"])
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                                               do_sample=False)
    model.save_pretrained(out)
    to_hub_key_layout(os.path.join(out, "model.safetensors"))
    cfg_path = os.path.join(out, "config.json")
    cj = json.load(open(cfg_path))
    cj["text_config"]["rope_theta"] = cj["text_config"]["rope_parameters"]["rope_theta"]
    cj["text_config"]["head_dim"] = spec["text"]["head_dim"]
    with open(cfg_path, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")

    v = spec["vision"]
    image_processor = SiglipImageProcessorPil(
        do_resize=True, size={"height": v["image_size"], "width": v["image_size"]},
        resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=htok, patch_size=v["patch_size"],
                               vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                               num_additional_image_tokens=0, chat_template=QWEN_CHAT_TEMPLATE, image_token="<image>")
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # classic standalone preprocessor_config.json
    # As in the llava-hf hub repos (written by transformers 4.x): transformers.js' AutoProcessor picks the
    # processor class from preprocessor_config.json.
    pp_path = os.path.join(out, "preprocessor_config.json")
    pp = json.load(open(pp_path))
    pp["processor_class"] = "LlavaProcessor"
    with open(pp_path, "w") as f:
        json.dump(pp, f, indent=2, sort_keys=True)
        f.write("\n")
    tc_path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc.update(chat_template=QWEN_CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast",
              model_max_length=spec["text"]["max_position_embeddings"], add_bos_token=False, add_eos_token=False,
              clean_up_tokenization_spaces=False, padding_side="left")
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")

    # Sanity: reload with no missing/unexpected keys and identical weights.
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    sd_a, sd_b = model.state_dict(), reloaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    n_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    print(json.dumps(dict(
        out=out, vocab_size=vocab_size, ids=ids, n_params=n_params, n_vision=n_vision, n_projector=n_proj,
        n_text=n_params - n_vision - n_proj, model_sha256=sha256(os.path.join(out, "model.safetensors")),
        files={f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))},
    )))
    return 0


if __name__ == "__main__":
    sys.exit(main())
