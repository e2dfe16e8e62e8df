# Hand-off: host-a freezes a VM with a running counter and sends the bundle to
# host-b over the network; host-b thaws it and the counter continues.
# timeout: 600
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
ferry boot --detach --name counter --memory 512 >/dev/null
ferry exec counter -- sh -c 'setsid sh -c "i=0; echo \$\$ > /run/counter.pid; trap \"i=\\\$((i+1)); echo \\\$i > /run/count\" USR1; while :; do sleep 0.05; done" </dev/null >/dev/null 2>&1 &'
sleep 1
for want in 1 2; do
    got=$(ferry exec counter -- sh -c 'kill -USR1 $(cat /run/counter.pid); sleep 0.3; cat /run/count')
    [ "$got" = "$want" ] || fail "counter $got"
done
# Stream the bundle straight into the network: no file on this host.
ferry snapshot counter - | nc -N host-b 9000
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the source must be gone after a hand-off"
echo "bundle sent"
timeout 300 nc -l 9001 | grep -q continued || fail "host-b did not confirm"
