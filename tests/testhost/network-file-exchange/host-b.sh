# host-b fetches host-a's file by name over HTTP, then pushes its own with nc.
set -euo pipefail
getent hosts host-a
mkdir -p /srv/share && cd /srv/share
head -c 4194304 /dev/urandom > from-b.bin
sha256sum from-b.bin | cut -d' ' -f1 > from-b.sha256
python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 &
timeout 120 bash -c 'until curl -fsS -o from-a.bin http://host-a:8000/from-a.bin; do sleep 1; done'
want=$(curl -fsS http://host-a:8000/from-a.sha256)
have=$(sha256sum from-a.bin | cut -d' ' -f1)
echo "from-a: want $want have $have"
[ "$want" = "$have" ]
timeout 120 bash -c 'until nc -N -w 5 host-a 9000 < from-b.bin; do sleep 1; done'
timeout 300 nc -l 9001 | grep -q done
