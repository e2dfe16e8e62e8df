# host-b receives the bundle over the network and restores it.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
# Restore straight from the network stream.
timeout 300 nc -l 9000 | ferry restore - --detach
got=$(ferry exec counter -- sh -c 'kill -USR1 $(cat /run/counter.pid); sleep 0.3; cat /run/count')
[ "$got" = 3 ] || fail "counter continued at $got, wanted 3"
echo "counter continued at $got on $(hostname)"
timeout 60 bash -c 'until echo continued | nc -N host-a 9001; do sleep 1; done'
