#!/bin/bash
# Test host init (PID 1): bring the machine up, run the script, report its exit
# status on the second serial port, power off.
export PATH=/opt/ferry/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^testhost\.$1=//p"; }
name=$(arg name)
index=$(arg index)
count=$(arg count)
hostname "$name"
echo "$name" >/etc/hostname

modprobe -a kvm_amd virtio_net vhost_vsock tun 2>/dev/null

# As `ferry install` leaves a host: guest memory (a memfd that asks for them)
# gets 2 MiB pages, so a guest's first touches are not one nested fault per page.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled

# Network: the user-mode NIC reaches the outside (package mirror), the second NIC
# is the private link between test hosts.
ip link set lo up
for dev in /sys/class/net/*; do
    ifname=${dev##*/}
    case "$(cat "$dev/address")" in
    52:54:00:12:00:*)
        ip link set "$ifname" up
        ip addr add 10.0.2.15/24 dev "$ifname"
        ip route add default via 10.0.2.2
        ;;
    52:54:00:77:00:*)
        ip link set "$ifname" up
        ip addr add "10.77.0.$index/24" dev "$ifname"
        ;;
    esac
done
echo "nameserver 10.0.2.3" >/etc/resolv.conf
{
    echo "127.0.0.1 localhost"
    echo "10.77.0.$index $name"
    for i in $(seq 1 "$count"); do
        [ "$i" = "$index" ] && continue
        echo "10.77.0.$i host-$(printf "\\x$(printf %x $((96 + i)))")"
    done
} >/etc/hosts

disk() {
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${d##*/}"
    done
}
mkdir -p /root/.cache/ferry /opt/ferry
mount "$(disk ferry-assets)" /root/.cache/ferry
mount "$(disk ferry-payload)" /opt/ferry

# @ferry/runtime, installed globally as `npm install -g` would; /node_modules
# makes it importable (ESM too) from a script anywhere on the disk.
if [ -f /opt/ferry/node/ferry-runtime.tgz ]; then
    mkdir -p /usr/lib/node_modules/@ferry/runtime
    tar -xzf /opt/ferry/node/ferry-runtime.tgz --strip-components=1 -C /usr/lib/node_modules/@ferry/runtime
    ln -sfn /usr/lib/node_modules /node_modules
fi

# The ferry Python package, installed as pip would (a wheel is a zip laid
# out for site-packages), so `import ferry` works from any script.
for wheel in /opt/ferry/python/*.whl; do
    [ -f "$wheel" ] || continue
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    mkdir -p "$site"
    python3 -m zipfile -e "$wheel" "$site"
done

echo "testhost: $name up in $(cut -d' ' -f1 /proc/uptime)s" >/dev/ttyS0
cd /root
bash /opt/ferry/script.sh </dev/null >/dev/ttyS0 2>&1
rc=$?
echo "$rc" >/dev/ttyS1
sync
busybox poweroff -f
