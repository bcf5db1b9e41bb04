#!/usr/bin/env bash
# Runs every test of cmrm: native (library, CLI, parity with transformers, bad inputs, GPU on
# lavapipe), the wasm32 build, a short run of every fuzz target, and the browser tests in
# headless Chromium.
# Installs what it needs first (scripts/setup.sh). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH" XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# One clean build per run: incremental caches would only take disk.
export CARGO_INCREMENTAL=0

bash scripts/setup.sh

START=$(date +%s)
step() { printf '\n=== %s (at %d s) ===\n' "$*" "$(($(date +%s) - START))" >&2; }

step "format and lints"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --target wasm32-unknown-unknown --lib --no-default-features -- -D warnings

step "native tests"
cargo test --lib --bins --tests

step "wasm32 library build (simd128)"
cargo build --target wasm32-unknown-unknown --lib --release

step "fuzzing: every target for 15 s, regressions replayed (scripts/fuzz.sh)"
bash scripts/fuzz.sh 15

if [ -x scripts/test-browser.sh ]; then
  step "browser tests (headless Chromium)"
  bash scripts/test-browser.sh
fi
step "all tests passed"
