//! `ferry-runc`: the same VMs behind runc's command line, for container
//! engines that can only name a runc-compatible executable (Docker before
//! 23, whose runtimes are always run by `containerd-shim-runc-v2`). Each
//! container is a ferry VM kept by a *keeper* process: `create` starts the
//! keeper, which boots the VM and waits for `start`; the keeper's pid is
//! the container's, its stdio the container's, and it exits with the
//! process's status, which is how the runc shim sees the container end.
//!
//! The executable is `containerd-shim-ferry-v2` called by this name (a
//! link to it), so both front ends share one binary.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::{BootOptions, ChildEvent, ExecOptions, Runtime, Vm};

use crate::error::{Kind, Result, ShimError};
use crate::process::exit_code;
use crate::rootfs;
use crate::service::vm_name;
use crate::spec::{Launch, Process, Spec};

/// The hidden commands this executable runs itself with.
pub const KEEP: &str = "__ferry-runc-keep";
/// See [`KEEP`]: the keeper of an exec'd process.
pub const KEEP_EXEC: &str = "__ferry-runc-exec";

/// Where containers are kept unless `--root` says otherwise.
const DEFAULT_ROOT: &str = "/run/ferry-runc";
/// The namespace part of the VMs' names (`ctr-runc-ID`).
const NAMESPACE: &str = "runc";
/// How long a keeper may take to boot its VM.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Signals a keeper passes on to its process (SIGKILL and SIGSTOP cannot
/// be caught: `ferry-runc kill` carries every signal through the keeper's
/// control FIFO instead).
const FORWARDED: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn err(code: &str, message: impl Into<String>, hint: &str) -> ShimError {
    ShimError::new(Kind::Invalid, code, message, hint)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ShimError {
    move |e| {
        ShimError::new(
            Kind::Internal,
            "RUNC_IO",
            format!("{what}: {e}"),
            "check the state directory (--root) is writable",
        )
    }
}

/// The command line: runc's global flags, the command, its flags and
/// arguments.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    root: Option<PathBuf>,
    log: Option<PathBuf>,
    command: String,
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

/// Flags that take a value (the rest are switches).
const VALUED: &[&str] = &[
    "root",
    "log",
    "log-format",
    "criu",
    "rootless",
    "bundle",
    "b",
    "pid-file",
    "console-socket",
    "process",
    "p",
    "format",
    "f",
    "resources",
    "r",
    "preserve-fds",
    "cwd",
    "env",
    "e",
    "user",
    "u",
    "process-label",
    "apparmor",
    "cap",
    "c",
];

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut a = Args::default();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let Some(flag) = arg.strip_prefix("--").or_else(|| {
                arg.strip_prefix('-')
                    .filter(|f| !f.is_empty() && !f.starts_with(char::is_numeric))
            }) else {
                if a.command.is_empty() {
                    a.command = arg.clone();
                } else {
                    a.positional.push(arg.clone());
                }
                continue;
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None if VALUED.contains(&flag) && i < args.len() => {
                    i += 1;
                    (flag.to_string(), args[i - 1].clone())
                }
                None => (flag.to_string(), String::new()),
            };
            if a.command.is_empty() {
                match name.as_str() {
                    "root" => a.root = Some(value.into()),
                    "log" => a.log = Some(value.into()),
                    "v" | "version" => a.command = "--version".into(),
                    _ => {}
                }
            } else {
                a.flags.push((name, value));
            }
        }
        a
    }

    fn flag(&self, names: &[&str]) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| names.contains(&n.as_str()))
            .map(|(_, v)| v.as_str())
    }

    fn id(&self) -> Result<&str> {
        self.positional.first().map(String::as_str).ok_or_else(|| {
            err(
                "RUNC_USAGE",
                format!("{} needs a container id", self.command),
                "ferry-runc COMMAND [FLAGS] ID",
            )
        })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
            .join(id)
    }
}

/// Runs `ferry-runc ARGS`; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let a = Args::parse(args);
    match run(&a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry-runc: {e}");
            if let Some(log) = &a.log {
                let line = serde_json::json!({"level": "error", "msg": e.display()});
                if let Ok(mut f) = File::options().create(true).append(true).open(log) {
                    let _ = writeln!(f, "{line}");
                }
            }
            1
        }
    }
}

fn run(a: &Args) -> Result<()> {
    match a.command.as_str() {
        "--version" | "version" => {
            println!(
                "runc version 1.1.5 (ferry-runc {})\nspec: 1.0.2-dev",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        "create" => create(a),
        "start" => control(&a.dir(a.id()?), "start"),
        "kill" => {
            let signal = match a.positional.get(1) {
                Some(s) => parse_signal(s)?,
                None => libc::SIGTERM,
            };
            control(&a.dir(a.id()?), &format!("signal {signal}"))
        }
        "delete" => delete(a),
        "state" => state(a),
        "ps" => {
            let dir = a.dir(a.id()?);
            let pids: Vec<u32> = keeper(&dir).into_iter().collect();
            println!("{}", serde_json::json!(pids));
            Ok(())
        }
        "pause" | "resume" => {
            let vm = runtime()?.open_running(&vm_name(NAMESPACE, a.id()?))?;
            if a.command == "pause" {
                vm.pause()?;
            } else {
                vm.resume()?;
            }
            Ok(())
        }
        "exec" => exec(a),
        "update" => {
            // Resources of a running VM do not change: read and drop them.
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            Ok(())
        }
        other => Err(err(
            "RUNC_USAGE",
            format!("unknown command {other:?}"),
            "ferry-runc takes create, start, state, kill, delete, exec, ps, pause, resume",
        )),
    }
}

fn runtime() -> Result<Runtime> {
    Ok(Runtime::new(ferry::Config::default())?)
}

fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG");
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        _ => {
            return Err(err(
                "RUNC_USAGE",
                format!("unknown signal {s:?}"),
                "give a number or a name such as SIGTERM",
            ))
        }
    };
    Ok(n)
}

/// The keeper's pid, while it lives (a zombie does not count).
fn keeper(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    (state != "Z" && state != "X").then_some(pid)
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err("RUNC_IO", "a path with a NUL byte", ""))?;
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io(format!("mkfifo {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Spawns this executable as `hidden ARGS...` with the container's stdio
/// (none with a terminal: the engine then reads this command's output to
/// its end, which a keeper holding it would never give), waits until it
/// writes `ready` in `dir` (or `error`, or ends), and returns its pid. It
/// is not waited for: once this process exits it is the runc shim's (a
/// subreaper's) child.
fn spawn_keeper(
    dir: &Path,
    ready: &str,
    hidden: &str,
    args: &[&Path],
    terminal: bool,
) -> Result<u32> {
    use std::process::Stdio;
    let exe = std::env::current_exe().map_err(io("find this executable".into()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(hidden).args(args);
    if terminal {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let mut child = cmd.spawn().map_err(io("start the keeper".into()))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if dir.join(ready).exists() {
            return Ok(child.id());
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("{ready}.error"))) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(serde_json::from_str::<ErrorFile>(&text)
                .map(ErrorFile::into_error)
                .unwrap_or_else(|_| err("RUNC_KEEPER_FAILED", text, "")));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ShimError::new(
                Kind::Internal,
                "RUNC_KEEPER_FAILED",
                format!("the container's keeper process ended ({status}) before it was ready"),
                "read the error above; the runtime's log has more",
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(ShimError::new(
                Kind::Internal,
                "RUNC_KEEPER_FAILED",
                format!("the container's VM was not ready within {READY_TIMEOUT:?}"),
                "check the host's KVM and load",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An error a keeper hands to the command that started it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ErrorFile {
    code: String,
    message: String,
    hint: Option<String>,
}

impl ErrorFile {
    fn into_error(self) -> ShimError {
        ShimError {
            code: self.code,
            message: self.message,
            hint: self.hint,
            kind: Kind::Invalid,
        }
    }

    fn write(path: &Path, e: &ShimError) {
        let f = ErrorFile {
            code: e.code.clone(),
            message: e.message.clone(),
            hint: e.hint.clone(),
        };
        let _ = std::fs::write(path, serde_json::to_vec(&f).unwrap_or_default());
    }
}

fn create(a: &Args) -> Result<()> {
    let id = a.id()?;
    let bundle = match a.flag(&["bundle", "b"]) {
        Some(b) => PathBuf::from(b),
        None => std::env::current_dir().map_err(io("current directory".into()))?,
    };
    let dir = a.dir(id);
    if dir.exists() {
        return Err(err(
            "RUNC_EXISTS",
            format!("container {id:?} exists already"),
            "delete it first",
        ));
    }
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    std::fs::write(dir.join("bundle"), bundle.as_os_str().as_encoded_bytes())
        .map_err(io("write the state".into()))?;
    std::fs::write(dir.join("id"), id).map_err(io("write the state".into()))?;
    let terminal = a.flag(&["console-socket"]).filter(|s| !s.is_empty());
    if let Some(socket) = terminal {
        std::fs::write(dir.join("console"), socket).map_err(io("write the state".into()))?;
    }
    let pid = match spawn_keeper(&dir, "created", KEEP, &[&dir], terminal.is_some()) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    std::fs::write(dir.join("pid"), pid.to_string()).map_err(io("write the state".into()))?;
    if let Some(pid_file) = a.flag(&["pid-file"]) {
        std::fs::write(pid_file, pid.to_string()).map_err(io(format!("write {pid_file}")))?;
    }
    Ok(())
}

/// Writes `line` to the keeper's control FIFO.
fn control(dir: &Path, line: &str) -> Result<()> {
    let not_running = || {
        ShimError::new(
            Kind::Precondition,
            "RUNC_NOT_RUNNING",
            format!("container {} is not running", dir.display()),
            "`ferry-runc state ID` shows its state",
        )
    };
    let mut ctl = File::options()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(dir.join("ctl"))
        .map_err(|_| not_running())?;
    ctl.write_all(format!("{line}\n").as_bytes())
        .map_err(|_| not_running())
}

fn delete(a: &Args) -> Result<()> {
    let id = a.id()?;
    let dir = a.dir(id);
    if !dir.exists() {
        return Ok(());
    }
    if let Some(pid) = keeper(&dir) {
        if a.flag(&["force", "f"]).is_none() {
            return Err(ShimError::new(
                Kind::Precondition,
                "RUNC_RUNNING",
                format!("container {id:?} is running"),
                "kill it first, or delete --force",
            ));
        }
        let _ = control(&dir, &format!("signal {}", libc::SIGKILL));
        let deadline = Instant::now() + Duration::from_secs(5);
        while keeper(&dir).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if keeper(&dir).is_some() {
            // SAFETY: kill(2) of the keeper this container recorded.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    let rt = runtime()?;
    let name = vm_name(NAMESPACE, id);
    if let Ok(vm) = rt.open(&name) {
        vm.remove()?;
    }
    let _ = std::fs::remove_file(rootfs::image_path(&rt, &name));
    std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))
}

fn state(a: &Args) -> Result<()> {
    let id = a.id()?;
    let dir = a.dir(id);
    if !dir.exists() {
        return Err(ShimError::new(
            Kind::NotFound,
            "RUNC_NOT_FOUND",
            format!("container {id:?} does not exist"),
            "",
        ));
    }
    let pid = keeper(&dir);
    let mut status = if dir.join("started").exists() {
        "running"
    } else {
        "created"
    };
    if pid.is_none() {
        status = "stopped";
    } else if runtime()?
        .open_running(&vm_name(NAMESPACE, id))
        .is_ok_and(|vm| vm.is_paused())
    {
        status = "paused";
    }
    let bundle = std::fs::read_to_string(dir.join("bundle")).unwrap_or_default();
    let created = std::fs::metadata(dir.join("id"))
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH);
    let state = serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "id": id,
        "pid": pid.unwrap_or(0),
        "status": status,
        "bundle": bundle,
        "rootfs": Path::new(&bundle).join("rootfs"),
        "created": rfc3339(created),
        "owner": "",
    });
    println!("{state:#}");
    Ok(())
}

/// `t` as RFC 3339 in UTC.
fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn exec(a: &Args) -> Result<()> {
    let id = a.id()?;
    let dir = a.dir(id);
    if keeper(&dir).is_none() {
        return Err(ShimError::new(
            Kind::Precondition,
            "RUNC_NOT_RUNNING",
            format!("container {id:?} is not running"),
            "",
        ));
    }
    let process = a.flag(&["process", "p"]).ok_or_else(|| {
        err(
            "RUNC_USAGE",
            "exec needs --process FILE",
            "ferry-runc exec --process process.json ID",
        )
    })?;
    let ticket = format!("exec-{}", std::process::id());
    let console = dir.join(format!("{ticket}.console"));
    let terminal = a.flag(&["console-socket"]).filter(|s| !s.is_empty());
    if let Some(socket) = terminal {
        std::fs::write(&console, socket).map_err(io("write the state".into()))?;
    }
    let pid = spawn_keeper(
        &dir,
        &ticket,
        KEEP_EXEC,
        &[&dir, Path::new(process), Path::new(&ticket)],
        terminal.is_some(),
    );
    let _ = std::fs::remove_file(dir.join(&ticket));
    let _ = std::fs::remove_file(&console);
    let pid = pid?;
    if let Some(pid_file) = a.flag(&["pid-file"]) {
        std::fs::write(pid_file, pid.to_string()).map_err(io(format!("write {pid_file}")))?;
    }
    Ok(())
}

/// The terminal the engine asked for in `file` (its console socket's
/// path): the slave of a pty pair whose master went to the engine.
fn console(file: &Path) -> Result<Option<File>> {
    let Ok(socket) = std::fs::read_to_string(file) else {
        return Ok(None);
    };
    crate::console::send_master(Path::new(&socket))
        .map(Some)
        .map_err(io(format!("send the terminal to {socket}")))
}

/// A keeper's work: the process in the VM, its stdio on this process's
/// (or on `tty`, the terminal the engine asked for), signals passed on,
/// and this process's exit with its status.
fn run_process(vm: &Vm, launch: &Launch, control: Option<File>, tty: Option<File>) -> ! {
    let opts = ExecOptions {
        env: launch.env.clone(),
        cwd: launch.cwd.clone(),
        user: launch.user.clone(),
        stdin: Some(Vec::new()),
        timeout: None,
        tty: tty
            .as_ref()
            .map(|t| crate::console::size(t).or(launch.tty).unwrap_or((24, 80))),
    };
    let mut child = match vm.spawn(&launch.args, &opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-runc: {}", ShimError::from(e));
            std::process::exit(127);
        }
    };
    let input = child.input();
    let source: Box<dyn Read + Send> = match tty.as_ref().map(File::try_clone) {
        Some(Ok(t)) => Box::new(t),
        _ => Box::new(std::io::stdin()),
    };
    {
        let input = input.clone();
        std::thread::spawn(move || {
            let mut stdin = source;
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || input.write_stdin(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = input.close_stdin();
        });
    }
    if let Ok(mut signals) = signal_hook::iterator::Signals::new(FORWARDED) {
        let input = input.clone();
        std::thread::spawn(move || {
            for s in signals.forever() {
                let _ = input.signal(s);
            }
        });
    }
    if let Some(ctl) = control {
        let input = input.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(ctl).lines().map_while(|l| l.ok()) {
                if let Some(n) = line.strip_prefix("signal ").and_then(|n| n.parse().ok()) {
                    let _ = input.signal(n);
                }
            }
        });
    }
    if let Some(Ok(t)) = tty.as_ref().map(File::try_clone) {
        // The engine resizes the master; the process's pty follows.
        let input = input.clone();
        std::thread::spawn(move || {
            let mut last = crate::console::size(&t);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = crate::console::size(&t);
                if now != last {
                    if let Some((rows, cols)) = now {
                        let _ = input.resize(rows, cols);
                    }
                    last = now;
                }
            }
        });
    }
    let mut out: Box<dyn Write> = match tty {
        Some(t) => Box::new(t),
        None => Box::new(std::io::stdout()),
    };
    let mut errout = std::io::stderr();
    let code = loop {
        match child.next_event() {
            Ok(ChildEvent::Stdout(b)) => {
                let _ = out.write_all(&b).and_then(|()| out.flush());
            }
            Ok(ChildEvent::Stderr(b)) => {
                let _ = errout.write_all(&b);
            }
            Ok(ChildEvent::Exit(status)) => break exit_code(&status),
            Err(_) => break 128 + libc::SIGKILL as u32,
        }
    };
    std::process::exit(code as i32)
}

/// `KEEP DIR`: boots the container's VM, then runs its process on `start`.
pub fn keep(dir: &Path) -> i32 {
    let ready = (|| -> Result<(Vm, Launch, Option<File>)> {
        let bundle = PathBuf::from(
            std::fs::read_to_string(dir.join("bundle")).map_err(io("read the state".into()))?,
        );
        let id = std::fs::read_to_string(dir.join("id")).map_err(io("read the state".into()))?;
        let spec = Spec::load(&bundle)?;
        let launch = spec
            .process
            .as_ref()
            .ok_or_else(|| err("SHIM_SPEC_INVALID", "the spec has no process", ""))?
            .launch()?;
        let rt = runtime()?;
        let name = vm_name(NAMESPACE, &id);
        let image = rootfs::image_path(&rt, &name);
        rootfs::prepare(&image, &spec.root_dir(&bundle), &[], |r| {
            rootfs::check_executable(r, &launch.args[0], launch.path())
        })?;
        if let Ok(old) = rt.open(&name) {
            let _ = old.remove();
        }
        let vm = rt.boot(BootOptions {
            image: Some(image),
            name: Some(name),
            cpus: spec.cpus(),
            memory_mib: spec.memory_mib(),
            ephemeral: true,
            ..BootOptions::default()
        })?;
        mkfifo(&dir.join("ctl"))?;
        let tty = console(&dir.join("console"))?;
        Ok((vm, launch, tty))
    })();
    let (vm, launch, tty) = match ready {
        Ok(r) => r,
        Err(e) => {
            ErrorFile::write(&dir.join("created.error"), &e);
            if let (Ok(rt), Ok(id)) = (runtime(), std::fs::read_to_string(dir.join("id"))) {
                let _ = std::fs::remove_file(rootfs::image_path(&rt, &vm_name(NAMESPACE, &id)));
            }
            return 1;
        }
    };
    // Read and write, so the FIFO never reports an end between writers.
    let ctl = match File::options().read(true).write(true).open(dir.join("ctl")) {
        Ok(f) => f,
        Err(e) => {
            ErrorFile::write(
                &dir.join("created.error"),
                &io("open the control FIFO".into())(e),
            );
            return 1;
        }
    };
    let _ = std::fs::write(dir.join("created"), b"");
    let mut lines = BufReader::new(ctl);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            return 1;
        }
        let line = line.trim();
        if line == "start" {
            break;
        }
        if let Some(n) = line
            .strip_prefix("signal ")
            .and_then(|n| n.parse::<i32>().ok())
        {
            // Killed before it started.
            let _ = vm.remove();
            return 128 + n;
        }
    }
    let _ = std::fs::write(dir.join("started"), b"");
    run_process(&vm, &launch, Some(lines.into_inner()), tty)
}

/// `KEEP_EXEC DIR PROCESS TICKET`: runs an exec'd process in the
/// container's VM.
pub fn keep_exec(dir: &Path, process: &Path, ticket: &str) -> i32 {
    let ready = (|| -> Result<(Vm, Launch, Option<File>)> {
        let id = std::fs::read_to_string(dir.join("id")).map_err(io("read the state".into()))?;
        let text = std::fs::read(process).map_err(io(format!("read {}", process.display())))?;
        let launch = Process::parse(&text)?.launch()?;
        let vm = runtime()?.open_running(&vm_name(NAMESPACE, &id))?;
        let tty = console(&dir.join(format!("{ticket}.console")))?;
        Ok((vm, launch, tty))
    })();
    match ready {
        Ok((vm, launch, tty)) => {
            let _ = std::fs::write(dir.join(ticket), b"");
            run_process(&vm, &launch, None, tty)
        }
        Err(e) => {
            ErrorFile::write(&dir.join(format!("{ticket}.error")), &e);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn runc_command_lines_parse() {
        let a = Args::parse(&args(
            "--root /run/x --log /tmp/log.json --log-format json create --bundle /b --pid-file /p/pid abc",
        ));
        assert_eq!(a.root.as_deref(), Some(Path::new("/run/x")));
        assert_eq!(a.log.as_deref(), Some(Path::new("/tmp/log.json")));
        assert_eq!(a.command, "create");
        assert_eq!(a.flag(&["bundle", "b"]), Some("/b"));
        assert_eq!(a.flag(&["pid-file"]), Some("/p/pid"));
        assert_eq!(a.id().unwrap(), "abc");
        assert_eq!(a.dir("abc"), Path::new("/run/x/abc"));

        let k = Args::parse(&args("--root /r kill --all abc 15"));
        assert_eq!(k.command, "kill");
        assert_eq!(k.positional, ["abc", "15"]);
        assert!(k.flag(&["all"]).is_some());
        let e = Args::parse(&args(
            "exec --process=/tmp/p.json --detach --pid-file /x abc",
        ));
        assert_eq!(e.flag(&["process", "p"]), Some("/tmp/p.json"));
        assert_eq!(Args::parse(&args("--version")).command, "--version");
        assert_eq!(
            Args::parse(&args("delete --force abc")).flag(&["force"]),
            Some("")
        );
        assert_eq!(
            Args::parse(&args("state")).id().unwrap_err().code,
            "RUNC_USAGE"
        );
    }

    #[test]
    fn signals_and_times() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert!(parse_signal("SIGNOPE").is_err());
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_515_200 + 3_661);
        assert_eq!(rfc3339(t), "2026-12-06T01:01:01Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn state_of_a_missing_container_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Args {
            root: Some(tmp.path().to_path_buf()),
            command: "state".into(),
            positional: vec!["nope".into()],
            ..Args::default()
        };
        assert_eq!(state(&a).unwrap_err().code, "RUNC_NOT_FOUND");
        let d = Args {
            command: "delete".into(),
            ..a
        };
        assert!(
            delete(&d).is_ok(),
            "deleting what is not there is not an error"
        );
        assert_eq!(keeper(tmp.path()), None);
    }
}
