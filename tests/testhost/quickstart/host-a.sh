# The README's quickstart, end to end: bake the counter server with nodejs from
# apt inside a VM, boot it with a port forward, count, freeze it and send it to
# host-b over the network.
# timeout: 1200
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/counter && cd /root/counter
cat > server.js <<'JS'
const http = require("http");
let count = 0;
http.createServer((req, res) => { count += 1; res.end(`${count}\n`); })
  .listen(3000, "127.0.0.1", () => console.log("counter listening on 3000"));
JS
ferry bake -o counter.tar.gz --copy server.js:/app/server.js \
    --run 'apt-get update && apt-get install -y --no-install-recommends nodejs' \
    --workdir /app --cmd node /app/server.js
ferry boot --detach --name counter -p 3000:3000 counter.tar.gz
# Ready when the server says so on the console (a probe request would count).
timeout 120 bash -c 'until ferry logs counter | grep -q "counter listening"; do sleep 0.5; done'
[ "$(curl -fsS 127.0.0.1:3000)" = 1 ] || fail "first hit"
[ "$(curl -fsS 127.0.0.1:3000)" = 2 ] || fail "second hit"
echo "count is 2 on host-a"
ferry snapshot counter - | nc -N host-b 9000
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the frozen VM must be gone"
timeout 900 nc -l 9001 | grep -q quickstart-done || fail "host-b did not finish"
