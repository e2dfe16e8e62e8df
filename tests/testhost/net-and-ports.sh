# Port forwarding into a VM over vsock (no guest network needed), clear errors
# for a taken host port (held by a ferry VM or by another process), and
# outbound networking through passt: DNS and HTTP to the host's Debian
# mirror, and apt-get update, from inside the guest.
# timeout: 600
set -euo pipefail

fail() { echo "FAIL: $*"; exit 1; }
# expect_code CODE CMD...: CMD must fail and print error[CODE]; the output is
# left in $out.
expect_code() {
    local code=$1; shift
    if out=$("$@" 2>&1); then fail "expected $code from: $*"; fi
    echo "$out" | grep -q "error\[$code\]" || fail "expected $code from: $* ; got: $out"
    echo "ok: $* -> $code"
}

echo "== a forward into a VM without a network device"
ferry boot --detach --name web -p 8080:8000 >/dev/null
if ferry exec web -- ip -o link show eth0 >/dev/null 2>&1; then fail "web has eth0 without --net"; fi
ferry ls --json | jq -e '.[] | select(.name == "web") | .ports == [{"host_ip":"127.0.0.1","host_port":8080,"guest_port":8000}]' >/dev/null \
    || fail "ports in ferry ls --json: $(ferry ls --json | jq -c '.[] | select(.name == "web") | .ports')"
# A tiny HTTP responder in the guest (netcat-openbsd, one connection per nc),
# detached from the exec. No -q: it needs alarm(2), which the guest kernel
# (tinyconfig, no POSIX timers) lacks; -N ends nc once the client is gone.
ferry exec web -- setsid -f sh -c \
    'while true; do printf "HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello-guest\n" | nc -l -p 8000 -N >/dev/null; done' \
    </dev/null >/dev/null 2>&1
# get URL: the body, retrying while the guest's one-shot nc is being restarted.
get() {
    local body=""
    for _ in $(seq 1 50); do
        body=$(curl -s --max-time 5 "$1" || true)
        [ -n "$body" ] && break
        sleep 0.2
    done
    echo "$body"
}
body=$(get http://127.0.0.1:8080/)
[ "$body" = hello-guest ] || fail "curl through the forward: '$body'"
echo "ok: curl 127.0.0.1:8080 -> guest port 8000: $body"
# Connections are independent: several in a row each get an answer.
for i in 1 2 3; do
    [ "$(get http://127.0.0.1:8080/)" = hello-guest ] || fail "request $i"
done
# Nothing listens on the guest port: the host connection ends, it does not hang.
ferry boot --detach --name quiet -p 127.0.0.1:8081:9 >/dev/null
set +e; curl -s --max-time 20 http://127.0.0.1:8081/; rc=$?; set -e
[ "$rc" = 52 ] || [ "$rc" = 56 ] || fail "closed guest port: curl exit $rc (want an empty reply or reset)"
echo "ok: a closed guest port closes the host connection (curl exit $rc)"
ferry stop quiet && ferry rm quiet

echo "== a taken host port fails the boot before the VM starts"
expect_code BOOT_PORT_FORWARD_IN_USE ferry boot --detach --name web2 -p 8080:80
echo "$out"
echo "$out" | grep -q "ferry VM web" || fail "the holder is not named: $out"
echo "$out" | grep -q "hint:" || fail "no hint: $out"
python3 -m http.server 9090 --bind 127.0.0.1 >/dev/null 2>&1 &
http_pid=$!
for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:9090/ && break; sleep 0.1; done
expect_code BOOT_PORT_FORWARD_IN_USE ferry boot --detach --name web3 -p 9090:80
echo "$out"
echo "$out" | grep -q "another process" || fail "not blamed on another process: $out"
kill $http_pid
expect_code BOOT_PORT_FORWARD_INVALID ferry boot --detach --name web4 -p 8080
[ "$(ferry ls --json | jq length)" = 1 ] || fail "failed boots left VMs behind: $(ferry ls)"

echo "== stopping the VM frees its port"
ferry stop web
ferry rm web
ferry boot --detach --name web -p 8080:8000 >/dev/null
ferry stop web && ferry rm web

echo "== outbound network through passt"
ferry boot --detach --name out --net >/dev/null
pgrep -a passt || fail "no passt process; vmm.log: $(cat "$(ferry ls --json | jq -r '.[0].dir')/vmm.log")"
ferry exec out -- ip -4 addr show eth0
ferry exec out -- ip route
ferry exec out -- cat /etc/resolv.conf
# The mirror this test host's apt uses, read at run time.
mirror=$(grep -rhoE 'https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -v security | head -1 || true)
[ -n "$mirror" ] || fail "no mirror in this host's apt sources"
host=$(echo "$mirror" | sed -E 's#^https?://([^/:]+).*#\1#')
echo "mirror: $mirror (host $host)"
if ! echo "$host" | grep -qE '^[0-9.]+$'; then
    ferry exec out -- getent hosts "$host" || fail "DNS lookup of $host in the guest"
fi
status=$(ferry exec out -- curl -sSI --max-time 60 "${mirror%/}/dists/bookworm/Release" | head -1 | tr -d '\r')
echo "guest: HEAD ${mirror%/}/dists/bookworm/Release -> $status"
echo "$status" | grep -qE '^HTTP/[0-9.]+ 200' || fail "HTTP from the guest: $status"
echo "guest apt sources:"; ferry exec out -- sh -c 'cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true'
ferry exec out -- apt-get update || fail "apt-get update in the guest"
echo "ok: apt-get update in the guest"

echo "== passt ends with the VM"
ferry stop out
for _ in $(seq 1 50); do pgrep passt >/dev/null || break; sleep 0.1; done
if pgrep passt >/dev/null; then fail "passt outlived its VM"; fi
ferry rm out
echo "PASS"
