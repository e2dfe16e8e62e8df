# Fleet storage, the other host (see host-a.sh): restores the VM host-a
# pushed, from host-a's S3 server, and checks its counter goes on here.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
say() { timeout 120 bash -c "until printf '%s\n' '$1' | nc -N host-a 9201; do sleep 1; done"; }
hear() { timeout 600 nc -l 9200; }

read -r env url at_push <<< "$(hear)"
echo "$env" | base64 -d > /tmp/s3.env
. /tmp/s3.env
echo "restoring $url (pushed at count $at_push) from $AWS_ENDPOINT_URL"
if ! ferry restore "$url" --name counter --detach; then
    say failed
    fail "restore from the store"
fi
first=$(ferry exec counter -- cat /dev/shm/count)
sleep 2
second=$(ferry exec counter -- cat /dev/shm/count)
echo "counter here: $first then $second (it was $at_push at the push)"
if [ "$first" -ge "$at_push" ] && [ "$second" -gt "$first" ]; then
    say ok
else
    say "counter did not go on"
    fail "the counter did not go on: $at_push -> $first -> $second"
fi
echo "store (host-b): passed"
