#!/usr/bin/env bash
# Browser tests, both kinds, in headless Chromium (Debian chromium + chromium-driver; no downloads
# except the npm lockfile's packages):
#   1. wasm-bindgen-test suite (tests/web.rs): the oracle models loaded from bytes through the
#      browser API; greedy ids, unaltered and steered, must equal the transformers refs;
#   2. end-to-end test of the built page (tests/e2e): trunk build --release, a local static server
#      on 127.0.0.1, playwright-core driving /usr/bin/chromium. Screenshots go to artifacts/.
# Tools come from scripts/setup.sh (chromium, chromedriver, wasm-bindgen-cli, trunk).
# Env: CHROMEDRIVER, CHROMIUM, WASM_BINDGEN_TEST_TIMEOUT, ARTIFACTS, SKIP_WASM_TESTS=1, SKIP_E2E=1.
#
# scripts/test-browser.sh --bench   instead runs the benchmark (not a test, tests/web_bench.rs),
# wasm in headless Chromium vs native on this machine, and prints the ratios: decode tokens/s of
# the llava-interleave-qwen-0.5b decoder (random f32 weights), and seconds per calibration prompt
# of CMRM extraction (bundled model; 0.5B decoder); then the memory of the 0.5B model: built in
# each format, streamed from a real-size file natively, and loaded by the page in Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-600}"
export ARTIFACTS="${ARTIFACTS:-$PWD/artifacts}"

for tool in "$CHROMEDRIVER" "$CHROMIUM" wasm-bindgen-test-runner trunk node npm; do
  command -v "$tool" >/dev/null || { echo "test-browser: $tool not found; run scripts/setup.sh" >&2; exit 1; }
done

if [ "${1:-}" = "--bench" ]; then
  echo "== benchmark: wasm (headless Chromium, 1 thread) vs native, same code and model (tests/web_bench.rs)" >&2
  wasm=$(cargo test --target wasm32-unknown-unknown --release --no-default-features --test web_bench \
           -- --include-ignored --nocapture 2>&1 | grep -o 'cmrm-bench .*') || { echo "wasm benchmark failed" >&2; exit 1; }
  native=$(cargo test --release --test web_bench -- --ignored --nocapture --test-threads=1 --skip memory 2>&1 | grep -o 'cmrm-bench .*') \
    || { echo "native benchmark failed" >&2; exit 1; }
  native1=$(RAYON_NUM_THREADS=1 cargo test --release --test web_bench -- --ignored --nocapture --test-threads=1 --skip memory 2>&1 | grep -o 'cmrm-bench .*') \
    || { echo "native 1-thread benchmark failed" >&2; exit 1; }
  printf '%s\n%s\n%s\n' "$wasm" "$native" "$native1"
  # value NAME LINES: the number after the last '=' on the line of benchmark NAME.
  value() { grep "^cmrm-bench $1 " <<<"$2" | sed -E 's/.*=([0-9.]+)$/\1/'; }
  awk -v w="$(value decode "$wasm")" -v n="$(value decode "$native")" -v n1="$(value decode "$native1")" 'BEGIN {
    printf "decode tokens/s, wasm / native = %.2f (native all threads), %.2f (native 1 thread)\n", w / n, w / n1 }'
  for t in "$wasm" "$native" "$native1"; do
    awk -v line="$(grep '^cmrm-bench decode ' <<<"$t" | cut -d' ' -f3-4)" -v one="$(value decode "$t")" -v pair="$(value pair-decode "$t")" \
      'BEGIN { printf "pair decode (Compare, both answers as one batch) ÷ one answer, %s: %.2f\n", line, pair / one }'
  done
  for b in calibrate-tiny calibrate-0.5b; do
    awk -v b="$b" -v w="$(value "$b" "$wasm")" -v n="$(value "$b" "$native")" -v n1="$(value "$b" "$native1")" 'BEGIN {
      printf "%s seconds per prompt, wasm / native = %.2f (native all threads), %.2f (native 1 thread)\n", b, w / n, w / n1 }'
  done
  echo "== benchmark: memory of a streamed load of a real-size checkpoint (1.7 GB BF16, random), native and in the page" >&2
  # One measurement per process: peak RSS is per process.
  for w in q4 q8_0; do
    for t in memory_benchmark streamed_load_memory_benchmark; do
      CMRM_BENCH_WEIGHTS=$w cargo test --release --test web_bench -- --ignored --nocapture --exact "$t" 2>&1 \
        | grep -o 'cmrm-bench .*'
    done
  done
  trunk build --release >/dev/null 2>&1 || { echo "trunk build failed" >&2; exit 1; }
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error && DIST="$OLDPWD/dist" node bench.mjs)
  exit 0
fi

if [ "${SKIP_WASM_TESTS:-0}" != 1 ]; then
  echo "== 1/2 wasm-bindgen-test in headless Chromium (tests/web.rs; tests/web_gpu.rs on WebGPU/SwiftShader)" >&2
  # --no-default-features: the CLI binary (feature "cli") is native-only. webdriver.json adds
  # --enable-unsafe-webgpu so that requestAdapter() finds SwiftShader.
  cargo test --target wasm32-unknown-unknown --release --no-default-features --test web --test web_gpu
fi

if [ "${SKIP_E2E:-0}" != 1 ]; then
  echo "== 2/2 end-to-end test of the built page (tests/e2e)" >&2
  trunk build --release
  (
    cd tests/e2e
    npm ci --no-audit --no-fund --loglevel=error
    DIST="$OLDPWD/dist" npm test
  )
  echo "test-browser: screenshots in $ARTIFACTS" >&2
fi
