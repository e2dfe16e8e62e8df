#!/usr/bin/env bash
# Runs every fuzz target briefly (FUZZ_SECONDS, default 30) on its corpus
# under fuzz/corpus/TARGET, FUZZ_JOBS at a time (default: the number of
# CPUs, at most 2; each libFuzzer process uses one core). A target's output
# is printed as one block when it ends. Exits non-zero if any target found a
# crash, leak or timeout; libFuzzer leaves the input under
# fuzz/artifacts/TARGET.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Extra arguments are passed to `cargo fuzz run` before the libFuzzer flags.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
jobs="${FUZZ_JOBS:-$(nproc)}"
[ "$jobs" -le 2 ] || jobs=2
[ "$jobs" -ge 1 ] || jobs=1
targets=(bundle_open memory_frames disk_frames agent_frames virtio_fs_request virtqueue_restore)

cargo +nightly fuzz build "$@"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# fuzz_one TARGET [ARGS...]: one target's run, its output in $logs/TARGET.
fuzz_one() {
    local t=$1 dict=()
    shift
    mkdir -p "fuzz/corpus/$t"
    if [ -f "fuzz/dict/$t.dict" ]; then
        dict=("-dict=$PWD/fuzz/dict/$t.dict")
    fi
    echo "fuzz smoke: $t for ${seconds}s"
    cargo +nightly fuzz run "$@" "$t" "$PWD/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
        -max_len=65536 -print_final_stats=1 "${dict[@]}"
}

declare -A target_of=()
failed=()
# finish: waits for one running target, prints its block, notes a failure.
finish() {
    local pid rc=0
    wait -n -p pid || rc=$?
    local t=${target_of[$pid]}
    unset "target_of[$pid]"
    cat "$logs/$t"
    if [ "$rc" != 0 ]; then
        echo "fuzz smoke: $t FAILED (see fuzz/artifacts/$t)" >&2
        failed+=("$t")
    fi
}

for t in "${targets[@]}"; do
    [ "${#target_of[@]}" -lt "$jobs" ] || finish
    fuzz_one "$t" "$@" >"$logs/$t" 2>&1 &
    target_of[$!]=$t
done
while [ "${#target_of[@]}" -gt 0 ]; do
    finish
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz smoke: ${failed[*]} FAILED" >&2
    exit 1
fi
echo "fuzz smoke: every target ran ${seconds}s without a crash"
