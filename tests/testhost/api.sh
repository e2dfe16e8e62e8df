# The library API, driven directly (not through the CLI): boot, exec, spawn
# with streaming stdio and a signal, files and directory trees, snapshot to a
# writer and restore from a reader, forks of three from a running and a
# paused source, pause/resume, a forward added and closed at run time, stop
# asking the guest first. Then one of the README's Rust examples.
# timeout: 600
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }

api_check || fail "api_check"
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "api_check left VMs: $(ferry ls)"

echo "== example: fork_three"
fork_three | tee /tmp/fork3.out
[ "$(grep -c ' before ' /tmp/fork3.out)" = 3 ] || fail "three siblings sharing the past"
[ "$(awk '/ before /{print $2}' /tmp/fork3.out | sort -u | wc -l)" = 3 ] || fail "three hostnames"
[ "$(awk '/ before /{print $4}' /tmp/fork3.out | sort -u | wc -l)" = 3 ] || fail "three random streams"
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "the example left VMs: $(ferry ls)"
echo "api: all passed"
