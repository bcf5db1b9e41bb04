#!/usr/bin/env bash
# Publish CMRM vectors for a real checkpoint (for a person with network access):
#   scripts/publish-vectors.sh owner/name[@revision] [--out DIR] [--url-base URL] [--quantize q4|q8_0]
#                              [--calibration FILE.jsonl] [--anchor blank|noise] [--method mean|pca]
#
# 1. `cmrm inspect`: the model's facts from its small files (fails early on a model cmrm cannot read);
# 2. downloads the checkpoint into the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 uses the cache only);
# 3. `cmrm extract` on the built-in calibration set (www/assets/calibration/builtin-v1.jsonl by default):
#    OUT/NAME.cmrm.safetensors;
# 4. with --quantize, `cmrm quantize`: OUT/NAME-q4/ (model.gguf + the other files) to host beside it;
# 5. prints the vectors-catalog entry for the file published at URL-BASE/NAME.cmrm.safetensors, to add
#    to www/vectors/catalog.json ("entries": [...]).
# The cmrm binary: $CMRM, else target/release/cmrm, else built with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
model="$1"; shift
out="published"; url_base=""; quantize=""; calibration="www/assets/calibration/builtin-v1.jsonl"
anchor="blank"; method="mean"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --url-base) url_base="$2"; shift 2 ;;
    --quantize) quantize="$2"; shift 2 ;;
    --calibration) calibration="$2"; shift 2 ;;
    --anchor) anchor="$2"; shift 2 ;;
    --method) method="$2"; shift 2 ;;
    *) echo "publish-vectors: unknown option $1" >&2; usage ;;
  esac
done
case "$quantize" in ""|q4|q8_0) ;; *) echo "publish-vectors: --quantize takes q4 or q8_0" >&2; exit 2 ;; esac

cmrm="${CMRM:-}"
if [ -z "$cmrm" ]; then
  if [ ! -x target/release/cmrm ]; then
    echo "publish-vectors: building the cmrm CLI (release)" >&2
    cargo build --release --bin cmrm >&2
  fi
  cmrm="target/release/cmrm"
fi

name="${model%%@*}"; name="${name##*/}"
[ -n "$url_base" ] || url_base="https://HOST/vectors"
mkdir -p "$out"
vectors="$out/$name.cmrm.safetensors"

echo "== 1/4 $model: what it is (small files only)" >&2
"$cmrm" inspect --model "$model" >&2

echo "== 2/4 $model: extract CMRM vectors ($method, anchor $anchor) over $calibration" >&2
# `extract` downloads the checkpoint into the Hugging Face cache first (or reads it from there).
entry=$("$cmrm" extract --model "$model" --calibration "$calibration" --anchor "$anchor" --method "$method" \
  --out "$vectors" --catalog-entry "$url_base/$name.cmrm.safetensors" --json)

if [ -n "$quantize" ]; then
  echo "== 3/4 $model: a $quantize copy to host beside the vectors" >&2
  "$cmrm" quantize --model "$model" --format "$quantize" --out "$out/$name-$quantize" >&2
else
  echo "== 3/4 (no --quantize: no smaller copy written)" >&2
fi

echo "== 4/4 the catalog entry for $vectors (publish it at $url_base/$name.cmrm.safetensors)" >&2
printf '%s\n' "$entry" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["catalog_entry"], indent=2))' 2>/dev/null \
  || printf '%s\n' "$entry"
