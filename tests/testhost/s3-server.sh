# s3-server runs Garage: the bucket `ferry` exists for the key in /tmp/s3.env,
# an anonymous request gets an S3 error (the API answers, it is not refused),
# a signed PUT and GET work through the endpoint's host name, and after a
# stop a connection is refused, while a new start keeps the key, bucket and object.
set -euo pipefail

fail() { echo "FAIL: $*"; exit 1; }

# s3 CURL-ARGS...: a request signed with the key in the environment.
s3() {
    curl -s --max-time 20 --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

check() {
    # shellcheck disable=SC1091
    source /tmp/s3.env
    [ "$AWS_ENDPOINT_URL" = "http://$(hostname):3900" ] || fail "endpoint $AWS_ENDPOINT_URL"
    local out code
    out=$(garage bucket info ferry) || fail "garage bucket info ferry"
    grep -q "RWO.*$AWS_ACCESS_KEY_ID" <<<"$out" || fail "the key cannot read, write and own bucket ferry: $out"
    out=$(curl -s --max-time 20 -w '\n%{http_code}' "$AWS_ENDPOINT_URL/ferry/") \
        || fail "anonymous GET: curl exit $?"
    code=${out##*$'\n'}
    [ "$code" = 403 ] || fail "anonymous GET: HTTP $code: $out"
    grep -q '<Code>AccessDenied</Code>' <<<"$out" || fail "anonymous GET: no S3 error: $out"
    echo "ok: anonymous GET -> 403 AccessDenied"
}

echo "== first start"
s3-server start
check
echo "hello from $(hostname)" >/tmp/object
code=$(s3 -o /dev/null -w '%{http_code}' -T /tmp/object "$AWS_ENDPOINT_URL/ferry/dir/object")
[ "$code" = 200 ] || fail "signed PUT: HTTP $code"
[ "$(s3 "$AWS_ENDPOINT_URL/ferry/dir/object")" = "hello from $(hostname)" ] || fail "signed GET"
listing=$(s3 "$AWS_ENDPOINT_URL/ferry?list-type=2")
grep -q '<Key>dir/object</Key>' <<<"$listing" || fail "listing: $listing"
echo "ok: signed PUT, GET and list"
first_key=$AWS_ACCESS_KEY_ID

echo "== stop"
s3-server stop
set +e
curl -s --max-time 10 -o /dev/null "$AWS_ENDPOINT_URL/ferry/"
rc=$?
set -e
[ "$rc" = 7 ] || fail "after stop: curl exit $rc, want 7 (connection refused)"
echo "ok: connection refused while stopped"

echo "== second start"
s3-server start
check
[ "$AWS_ACCESS_KEY_ID" = "$first_key" ] || fail "a new key after restart: $AWS_ACCESS_KEY_ID"
keys=$(garage key list)
[ "$(grep -c GK <<<"$keys")" = 1 ] || fail "keys: $keys"
[ "$(s3 "$AWS_ENDPOINT_URL/ferry/dir/object")" = "hello from $(hostname)" ] || fail "the object is gone"
echo "ok: same key, bucket and object after a restart"
s3-server stop
echo "s3-server ok"
