# Live migration, source side: a guest keeps rewriting 128 MiB and counting
# while it moves to host-b. First a wrong token (refused before any memory
# goes), then a receiver killed mid-transfer, then a link cut right after
# the pause: each time the VM runs on here with its memory intact. Then the
# real migration: the counter and the memory check continue on host-b,
# reached through the forward host-b's receiver set up.
# timeout: 1500
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
say() { timeout 120 bash -c "until echo '$1' | nc -N host-b 9101; do sleep 1; done"; }
hear() { timeout 600 nc -l 9100; }
status() { ferry exec churn -- ferry-churn --query 127.0.0.1:7000; }
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p"; }

ferry boot --detach --name churn --memory 512 >/dev/null
ferry cp "$(command -v ferry-churn)" churn:/usr/local/bin/ferry-churn
ferry exec churn -- sh -c 'setsid ferry-churn --mib 128 --rate 4 --port 7000 </dev/null >/dev/null 2>&1 &'
timeout 120 bash -c "until ferry exec churn -- ferry-churn --query 127.0.0.1:7000 | grep -q 'pass=[1-9]'; do sleep 2; done" \
    || fail "the churn program did not finish a pass"
echo "churning: $(status)"

# The frame-aware link that breaks just after the source paused: it passes
# everything until the final message (tag 11), then drops the connection.
cat > /tmp/cut.py <<'PY'
import socket, sys, threading, os
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def back():
    while True:
        b = s.recv(65536)
        if not b:
            os._exit(0)
        sys.stdout.buffer.write(b); sys.stdout.buffer.flush()
threading.Thread(target=back, daemon=True).start()
inp = sys.stdin.buffer
def read(n):
    b = b""
    while len(b) < n:
        c = inp.read(n - len(b))
        if not c:
            os._exit(0)
        b += c
    return b
while True:
    head = read(5)
    if head[0] == 11:
        sys.stderr.write("cut.py: cutting the link at the final message\n")
        s.close()
        os._exit(1)
    s.sendall(head + read(int.from_bytes(head[1:], "little")))
PY

check_alive() {
    local before after
    before=$(status); sleep 3; after=$(status)
    echo "$1: $before -> $after"
    [ "$(echo "$after" | field errors)" = 0 ] || fail "$1: memory errors: $after"
    [ "$(echo "$after" | field count)" -gt "$(echo "$before" | field count)" ] || fail "$1: the counter stopped"
    [ "$(ferry ls --json | jq -r '.[0].status.state // .[0].status')" != "" ]
    ferry ls
}

# 1. A wrong token: refused before anything about the VM is sent.
TOKEN=$(hear)
out=$(ferry migrate churn host-b:9000 --token 0000 2>&1) && fail "a wrong token was accepted"
echo "$out"
echo "$out" | grep -q MIGRATE_AUTH_FAILED || fail "wrong token: $out"
check_alive "after the wrong token"

# 2. The same receiver (it waits on) is killed by host-b mid-transfer.
say ready-2
start=$(date +%s)
out=$(ferry migrate churn host-b:9000 --token "$TOKEN" --bandwidth-limit 8M 2>&1) && fail "migrated though the receiver was killed"
echo "$out"
echo "$out" | grep -q MIGRATE_LINK_BROKEN || fail "receiver killed: $out"
echo "$out" | grep -q "still runs here" || fail "the error does not say the VM runs on: $out"
check_alive "after the receiver died"

# 3. The link breaks right after the pause.
TOKEN=$(hear)
out=$(ferry migrate churn - --via "python3 /tmp/cut.py host-b 9000" --token "$TOKEN" 2>&1) && fail "migrated over a cut link"
echo "$out"
echo "$out" | grep -q MIGRATE_LINK_BROKEN || fail "cut link: $out"
check_alive "after the cut link"
say cut-done

# 4. The real migration.
TOKEN=$(hear)
last=$(status)
ferry migrate churn host-b:9000 --token "$TOKEN" --downtime-ms 300 --json > /tmp/report.json \
    || fail "migration failed: $(cat /tmp/report.json)"
jq . /tmp/report.json
[ "$(jq '.rounds | length' /tmp/report.json)" -ge 2 ] || fail "expected pre-copy rounds"
[ "$(jq .downtime_ms /tmp/report.json)" -gt 0 ] || fail "no downtime measured"
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the source VM is still here after the migration"
say "migrated $(echo "$last" | field pass) $(echo "$last" | field count)"
timeout 600 nc -l 9100 | grep -q continued || fail "host-b did not confirm"
echo "migrated: downtime $(jq .downtime_ms /tmp/report.json) ms, $(jq '.rounds|length' /tmp/report.json) rounds"
