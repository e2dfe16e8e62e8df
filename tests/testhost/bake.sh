# ferry bake: --copy (file and directory), --run, --env, --workdir, --cmd; the baked
# tarball boots (attached and detached) with its command, env and workdir; a failing
# step and a Ctrl-C leave no image and no VM; a recipe bake on top of a baked image;
# a package install when the bake VM has networking.
# timeout: 1200
set -euo pipefail

fail() { echo "FAIL: $*"; exit 1; }
no_vms() { [ "$(ferry ls --json | jq length)" = 0 ] || { ferry ls; fail "$1: VMs left behind"; }; }
no_partials() { ! ls -a "$work" | grep -q '\.part$' || fail "$1: partial output left in $work"; }

work=$(mktemp -d)
cd "$work"
cat > greet.sh <<'EOF'
#!/bin/sh
echo "hello from $(basename "$0") in $(pwd) as $GREETING"
EOF
chmod 755 greet.sh
mkdir -p site/css
echo "<h1>index</h1>" > site/index.html
echo "body{}" > site/css/main.css

echo "== bake with --copy, --run, --env, --workdir, --cmd"
t0=$(date +%s)
ferry bake -o "$work/app.tar.gz" \
    --copy greet.sh:/usr/local/bin/greet \
    --copy site:/srv/site \
    --env GREETING=bakers --workdir /app \
    --run 'greet | tee /app/greeting.txt' \
    --run 'test -f /srv/site/css/main.css && stat -c "%U %a" /usr/local/bin/greet' \
    --cmd sh -c 'cat /app/greeting.txt; echo "env=$GREETING pwd=$(pwd)"' 2>&1 | tee bake.log
echo "METRIC bake_seconds=$(( $(date +%s) - t0 ))"
grep -qx 'step 3/4: greet | tee /app/greeting.txt' bake.log || fail "step header missing"
grep -qx 'hello from greet in /app as bakers' bake.log || fail "step output not shown live"
grep -qx 'root 755' bake.log || fail "copied file owner/mode"
[ -s app.tar.gz ] || fail "no output"
ls -l app.tar.gz
no_partials "successful bake"
no_vms "successful bake"
tar -tzf app.tar.gz > list.txt
grep -qx './etc/ferry/image.json' list.txt || fail "no image.json in the tarball"
grep -qx './srv/site/css/main.css' list.txt || fail "copied directory missing"
grep -qx './proc/' list.txt || fail "/proc itself should be kept"
! grep -q '^\./proc/.' list.txt || fail "/proc contents exported"
! grep -q '^\./sys/.' list.txt || fail "/sys contents exported"
tar -xzOf app.tar.gz ./etc/ferry/image.json | tee image.json
jq -e '.workdir == "/app" and .env.GREETING == "bakers" and .cmd[0] == "sh"' image.json >/dev/null \
    || fail "image.json content"
! tar -xzOf app.tar.gz ./etc/hosts | grep -q 'bake-' || fail "bake VM hostname left in /etc/hosts"

echo "== attached boot runs the recorded command with its env and workdir"
out=$(ferry boot app.tar.gz)
echo "$out"
[ "$out" = "$(printf 'hello from greet in /app as bakers\nenv=bakers pwd=/app')" ] || fail "attached boot: $out"
[ "$(ferry boot app.tar.gz -- sh -c 'echo $GREETING $(pwd)')" = "bakers /app" ] || fail "explicit command env/workdir"
[ "$(ferry boot -e GREETING=flags app.tar.gz -- sh -c 'echo $GREETING')" = "flags" ] || fail "flags override image env"
no_vms "attached boots"

echo "== detached boot runs it as the main process"
name=$(ferry boot --detach app.tar.gz)
for _ in $(seq 1 120); do
    state=$(ferry ls --json | jq -r --arg n "$name" '.[] | select(.name == $n) | .status.state')
    [ "$state" = running ] || break
    sleep 0.5
done
ferry logs "$name" | tee detached.log | tail -5
grep -q 'env=bakers pwd=/app' detached.log || fail "detached main process output"
ferry rm "$name" >/dev/null
no_vms "detached boot"

echo "== a failing step stops the bake, shows its output, leaves nothing"
set +e
ferry bake -o "$work/bad.tar.gz" --run 'echo before; exit 3' --run 'echo never' > bad.log 2>&1
rc=$?
set -e
cat bad.log
[ "$rc" != 0 ] || fail "failing bake exited 0"
grep -q 'error\[BAKE_STEP_FAILED\]' bad.log || fail "no BAKE_STEP_FAILED"
grep -q 'step 1/2 failed (exit status 3): echo before; exit 3' bad.log || fail "error does not name the step"
grep -qx 'before' bad.log || fail "the step's output was not shown"
! grep -qx 'never' bad.log || fail "a step after the failure ran"
[ ! -e bad.tar.gz ] || fail "partial image left behind"
no_partials "failed bake"
no_vms "failed bake"
[ -z "$(ls -A ~/.local/share/ferry/vms 2>/dev/null)" ] || fail "VM state directory left behind"

echo "== Ctrl-C cleans up"
ferry bake -o "$work/int.tar" --run 'echo started; sleep 120' > int.log 2>&1 &
pid=$!
for _ in $(seq 1 240); do grep -qx started int.log && break; sleep 0.5; done
grep -qx started int.log || { cat int.log; fail "interrupt test: step never started"; }
kill -INT "$pid"
set +e; wait "$pid"; rc=$?; set -e
cat int.log
[ "$rc" = 130 ] || fail "interrupted bake exit status $rc"
grep -q 'BAKE_CANCELLED' int.log || fail "no BAKE_CANCELLED"
[ ! -e int.tar ] || fail "interrupted bake left an image"
no_partials "interrupted bake"
no_vms "interrupted bake"

echo "== recipe on top of the baked image"
mkdir recipe
cat > recipe/layer.toml <<'EOF'
from = "../app.tar.gz"
output = "../layer.tar.zst"
env = { LAYER = "2" }
cmd = ["sh", "-c", "cat /app/second.txt; echo layer=$LAYER greeting=$GREETING pwd=$(pwd)"]

[[step]]
copy = { from = "../greet.sh", to = "/usr/local/bin/greet2" }

[[step]]
run = "greet2 > /app/second.txt"
EOF
ferry bake -f recipe/layer.toml 2>&1 | tail -3
[ -s layer.tar.zst ] || fail "recipe output"
out=$(ferry boot layer.tar.zst)
echo "$out"
[ "$out" = "$(printf 'hello from greet2 in /app as bakers\nlayer=2 greeting=bakers pwd=/app')" ] || fail "recipe image: $out"
no_vms "recipe bake"

echo "== package install (needs guest networking)"
if ferry boot --help | grep -q -- '--net'; then
    ferry bake -o "$work/jq.tar.gz" --run 'apt-get update && apt-get install -y --no-install-recommends jq' \
        --cmd jq -n '{baked: true}' 2>&1 | tail -5
    [ "$(ferry boot jq.tar.gz | jq -c .)" = '{"baked":true}' ] || fail "jq in the baked image"
    no_vms "package bake"
else
    echo "SKIP: this ferry has no guest networking yet (no --net), apt-get cannot reach a mirror"
fi

echo "PASS: bake"
