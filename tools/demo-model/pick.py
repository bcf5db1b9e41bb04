#!/usr/bin/env python3
"""build.sh's bookkeeping for the demo model.

    pick.py OUT SEED...                         print "seed layers alpha positions" of the seed
                                                whose chosen setting has the widest margin over
                                                the goals on validation
    pick.py --catalog EXTRACT_JSON CATALOG      put `cmrm extract`'s catalog entry into the catalog
                                                as bundled:demo-shapes
    pick.py --report OUT EVAL_JSON REPORT SEED... write the report: the shipped model's `cmrm eval`
                                                figures on the test split, and every seed's
                                                figures (train.py's own evaluation; mean, worst)
"""
from __future__ import annotations

import json
import sys

MODEL_KEY = "bundled:demo-shapes"
FIGURES = [
    ("harmful_text_refusal", "harmful, text only: refusal", None),
    ("harmful_image_refusal", "harmful + image: refusal", "unaltered"),
    ("harmful_image_refusal", "harmful + image + CMRM: refusal", "steered"),
    ("safe_image_over_refusal", "safe + image: over-refusal", "unaltered"),
    ("safe_image_over_refusal", "safe + image + CMRM: over-refusal", "steered"),
    ("benign_accuracy", "benign + image: accuracy", "unaltered"),
    ("benign_accuracy", "benign + image + CMRM: accuracy", "steered"),
]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def figures(split: dict) -> dict:
    out = {}
    for key, label, where in FIGURES:
        if where is None:
            out[label] = split[key]
        elif where == "unaltered":
            out[label] = split["unaltered"][key]
        else:
            out[label] = split["steered"][0][key]
    return out


def pick(out: str, seeds: list[str]) -> None:
    best = max(seeds, key=lambda s: load(f"{out}/seed-{s}/selection.json")["chosen"]["margin_on_val"])
    chosen = load(f"{out}/seed-{best}/selection.json")["chosen"]
    layers = ",".join(str(l) for l in chosen["layers"])
    print(best, layers, chosen["alpha"], chosen["positions"])


def catalog(extract_json: str, catalog_path: str) -> None:
    entry = load(extract_json)["catalog_entry"]
    entry["model"], entry["revision"] = MODEL_KEY, "main"
    entry["calibration"]["name"] = "demo-shapes-calibration"
    cat = load(catalog_path)
    cat["entries"] = [e for e in cat["entries"] if e["model"] != MODEL_KEY] + [entry]
    with open(catalog_path, "w") as f:
        json.dump(cat, f, indent=2, sort_keys=True)
        f.write("\n")


def group(metrics: dict, kind: str, with_image: bool) -> dict:
    return next(g for g in metrics["groups"] if g["kind"] == kind and g["with_image"] == with_image)


def report(out: str, eval_json: str, report_path: str, seeds: list[str]) -> None:
    ev = load(eval_json)
    shipped_seed, layers, alpha, positions = None, None, None, None
    with open(f"{out}/picked.txt") as f:
        shipped_seed, layers, alpha, positions = f.read().split()
    chosen = next(m for m in ev["steered"] if abs(m["alpha"] - float(alpha)) < 1e-6)
    u = ev["unaltered"]
    cmrm_eval = {
        "harmful, text only: refusal": group(u, "harmful", False)["refusal_rate"],
        "harmful + image: refusal": group(u, "harmful", True)["refusal_rate"],
        "harmful + image + CMRM: refusal": group(chosen, "harmful", True)["refusal_rate"],
        "safe + image: over-refusal": group(u, "safe", True)["refusal_rate"],
        "safe + image + CMRM: over-refusal": group(chosen, "safe", True)["refusal_rate"],
        "benign + image: accuracy": group(u, "benign", True)["accuracy"],
        "benign + image + CMRM: accuracy": group(chosen, "benign", True)["accuracy"],
        "borderline, text only: refusal": group(u, "borderline", False)["refusal_rate"],
        "borderline + image: refusal": group(u, "borderline", True)["refusal_rate"],
    }
    per_seed = {}
    for s in seeds:
        sel = load(f"{out}/seed-{s}/selection.json")
        per_seed[s] = {
            "chosen": sel["chosen"],
            "seconds": sel["seconds"],
            "val": figures({**sel["val"], "steered": [m for m in sel["val"]["steered"] if m["layers"] == sel["chosen"]["layers"] and m["alpha"] == sel["chosen"]["alpha"]]}),
            "test": figures(sel["test"]),
        }
    summary = {}
    for label in per_seed[seeds[0]]["test"]:
        values = [per_seed[s]["test"][label] for s in seeds]
        worse_is_higher = "over-refusal" in label or label == "harmful + image: refusal"
        summary[label] = {"mean": sum(values) / len(values), "worst": max(values) if worse_is_higher else min(values)}
    result = {
        "shipped": {"seed": int(shipped_seed), "layers": layers, "alpha": float(alpha), "positions": positions,
                    "n_params": load(f"{out}/seed-{shipped_seed}/selection.json")["n_params"],
                    "test_by_cmrm_eval": cmrm_eval, "cases": ev["n_cases"]},
        "seeds": per_seed,
        "seeds_test_summary": summary,
    }
    with open(report_path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")


def main() -> int:
    args = sys.argv[1:]
    if args[0] == "--catalog":
        catalog(args[1], args[2])
    elif args[0] == "--report":
        report(args[1], args[2], args[3], args[4:])
    else:
        pick(args[0], args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
