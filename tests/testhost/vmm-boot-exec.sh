# ferry's own VMM: boot, exec (output, exit codes, stdin, env, cwd, pty), cp of a
# 20 MB file both ways, 2 vCPUs, 8 parallel execs, many execs over one session,
# detached lifecycle, clear errors on a stopped VM, and guest shutdown ending the VM.
# timeout: 300
set -euo pipefail

ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
# expect_code CODE CMD...: CMD must fail and print error[CODE].
expect_code() {
    local code=$1; shift
    local out
    if out=$("$@" 2>&1); then fail "expected $code from: $*"; fi
    echo "$out" | grep -q "error\[$code\]" || fail "expected $code from: $* ; got: $out"
    echo "ok: $* -> $code"
}

echo "== attached boot runs a command and propagates its status"
t0=$(ms)
out=$(ferry boot -- cat /etc/debian_version)
echo "attached boot + command + teardown: $(( $(ms) - t0 )) ms"
[ "$out" = "$(debugfs -R 'cat /etc/debian_version' "$(ferry install --json | jq -r .rootfs.ext4)" 2>/dev/null)" ] || fail "debian_version: $out"
set +e; ferry boot -- sh -c 'exit 3'; rc=$?; set -e
[ "$rc" = 3 ] || fail "attached boot exit status $rc"
[ "$(ferry ls --json | jq length)" = 0 ] || fail "attached boots must not leave VMs behind"

echo "== detached boot, time to first exec reply"
t0=$(ms)
ferry boot --detach --name t1 --cpus 2 --memory 512 >/dev/null
first=$(ferry exec t1 -- echo ready)
t1=$(ms)
[ "$first" = ready ] || fail "first exec: $first"
echo "METRIC boot_to_first_exec_ms=$(( t1 - t0 ))"
ferry ls
ferry ls --json | jq -e '.[] | select(.name == "t1" and .status.state == "running")' >/dev/null

echo "== exit codes, signals, separate streams"
set +e
ferry exec t1 -- sh -c 'echo to-out; echo to-err >&2; exit 7' >/tmp/out 2>/tmp/err; rc=$?
set -e
[ "$rc" = 7 ] || fail "exit code $rc"
[ "$(cat /tmp/out)" = to-out ] || fail "stdout: $(cat /tmp/out)"
[ "$(cat /tmp/err)" = to-err ] || fail "stderr: $(cat /tmp/err)"
set +e; ferry exec t1 -- sh -c 'kill -9 $$'; rc=$?; set -e
[ "$rc" = 137 ] || fail "signal exit $rc"
set +e; ferry exec t1 -- /no/such/program 2>/tmp/err; rc=$?; set -e
[ "$rc" = 127 ] && grep -q EXEC_NOT_FOUND /tmp/err || fail "missing program: rc=$rc $(cat /tmp/err)"

echo "== stdin round trip"
[ "$(echo hello | ferry exec -i t1 -- cat)" = hello ] || fail "stdin echo"
head -c 3000000 /dev/urandom > /tmp/stdin.bin
want=$(sha256sum < /tmp/stdin.bin | cut -d' ' -f1)
have=$(ferry exec -i t1 -- sha256sum < /tmp/stdin.bin | cut -d' ' -f1)
[ "$want" = "$have" ] || fail "3 MB through stdin: $want vs $have"

echo "== env, cwd, user, pty"
[ "$(ferry exec -e FOO=bar -e N=1 -w /tmp t1 -- sh -c 'echo $FOO$N $(pwd)')" = "bar1 /tmp" ] || fail "env/cwd"
[ "$(ferry exec -u nobody t1 -- id -un)" = nobody ] || fail "user"
ferry exec -t t1 -- tty | grep -q '^/dev/pts/' || fail "pty"

echo "== 20 MB file in and out"
head -c 20971520 /dev/urandom > /tmp/big.bin
ferry cp /tmp/big.bin t1:/root/big.bin
[ "$(ferry exec t1 -- sha256sum /root/big.bin | cut -d' ' -f1)" = "$(sha256sum < /tmp/big.bin | cut -d' ' -f1)" ] || fail "copy in"
ferry cp t1:/root/big.bin /tmp/back.bin
cmp /tmp/big.bin /tmp/back.bin || fail "copy out"

echo "== 2 vCPUs"
[ "$(ferry exec t1 -- nproc)" = 2 ] || fail "nproc"

echo "== 8 parallel execs"
for i in $(seq 1 8); do ferry exec t1 -- sh -c "sleep 1; echo par-$i" > /tmp/par-$i & done
wait
for i in $(seq 1 8); do [ "$(cat /tmp/par-$i)" = "par-$i" ] || fail "parallel exec $i"; done

echo "== many execs over one session (the Rust API's Session, via bench-rtt)"
rtt=$(ferry bench-rtt t1 --count 50)
echo "$rtt"
jq -e '.count == 50 and .echo_rtt == null
    and .exec_rtt > 0 and .exec_rtt < 5
    and .ping_rtt > 0 and .ping_rtt <= .exec_rtt
    and .user_exec_rtt > 0 and .new_connection_exec_rtt > 0' <<<"$rtt" >/dev/null || fail "bench-rtt: $rtt"
echo "METRIC session_exec_rtt_us=$(jq '.exec_rtt * 1e6 | floor' <<<"$rtt") session_ping_rtt_us=$(jq '.ping_rtt * 1e6 | floor' <<<"$rtt")"
# The session's connection stays usable for one-shot commands beside it.
[ "$(ferry exec t1 -- echo after)" = after ] || fail "exec after the session"

echo "== VMM memory beside guest RAM"
pid=$(ferry ls --json | jq -r '.[] | select(.name=="t1") | .status.pid')
grep -E 'VmRSS|RssAnon|RssFile|RssShmem' /proc/$pid/status
echo "METRIC vmm_rss_anon_kib=$(awk '/RssAnon/{print $2}' /proc/$pid/status) guest_ram_mib=512"

echo "== logs, name uniqueness, stop, errors on a stopped VM"
ferry logs t1 | grep -q FERRY-AGENT-READY || fail "console log"
expect_code VM_NAME_TAKEN ferry boot --detach --name t1
ferry stop t1
ferry ls --json | jq -e '.[] | select(.name == "t1" and .status.state == "stopped")' >/dev/null
expect_code VM_NOT_RUNNING ferry exec t1 -- true
expect_code VM_NOT_RUNNING ferry cp /tmp/big.bin t1:/root/x
expect_code VM_NOT_FOUND ferry exec nosuchvm -- true
ferry rm t1
[ "$(ferry ls --json | jq length)" = 0 ] || fail "rm"

echo "== guest shutdown ends the VM"
ferry boot --detach --name p1 -- sh -c 'sleep 1' >/dev/null
for _ in $(seq 1 100); do
    ferry ls --json | jq -e '.[] | select(.name=="p1" and .status.state=="stopped")' >/dev/null && break
    sleep 0.2
done
ferry ls --json | jq -e '.[] | select(.name=="p1" and .status.state=="stopped")' >/dev/null || fail "main command exit did not end the VM"
ferry logs p1 | grep -q 'FERRY-MAIN-EXIT code=0' || fail "main exit not logged"
ferry rm p1
ferry boot --detach --name p2 >/dev/null
# reboot(2) from inside the guest (no init system in the base image).
ferry exec p2 -- perl -e 'syscall(169, 0xfee1dead, 672274793, 0x1234567)' || true
for _ in $(seq 1 50); do
    ferry ls --json | jq -e '.[] | select(.name=="p2" and .status.state=="stopped")' >/dev/null && break
    sleep 0.2
done
ferry ls --json | jq -e '.[] | select(.name=="p2" and .status.state=="stopped")' >/dev/null || fail "guest reboot did not end the VM"
ferry rm p2

echo "== a dead VMM is detected"
ferry boot --detach --name k1 >/dev/null
pid=$(ferry ls --json | jq -r '.[] | select(.name=="k1") | .status.pid')
kill -9 "$pid"; sleep 0.5
ferry ls --json | jq -e '.[] | select(.name=="k1" and .status.state=="stopped" and .status.reason=="lost")' >/dev/null || fail "lost VMM"
expect_code VM_NOT_RUNNING ferry exec k1 -- true
ferry rm k1
echo "all vmm tests passed"
