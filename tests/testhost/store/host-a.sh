# Fleet storage against a real S3 server (Garage, on this host): a running
# VM is pushed, restored lazily from the store on host-b (its counter goes
# on there), pushed again after 10 MiB changed in the guest (the upload is
# about those bytes), host-b runs both pushes at once within a small chunk
# cache, and a damaged chunk or a server that stops in the middle fails the
# restore with its code and leaves no VM.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
code_of() { sed -n 's/.*error\[\([A-Z_]*\)\].*/\1/p' | head -1; }
say() { timeout 120 bash -c "until printf '%s\n' '$1' | nc -N host-b 9200; do sleep 1; done"; }
hear() { timeout 600 nc -l 9201; }

s3-server start
. /tmp/s3.env
STORE=s3://ferry/vms
cd /root

# A counter that lives in bash's memory: it goes on only if the memory does.
ferry boot --detach --name counter --memory 512 -- \
    bash -c 'n=0; while :; do n=$((n+1)); echo $n > /dev/shm/count; sleep 0.2; done' >/dev/null
timeout 60 bash -c 'until ferry exec counter -- cat /dev/shm/count >/dev/null 2>&1; do sleep 0.5; done'

# Files on the guest's disk, written and read with O_DIRECT so they never
# enter its page cache (nor leave freed pages behind, which would scatter
# the second push's 10 MiB): the restored guest reads them from its disk,
# one at once, one not until later.
ferry exec counter -- sh -c '
    head -c 8388608 /dev/urandom | dd of=/root/on-disk bs=1M iflag=fullblock oflag=direct status=none
    head -c 4194304 /dev/urandom | dd of=/root/cold bs=1M iflag=fullblock oflag=direct status=none'
disk_sha=$(ferry exec counter -- sh -c '{ dd if=/root/on-disk bs=1M iflag=direct status=none
    dd if=/root/cold bs=1M iflag=direct status=none; } | sha256sum' | cut -d' ' -f1)

echo "== push"
# Read before the push: the pushed VM's counter is at least this.
at_push=$(ferry exec counter -- cat /dev/shm/count)
ferry push counter "$STORE" --json > push1.json
cat push1.json
url=$(jq -r .report.url push1.json)
[ "$(jq .report.uploaded_chunks push1.json)" = "$(jq .report.chunks push1.json)" ] ||
    fail "a first push into an empty store uploads every chunk"
ferry ls | grep -q counter || fail "push stopped the VM"

echo "== restore on host-b"
say "$(base64 -w0 /tmp/s3.env) $url $at_push $disk_sha"
[ "$(hear)" = ok ] || fail "host-b could not restore the pushed VM"

echo "== a second push after 10 MiB changed sends about those bytes"
ferry exec counter -- sh -c 'head -c 10485760 /dev/urandom > /dev/shm/ten'
ferry push counter "$STORE" --json > push2.json
cat push2.json
sent=$(jq .report.uploaded_bytes push2.json)
changed=10485760
echo "second push: $sent bytes uploaded for $changed changed"
[ "$sent" -le $((changed * 3 / 2)) ] || fail "uploaded $sent bytes, more than 1.5 x the $changed changed"
[ "$sent" -ge "$changed" ] || fail "uploaded $sent bytes: the 10 MiB of new bytes are not all there"
url2=$(jq -r .report.url push2.json)
say "$url2"
[ "$(hear)" = ok ] || fail "host-b: the chunk cache check failed"

echo "== pull-bundle gives a bundle that restores here too"
ferry pull-bundle "$url2" pulled.snap
ferry inspect pulled.snap >/dev/null
ferry restore pulled.snap --name from-file --detach >/dev/null
[ "$(ferry exec from-file -- sha256sum /dev/shm/ten | cut -d' ' -f1)" = \
  "$(ferry exec counter -- sha256sum /dev/shm/ten | cut -d' ' -f1)" ] ||
    fail "the pulled bundle's guest memory differs"
ferry rm -f from-file >/dev/null

# Raw S3 requests, signed with the same key.
s3() {
    curl -sf --aws-sigv4 "aws:amz:${AWS_REGION}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}
endpoint="$AWS_ENDPOINT_URL/ferry/vms"

echo "== a damaged chunk: BUNDLE_CORRUPT, no VM"
digest=${url2##*/}
s3 "$endpoint/manifests/$digest" > manifest.json
# A chunk of the prefetch list: fetched (and checked) before the VM starts.
victim=$(jq -r '.prefetch[0][0] as $p | [.memory[] | select(.at <= $p and $p < .at + .len)][0].sha256' manifest.json)
other=$(jq -r --arg v "$victim" '[.memory[] | select(.sha256 != $v)][0].sha256' manifest.json)
[ -n "$victim" ] && [ "$victim" != null ] || fail "the pushed VM has no prefetch list"
s3 "$endpoint/chunks/$victim" > victim.orig
s3 "$endpoint/chunks/$other" > other.bytes
s3 -X PUT --data-binary @other.bytes "$endpoint/chunks/$victim" >/dev/null
rm -rf ~/.cache/ferry/store
before=$(ferry ls --json | jq length)
if ferry restore "$url2" --name damaged --detach 2> damaged.err; then
    fail "a damaged chunk restored"
fi
cat damaged.err
[ "$(code_of < damaged.err)" = BUNDLE_CORRUPT ] || fail "a damaged chunk is not BUNDLE_CORRUPT"
[ "$(ferry ls --json | jq length)" = "$before" ] || fail "a failed restore left a VM"
ls ~/.local/share/ferry/incoming/ 2>/dev/null | grep -q . && fail "a failed restore left a file: $(ls ~/.local/share/ferry/incoming/)"
[ -e ~/.cache/ferry/store/chunks/"$victim" ] && fail "the damaged chunk was cached"
s3 -X PUT --data-binary @victim.orig "$endpoint/chunks/$victim" >/dev/null

echo "== the server is down: STORE_UNREACHABLE, retryable, no VM"
s3-server stop
if ferry restore "$url2" --name cut --detach 2> cut.err; then fail "a restore went through with its server stopped"; fi
cat cut.err
[ "$(code_of < cut.err)" = STORE_UNREACHABLE ] || fail "a stopped server is not STORE_UNREACHABLE"
grep -q "run the same command again" cut.err || fail "the error does not say to retry"
[ "$(ferry ls --json | jq length)" = "$before" ] || fail "a cut restore left a VM"
ls ~/.local/share/ferry/incoming/ 2>/dev/null | grep -q . && fail "a cut restore left a file"
s3-server start

echo "== the server stops while memory and disk still arrive: the VM waits, then goes on"
rm -rf ~/.cache/ferry/store
# No background fetch: what the guest reads next comes from the store on
# first touch, while the server is away.
FERRY_STORE_BACKGROUND=off ferry restore "$url2" --name again --detach >/dev/null ||
    fail "the retry after the server came back failed"
s3-server stop
jq -e '.all_in_place | not' ~/.local/share/ferry/vms/again/lazy-stats.json >/dev/null 2>&1 ||
    [ ! -e ~/.local/share/ferry/vms/again/lazy-stats.json ] || fail "all memory arrived with no background fetch"
# /root/cold was never read since the push: its disk windows must come now.
ferry exec again -- sh -c 'sha256sum < /dev/shm/ten; sha256sum < /root/cold' > again.sums &
reader=$!
sleep 5
s3-server start
wait "$reader" || fail "the guest's reads failed once the server was back"
grep -q "trying again" ~/.local/share/ferry/vms/again/vmm.log || fail "the VMM never met the stopped server"
[ "$(cat again.sums)" = "$(ferry exec counter -- sh -c 'sha256sum < /dev/shm/ten; sha256sum < /root/cold')" ] ||
    fail "the restored guest's memory or disk differs"
ferry rm -f again >/dev/null

echo "== gc keeps what pushed VMs name"
ferry gc --store "$STORE" --min-age 0 --json > gc.json
cat gc.json
[ "$(jq .store.manifests gc.json)" = 2 ] || fail "gc does not see the two pushes"
ferry pull-bundle "$url" first-again.snap || fail "gc removed a chunk of the first push"
ferry pull-bundle "$url2" second-again.snap || fail "gc removed a chunk of the second push"

echo "== the SDKs restore from and push to the store"
cat > store-node.mjs <<'JS'
import { restore } from '@ferry/runtime';

const vm = await restore({ bundle: process.env.URL, name: 'from-store-js' });
try {
  const r = await vm.exec(['cat', '/dev/shm/count']);
  console.log('count', r.stdout.toString().trim());
  const report = await vm.push(process.env.STORE);
  console.log('uploadedChunks', report.uploadedChunks, 'of', report.chunks);
  if (!report.url.startsWith(process.env.STORE)) throw new Error(`pushed to ${report.url}`);
} finally {
  await vm.remove();
}
JS
URL="$url2" STORE="$STORE" node store-node.mjs || fail "the Node SDK with the store"
cat > store-py.py <<'PY'
import os
import ferry

vm = ferry.restore(os.environ["URL"], name="from-store-py")
try:
    print("count", vm.exec(["cat", "/dev/shm/count"]).stdout.decode().strip())
    report = vm.push(os.environ["STORE"])
    print("uploaded_chunks", report.uploaded_chunks, "of", report.chunks)
    assert report.url.startswith(os.environ["STORE"]), report.url
finally:
    vm.remove()
PY
URL="$url2" STORE="$STORE" python3 store-py.py || fail "the Python SDK with the store"

echo "== bad input"
ferry restore s3://ferry/vms --name x --detach 2> e1 && fail "a store without a digest restored"
[ "$(code_of < e1)" = STORE_URL_INVALID ] || fail "no digest: $(cat e1)"
ferry restore "s3://ferry/vms/$(printf '0%.0s' {1..64})" --name x --detach 2> e2 && fail "an unknown digest restored"
[ "$(code_of < e2)" = STORE_NOT_FOUND ] || fail "unknown digest: $(cat e2)"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY AWS_SHARED_CREDENTIALS_FILE=/nonexistent \
    ferry push pulled.snap "$STORE" 2> e3 && fail "a push without credentials went through"
[ "$(code_of < e3)" = STORE_CREDENTIALS ] || fail "no credentials: $(cat e3)"
echo "store: all checks passed"
