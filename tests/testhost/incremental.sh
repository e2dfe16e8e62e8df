# Incremental snapshots: a base snapshot of a running VM, 10 MiB changed in
# the guest, then `--since base`: the bundle holds about the changed bytes,
# restores to the right content with its parent beside it or named with
# --parent, fails with SNAPSHOT_PARENT_MISSING without it (leaving no VM),
# chains two deep, and a parent the VM did not take is refused.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
code_of() { sed -n 's/.*error\[\([A-Z_]*\)\].*/\1/p' | head -1; }
mkdir -p /root/inc && cd /root/inc
ferry boot --detach --name inc --memory 512 >/dev/null
ferry exec inc -- sh -c 'echo base-state > /root/kept; sync'
ferry snapshot inc base.snap --leave-running >/dev/null

# 10 MiB of new, incompressible bytes in guest memory (tmpfs), and a small
# file on the disk.
ferry exec inc -- sh -c 'head -c 10485760 /dev/urandom > /dev/shm/ten; sync'
want=$(ferry exec inc -- sha256sum /dev/shm/ten | cut -d' ' -f1)
ferry exec inc -- sh -c 'echo changed > /root/disk-note; sync'
ferry snapshot inc inc.snap --since base.snap --leave-running >/dev/null

ferry inspect inc.snap --json > inspect.json
total=$(stat -c %s inc.snap)
memory=$(jq '[.manifest.sections[] | select(.kind == "memory-data") | .length] | add' inspect.json)
disk=$(jq '[.manifest.sections[] | select(.kind == "disk-top") | .length] | add // 0' inspect.json)
changed=$((10485760 + 65536))
echo "incremental bundle: $total bytes in all, memory $memory, disk $disk; changed $changed; full base $(stat -c %s base.snap)"
[ "$memory" -ge 10485760 ] || fail "the 10 MiB are not all in the bundle ($memory)"
[ $((memory + disk)) -le $((changed * 12 / 10)) ] || fail "memory + disk $((memory + disk)) is more than 1.2 x the changed $changed"
[ "$(jq -r '.chain[0].file_name' inspect.json)" = base.snap ] || fail "inspect does not show the parent: $(jq -c .chain inspect.json)"
[ "$(jq -r '.chain[0].found' inspect.json)" != null ] || fail "inspect does not find the parent"
ferry inspect inc.snap | grep -A3 '^chain' || true

# A second level: another change, another incremental bundle on this one.
ferry exec inc -- sh -c 'echo level-two > /dev/shm/two'
ferry snapshot inc inc2.snap --since inc.snap --leave-running >/dev/null
[ "$(ferry inspect inc2.snap --json | jq '.chain | length')" = 2 ] || fail "the two-deep chain"

# A parent this VM never took is refused.
ferry boot --detach --name other --memory 256 >/dev/null
ferry snapshot other other.snap --leave-running >/dev/null
err=$(ferry snapshot inc bad.snap --since other.snap --leave-running 2>&1) && fail "a foreign parent was accepted"
[ "$(echo "$err" | code_of)" = SNAPSHOT_PARENT_MISMATCH ] || fail "foreign parent: $err"
[ ! -e bad.snap ] || fail "a refused snapshot left a file"
ferry rm -f other >/dev/null

ferry rm -f inc >/dev/null
# Restore the chain: the parent is found beside the bundle.
ferry restore inc2.snap --name back --detach >/dev/null
got=$(ferry exec back -- sha256sum /dev/shm/ten | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "the 10 MiB came back as $got, want $want"
[ "$(ferry exec back -- cat /root/kept)" = base-state ] || fail "the base's disk state"
[ "$(ferry exec back -- cat /root/disk-note)" = changed ] || fail "the incremental disk write"
[ "$(ferry exec back -- cat /dev/shm/two)" = level-two ] || fail "the second level"
ferry rm -f back >/dev/null

# Without its parent: a clear error and no VM; with --parent it restores.
mkdir -p moved && mv base.snap moved/
err=$(ferry restore inc2.snap --name lost --detach 2>&1) && fail "restored without the base"
echo "$err"
[ "$(echo "$err" | code_of)" = SNAPSHOT_PARENT_MISSING ] || fail "missing parent: $err"
[ "$(ferry ls --json | jq length)" = 0 ] || fail "a failed restore left a VM"
ferry restore inc2.snap --name found --parent moved/base.snap --detach >/dev/null
[ "$(ferry exec found -- sha256sum /dev/shm/ten | cut -d' ' -f1)" = "$want" ] || fail "restore with --parent"
ferry rm -f found >/dev/null
echo "incremental: all passed"
