# host-b: thaw the counter, keep counting, fork it and watch both diverge.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
timeout 1800 nc -l 9000 > /root/counter.snap
last=2
ferry restore /root/counter.snap --detach -p 3000:3000
[ "$(curl -fsS 127.0.0.1:3000)" = $((last + 1)) ] || fail "restore did not continue the count"
ferry fork counter --new-name counter-b --detach -p 3001:3000
a=$(curl -fsS 127.0.0.1:3000); b=$(curl -fsS 127.0.0.1:3001)
[ "$a" = $((last + 2)) ] && [ "$b" = $((last + 2)) ] || fail "both must answer $((last + 2)): $a $b"
# The fork reaches its own server over loopback inside the guest.
c=$(ferry exec counter-b -- curl -fsS 127.0.0.1:3000)
[ "$c" = $((last + 3)) ] || fail "exec into the fork: $c"
[ "$(curl -fsS 127.0.0.1:3000)" = $((last + 3)) ] || fail "the source counts on its own"
# A third VM asking for port 3000 is refused before it starts, naming the holder.
if out=$(ferry fork counter --new-name counter-c --detach -p 3000:3000 2>&1); then fail "port 3000 was taken"; fi
echo "$out" | grep -q 'error\[BOOT_PORT_FORWARD_IN_USE\]' || fail "wrong error: $out"
echo "$out" | grep -q counter || fail "the holder is not named: $out"
[ "$(ferry ls --json | jq length)" = 2 ] || fail "the refused fork left something behind"
echo "quickstart passed on $(hostname)"
timeout 60 bash -c 'until echo quickstart-done | nc -N host-a 9001; do sleep 1; done'
