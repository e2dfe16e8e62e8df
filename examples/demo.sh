# The main job, run inside a test host: boot a microVM with ferry and run a
# command in it, then keep one running and talk to it.
set -euo pipefail
ferry boot -- sh -c 'echo "hello from $(hostname): $(uname -sr), Debian $(cat /etc/debian_version)"'
ferry boot --detach --name demo --cpus 2
ferry exec demo -- sh -c 'nproc; free -m | head -2'
ferry ls
ferry stop demo
ferry rm demo
