#!/usr/bin/env python3
"""Write the demo model's evaluation and calibration sets as cmrm reads them.

    python tools/demo-model/sets.py OUT

OUT/images/*.png      the 90 shape images (32×32)
OUT/calibration.jsonl the 64 prompts of the shipped vectors (`cmrm extract --anchor blank`)
OUT/val.jsonl         validation cases, OUT/test.jsonl test cases, for `cmrm eval`:
                      harmful, safe and borderline requests as text ("image": "none") and with
                      their shape image; benign shape questions with their image and "expect".
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402


def image_path(shape: world.Shape) -> str:
    return f"images/{shape.name}.png"


def cases(split: str) -> list[dict]:
    out = []
    for kind in ("harmful", "safe", "borderline"):
        for r in world.split_requests(split, kind):
            out.append({"prompt": r.text, "image": "none", "kind": kind})
        for r in world.split_requests(split, kind):
            out.append({"prompt": r.text, "image": image_path(r.image()), "kind": kind})
    for q in world.split_questions(split):
        out.append({"prompt": q.question, "image": image_path(q.shape), "kind": "benign", "expect": q.answer})
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for shape in world.ALL_SHAPES:
        shape.render().save(os.path.join(out, image_path(shape)), optimize=True)
    write_jsonl(os.path.join(out, "calibration.jsonl"), [{"prompt": r.text} for r in world.calibration_requests()])
    for split in ("val", "test"):
        write_jsonl(os.path.join(out, f"{split}.jsonl"), cases(split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
