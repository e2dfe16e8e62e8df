# QEMU's microvm machine boots ferry's guest kernel (vmlinux, PVH entry) with the
# base rootfs on a virtio disk and prints /etc/debian_version. This proves the
# assets independently of ferry's own VMM and keeps QEMU ready as the benchmark peer.
set -euo pipefail

kernel=$(ferry install --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernel"]["vmlinux"])')
rootfs=$(ferry install --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["ext4"])')
expected=$(debugfs -R 'cat /etc/debian_version' "$rootfs" 2>/dev/null)
echo "expecting debian_version $expected"

start=$(date +%s%N)
out=$(timeout 120 qemu-system-x86_64 \
    -M microvm,acpi=off -enable-kvm -cpu host,pmu=off -m 512 -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con -serial chardev:con \
    -kernel "$kernel" \
    -append "console=ttyS0 quiet panic=-1 reboot=t root=/dev/vda ro init=/bin/sh -c \"echo BOOTED; cat /etc/debian_version\"" \
    -drive id=root,file="$rootfs",format=raw,if=none,snapshot=on \
    -device virtio-blk-device,drive=root </dev/null | tr -d '\r')
end=$(date +%s%N)
echo "$out"
booted=$(echo "$out" | grep -c '^BOOTED$' || true)
[ "$booted" = 1 ] || { echo "guest init never ran"; exit 1; }
echo "$out" | grep -qx "$expected" || { echo "debian_version not printed"; exit 1; }
echo "qemu microvm: process start to guest exit $(( (end - start) / 1000000 )) ms"
