#!/bin/bash
# s3-server: a single-node Garage, a real S3-compatible object store, for tests.
#
#   s3-server start [ADDR]   start it with the S3 API on ADDR:3900 (default
#                            0.0.0.0, so the other test hosts reach it too);
#                            on first start set up the layout, a key and the
#                            bucket `ferry`; write /tmp/s3.env (0600) and
#                            print it without the secret
#   s3-server stop           stop it (SIGTERM, SIGKILL after 20 s); a later
#                            start reuses the same data, key and bucket
#
# /tmp/s3.env exports AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
# (garage) and AWS_ENDPOINT_URL (http://HOST:3900, HOST being this host's name
# unless ADDR names one address), so it can be sourced here or copied to
# another host. Buckets are addressed path-style (no root domain is set).
# `garage` itself works as the admin CLI (config /etc/garage.toml); the
# server's log is /var/log/garage.log.
set -euo pipefail

dir=/var/lib/garage
conf=/etc/garage.toml
pidfile=/run/garage.pid
log=/var/log/garage.log
envfile=/tmp/s3.env
export GARAGE_CONFIG_FILE=$conf

die() {
    echo "s3-server: $*" >&2
    exit 1
}

# alive PID: the process exists and is not a zombie waiting for init.
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

running() {
    [ -f "$pidfile" ] && alive "$(cat "$pidfile")"
}

ensure_key() {
    garage key info ferry >/dev/null 2>&1 || garage key create ferry
}

ensure_bucket() {
    garage bucket info ferry >/dev/null 2>&1 || garage bucket create ferry
}

# retry SECS CMD...: runs CMD until it succeeds, failing after SECS seconds
# or as soon as the server has exited.
retry() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        running || { tail -n 20 "$log" >&2; die "garage server exited (log: $log)"; }
        [ "$SECONDS" -lt "$deadline" ] || { "$@" || true; die "timed out: $*"; }
        sleep 0.5
    done
}

start() {
    local addr=${1:-0.0.0.0}
    local bind=$addr host=$addr probe=$addr
    case $addr in
    *:*) bind="[$addr]" probe="[$addr]" host="[$addr]" ;;
    esac
    case $addr in
    0.0.0.0 | ::) host=$(hostname) probe=127.0.0.1 ;;
    esac

    if running; then
        echo "s3-server: garage already running (pid $(cat "$pidfile"))" >&2
    else
        mkdir -p "$dir/meta" "$dir/data"
        if [ ! -s "$dir/rpc_secret" ]; then
            (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/rpc_secret")
        fi
        # Rewritten on every start, so a restart may bind another address.
        (umask 077 && cat >"$conf" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
# Under emulation zstd on every block costs CPU time the tests need.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(cat "$dir/rpc_secret")"

[s3_api]
s3_region = "garage"
api_bind_addr = "$bind:3900"
EOF
        )
        # Its own session and no inherited descriptors: `$(s3-server start)`
        # returns, and the caller's process group can be killed apart from it.
        NO_COLOR=1 setsid garage server </dev/null >>"$log" 2>&1 &
        echo $! >"$pidfile"
    fi

    # The node's RPC answers once its key exists and it listens.
    retry 120 garage status
    local version
    version=$(garage json-api GetClusterLayout | jq -r .version)
    if [ "$version" = 0 ]; then
        local id
        id=$(garage node id -q)
        garage layout assign -z dc1 -c 1G "${id%%@*}" >/dev/null
        garage layout apply --version 1 >/dev/null
    fi
    retry 60 ensure_key
    retry 60 ensure_bucket
    retry 60 garage bucket allow --read --write --owner ferry --key ferry

    local key secret
    key=$(garage key info ferry --key-id)
    secret=$(garage key info ferry --secret-key)
    # Ready once a signed request gets the (empty or not) bucket listing.
    retry 60 curl -sf --max-time 5 -o /dev/null \
        --aws-sigv4 "aws:amz:garage:s3" --user "$key:$secret" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        "http://$probe:3900/ferry?list-type=2"

    (umask 077 && cat >"$envfile" <<EOF
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=garage
export AWS_ENDPOINT_URL=http://$host:3900
EOF
    )
    # The secret stays in the file (0600).
    grep -v AWS_SECRET_ACCESS_KEY "$envfile"
    echo "s3-server: credentials in $envfile"
}

stop() {
    if ! running; then
        echo "s3-server: garage is not running" >&2
        rm -f "$pidfile"
        return 0
    fi
    local pid
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 200); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        kill -KILL "$pid"
        while alive "$pid"; do sleep 0.1; done
    fi
    rm -f "$pidfile"
    echo "s3-server: stopped"
}

case ${1:-} in
start)
    shift
    start "$@"
    ;;
stop) stop ;;
*)
    echo "usage: s3-server start [ADDR] | s3-server stop" >&2
    exit 2
    ;;
esac
