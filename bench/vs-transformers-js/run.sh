#!/usr/bin/env bash
# cmrm beside transformers.js and PyTorch on one LLaVA checkpoint, in one run: the same 56 M-parameter
# SigLIP + Qwen2 model (random weights, made here), image, prompt (222 tokens, 196 of them image
# tokens) and 32 greedy tokens. Prints each runtime's figures and the ratios; writes results/.
#
#   bench/vs-transformers-js/run.sh             # everything (first run: PyPI + npm packages, ONNX export)
#   SKIP_BUILD=1 bench/vs-transformers-js/run.sh  # reuse the model, ONNX files, node_modules and dist-cmrm
#   PYTHON=/path/to/python …                     # a Python with the oracle's pinned torch + transformers
#                                                # (default: .venv here, made from tests/fixtures/oracle/requirements.txt)
#   RUNS=3 WARMUP=5 TOKENS=32 PORT=8123 PORT_COI=8124
#
# Rows: transformers.js 4.3.2 (ONNX Runtime Web, wasm, fp32) with 1 thread (plain server) and with 2
# threads (COOP/COEP); cmrm's page Session (wasm, f32, 1 thread; and 2 threads, its threads build); PyTorch (transformers) with 1 and 2
# threads; cmrm's CLI natively. Everything is served from 127.0.0.1. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
ROOT=$(cd ../.. && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
PORT=${PORT:-8123}
PORT_COI=${PORT_COI:-8124}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-5}
TOKENS=${TOKENS:-32}
mkdir -p results/raw

# --- tools: the project's (trunk, chromium), a Python with torch + transformers, the ONNX exporters ----
CMRM_SKIP_TRUNK=0 bash "$ROOT/scripts/setup.sh"
PY=${PYTHON:-$HERE/.venv/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r "$ROOT/tests/fixtures/oracle/requirements.txt"
fi
XPY=$HERE/.venv-export/bin/python
if [ ! -x "$XPY" ]; then
  # A venv that sees $PY's packages (torch, transformers) through a .pth, plus the ONNX tooling.
  BASEPY=$("$PY" -c "import sys, os; print(os.path.join(sys.base_prefix, 'bin', 'python3'))")
  "$BASEPY" -m venv .venv-export
  SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
  echo "$SP" > "$(.venv-export/bin/python -c 'import site; print(site.getsitepackages()[0])')/base-venv.pth"
  .venv-export/bin/pip install -q onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2
fi

# --- the model, its ONNX graphs (checked against transformers), npm, cmrm's page and vectors ----------
if [ -z "${SKIP_BUILD:-}" ] || [ ! -f models/mid-llava/onnx/decoder_model_merged.onnx ]; then
  "$PY" make_model.py 2>/dev/null | tee results/raw/make_model.json
  "$XPY" export_onnx.py 2>&1 | grep -E '^\{|^export' | tee results/raw/export_check.jsonl
fi
if [ -z "${SKIP_BUILD:-}" ] || [ ! -d node_modules/@huggingface/transformers ]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
fi
if [ -z "${SKIP_BUILD:-}" ] || [ ! -f dist-cmrm/cmrm_bg.wasm ] || [ ! -f models/mid-llava/cmrm-vectors.safetensors ]; then
  (cd "$ROOT" && trunk build --release >/dev/null 2>&1 && cargo build -q --release --bin cmrm)
  rm -rf dist-cmrm && cp -r "$ROOT/dist" dist-cmrm
  "$ROOT/target/release/cmrm" extract --model models/mid-llava --backend cpu \
    --calibration "$ROOT/www/assets/calibration/builtin-v1.jsonl" --out models/mid-llava/cmrm-vectors.safetensors
fi

# --- servers on 127.0.0.1: plain (1 thread for ORT) and cross-origin isolated (threads) ---------------
python3 serve.py --port "$PORT" >/dev/null 2>&1 &
PID1=$!
python3 serve.py --port "$PORT_COI" --coi >/dev/null 2>&1 &
PID2=$!
trap 'kill $PID1 $PID2 2>/dev/null || true' EXIT
sleep 1

browser() {  # name, page, query, port
  echo "== $1" >&2
  node bench_browser.mjs --label "$1" --url "http://127.0.0.1:$4/www/$2?$3" > "results/raw/$1.json"
}
browser tjs-fp32-1t index.html "dtype=fp32&warmup=$WARMUP&runs=$RUNS&tokens=$TOKENS" "$PORT"
browser cmrm-f32-1t cmrm.html "weights=f32&backend=cpu&warmup=$WARMUP&runs=$RUNS&tokens=$TOKENS" "$PORT"
browser tjs-fp32-2t index.html "dtype=fp32&warmup=$WARMUP&runs=$RUNS&tokens=$TOKENS&threads=2" "$PORT_COI"
browser cmrm-f32-2t cmrm.html "weights=f32&backend=cpu&warmup=$WARMUP&runs=$RUNS&tokens=$TOKENS&threads=2" "$PORT_COI"

# --- natively: PyTorch (transformers generate) and cmrm's CLI, 1 and 2 threads ------------------------
QUESTION=$(python3 -c "import json; print(json.load(open('mid-llava.spec.json'))['bench']['question'])")
for t in 1 2; do
  echo "== pytorch-f32-${t}t" >&2
  "$PY" bench_torch.py --threads "$t" --warmup "$WARMUP" --runs "$RUNS" --tokens "$TOKENS" 2>/dev/null > "results/raw/pytorch-f32-${t}t.json"
  echo "== cmrm-native-f32-${t}t" >&2
  for r in $(seq 0 "$RUNS"); do   # the first run warms the page cache
    RAYON_NUM_THREADS=$t "$ROOT/target/release/cmrm" generate --model models/mid-llava --backend cpu \
      --image assets/bench.png --prompt "$QUESTION" --max-new-tokens "$TOKENS" --json 2>/dev/null
  done > "results/raw/cmrm-native-f32-${t}t.jsonl"
done

python3 summarize.py
