#!/usr/bin/env bash
# Installs every tool cmrm's build, page and tests need, on a fresh Debian machine.
# Idempotent and guarded: a second run takes seconds. Pinned versions: see ../README.md.
set -euo pipefail

WASM_BINDGEN_VERSION=0.2.130   # must equal the wasm-bindgen crate version in Cargo.toml
WASM_PACK_VERSION=0.15.1
TRUNK_VERSION=0.21.14          # trunk 0.22 needs rustc >= 1.96
CARGO_FUZZ_VERSION=0.13.2      # fuzz targets on stable (--sanitizer none)
NIGHTLY=nightly-2026-05-19     # the page's threads build only (scripts/build-threads.sh: std with atomics)
export PATH="$HOME/.cargo/bin:$PATH"

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.json ] || need_apt+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

rustup target list --installed | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 \
   || ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q rust-src; then
  echo "setup: rustup toolchain install $NIGHTLY (rust-src)" >&2
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
fi

if ! wasm-bindgen --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
  echo "setup: cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION" >&2
  # not --locked: its lockfile pins a webpki-roots version the registry no longer serves
  cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
if ! wasm-pack --version 2>/dev/null | grep -q "$WASM_PACK_VERSION"; then
  echo "setup: cargo install wasm-pack $WASM_PACK_VERSION" >&2
  cargo install -q wasm-pack --version "$WASM_PACK_VERSION" --locked
fi
if [ "${CMRM_SKIP_TRUNK:-0}" != 1 ] && ! trunk --version 2>/dev/null | grep -q "$TRUNK_VERSION"; then
  echo "setup: cargo install trunk $TRUNK_VERSION" >&2
  cargo install -q trunk --version "$TRUNK_VERSION" --locked
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "setup: cargo install cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install -q cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
echo "setup: tools ready" >&2
