# Freeze and thaw on one host: an in-memory counter survives; the wall clock is
# corrected; unsynced writes are kept; damaged bundles fail clearly; a loaded
# 2-vCPU VM survives; five restores of one bundle run at once; thin bundles
# restore where their base is and fail cleanly where it is not; compressed
# guest memory comes back intact.
# timeout: 900
set -euo pipefail
ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
expect_code() {
    local code=$1; shift
    local out
    if out=$(timeout 60 "$@" 2>&1); then fail "expected $code from: $*"; fi
    echo "$out" | grep -q "error\[$code\]" || fail "expected $code from: $* ; got: $out"
    echo "ok: $code"
}
running() { ferry ls --json | jq -e --arg n "$1" '.[] | select(.name==$n and .status.state=="running")' >/dev/null; }
# A counter held only in a shell variable; SIGUSR1 asks for the next value.
start_counter() {
    ferry exec "$1" -- sh -c 'setsid sh -c "i=0; echo \$\$ > /run/counter.pid; trap \"i=\\\$((i+1)); echo \\\$i > /run/count\" USR1; while :; do sleep 0.05; done" </dev/null >/dev/null 2>&1 &'
    sleep 1
}
next() { ferry exec "$1" -- sh -c 'kill -USR1 $(cat /run/counter.pid); sleep 0.3; cat /run/count'; }

echo "== (a) counter survives snapshot and restore"
ferry boot --detach --name c1 --memory 512 >/dev/null
start_counter c1
[ "$(next c1)" = 1 ] && [ "$(next c1)" = 2 ] || fail "counter before snapshot"
pid_before=$(ferry exec c1 -- cat /run/counter.pid)
# (g) a write the guest never synced must be carried by the snapshot.
ferry exec c1 -- sh -c 'echo unsynced-data > /root/unsynced.txt'
t0=$(ms)
ferry snapshot c1 /root/c1.snap
echo "METRIC snapshot_ms=$(( $(ms) - t0 ))"
running c1 && fail "a snapshot without --leave-running must stop the VM"
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the frozen VM lives in the bundle now"
ls -l /root/c1.snap
echo "METRIC bundle_bytes_counter=$(stat -c %s /root/c1.snap)"
ferry inspect /root/c1.snap --json | jq -e '.manifest.vm_name == "c1"' >/dev/null || fail "inspect"
echo "(e) waiting 30 s before restoring"
sleep 30
t0=$(ms)
ferry restore /root/c1.snap --detach >/dev/null
first=$(ferry exec c1 -- echo up)
echo "METRIC restore_to_first_exec_ms=$(( $(ms) - t0 ))"
[ "$first" = up ] || fail "restore first exec"
[ "$(ferry exec c1 -- cat /run/counter.pid)" = "$pid_before" ] || fail "same process after restore"
[ "$(next c1)" = 3 ] || fail "counter did not continue"
[ "$(ferry exec c1 -- cat /root/unsynced.txt)" = unsynced-data ] || fail "unsynced write lost"

echo "== (e) wall clock after a restore 30 s later"
host=$(date +%s.%N); guest=$(ferry exec c1 -- date +%s.%N)
python3 -c "import sys; d=abs($host-$guest); print('clock skew %.3f s' % d); sys.exit(0 if d < 1.0 else 1)" || fail "guest clock"
ferry stop c1; ferry rm c1

echo "== (h) damaged bundles"
size=$(stat -c %s /root/c1.snap)
head -c $((size / 2)) /root/c1.snap > /root/trunc.snap
expect_code BUNDLE_TRUNCATED ferry restore /root/trunc.snap --name bad1 --detach
cp /root/c1.snap /root/flip.snap
printf '\xff' | dd of=/root/flip.snap bs=1 seek=$((4096 * 3 + 17)) conv=notrunc status=none
expect_code BUNDLE_CORRUPT ferry restore /root/flip.snap --name bad2 --detach
cp /root/c1.snap /root/newer.snap
printf '\x63' | dd of=/root/newer.snap bs=1 seek=8 conv=notrunc status=none
expect_code BUNDLE_VERSION_UNSUPPORTED ferry restore /root/newer.snap --name bad3 --detach
# Wrong architecture and missing CPU features are covered by crates/cli/tests/restore_errors.rs.
expect_code BUNDLE_NOT_A_BUNDLE ferry restore /etc/hostname --name bad6 --detach
[ "$(ferry ls --json | jq length)" = 0 ] || fail "failed restores must leave nothing"
pgrep -x ferry-vmm && fail "a VMM process was left running"

echo "== (j) five concurrent restores of one bundle"
for i in 1 2 3 4 5; do ferry restore /root/c1.snap --name r$i --detach >/dev/null & done
wait
for i in 1 2 3 4 5; do [ "$(next r$i)" = 3 ] || fail "restore r$i"; done
for i in 1 2 3 4 5; do ferry stop r$i; ferry rm r$i; done

echo "== (i) a 2-vCPU VM under CPU and disk load"
ferry boot --detach --name load --cpus 2 --memory 512 >/dev/null
ferry exec load -- sh -c 'setsid sh -c "while :; do :; done" </dev/null >/dev/null 2>&1 &
  setsid sh -c "while :; do dd if=/dev/urandom of=/root/churn bs=64k count=64 conv=fsync 2>/dev/null; done" </dev/null >/dev/null 2>&1 &'
sleep 3
ferry snapshot load /root/load.snap
ferry restore /root/load.snap --detach >/dev/null
[ "$(ferry exec load -- nproc)" = 2 ] || fail "vCPUs after restore"
ferry exec load -- sh -c 'pgrep -c -f "while :" >/dev/null && dd if=/dev/zero of=/root/after bs=1M count=8 conv=fsync 2>/dev/null && sha256sum /root/after' || fail "loaded VM unusable after restore"
ferry stop load; ferry rm load

echo "== (k) a thin bundle restores on the host that has its base"
ferry boot --detach --name th --memory 512 >/dev/null
start_counter th
[ "$(next th)" = 1 ] || fail "thin: counter before snapshot"
ferry exec th -- sh -c 'echo written-before-thin > /root/thin.txt'
ferry snapshot --thin th /root/th.snap
ferry inspect /root/th.snap --json | jq -e '.thin == true and .manifest.disk.thin == true' >/dev/null || fail "inspect must say thin"
ferry inspect /root/th.snap --json | jq -e '[.manifest.sections[].kind] | index("disk-base") == null' >/dev/null || fail "a thin bundle carries no disk base"
echo "METRIC bundle_bytes_thin_counter=$(stat -c %s /root/th.snap)"
ferry restore /root/th.snap --detach >/dev/null
[ "$(next th)" = 2 ] || fail "thin: counter did not continue"
[ "$(ferry exec th -- cat /root/thin.txt)" = written-before-thin ] || fail "thin: the VM's own disk writes are lost"
# Streamed, too.
ferry snapshot --thin th - | ferry restore - --name th2 --detach >/dev/null
[ "$(next th2)" = 3 ] || fail "streamed thin bundle"
ferry rm -f th2

echo "== (l) a thin bundle on a host without its base fails cleanly"
# A fresh cache and data directory: this "host" has never seen the image.
expect_code RESTORE_BASE_MISSING env FERRY_CACHE_DIR=/root/fresh-cache FERRY_DATA_DIR=/root/fresh-data \
    ferry restore /root/th.snap --name nobase --detach
out=$(FERRY_CACHE_DIR=/root/fresh-cache FERRY_DATA_DIR=/root/fresh-data ferry restore /root/th.snap --name nobase --detach 2>&1 || true)
echo "$out" | grep -q "full bundle" || fail "the error must point to full bundles: $out"
left=$(find /root/fresh-data /root/fresh-cache -type f 2>/dev/null | wc -l || true)
[ "$left" = 0 ] || { find /root/fresh-data /root/fresh-cache -type f; fail "a refused thin restore left files behind"; }
out=$(cat /root/th.snap | FERRY_CACHE_DIR=/root/fresh-cache FERRY_DATA_DIR=/root/fresh-data ferry restore - --name nobase --detach 2>&1 || true)
echo "$out" | grep -q "RESTORE_BASE_MISSING" || fail "streamed thin bundle without base: $out"
# A stream that was read is kept for a retry, at the path the error names;
# `ferry gc` removes it.
kept=$(find /root/fresh-data/incoming -type f)
[ "$(echo "$kept" | wc -l)" = 1 ] && echo "$out" | grep -qF "$kept" || fail "the received bundle must be kept and named: $out"
cmp -s "$kept" /root/th.snap || fail "the kept bundle differs from what was sent"
FERRY_CACHE_DIR=/root/fresh-cache FERRY_DATA_DIR=/root/fresh-data ferry gc >/dev/null
left=$(find /root/fresh-data /root/fresh-cache -type f 2>/dev/null | wc -l || true)
[ "$left" = 0 ] || { find /root/fresh-data /root/fresh-cache -type f; fail "a refused thin restore left files behind"; }
[ "$(FERRY_DATA_DIR=/root/fresh-data ferry ls --json | jq length)" = 0 ] || fail "a refused thin restore left a VM"
[ "$(ferry ls --json | jq '[.[] | select(.name=="nobase")] | length')" = 0 ] || fail "a refused thin restore left a VM"
# th is gone already: its streamed snapshot handed it off to th2.
if ferry ls --json | jq -e '.[] | select(.name=="th")' >/dev/null; then fail "a snapshot without --leave-running must remove the VM"; fi

echo "== (m) compressed guest memory: a 256 MiB tmpfs file survives"
ferry boot --detach --name big --memory 512 >/dev/null
ferry exec big -- sh -c 'mkdir -p /mnt/fill && mount -t tmpfs -o size=300M fill /mnt/fill &&
  { head -c 67108864 /dev/urandom; yes ferry-compressible-text | head -c 201326592; } > /mnt/fill/data'
sum_before=$(ferry exec big -- sha256sum /mnt/fill/data | cut -d" " -f1)
ferry snapshot big /root/big.snap
ferry inspect /root/big.snap --json | jq -e '.memory_compressed == true' >/dev/null || fail "memory must be compressed"
ferry inspect /root/big.snap --json | jq -c '.manifest | {memory_bytes, memory_stored_bytes}'
ferry restore /root/big.snap --detach >/dev/null
jq -c . ~/.local/share/ferry/vms/big/restore-stats.json
sum_after=$(ferry exec big -- sha256sum /mnt/fill/data | cut -d" " -f1)
[ "$sum_before" = "$sum_after" ] || fail "tmpfs file changed across a compressed snapshot: $sum_before vs $sum_after"
# A fork of the restored VM reads the decoded memory too.
ferry fork big --new-name big-kid --detach >/dev/null
[ "$(ferry exec big-kid -- sha256sum /mnt/fill/data | cut -d" " -f1)" = "$sum_before" ] || fail "fork of a restored VM"
ferry rm -f big-kid; ferry rm -f big
rm -f /root/big.snap

echo "== (n) the prefetch set: recorded for a running VM, only the rings for a paused one; --compact restores too"
ferry boot --detach --name pf --memory 256 -- sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/n; sleep 0.05; done' >/dev/null
sleep 1
n=$(ferry snapshot pf /root/pf.snap --leave-running --json | jq '.report.prefetch_pages')
[ "$n" -gt 40 ] || fail "a running VM's snapshot must record the pages it touches (got $n)"
running=$n
ferry inspect /root/pf.snap --json | jq -e '.manifest.memory_prefetch_frames | length > 0' >/dev/null ||
  fail "the manifest must name the prefetch frames"
ferry pause pf
n=$(ferry snapshot pf /root/pf-paused.snap --leave-running --json | jq '.report.prefetch_pages')
# A paused VM touches nothing: its set is only its virtqueues' rings, which
# every restore's devices read first (a few pages per queue).
[ "$n" -gt 0 ] && [ "$n" -le 40 ] && [ "$n" -lt "$running" ] ||
  fail "a paused VM's set must hold its rings only (got $n pages, running $running)"
ferry resume pf
ferry snapshot pf /root/pf-compact.snap --compact --json | jq -c '.report | {prefetch_pages, memory_stored_bytes}'
for b in pf pf-compact; do
  ferry restore /root/$b.snap --name r-$b --detach >/dev/null
  a=$(ferry exec r-$b -- cat /run/n); sleep 0.5; c=$(ferry exec r-$b -- cat /run/n)
  [ "$c" -gt "$a" ] || fail "restored $b: the counter must go on ($a then $c)"
  ferry rm -f r-$b >/dev/null
done
rm -f /root/pf.snap /root/pf-paused.snap /root/pf-compact.snap

echo "== bundle sizes for a 512 MiB guest, idle and after touching 256 MiB"
ferry boot --detach --name idle --memory 512 >/dev/null
ferry snapshot idle /root/idle.snap --leave-running
echo "METRIC bundle_bytes_idle_512=$(stat -c %s /root/idle.snap)"
ferry inspect /root/idle.snap --json | jq -c '.manifest | {memory_bytes, memory_stored_bytes, disk}'
ferry snapshot --thin idle /root/idle-thin.snap
echo "METRIC bundle_bytes_idle_512_thin=$(stat -c %s /root/idle-thin.snap)"
ferry boot --detach --name touched --memory 512 >/dev/null
# Fill 256 MiB of guest memory with non-zero data (tmpfs pages live in RAM).
ferry exec touched -- sh -c 'mkdir -p /mnt/fill && mount -t tmpfs -o size=300M fill /mnt/fill &&
  yes abcdefghijklmnop | head -c 268435456 > /mnt/fill/data && ls -l /mnt/fill/data'
ferry snapshot touched /root/touched.snap
echo "METRIC bundle_bytes_touched_256_of_512=$(stat -c %s /root/touched.snap)"
ferry inspect /root/touched.snap --json | jq -c '.manifest | {memory_bytes}'
echo "all snapshot tests passed"
