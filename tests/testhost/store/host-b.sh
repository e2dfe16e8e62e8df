# Fleet storage, the other host (see host-a.sh): restores the VMs host-a
# pushed, from host-a's S3 server, lazily: the counter goes on here while
# guest memory still arrives, the rest comes in the background; the disk
# image (this host never had it) and the VM's disk writes arrive as the
# guest reads them, and a snapshot fetches the rest first; the image is
# then published in the host's cache and the VM's layer stands on it; the
# host's chunk cache stays within its limit while two VMs run.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
say() { timeout 120 bash -c "until printf '%s\n' '$1' | nc -N host-a 9201; do sleep 1; done"; }
hear() { timeout 600 nc -l 9200; }
vms=~/.local/share/ferry/vms
cache=~/.cache/ferry/store/chunks

# Waits until the VM named $1 has all of its memory and disk from the store.
all_in_place() {
    timeout 300 bash -c "until jq -e .all_in_place $vms/$1/lazy-stats.json >/dev/null 2>&1; do sleep 0.5; done" ||
        fail "$1: guest memory never all arrived: $(cat $vms/$1/lazy-stats.json 2>/dev/null)"
    timeout 300 bash -c "while [ -e $vms/$1/disk-fill.json ]; do sleep 0.5; done" ||
        fail "$1: the disk never all arrived: $(cat $vms/$1/disk-stats.json 2>/dev/null)"
}

# The disk the VM $1's layer stands on (the path in its header).
backing_of() { dd if="$vms/$1/root.img" bs=64 skip=1 count=63 status=none | tr -d '\0'; }

read -r env url at_push disk_sha <<< "$(hear)"
echo "$env" | base64 -d > /tmp/s3.env
. /tmp/s3.env
# Every test host has ferry's default image, the pushed VM's: this one hides
# each name it would find it by, to be a host that never had it.
curl -sf --aws-sigv4 "aws:amz:${AWS_REGION}:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$AWS_ENDPOINT_URL/ferry/vms/manifests/${url##*/}" > /tmp/manifest.json ||
    { say failed; fail "cannot read the pushed VM's manifest"; }
named=$(jq -r '.bundle.disk.base_cache_path // empty' /tmp/manifest.json)
[ -n "$named" ] && [ -f ~/.cache/ferry/"$named" ] ||
    { say failed; fail "the image is not where the manifest says: $(jq -c .bundle.disk /tmp/manifest.json)"; }
mv ~/.cache/ferry/"$named" ~/.cache/ferry/"$named".hidden
rm -rf ~/.cache/ferry/encoded-bases ~/.cache/ferry/bases
echo "restoring $url (pushed at count $at_push) from $AWS_ENDPOINT_URL"
if ! ferry restore "$url" --name counter --detach; then
    say failed
    fail "restore from the store"
fi
first=$(ferry exec counter -- cat /dev/shm/count)
sleep 2
second=$(ferry exec counter -- cat /dev/shm/count)
echo "counter here: $first then $second (it was $at_push at the push)"
if ! { [ "$first" -ge "$at_push" ] && [ "$second" -gt "$first" ]; }; then
    say "counter did not go on"
    fail "the counter did not go on: $at_push -> $first -> $second"
fi
all_in_place counter
jq -c . "$vms/counter/lazy-stats.json"
[ "$(jq .prefetched_chunks "$vms/counter/lazy-stats.json")" -gt 0 ] || { say "no prefetch"; fail "nothing was prefetched"; }
[ "$(jq .background_chunks "$vms/counter/lazy-stats.json")" -gt 0 ] || { say "no background"; fail "nothing came in the background"; }
third=$(ferry exec counter -- cat /dev/shm/count)
[ "$third" -gt "$second" ] || { say "stopped"; fail "the counter stopped once memory was all in place"; }
timeout 300 bash -c "until jq -e .all_in_place $vms/counter/disk-stats.json >/dev/null 2>&1; do sleep 0.5; done" ||
    { say failed; fail "the disk never all arrived: $(cat $vms/counter/disk-stats.json 2>/dev/null)"; }
jq -c . "$vms/counter/disk-stats.json"
[ ! -e "$vms/counter/disk-fill.json" ] || { say failed; fail "the disk's fill record outlived the fill"; }
[ "$(ferry exec counter -- cat /root/on-disk /root/cold | sha256sum | cut -d' ' -f1)" = "$disk_sha" ] ||
    { say failed; fail "the files on the restored disk differ"; }
# The image came window by window after the start, not before it.
jq -e .image "$vms/counter/disk-stats.json" >/dev/null || { say failed; fail "the disk image was not fetched window by window"; }
image=$(backing_of counter)
case "$image" in
    */.cache/ferry/bases/*.img) ;;
    *) say failed; fail "the VM's layer stands on $image, not on the published image" ;;
esac
[ -f "$image" ] && [ ! -e "$vms/counter/image-filling.img" ] ||
    { say failed; fail "the image was not published, or its file stayed in the VM's directory"; }
before=$(jq .restore_fetched_bytes "$vms/counter/lazy-stats.json")
after=$(jq .fetched_bytes "$vms/counter/disk-stats.json")
echo "fetched before the start: $before bytes; the disk (image and writes) after it: $after bytes"
[ "$before" -lt "$after" ] || { say failed; fail "the image came before the start"; }

echo "== the image and the disk writes arrive as the guest reads them; a snapshot fetches the rest first"
# Without the image again: the running counter VM keeps the file it opened.
rm -f "$image"
FERRY_STORE_BACKGROUND=off ferry restore "$url" --name reader --detach >/dev/null ||
    { say failed; fail "restore without background fetches"; }
stats=$vms/reader/disk-stats.json
[ -e "$vms/reader/disk-fill.json" ] || { say failed; fail "no disk fill under way after the restore"; }
ferry exec reader -- sha256sum /root/on-disk >/dev/null
jq -c . "$stats"
demand=$(jq .demand_windows "$stats")
# 8 MiB read: at least its four 2 MiB windows; the 4 MiB file left alone
# holds at least one more that nobody reached.
[ "$demand" -ge 4 ] || { say failed; fail "reading 8 MiB fetched $demand windows"; }
jq -e '(.all_in_place | not) and .background_windows == 0' "$stats" >/dev/null ||
    { say failed; fail "windows arrived that nobody reached, with no background fetch"; }
ferry snapshot reader /root/reader.snap --leave-running >/dev/null || { say failed; fail "snapshot of a VM whose disk still arrives"; }
jq -c . "$stats"
jq -e '.all_in_place and .background_windows > 0 and .image' "$stats" >/dev/null ||
    { say failed; fail "the snapshot did not fetch the rest of the disk first"; }
[ -f "$image" ] && [ "$(backing_of reader)" = "$image" ] && [ ! -e "$vms/reader/image-filling.img" ] ||
    { say failed; fail "the snapshot did not publish the image under the VM's layer"; }
[ ! -e "$vms/reader/disk-fill.json" ] || { say failed; fail "the disk's fill record outlived the fill"; }
ferry rm -f reader >/dev/null
ferry restore /root/reader.snap --name reread --detach >/dev/null || { say failed; fail "restore the snapshot"; }
[ "$(ferry exec reread -- cat /root/on-disk /root/cold | sha256sum | cut -d' ' -f1)" = "$disk_sha" ] ||
    { say failed; fail "the snapshot's disk lacks what arrived late"; }
ferry rm -f reread >/dev/null
rm -f /root/reader.snap
say ok

echo "== the chunk cache keeps its limit while two VMs run"
read -r url2 <<< "$(hear)"
ferry rm -f counter >/dev/null
rm -rf ~/.cache/ferry/store
limit_mib=8
export FERRY_CHUNK_CACHE_MIB=$limit_mib
limit=$((limit_mib << 20))
# Samples the cache's size until told to stop.
echo 0 > /tmp/cache-max
( set +e; max=0; while [ ! -e /tmp/stop-sampling ]; do
      # The bytes of every file in it (temp files too), not du's count,
      # which adds the directory's own size.
      n=$(find "$cache" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
      if [ "$n" -gt "$max" ]; then max=$n; echo "$max" > /tmp/cache-max; fi
      sleep 0.1
  done; exit 0 ) &
sampler=$!
ferry restore "$url" --name one --detach >/dev/null || { say failed; fail "restore one"; }
ferry restore "$url2" --name two --detach >/dev/null || { say failed; fail "restore two"; }
all_in_place one
all_in_place two
a=$(ferry exec one -- cat /dev/shm/count); b=$(ferry exec two -- cat /dev/shm/count)
sleep 1
[ "$(ferry exec one -- cat /dev/shm/count)" -gt "$a" ] || { say failed; fail "VM one stopped"; }
[ "$(ferry exec two -- cat /dev/shm/count)" -gt "$b" ] || { say failed; fail "VM two stopped"; }
ferry exec two -- test -s /dev/shm/ten || { say failed; fail "VM two lacks the second push's file"; }
touch /tmp/stop-sampling; wait "$sampler"
max=$(cat /tmp/cache-max)
fetched_by() { jq '.restore_fetched_bytes + .fetched_bytes' "$vms/$1/lazy-stats.json"; }
fetched=$(( $(fetched_by one) + $(fetched_by two) ))
echo "chunk cache: at most $max bytes (limit $limit); the two restores fetched $fetched bytes"
[ "$max" -le "$limit" ] || { say failed; fail "the cache grew to $max bytes, over its $limit limit"; }
[ "$fetched" -gt "$limit" ] || { say failed; fail "the restores fetched $fetched bytes: not enough to test the limit"; }
ls ~/.cache/ferry/store/pins | grep -q . && { say failed; fail "pins left once memory and disk are in place: $(ls ~/.cache/ferry/store/pins)"; }
ferry rm -f one two >/dev/null
say ok
echo "store (host-b): passed"
