# The CLI as Docker users expect it: `exec -it NAME sh` on a real pseudo-terminal
# (typed input, Ctrl-C to the guest program, window resizes, the terminal restored),
# exit statuses 125/126/127/N/128+N, `exec NAME CMD` without `--`, `ps -q`/`-a`,
# pause/resume (a guest counter on a live mount stands still while paused),
# `logs --tail`, `cp -r` of trees with modes and symlinks both ways, `stop` asking
# the guest first (a TERM trap in the guest runs), `kill`, `fork --count`, JSON
# errors for usage and runtime errors, completion scripts that load in bash, and
# progress shown on a terminal only.
# timeout: 900
set -euo pipefail

fail() { echo "FAIL: $*"; exit 1; }
# expect_status N CMD...: CMD must exit with status N; its stderr is left in $err.
expect_status() {
    local want=$1; shift
    local rc
    set +e; "$@" >/tmp/expect.out 2>/tmp/expect.err; rc=$?; set -e
    err=$(cat /tmp/expect.err)
    [ "$rc" = "$want" ] || fail "expected status $want from: $* ; got $rc: $err"
    echo "ok: $* -> $rc"
}
# The names `ferry ps` (with its flags) lists, on one line.
ps_names() { ferry ps -q "$@" | sort | tr '\n' ' '; }

mkdir -p /tmp/share
ferry boot --detach --name web --live-mount /tmp/share:/mnt/share >/dev/null

echo "== exec NAME CMD without --, and with it"
[ "$(ferry exec web echo hi there)" = "hi there" ] || fail "exec without --"
[ "$(ferry exec web sh -c 'echo "$0-$1"' a -b)" = "a--b" ] || fail "the command's own flags"
[ "$(ferry exec web -- echo old form)" = "old form" ] || fail "exec with --"
[ "$(ferry exec -e GREETING=hey web printenv GREETING)" = hey ] || fail "options before NAME"

echo "== exit statuses as Docker's"
expect_status 125 ferry exec ghost true
echo "$err" | grep -q 'error\[VM_NOT_FOUND\]' || fail "no such VM: $err"
expect_status 125 ferry exec web
echo "$err" | grep -q 'error\[USAGE_INVALID\]' || fail "usage error: $err"
ferry exec web sh -c 'printf "echo x\n" > /root/plain; chmod 0644 /root/plain'
expect_status 126 ferry exec web /root/plain
echo "$err" | grep -q 'EXEC_PERMISSION_DENIED' || fail "not executable: $err"
expect_status 127 ferry exec web no-such-command
echo "$err" | grep -q 'EXEC_NOT_FOUND' || fail "not found: $err"
expect_status 7 ferry exec web sh -c 'exit 7'
expect_status 137 ferry exec web sh -c 'kill -9 $$'
expect_status 127 ferry boot -- no-such-command
expect_status 5 ferry boot -- sh -c 'exit 5'
[ -z "$(ferry ls -q | grep -v '^web$' || true)" ] || fail "attached boots left VMs: $(ferry ls)"

echo "== --json errors: one JSON object on stderr"
check_json_error() {
    local code=$1; shift
    expect_status 125 ferry --json "$@"
    [ ! -s /tmp/expect.out ] || fail "stdout is not empty: $(cat /tmp/expect.out)"
    python3 -c '
import json, sys
v = json.loads(open("/tmp/expect.err").read())
assert set(v) == {"code", "message", "hint", "retryable"}, v
assert v["code"] == sys.argv[1], v
assert isinstance(v["retryable"], bool) and v["message"], v
' "$code" || fail "JSON error from $*: $err"
    echo "ok: $* -> $err"
}
check_json_error USAGE_INVALID exec web
check_json_error USAGE_INVALID ps --no-such-flag
check_json_error VM_NOT_FOUND exec ghost true
check_json_error VM_NOT_FOUND pause ghost

echo "== completion scripts"
ferry completions bash >/tmp/ferry.bash
out=$(bash -c 'source /tmp/ferry.bash && complete -p ferry' 2>&1) || fail "bash completions: $out"
echo "$out" | grep -q -- '-F _ferry ferry' || fail "bash completions: $out"
# `source <(...)` needs /dev/fd, which a test host's devtmpfs may lack.
if [ -e /dev/fd ]; then
    bash -c 'source <(ferry completions bash) && complete -p ferry' | grep -q _ferry || fail "source <(ferry completions bash)"
fi
# Completing `ferry pau` and `ferry ps -`.
got=$(bash -c 'source /tmp/ferry.bash; COMP_WORDS=(ferry pau); COMP_CWORD=1; _ferry ferry pau ferry; echo "${COMPREPLY[*]}"')
[ "$got" = pause ] || fail "completing ferry pau: $got"
got=$(bash -c 'source /tmp/ferry.bash; COMP_WORDS=(ferry ps -); COMP_CWORD=2; _ferry ferry - ps; echo "${COMPREPLY[*]}"')
echo "$got" | grep -qw -- --all || fail "completing ferry ps -: $got"
for shell in zsh fish; do
    ferry completions "$shell" | grep -q snapshot || fail "$shell completions"
done

echo "== exec -it on a pseudo-terminal, progress on a terminal"
dd if=/dev/urandom of=/tmp/big.bin bs=1M count=48 status=none
cat >/tmp/pty_check.py <<'PY'
"""Drives ferry through a real pseudo-terminal, as a person at a terminal would."""
import fcntl, os, re, select, signal, struct, sys, termios, time

def winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

class Session:
    """ferry with a pty as its controlling terminal and stdio; we keep the
    slave open to read the terminal's settings as ferry leaves them."""
    def __init__(self, argv, env=None):
        self.master, self.slave = os.openpty()
        winsize(self.slave, 30, 100)
        self.before = termios.tcgetattr(self.slave)
        self.out = b""
        self.pid = os.fork()
        if self.pid == 0:
            os.setsid()
            fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(self.slave, fd)
            os.close(self.master)
            # A terminal that does colour, as people's do.
            os.execvpe(argv[0], argv, {**os.environ, "TERM": "xterm-256color", **(env or {})})

    def send(self, data):
        os.write(self.master, data)

    def expect(self, pattern, timeout=60):
        """Reads until `pattern` (a regex over bytes) shows up after what
        earlier calls consumed."""
        deadline = time.time() + timeout
        while True:
            m = re.search(pattern, self.out)
            if m:
                self.out = self.out[m.end():]
                return m
            left = deadline - time.time()
            if left <= 0:
                sys.exit(f"FAIL: {pattern!r} not seen in {timeout}s; output: {self.out[-2000:]!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    pass

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                # Drain what is left.
                while select.select([self.master], [], [], 0.2)[0]:
                    try:
                        chunk = os.read(self.master, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    self.out += chunk
                return os.waitstatus_to_exitcode(status)
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    pass
        sys.exit(f"FAIL: ferry did not exit in {timeout}s; output: {self.out[-2000:]!r}")

def check_shell():
    s = Session(["ferry", "exec", "-it", "web", "sh"])
    # Typed input reaches the guest: only the guest's shell computes 1+2.
    s.send(b"echo typed-$((1+2))\r")
    s.expect(rb"typed-3")
    during = termios.tcgetattr(s.slave)
    assert not during[3] & termios.ECHO and not during[3] & termios.ICANON, "not in raw mode"
    # Ctrl-C interrupts the guest's program, not ferry: the session goes on.
    s.send(b"sleep 100\r")
    time.sleep(2)
    t0 = time.time()
    s.send(b"\x03")
    s.send(b"echo after-$((2+3))\r")
    s.expect(rb"after-5", timeout=30)
    print(f"ok: Ctrl-C ended sleep 100 after {time.time() - t0:.1f}s; the shell answers")
    # The guest's terminal has the size of ours, and follows a resize.
    s.send(b"stty size\r")
    s.expect(rb"30 100")
    winsize(s.slave, 40, 120)
    os.kill(s.pid, signal.SIGWINCH)
    for attempt in range(10):
        time.sleep(0.5)
        s.send(b"echo size-$(stty size | tr ' ' x)\r")
        m = s.expect(rb"size-(\d+x\d+)")
        if m.group(1) == b"40x120":
            break
    else:
        sys.exit(f"FAIL: stty size after a resize: {m.group(1)!r}")
    print("ok: stty size follows the resize to 40x120")
    s.send(b"exit 3\r")
    code = s.wait()
    assert code == 3, f"exit status {code}"
    after = termios.tcgetattr(s.slave)
    assert after == s.before, f"terminal not restored:\nbefore {s.before}\nafter  {after}"
    print("ok: exit status 3 propagated; the terminal's settings are restored")

def check_progress():
    s = Session(["ferry", "cp", "/tmp/big.bin", "web:/root/big.bin"])
    code = s.wait(timeout=300)
    assert code == 0, f"cp exit {code}: {s.out!r}"
    assert b"copying to web:/root/big.bin" in s.out, f"no progress on a terminal: {s.out!r}"
    assert b"copied 50331648 bytes" in s.out, s.out
    print("ok: cp shows progress on a terminal")

def check_colour():
    s = Session(["ferry", "stop", "ghost"])
    assert s.wait() == 125
    assert b"\x1b[" in s.out and b"VM_NOT_FOUND" in s.out, f"not coloured: {s.out!r}"
    s = Session(["ferry", "stop", "ghost"], env={"NO_COLOR": "1"})
    assert s.wait() == 125
    assert b"\x1b[" not in s.out and b"error[VM_NOT_FOUND]" in s.out, f"NO_COLOR: {s.out!r}"
    print("ok: error[CODE] coloured on a terminal, plain with NO_COLOR")

check_shell()
check_progress()
check_colour()
PY
python3 /tmp/pty_check.py
# Not a terminal: no progress, only the summary line.
ferry cp web:/root/big.bin /tmp/back.bin 2>/tmp/cp.err
cmp /tmp/big.bin /tmp/back.bin || fail "cp round trip"
[ "$(wc -l </tmp/cp.err)" = 1 ] && ! grep -q $'\x1b' /tmp/cp.err || fail "progress off a terminal: $(cat -A /tmp/cp.err)"

echo "== ps, ps -a, ls, fork --count, kill"
ferry boot --detach --name idle >/dev/null
[ "$(ps_names)" = "idle web " ] || fail "ps -q: $(ps_names)"
ferry fork idle --count 2 --detach >/dev/null
[ "$(ps_names)" = "idle idle-1 idle-2 web " ] || fail "fork --count 2: $(ps_names)"
[ "$(ferry exec idle-2 hostname)" = idle-2 ] || fail "fork hostname"
ferry fork idle --new-name one --new-name two --detach >/dev/null
[ "$(ps_names)" = "idle idle-1 idle-2 one two web " ] || fail "fork --new-name: $(ps_names)"
ferry rm -f idle-1 idle-2 one two >/dev/null
ferry kill idle >/dev/null
[ "$(ps_names)" = "web " ] || fail "ps after kill: $(ps_names)"
[ "$(ps_names -a)" = "idle web " ] || fail "ps -a: $(ps_names -a)"
[ "$(ferry ls -q | sort | tr '\n' ' ')" = "idle web " ] || fail "ls: $(ferry ls)"
ferry ps --json | python3 -c 'import json,sys; v=json.load(sys.stdin); assert [x["name"] for x in v] == ["web"], v'
ferry ps -aq --json | python3 -c 'import json,sys; assert json.load(sys.stdin) == ["idle", "web"]'
ferry ls --json | python3 -c '
import json, sys
v = {x["name"]: x for x in json.load(sys.stdin)}
assert v["idle"]["status"]["state"] == "stopped", v
assert v["web"]["status"]["state"] == "running", v'
ferry rm idle >/dev/null

echo "== pause and resume: a guest counter stands still while paused"
ferry exec web setsid -f sh -c \
    'i=0; while :; do i=$((i+1)); echo $i > /mnt/share/.count; mv /mnt/share/.count /mnt/share/count; sleep 0.2; done' \
    </dev/null >/dev/null 2>&1
count() { cat /tmp/share/count 2>/dev/null || echo 0; }
for _ in $(seq 1 50); do [ "$(count)" -gt 2 ] && break; sleep 0.2; done
[ "$(count)" -gt 2 ] || fail "the counter does not count: $(count)"
[ "$(ferry pause web)" = web ] || fail "pause prints the name"
sleep 0.5
p1=$(count); sleep 3; p2=$(count)
echo "paused: $p1 then $p2"
[ "$p1" = "$p2" ] || fail "the counter advanced while paused: $p1 -> $p2"
ferry ps | grep -E '^web +paused' >/dev/null || fail "ps does not say paused: $(ferry ps)"
ferry ps --json | python3 -c 'import json,sys; assert json.load(sys.stdin)[0]["paused"] is True'
ferry resume web >/dev/null
sleep 2
r=$(count)
echo "resumed: $r"
[ "$r" -gt "$p2" ] || fail "the counter did not advance after resume: $p2 -> $r"
ferry ps | grep -E '^web +running' >/dev/null || fail "ps after resume: $(ferry ps)"

echo "== logs --tail"
tail_ok=""
for attempt in 1 2 3; do
    ferry exec web sh -c "for i in 1 2 3 4 5; do echo tail-$attempt-\$i > /dev/console; done"
    got=$(ferry logs web --tail 3 | tr -d '\r')
    want=$(printf 'tail-%s-3\ntail-%s-4\ntail-%s-5' "$attempt" "$attempt" "$attempt")
    if [ "$got" = "$want" ]; then tail_ok=1; break; fi
    echo "attempt $attempt: got $(echo "$got" | cat -A)"
done
[ -n "$tail_ok" ] || fail "logs --tail 3"
[ "$(ferry logs web --tail 3 | wc -l)" = 3 ] || fail "logs --tail 3 line count"
[ "$(ferry logs web --tail 0 | wc -c)" = 0 ] || fail "logs --tail 0"
ferry logs web --tail 2 --json | python3 -c '
import json, sys
lines = [json.loads(l) for l in sys.stdin]
want = ["tail-%s-4" % sys.argv[1], "tail-%s-5" % sys.argv[1]]
assert [l["line"] for l in lines] == want and {l["vm"] for l in lines} == {"web"}, lines
' "$attempt" || fail "logs --tail --json"

echo "== cp -r: trees with modes and symlinks, both ways"
rm -rf /tmp/tree /tmp/out /tmp/outdir
mkdir -p /tmp/tree/sub
echo secret >/tmp/tree/sub/key
echo hello >/tmp/tree/a.txt
chmod 0600 /tmp/tree/sub/key
chmod 0750 /tmp/tree/sub
chmod 0644 /tmp/tree/a.txt
ln -s a.txt /tmp/tree/link
ln -s sub /tmp/tree/sublink
ferry cp -r /tmp/tree web:/root/ 2>/dev/null
got=$(ferry exec web sh -c 'cd /root/tree && stat -c "%n %a %F" sub sub/key a.txt && readlink link sublink && cat sub/key')
want="sub 750 directory
sub/key 600 regular file
a.txt 644 regular file
a.txt
sub
secret"
[ "$got" = "$want" ] || fail "tree in: $got"
# A destination that does not exist receives the tree's content.
ferry cp -r /tmp/tree web:/root/copy2 2>/dev/null
[ "$(ferry exec web readlink /root/copy2/link)" = a.txt ] || fail "tree into a new directory"
ferry exec web sh -c 'mkdir -p /root/gt/d && echo guest > /root/gt/d/f && chmod 0600 /root/gt/d/f \
    && chmod 0750 /root/gt/d && ln -s d/f /root/gt/l && ln -s d /root/gt/dl'
ferry cp -r web:/root/gt /tmp/out 2>/dev/null
got=$(cd /tmp/out && stat -c "%n %a %F" d d/f && readlink l dl && cat l)
want="d 750 directory
d/f 600 regular file
d/f
d
guest"
[ "$got" = "$want" ] || fail "tree out: $got"
mkdir /tmp/outdir
ferry cp -r web:/root/gt /tmp/outdir 2>/dev/null
[ "$(readlink /tmp/outdir/gt/l)" = d/f ] || fail "tree into an existing host directory: $(ls -la /tmp/outdir)"
ferry --json cp web:/root/gt/d/f /tmp/f.copy | python3 -c 'import json,sys; v=json.load(sys.stdin); assert v["ok"] and v["bytes"] == 6, v'
[ "$(stat -c %a /tmp/f.copy)" = 600 ] || fail "file mode out"

echo "== stop asks the guest to power off: a TERM trap in the guest runs"
rm -f /tmp/share/stopped
# A daemon-like guest process: its stdio leaves the exec's pipes, which close when
# the exec ends (dash reports the killed `sleep` on stderr, and a closed pipe there
# would end it with SIGPIPE before its trap runs).
ferry exec web setsid -f sh -c \
    'exec </dev/null >/dev/null 2>&1; trap "echo graceful > /mnt/share/stopped; exit 0" TERM; while :; do sleep 1; done' \
    </dev/null >/dev/null 2>&1
sleep 1
t0=$(date +%s)
[ "$(ferry stop web)" = web ] || fail "stop prints the name"
echo "stopped in $(( $(date +%s) - t0 )) s"
[ "$(cat /tmp/share/stopped 2>/dev/null)" = graceful ] || fail "the guest's TERM trap did not run"
[ "$(ps_names)" = "" ] || fail "web still listed by ps: $(ps_names)"
ferry --json rm web | python3 -c 'import json,sys; assert json.load(sys.stdin) == {"ok": True, "names": ["web"]}'
[ "$(ferry ls -q)" = "" ] || fail "VMs left: $(ferry ls)"
echo "PASS"
