# The record of changed guest pages that live migration and incremental
# snapshots build on: pages the guest writes (KVM's dirty log) and pages a
# device writes into guest memory (which KVM does not see) both count.
# timeout: 300
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
pages() { ferry bench-dirty d1 take | jq -r .pages; }

ferry boot --detach --name d1 --memory 512 >/dev/null
ferry exec d1 -- sh -c 'head -c 8388608 /dev/urandom > /root/disk-file && sync'

echo "== idle: few pages change"
ferry bench-dirty d1 start >/dev/null
sleep 2
idle=$(pages)
echo "idle 2 s: $idle pages"
[ "$idle" -lt 1024 ] || fail "an idle guest changed $idle pages in 2 s"

echo "== the guest writes 10 MiB into tmpfs"
ferry bench-dirty d1 take >/dev/null
ferry exec d1 -- sh -c 'head -c 10485760 /dev/urandom > /dev/shm/ten'
wrote=$(pages)
echo "after 10 MiB (2560 pages) written: $wrote pages"
[ "$wrote" -ge 2560 ] || fail "10 MiB written by the guest, only $wrote pages seen"
[ "$wrote" -le $((2560 * 2 + 1024)) ] || fail "10 MiB written, $wrote pages counted"

echo "== the block device writes 8 MiB into the guest's page cache"
ferry exec d1 -- sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'
ferry bench-dirty d1 take >/dev/null
ferry exec d1 -- sh -c 'cat /root/disk-file > /dev/null'
read_in=$(pages)
echo "after reading an 8 MiB file (2048 pages) from disk: $read_in pages"
[ "$read_in" -ge 2048 ] || fail "8 MiB read from disk, only $read_in pages seen: device writes are missed"

echo "== taking starts over; stopping leaves the VM running"
again=$(pages)
echo "right after: $again pages"
[ "$again" -lt "$read_in" ] || fail "taking did not start over ($again after $read_in)"
ferry bench-dirty d1 stop >/dev/null
[ "$(ferry exec d1 -- cat /dev/shm/ten | wc -c)" = 10485760 ] || fail "the guest's tmpfs file after tracking stopped"
out=$(ferry bench-dirty nosuchvm take 2>&1 || true)
echo "$out" | grep -q VM_NOT_FOUND || fail "an unknown VM: $out"
ferry rm -f d1 >/dev/null
echo "dirty-pages: all checks passed"
