#!/usr/bin/env bash
# Coverage-guided fuzzing of every file cmrm reads from a stranger (fuzz/, cargo-fuzz + libFuzzer
# on stable Rust: coverage instrumentation, no sanitizer; debug assertions and overflow checks on).
#
#   scripts/fuzz.sh                 20 s per target (the short run of scripts/test.sh)
#   scripts/fuzz.sh 600             10 minutes per target (the long run; figures in docs/fuzzing.md)
#   scripts/fuzz.sh 600 image gguf  only these targets
#   CMRM_FUZZ_JOBS=2 scripts/fuzz.sh 600   two targets at a time
#
# Seeds: the bad-input corpus and the valid fixtures (written by tests/hostile.rs), plus
# fuzz/regressions/<target>/ (inputs that once failed: committed, replayed by every run).
# New coverage goes to fuzz/corpus/<target>/ (kept between runs, not committed). A failure
# leaves its input in fuzz/artifacts/<target>/; copy it into fuzz/regressions/<target>/ with the
# fix. Exits non-zero if any target failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds=${1:-20}
shift || true
all_targets=(safetensors gguf vectors image configs chat_template catalog)
targets=("${@:-${all_targets[@]}}")
jobs=${CMRM_FUZZ_JOBS:-1}

CMRM_SKIP_TRUNK=1 bash scripts/setup.sh

echo "fuzz: writing seed corpora" >&2
rm -rf fuzz/seeds
CMRM_FUZZ_SEEDS="$PWD/fuzz/seeds" cargo test -q --test hostile -- --ignored --exact write_fuzz_seeds >&2

echo "fuzz: building the targets" >&2
cargo fuzz build --sanitizer none --debug-assertions >&2

mkdir -p fuzz/logs
run_one() {
  local target=$1
  mkdir -p "fuzz/corpus/$target" "fuzz/regressions/$target" "fuzz/seeds/$target" "fuzz/artifacts/$target"
  local max_len=1048576
  case $target in image | configs | chat_template | catalog | vectors) max_len=65536 ;; esac
  # -timeout: an input taking over 10 s is a failure (a hang); -rss_limit_mb also caps a single
  # allocation (malloc_limit_mb defaults to it).
  cargo fuzz run --sanitizer none --debug-assertions "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" "fuzz/regressions/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=$max_len -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"fuzz/logs/$target.log" 2>&1
}

status=0
pids=()
names=()
for target in "${targets[@]}"; do
  echo "fuzz: $target for ${seconds} s" >&2
  run_one "$target" &
  pids+=($!)
  names+=("$target")
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || { status=1; echo "fuzz: ${names[0]} FAILED (fuzz/logs/${names[0]}.log)" >&2; }
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=1; echo "fuzz: ${names[$i]} FAILED (fuzz/logs/${names[$i]}.log)" >&2; }
done

printf '\n%-14s %10s %12s %9s %8s %8s %9s %s\n' target seconds executions "exec/s" edges corpus "peak MB" result
for target in "${targets[@]}"; do
  log=fuzz/logs/$target.log
  stat() { grep -o "stat::$1: *[0-9]*" "$log" | grep -o '[0-9]*$' | tail -1; }
  edges=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
  corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
  result=ok
  if grep -qE '^==[0-9]+== ERROR|panicked at|Test unit written|SUMMARY: libFuzzer' "$log"; then
    result="FAILED: $(grep -m1 -E 'panicked at|ERROR: libFuzzer' "$log" | cut -c1-120)"
  fi
  printf '%-14s %10s %12s %9s %8s %8s %9s %s\n' "$target" "$seconds" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "${edges:-?}" "$corpus" "$(stat peak_rss_mb)" "$result"
done
exit $status
