# Boot templates: a template of the base image is made once; later boots of the
# same shape restore it and are still distinct machines (name, hostname, RNG,
# disk, clock); a detached boot's main command runs and ends the VM; other
# shapes and --cold boot a kernel; a damaged template is dropped, not used.
# timeout: 600
set -euo pipefail
ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
running() { ferry ls --json | jq -e --arg n "$1" '.[] | select(.name==$n and .status.state=="running")' >/dev/null; }
# Boots with phase timings on stderr; says whether the boot came from a template.
from_template() { grep -q "restored from template" "$1"; }

echo "== create"
t0=$(ms)
ferry template create --memory 512 --json > /tmp/t.json
echo "METRIC template_create_ms=$(( $(ms) - t0 )) bytes=$(jq .bytes /tmp/t.json)"
id=$(jq -r .id /tmp/t.json)
ferry template ls | grep -q "$id" || fail "template ls does not list $id"
[ "$(ferry template ls --json | jq length)" = 1 ] || fail "one template expected"
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "the template's VM was left behind"

echo "== attached boots restore the template"
t0=$(ms)
out=$(FERRY_TIMINGS=1 ferry boot --name one --memory 512 -- hostname 2>/tmp/b1.err)
echo "METRIC template_boot_attached_ms=$(( $(ms) - t0 ))"
from_template /tmp/b1.err || { cat /tmp/b1.err; fail "boot did not use the template"; }
[ "$out" = one ] || fail "hostname of a template boot: $out"
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "attached boot left its VM"

echo "== detached boots are distinct machines"
FERRY_TIMINGS=1 ferry boot --detach --name a --memory 512 >/dev/null 2>/tmp/ba.err
FERRY_TIMINGS=1 ferry boot --detach --name b --memory 512 >/dev/null 2>/tmp/bb.err
from_template /tmp/ba.err && from_template /tmp/bb.err || fail "detached boots did not use the template"
[ "$(ferry exec a -- hostname)" = a ] && [ "$(ferry exec b -- cat /etc/hostname)" = b ] || fail "hostnames"
ra=$(ferry exec a -- sh -c 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"')
rb=$(ferry exec b -- sh -c 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"')
[ "$ra" != "$rb" ] || fail "two VMs from one template produced the same random bytes"
ferry exec a -- sh -c 'echo from-a > /root/mine.txt; sync'
ferry exec b -- test ! -e /root/mine.txt || fail "b sees a's disk write"
skew=$(( $(ferry exec b -- date +%s) - $(date +%s) ))
[ "${skew#-}" -le 5 ] || fail "guest clock off by ${skew}s"
[ "$(ferry ls --json | jq -r '.[] | select(.name=="a") | .image')" = base ] || fail "record image"
ferry rm -f a b

echo "== a detached boot's main command runs, and its end ends the VM"
FERRY_TIMINGS=1 ferry boot --detach --name m --memory 512 -- sh -c 'echo started > /run/m; sleep 4' >/dev/null 2>/tmp/bm.err
from_template /tmp/bm.err || fail "main-command boot did not use the template"
[ "$(ferry exec m -- cat /run/m)" = started ] || fail "main command did not run"
for _ in $(seq 1 60); do running m || break; sleep 0.5; done
running m && fail "the VM outlived its main command"
ferry rm -f m
out=$(ferry boot --detach --name bad --memory 512 -- /no/such/program 2>&1) && fail "a missing main program must fail the boot"
echo "$out" | grep -q "error\[BOOT_MAIN_FAILED\]" || fail "expected BOOT_MAIN_FAILED, got: $out"
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "a failed boot left its VM"

echo "== other shapes and --cold boot the kernel"
FERRY_TIMINGS=1 ferry boot --memory 384 -- true 2>/tmp/bs.err
from_template /tmp/bs.err && fail "a 384 MiB boot used the 512 MiB template"
t0=$(ms)
out=$(FERRY_TIMINGS=1 ferry boot --cold --name cold --memory 512 -- hostname 2>/tmp/bc.err)
echo "METRIC cold_boot_attached_ms=$(( $(ms) - t0 ))"
from_template /tmp/bc.err && fail "--cold used the template"
[ "$out" = cold ] || fail "cold hostname: $out"

echo "== a damaged template is dropped and the boot goes on cold"
path=$(jq -r .path /tmp/t.json)
truncate -s 4096 "$path"
out=$(ferry boot --name after --memory 512 -- hostname 2>/tmp/bd.err) || { cat /tmp/bd.err; fail "boot with a damaged template"; }
[ "$out" = after ] || fail "hostname after fallback: $out"
[ "$(ferry template ls --json | jq length)" = 0 ] || fail "the damaged template was kept"

echo "== rm"
ferry template create --memory 512 >/dev/null
ferry template rm --all
[ "$(ferry template ls --json | jq length)" = 0 ] || fail "template rm --all"
out=$(ferry template rm nosuch 2>&1) && fail "rm of a missing template must fail"
echo "$out" | grep -q "error\[TEMPLATE_NOT_FOUND\]" || fail "expected TEMPLATE_NOT_FOUND: $out"
echo "all template tests passed"
