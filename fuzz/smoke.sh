#!/bin/sh
# Runs every fuzz target briefly (FUZZ_SECONDS, default 30) on its corpus
# under fuzz/corpus/TARGET, one at a time. Exits non-zero on the first crash,
# leak or timeout; libFuzzer leaves the input under fuzz/artifacts/TARGET.
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Extra arguments are passed to `cargo fuzz run` before the libFuzzer flags.
set -eu

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
targets="bundle_open memory_frames agent_frames virtio_fs_request virtqueue_restore"

cargo +nightly fuzz build "$@"
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    dict=""
    if [ -f "fuzz/dict/$t.dict" ]; then
        dict="-dict=$PWD/fuzz/dict/$t.dict"
    fi
    echo "fuzz smoke: $t for ${seconds}s"
    # shellcheck disable=SC2086
    if ! cargo +nightly fuzz run "$@" "$t" "$PWD/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
        -max_len=65536 -print_final_stats=1 $dict; then
        echo "fuzz smoke: $t FAILED (see fuzz/artifacts/$t)" >&2
        exit 1
    fi
done
echo "fuzz smoke: every target ran ${seconds}s without a crash"
