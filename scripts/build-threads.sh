#!/usr/bin/env bash
# The page's second wasm build, with threads: std rebuilt with atomics (nightly), a rayon pool of
# Web Workers (wasm-bindgen-rayon), output in OUT (default dist/threads/: cmrm.js + cmrm_bg.wasm).
# worker.js loads it when the page is cross-origin isolated (COOP/COEP headers), else the
# one-thread build next to it. Trunk runs this after each build (Trunk.toml hook), so
# `trunk build --release` makes both.
#   scripts/build-threads.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
NIGHTLY=nightly-2026-05-19   # also in scripts/setup.sh
OUT=${1:-${TRUNK_STAGING_DIR:-dist}/threads}

if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
  echo "build-threads: $NIGHTLY is not installed (scripts/setup.sh installs it); the page will run one thread" >&2
  exit 0
fi
# A shared, imported memory (what wasm-bindgen's thread support expects) with a declared maximum:
# wasm32's whole 4 GiB. The TLS exports let each worker set up its thread-locals.
LINK="--shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base"
RUSTFLAGS="-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128 $(printf -- '-C link-arg=%s ' $LINK)" \
  cargo "+$NIGHTLY" build -q --target wasm32-unknown-unknown --release --lib --no-default-features \
  --features threads -Z build-std=panic_abort,std --target-dir target/threads
mkdir -p "$OUT"
wasm-bindgen --target web --no-typescript --out-dir "$OUT" target/threads/wasm32-unknown-unknown/release/cmrm.wasm
