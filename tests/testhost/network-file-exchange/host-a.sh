# host-a serves a random file; host-b fetches it by name and sends its own back.
set -euo pipefail
getent hosts host-b
mkdir -p /srv/share && cd /srv/share
head -c 4194304 /dev/urandom > from-a.bin
sha256sum from-a.bin | cut -d' ' -f1 > from-a.sha256
python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 &
# host-b pushes its file to us over a raw TCP stream.
timeout 300 nc -l -N 9000 > from-b.bin
want=$(timeout 60 bash -c 'until curl -fsS http://host-b:8000/from-b.sha256; do sleep 1; done')
have=$(sha256sum from-b.bin | cut -d' ' -f1)
echo "from-b: want $want have $have"
[ "$want" = "$have" ]
# Tell host-b we are done so it can stop serving.
echo done | nc -N host-b 9001
