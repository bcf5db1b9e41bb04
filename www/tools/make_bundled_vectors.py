#!/usr/bin/env python3
"""Write the bundled model's CMRM vector file (DESIGN §5) from the oracle's dataset-level shift.

The oracle's shift_vectors.safetensors holds  layer.{l} = mean h_l(text-only) - mean h_l(multimodal)
(refs README, "Dataset-level shift"); CMRM's v_l is multimodal - text, so every value is negated.
Applied with sign=subtract (h <- h - alpha*v), alpha=a then equals the oracle's steer case
`shift_*_a{a}` exactly (h + a*shift), which tests/web.rs checks in the browser.

Standard library only. Run from the repository root:
    python3 www/tools/make_bundled_vectors.py
Byte-identical output on every run (sorted header keys, no timestamps).
"""
import json
import struct
import sys
from pathlib import Path

MODEL = "tiny-llava-siglip-qwen2"
SRC = Path("tests/fixtures/oracle/refs") / MODEL / "shift_vectors.safetensors"
DST = Path("www/assets/models") / MODEL / "cmrm-vectors.safetensors"


def read_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        assert info["dtype"] == "F32" and len(info["shape"]) == 1, (name, info)
        a, b = info["data_offsets"]
        tensors[name] = list(struct.unpack(f"<{(b - a) // 4}f", body[a:b]))
    return meta, tensors


def write_safetensors(path, meta, tensors):
    header, blobs, offset = {"__metadata__": meta}, [], 0
    for name in sorted(tensors, key=lambda k: int(k.split(".")[1])):
        blob = struct.pack(f"<{len(tensors[name])}f", *tensors[name])
        header[name] = {"dtype": "F32", "shape": [len(tensors[name])], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte alignment of the data, as the reference writer does
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def fingerprint(config_path):
    """The architecture fingerprint cmrm checks vector files against (LlavaConfig::fingerprint in
    src/config.rs): "{text kind}-l{layers}-h{hidden}-v{vocab}+{vision kind}-{image size}px"."""
    cfg = json.loads(config_path.read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    text_kind = {"qwen2": "qwen2", "llama": "llama"}[text["model_type"]]
    vision_kind = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}[vision["model_type"]]
    return (f"{text_kind}-l{text['num_hidden_layers']}-h{text['hidden_size']}-v{text['vocab_size']}"
            f"+{vision_kind}-{vision['image_size']}px")


def main():
    src_meta, shift = read_safetensors(SRC)
    vectors = {name: [-x for x in values] for name, values in shift.items()}  # exact in f32
    meta = {
        "format": "cmrm-vectors/1",
        "model": fingerprint(DST.parent / "config.json"),
        "hidden_size": src_meta["hidden_size"],
        "num_layers": src_meta["num_layers"],
        "method": "mean",
        "anchor": "oracle calibration images (red_square, gradient, checker)",
        "n_calibration": src_meta["n_pairs"],
        "sign": "subtract",
        "default_alpha": "0.5",
        "default_layers": "all",
        "source": f"negated {SRC} (text - multimodal) = multimodal - text; random-weight demo model",
    }
    write_safetensors(DST, meta, vectors)
    print(f"wrote {DST} ({DST.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
