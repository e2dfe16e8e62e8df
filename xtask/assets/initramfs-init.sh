#!/bin/busybox sh
# Test host early init: load the virtio modules the root disk needs, find the
# disk by its serial, and switch into it.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Dependencies among these few modules are resolved by retrying passes.
for pass in 1 2 3; do
    for m in $(cat /modules.order); do
        grep -q "^${m%.ko} " /proc/modules || insmod "/modules/$m" 2>/dev/null
    done
done
root=
for _ in $(seq 1 200); do
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = testhost-root ] && root=/dev/${d##*/}
    done
    [ -n "$root" ] && break
    sleep 0.05
done
if [ -z "$root" ] || ! mount -t ext4 "$root" /newroot; then
    echo "testhost: root disk not found" >/dev/console
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/ferry-testhost-init
