# A test host has /dev/kvm backed by kvm_amd, the expected userland, and ferry.
set -euo pipefail

test -c /dev/kvm
grep -q '^kvm_amd ' /proc/modules
grep -qw svm /proc/cpuinfo
for tool in bash curl nc python3 ip qemu-system-x86_64 ferry ferry-agent; do
    command -v "$tool" >/dev/null || { echo "missing $tool"; exit 1; }
done
nc -h 2>&1 | grep -qi openbsd

# KVM answers its API: version 12, and a VM can be created.
python3 - <<'PY'
import fcntl, os
KVM_GET_API_VERSION, KVM_CREATE_VM = 0xAE00, 0xAE01
fd = os.open("/dev/kvm", os.O_RDWR)
assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
assert vm >= 0
print("kvm api 12, vm fd", vm)
PY

# ferry's assets are installed and warm: a second install must not rebuild.
start=$(date +%s%N)
ferry install
elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
echo "warm ferry install took ${elapsed} ms"
[ "$elapsed" -lt 10000 ]
# Outbound access to the package mirror.
apt-get update -q >/dev/null
echo "userland ok"
