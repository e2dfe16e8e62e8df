# Fork a running VM: both continue from the same instant and then diverge, with
# their own RNG state and disks; the source pauses only briefly.
# timeout: 300
set -euo pipefail
ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
start_counter() {
    ferry exec "$1" -- sh -c 'setsid sh -c "i=0; echo \$\$ > /run/counter.pid; trap \"i=\\\$((i+1)); echo \\\$i > /run/count\" USR1; while :; do sleep 0.05; done" </dev/null >/dev/null 2>&1 &'
    sleep 1
}
next() { ferry exec "$1" -- sh -c 'kill -USR1 $(cat /run/counter.pid); sleep 0.3; cat /run/count'; }

ferry boot --detach --name src --memory 512 >/dev/null
start_counter src
[ "$(next src)" = 1 ] || fail "counter"
ferry exec src -- sh -c 'echo shared > /root/before-fork.txt; sync'

echo "== (c) fork: same next value, then independent"
t0=$(ms)
ferry fork src --new-name kid --detach > /tmp/fork.out
first=$(ferry exec kid -- echo up)
echo "METRIC fork_to_first_exec_ms=$(( $(ms) - t0 ))"
cat /tmp/fork.out
[ "$first" = up ] || fail "fork first exec"
a=$(next src); b=$(next kid)
[ "$a" = 2 ] && [ "$b" = 2 ] || fail "both must answer 2: src=$a kid=$b"
a=$(next src); a=$(next src); b=$(next kid)
[ "$a" = 4 ] && [ "$b" = 3 ] || fail "independent counting: src=$a kid=$b"

echo "== (d) different random bytes"
ra=$(ferry exec src -- sh -c 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"')
rb=$(ferry exec kid -- sh -c 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"')
[ "$ra" != "$rb" ] || fail "forks produced the same random bytes"

echo "== (f) disk writes isolated"
[ "$(ferry exec kid -- cat /root/before-fork.txt)" = shared ] || fail "fork lost the disk"
ferry exec src -- sh -c 'echo from-src > /root/mine.txt; sync'
ferry exec kid -- sh -c 'echo from-kid > /root/mine.txt; sync'
[ "$(ferry exec src -- cat /root/mine.txt)" = from-src ] || fail "src sees kid's write"
[ "$(ferry exec kid -- cat /root/mine.txt)" = from-kid ] || fail "kid sees src's write"

echo "== forks of forks, and the hostname/identity"
ferry fork kid --new-name grandkid --detach >/dev/null
[ "$(next grandkid)" = 4 ] || fail "grandkid counter"
[ "$(ferry exec grandkid -- hostname)" = grandkid ] || fail "fork hostname"
for vm in grandkid kid src; do ferry stop $vm; ferry rm $vm; done
echo "all fork tests passed"
