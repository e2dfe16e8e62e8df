# Live migration, destination side (see host-a.sh).
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
say() { timeout 120 bash -c "until echo '$1' | nc -N host-a 9100; do sleep 1; done"; }
hear() { timeout 900 nc -l 9101; }
no_vm_here() {
    ferry gc >/dev/null
    [ "$(ferry ls --json | jq length)" = 0 ] || { ferry ls; fail "$1: a VM was left here"; }
}
listen() {
    rm -f /tmp/recv.out /tmp/recv.err
    ferry receive --listen 0.0.0.0:9000 -p 7000:7000 "$@" > /tmp/recv.out 2> /tmp/recv.err &
    RECV=$!
    timeout 60 bash -c 'until grep -q "^token: " /tmp/recv.out; do sleep 0.2; done'
    TOKEN=$(sed -n 's/^token: //p' /tmp/recv.out)
}

# 1 and 2: one receiver; the wrong token is refused and it waits on; then
# it is killed while memory flows.
listen
say "$TOKEN"
hear >/dev/null
timeout 300 bash -c 'until grep -q "receiving churn" /tmp/recv.err; do sleep 0.2; done'
sleep 3
grep -q "refused" /tmp/recv.err || fail "the wrong token was not reported: $(cat /tmp/recv.err)"
kill -9 "$RECV"
wait "$RECV" 2>/dev/null || true
cat /tmp/recv.err
no_vm_here "receiver killed"

# 3: the link is cut after the pause; the receiver must fail and leave nothing.
listen
say "$TOKEN"
if wait "$RECV"; then fail "the receiver succeeded over a cut link"; fi
cat /tmp/recv.err
no_vm_here "cut link"
hear >/dev/null

# 4: the real migration, with the forward of port 7000 set up here.
listen
say "$TOKEN"
wait "$RECV" || fail "receive failed: $(cat /tmp/recv.err)"
cat /tmp/recv.err
msg=$(hear)
read -r _ pass count <<< "$msg"
ferry ls
now=$(ferry-churn --query 127.0.0.1:7000)
echo "through the forward here: $now (source last saw pass=$pass count=$count)"
got_pass=$(echo "$now" | sed -n 's/.*pass=\([0-9]*\).*/\1/p')
got_errors=$(echo "$now" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
got_count=$(echo "$now" | sed -n 's/.*count=\([0-9]*\).*/\1/p')
[ "$got_errors" = 0 ] || fail "memory errors after the migration: $now"
[ "$got_pass" -ge "$pass" ] || fail "the pass went back: $now"
[ "$got_count" -gt "$count" ] || fail "the counter did not continue: $now"
# A pass takes about 32 s at 4 MiB/s: wait for the next one to finish here,
# every page of it checked against the pass before the move.
pass_now() { ferry exec churn -- ferry-churn --query 127.0.0.1:7000 | sed -n 's/.*pass=\([0-9]*\).*/\1/p'; }
deadline=$((SECONDS + 180))
until [ "$(pass_now)" -gt "$got_pass" ]; do
    [ $SECONDS -lt $deadline ] || fail "the memory rewrite stalled at pass $got_pass"
    sleep 3
done
later=$(ferry exec churn -- ferry-churn --query 127.0.0.1:7000)
echo "a full pass later, inside: $later"
[ "$(echo "$later" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')" = 0 ] || fail "memory errors: $later"
say continued
