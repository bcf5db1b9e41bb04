#!/usr/bin/env bash
# Build the page (trunk build --release → dist/, with the threads build in dist/threads/) and serve
# it on http://127.0.0.1:$PORT/ (8080) with COOP/COEP headers, so the page runs threads.
# Installs missing tools first (scripts/setup.sh). dist/ is plain static files: any static host
# serves it; without those headers it runs one thread. For live rebuilds while editing: `trunk serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PORT="${PORT:-8080}"

if ! command -v trunk >/dev/null || ! command -v node >/dev/null \
   || ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  scripts/setup.sh
fi
command -v node >/dev/null || { echo "serve: node is needed for the static server (apt-get install nodejs)" >&2; exit 1; }

trunk build --release
echo "serve: open http://127.0.0.1:$PORT/ (embed view: http://127.0.0.1:$PORT/embed.html?model=bundled)" >&2
exec node tests/e2e/server.mjs dist "$PORT"
