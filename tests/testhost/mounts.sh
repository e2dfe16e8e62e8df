# Host directories in VMs: --mount copies (read-write and :ro), --live-mount
# through virtio-fs (rw and :ro), containment of the guest inside the shared
# directory, and live mounts across snapshot, restore (moved host dir with
# --remap-mount) and fork.
# timeout: 600
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
expect_code() {
    local code=$1; shift
    local out
    if out=$(timeout 120 "$@" 2>&1); then fail "expected $code from: $*"; fi
    echo "$out" | grep -q "error\[$code\]" || fail "expected $code from: $* ; got: $out"
    echo "ok: $code"
}
# Runs a guest command that must fail.
must_fail() {
    local vm=$1; shift
    if ferry exec "$vm" -- sh -c "$*" >/tmp/must_fail.out 2>&1; then
        cat /tmp/must_fail.out
        fail "succeeded in the guest: $*"
    fi
    echo "ok: refused: $* ($(head -c 120 /tmp/must_fail.out | tr '\n' ' '))"
}
g() { local vm=$1; shift; ferry exec "$vm" -- sh -c "$*"; }

secret="host-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "$secret" > /etc/ferry-host-secret
chmod 600 /etc/ferry-host-secret

mkdir -p /srv/copy/sub /srv/live /srv/ro
echo copied > /srv/copy/a.txt
echo deep > /srv/copy/sub/b.txt
echo single > /srv/single.txt
echo from-host > /srv/live/host.txt
echo readonly > /srv/ro/r.txt

echo "== a missing source fails before anything starts"
expect_code BOOT_MOUNT_SOURCE_MISSING ferry boot --detach --name bad --mount /nonexistent:/x
expect_code BOOT_MOUNT_SOURCE_MISSING ferry boot --detach --name bad --live-mount /nonexistent:/x
expect_code BOOT_MOUNT_INVALID ferry boot --detach --name bad --mount /srv/copy:relative
[ "$(ferry ls --json | jq length)" = 0 ] || fail "failed boots must leave nothing"

echo "== --mount copies into the disk"
ferry boot --detach --name m1 --mount /srv/copy:/opt/copy \
    --mount /srv/copy:/opt/rocopy:ro --mount /srv/single.txt:/etc/single.txt >/dev/null
[ "$(g m1 cat /opt/copy/a.txt)" = copied ] || fail "copied file"
[ "$(g m1 cat /opt/copy/sub/b.txt)" = deep ] || fail "copied subdirectory"
[ "$(g m1 cat /etc/single.txt)" = single ] || fail "copied single file"
[ "$(g m1 cat /opt/rocopy/sub/b.txt)" = deep ] || fail "read-only copy readable"
g m1 'echo guest > /opt/copy/new.txt && cat /opt/copy/new.txt' >/dev/null || fail "rw copy writable"
[ ! -e /srv/copy/new.txt ] || fail "a copy must not write back to the host"
must_fail m1 'echo x > /opt/rocopy/a.txt'
must_fail m1 'touch /opt/rocopy/new'
must_fail m1 'rm /opt/rocopy/sub/b.txt'
ferry stop m1 && ferry rm m1

echo "== --live-mount rw: both directions"
ferry boot --detach --name l1 --live-mount /srv/live:/mnt/live --live-mount /srv/ro:/mnt/ro:ro >/dev/null
g l1 'mount | grep virtiofs'
[ "$(g l1 cat /mnt/live/host.txt)" = from-host ] || fail "host file in guest"
g l1 'echo from-guest > /mnt/live/guest.txt'
[ "$(cat /srv/live/guest.txt)" = from-guest ] || fail "guest write on host"
echo changed-on-host > /srv/live/host.txt
echo brand-new > /srv/live/new.txt
sleep 2
[ "$(g l1 cat /mnt/live/host.txt)" = changed-on-host ] || fail "host change in guest"
[ "$(g l1 cat /mnt/live/new.txt)" = brand-new ] || fail "host-created file in guest"
g l1 'ls -la /mnt/live'
# Tree copies, renames, links, an in-place edit, removals.
g l1 'cp -r /etc/apt /mnt/live/apt && mv /mnt/live/apt /mnt/live/apt2 && mkdir -p /mnt/live/d/e && echo 1 > /mnt/live/d/e/f && ln -s d/e/f /mnt/live/link && ln /mnt/live/d/e/f /mnt/live/hard && cat /mnt/live/link && stat -c %h /mnt/live/d/e/f && sed -i s/from-guest/edited/ /mnt/live/guest.txt && chmod 750 /mnt/live/d && truncate -s 3 /mnt/live/new.txt && rm -r /mnt/live/apt2/apt.conf.d' > /tmp/ops.out
[ "$(cat /tmp/ops.out)" = "$(printf '1\n2')" ] || fail "link ops: $(cat /tmp/ops.out)"
[ -d /srv/live/apt2 ] && [ ! -e /srv/live/apt2/apt.conf.d ] || fail "cp -r / mv / rm -r on host"
[ "$(readlink /srv/live/link)" = d/e/f ] || fail "guest symlink on host"
[ "$(cat /srv/live/guest.txt)" = edited ] || fail "sed -i on host"
[ "$(stat -c %a /srv/live/d)" = 750 ] || fail "chmod on host"
[ "$(stat -c %s /srv/live/new.txt)" = 3 ] || fail "truncate on host"
# Larger files both ways.
head -c 8388608 /dev/urandom > /srv/live/big.host
[ "$(g l1 sha256sum /mnt/live/big.host | cut -d' ' -f1)" = "$(sha256sum /srv/live/big.host | cut -d' ' -f1)" ] || fail "8 MiB read"
g l1 'head -c 8388608 /dev/urandom > /mnt/live/big.guest && sync'
[ "$(g l1 sha256sum /mnt/live/big.guest | cut -d' ' -f1)" = "$(sha256sum /srv/live/big.guest | cut -d' ' -f1)" ] || fail "8 MiB write"
g l1 'ls /mnt/live | wc -l; df -h /mnt/live | tail -1'
must_fail l1 'mknod /mnt/live/null c 1 3'

echo "== --live-mount :ro refuses writes"
[ "$(g l1 cat /mnt/ro/r.txt)" = readonly ] || fail "ro live readable"
must_fail l1 'echo x > /mnt/ro/r.txt'
must_fail l1 'touch /mnt/ro/new'
must_fail l1 'rm /mnt/ro/r.txt'
# Even with the guest's mount made writable, the device refuses.
g l1 'mount -o remount,rw /mnt/ro' || true
g l1 'grep " /mnt/ro " /proc/mounts'
g l1 'grep " /mnt/ro " /proc/mounts' | grep -q ' rw,' || fail "the guest remount to rw must succeed so the device is what refuses"
must_fail l1 'echo x > /mnt/ro/r.txt'
must_fail l1 'mkdir /mnt/ro/dir'
[ "$(cat /srv/ro/r.txt)" = readonly ] && [ "$(ls /srv/ro)" = r.txt ] || fail "ro share changed on the host"

echo "== escapes stay inside the guest"
ln -s / /srv/live/root
ln -s /etc/passwd /srv/live/passwd
ln -s /etc/ferry-host-secret /srv/live/secret
ln -s ../../../../../../etc/ferry-host-secret /srv/live/relsecret
sleep 1
for p in /mnt/live/root/etc/ferry-host-secret /mnt/live/secret /mnt/live/relsecret \
         /mnt/live/../../etc/ferry-host-secret; do
    must_fail l1 "cat $p"
done
# What these names reach is the guest's own files, never the host's.
g l1 'echo guest-only > /etc/ferry-guest-marker'
[ "$(g l1 cat /mnt/live/root/etc/ferry-guest-marker)" = guest-only ] || fail "/mnt/live/root is the guest's /"
[ "$(g l1 cat /mnt/live/../../etc/ferry-guest-marker)" = guest-only ] || fail ".. resolves in the guest"
[ "$(g l1 sha256sum /mnt/live/passwd | cut -d' ' -f1)" = "$(g l1 sha256sum /etc/passwd | cut -d' ' -f1)" ] || fail "passwd link is the guest's"
if g l1 "cat /mnt/live/root/etc/shadow /mnt/live/passwd /mnt/live/root/etc/hostname" | grep -q "$secret"; then
    fail "host secret visible"
fi
g l1 "grep -r $secret /mnt/live 2>/dev/null" && fail "host secret under the mount"
echo "ok: no host file reachable"

echo "== live mount across snapshot and restore"
g l1 'setsid sh -c "exec 3>>/mnt/live/held; i=0; while :; do i=\$((i+1)); echo \$i >&3; echo \$i >> /mnt/live/ticks; sleep 0.3; done" </dev/null >/dev/null 2>&1 &'
sleep 2
g l1 'cd /mnt/live/d/e && sleep 0.1 && cat f' >/dev/null
ferry snapshot l1 /root/l1.snap
held_before=$(wc -l < /srv/live/held)
# A bundle's live mounts are granted only when the user repeats them.
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore /root/l1.snap --detach
[ "$(ferry ls --json | jq length)" = 0 ] || fail "an unconfirmed restore leaves nothing"
ferry restore /root/l1.snap --detach --live-mount /srv/live --live-mount /srv/ro:/mnt/ro:ro >/dev/null
sleep 3
held_after=$(wc -l < /srv/live/held)
echo "held lines: $held_before before restore, $held_after after"
[ "$held_after" -gt "$held_before" ] || fail "a file kept open across the restore must keep receiving writes"
[ "$(tail -1 /srv/live/ticks)" -gt "$held_before" ] || fail "ticks continue"
[ "$(g l1 cat /mnt/live/host.txt)" = changed-on-host ] || fail "read after restore"
g l1 'echo after-restore > /mnt/live/after.txt'
[ "$(cat /srv/live/after.txt)" = after-restore ] || fail "write after restore"
[ "$(g l1 cat /mnt/live/d/e/f)" = 1 ] || fail "cached path after restore"
must_fail l1 'echo x > /mnt/ro/r.txt'

echo "== restore with the host directory moved"
ferry snapshot l1 /root/l1b.snap
mv /srv/live /srv/live-moved
out=$(ferry restore /root/l1b.snap --detach --live-mount /srv/live --live-mount /srv/ro 2>&1) && fail "restore must fail: $out"
echo "$out"
echo "$out" | grep -q 'error\[RESTORE_MOUNT_SOURCE_MISSING\]' || fail "code"
echo "$out" | grep -q '/srv/live' || fail "the message names the path"
[ "$(ferry ls --json | jq length)" = 0 ] || fail "a failed restore leaves nothing"
expect_code RESTORE_REMAP_INVALID ferry restore /root/l1b.snap --detach --live-mount /srv/ro --live-mount /srv/live --remap-mount /not/recorded=/srv/live-moved
# A remap confirms the mount it moves; the other one is repeated.
ferry restore /root/l1b.snap --detach --live-mount /srv/ro --remap-mount /srv/live=/srv/live-moved >/dev/null
[ "$(g l1 cat /mnt/live/host.txt)" = changed-on-host ] || fail "remapped read"
g l1 'echo remapped > /mnt/live/remapped.txt'
[ "$(cat /srv/live-moved/remapped.txt)" = remapped ] || fail "remapped write"
n1=$(wc -l < /srv/live-moved/held); sleep 2; n2=$(wc -l < /srv/live-moved/held)
[ "$n2" -gt "$n1" ] || fail "open file continues in the remapped directory"

echo "== forks share the live mount's host directory"
ferry fork l1 --new-name l2 --detach >/dev/null
g l2 'echo from-fork > /mnt/live/fork.txt'
[ "$(cat /srv/live-moved/fork.txt)" = from-fork ] || fail "fork write on host"
sleep 2
[ "$(g l1 cat /mnt/live/fork.txt)" = from-fork ] || fail "source sees the fork's write"

for vm in l2 l1; do ferry stop $vm; ferry rm $vm; done
rm -f /etc/ferry-host-secret
echo "all mount tests passed"
