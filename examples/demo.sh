# The main job, run inside a test host: boot a microVM with ferry's guest kernel
# and base rootfs, and run a command in it.
set -euo pipefail
kernel=$(ferry install --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernel"]["vmlinux"])')
rootfs=$(ferry install --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["ext4"])')
qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu host,pmu=off -m 512 \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con -serial chardev:con -kernel "$kernel" \
    -append "console=ttyS0 quiet panic=-1 reboot=t root=/dev/vda ro init=/bin/sh -c \"uname -a; cat /etc/os-release\"" \
    -drive id=root,file="$rootfs",format=raw,if=none,snapshot=on \
    -device virtio-blk-device,drive=root </dev/null
