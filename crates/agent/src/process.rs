//! Building the `Command` for an exec request or the main process.

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ferry_protocol::ErrorCode;
use nix::unistd::{Gid, Uid};

use crate::error::AgentError;
use crate::users::{self, Identity};

/// `PATH` given to processes that do not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run and how; shared by execs and the main process.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Variables overriding the defaults.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// User spec; unset keeps the agent's identity.
    pub user: Option<String>,
    /// Run on a terminal: sets `TERM` and makes stdin the controlling tty.
    pub tty: bool,
}

/// Builds a ready-to-spawn command: program resolved on `PATH`, a clean
/// environment, and a child-side hook that starts a new session (so the
/// process group can be signalled as a whole), acquires the controlling
/// terminal in tty mode, drops to the requested identity and changes into
/// the working directory as that identity.
///
/// Everything that can fail in a reportable way is checked here, in the
/// agent, so the host gets a precise code instead of a bare errno.
pub fn build_command(spec: &ProcessSpec, etc_dir: &Path) -> Result<Command, AgentError> {
    plan(spec, etc_dir)?.command()
}

/// A checked, fully resolved process start: what [`build_command`] and
/// [`Plan::spawn_direct`] run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The resolved executable.
    program: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    /// The identity to switch to, if a user was requested.
    switch_to: Option<Identity>,
    tty: bool,
}

/// Checks and resolves `spec` (see [`build_command`]) without building
/// anything to run yet.
pub fn plan(spec: &ProcessSpec, etc_dir: &Path) -> Result<Plan, AgentError> {
    let invalid = |m: String| AgentError::new(ErrorCode::ExecInvalid, m);
    let Some(arg0) = spec.argv.first() else {
        return Err(invalid("argv is empty".into()));
    };
    if arg0.is_empty() {
        return Err(invalid("argv[0] is empty".into()));
    }
    let strings = spec
        .argv
        .iter()
        .chain(spec.env.iter().flat_map(|(k, v)| [k, v]))
        .chain(spec.cwd.iter());
    for s in strings {
        if s.contains('\0') {
            return Err(invalid(format!("NUL byte in {s:?}")));
        }
    }
    if let Some((k, _)) = spec
        .env
        .iter()
        .find(|(k, _)| k.is_empty() || k.contains('='))
    {
        return Err(invalid(format!("bad environment variable name {k:?}")));
    }

    let switch_to = match &spec.user {
        Some(u) => Some(
            users::resolve(u, etc_dir)
                .map_err(|e| AgentError::new(ErrorCode::ExecUserUnknown, e.to_string()))?,
        ),
        None => None,
    };
    let me = match &switch_to {
        Some(id) => id.clone(),
        None => current_identity(etc_dir),
    };

    let env = environment(spec, &me);
    let cwd = PathBuf::from("/").join(spec.cwd.as_deref().unwrap_or("/"));
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::new(
                ErrorCode::ExecBadCwd,
                format!("{}: not a directory", cwd.display()),
            ))
        }
        Err(e) => {
            return Err(AgentError::new(
                ErrorCode::ExecBadCwd,
                format!("{}: {e}", cwd.display()),
            ))
        }
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = resolve_program(arg0, path_var, &cwd)?;
    Ok(Plan {
        program,
        argv: spec.argv.clone(),
        env,
        cwd,
        switch_to,
        tty: spec.tty,
    })
}

impl Plan {
    /// Whether [`Plan::spawn_direct`] can start this process: it runs as
    /// the agent's own user and without a controlling terminal.
    pub fn direct(&self) -> bool {
        self.switch_to.is_none() && !self.tty
    }

    /// Starts the process with `posix_spawn` (see [`crate::spawn`]) with
    /// `stdio` as its fds 0-2 and returns its pid. Only for plans that are
    /// [`Plan::direct`]. `ENOEXEC` (a script without `#!`) is returned as
    /// is: [`Plan::command`] runs such files through `/bin/sh` instead.
    pub fn spawn_direct(&self, stdio: [BorrowedFd<'_>; 3]) -> io::Result<libc::pid_t> {
        debug_assert!(self.direct());
        let c =
            |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        let program = c(self.program.as_os_str().as_bytes())?;
        let cwd = c(self.cwd.as_os_str().as_bytes())?;
        let argv = self
            .argv
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        // Sorted by name, as std's `Command` passes them.
        let mut vars: Vec<&(String, String)> = self.env.iter().collect();
        vars.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let env = vars
            .iter()
            .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        crate::spawn::spawn(&crate::spawn::SpawnArgs {
            program: &program,
            argv: &argv,
            env: &env,
            cwd: &cwd,
            stdio,
        })
    }

    /// A ready-to-spawn `Command` (stdio still to be set).
    pub fn command(self) -> Result<Command, AgentError> {
        let Plan {
            program,
            argv,
            env,
            cwd,
            switch_to,
            tty,
        } = self;
        let mut cmd = Command::new(&program);
        cmd.arg0(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));

        // Prepared before fork: the child may only make raw syscalls.
        let cwd_c = CString::new(cwd.as_os_str().as_encoded_bytes())
            .map_err(|_| AgentError::new(ErrorCode::ExecInvalid, "NUL byte in cwd"))?;
        let ids = switch_to.map(|id| {
            (
                Uid::from_raw(id.uid),
                Gid::from_raw(id.gid),
                id.groups
                    .iter()
                    .map(|g| Gid::from_raw(*g))
                    .collect::<Vec<_>>(),
            )
        });
        let hook = move || -> io::Result<()> {
            crate::spawn::reset_signal_dispositions();
            nix::unistd::setsid()?;
            if tty {
                // SAFETY: std has already dup2'ed the pty slave onto fd 0 before
                // running this hook, and it stays open until exec.
                let stdin = unsafe { BorrowedFd::borrow_raw(0) };
                rustix::process::ioctl_tiocsctty(stdin)?;
            }
            if let Some((uid, gid, groups)) = &ids {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            nix::unistd::chdir(cwd_c.as_c_str())?;
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only makes
        // system calls through libc/nix/rustix (rt_sigaction, setsid, ioctl,
        // setgroups, setgid, setuid, chdir) on data prepared before the fork;
        // it neither allocates nor takes locks.
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(cmd)
    }
}

/// The identity the agent itself runs as (root in the guest), for `HOME`,
/// `USER` and `LOGNAME`. Cached: most execs name no user, and re-reading
/// passwd and group for each of them is wasted work. The cache holds as
/// long as neither file has changed.
fn current_identity(etc_dir: &Path) -> Identity {
    static CACHE: Mutex<Option<(DbStamp, Identity)>> = Mutex::new(None);
    let stamp = DbStamp::of(etc_dir);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((s, id)) = cache.as_ref() {
        if *s == stamp {
            return id.clone();
        }
    }
    let id = lookup_current_identity(etc_dir);
    *cache = Some((stamp, id.clone()));
    id
}

fn lookup_current_identity(etc_dir: &Path) -> Identity {
    let uid = nix::unistd::getuid().as_raw();
    if uid == 0 {
        return users::root_identity(etc_dir);
    }
    users::resolve(&uid.to_string(), etc_dir).unwrap_or(Identity {
        uid,
        gid: nix::unistd::getgid().as_raw(),
        groups: Vec::new(),
        name: None,
        home: "/".into(),
    })
}

/// What identifies one version of the user databases: where they are and
/// the file metadata that any change (in place or by rename) alters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DbStamp {
    etc_dir: PathBuf,
    files: [Option<FileStamp>; 2],
}

/// Device, inode, mtime, ctime (seconds and nanoseconds) and size.
type FileStamp = (u64, u64, i64, i64, i64, i64, u64);

impl DbStamp {
    fn of(etc_dir: &Path) -> DbStamp {
        let stamp = |name: &str| {
            std::fs::metadata(etc_dir.join(name)).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.size(),
                )
            })
        };
        DbStamp {
            etc_dir: etc_dir.to_path_buf(),
            files: [stamp("passwd"), stamp("group")],
        }
    }
}

/// Default variables, then the request's, later ones replacing earlier.
fn environment(spec: &ProcessSpec, me: &Identity) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), me.home.clone()),
    ];
    if let Some(name) = &me.name {
        env.push(("USER".into(), name.clone()));
        env.push(("LOGNAME".into(), name.clone()));
    }
    if spec.tty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    for (k, v) in &spec.env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// Finds the executable like `execvp` would, but reports precisely.
pub fn resolve_program(arg0: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, AgentError> {
    let check = |p: &Path| -> Option<Result<(), AgentError>> {
        let m = std::fs::metadata(p).ok()?;
        if m.is_file() && m.permissions().mode() & 0o111 != 0 {
            Some(Ok(()))
        } else {
            Some(Err(AgentError::new(
                ErrorCode::ExecPermissionDenied,
                format!("{}: not an executable file", p.display()),
            )))
        }
    };
    if arg0.contains('/') {
        let p = cwd.join(arg0);
        return match check(&p) {
            Some(Ok(())) => Ok(p),
            Some(Err(e)) => Err(e),
            None => Err(AgentError::new(
                ErrorCode::ExecNotFound,
                format!("{arg0}: no such file"),
            )),
        };
    }
    let mut denied = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let p = cwd.join(dir).join(arg0);
        match check(&p) {
            Some(Ok(())) => return Ok(p),
            Some(Err(e)) => {
                denied.get_or_insert(e);
            }
            None => {}
        }
    }
    Err(denied.unwrap_or_else(|| {
        AgentError::new(
            ErrorCode::ExecNotFound,
            format!("{arg0}: command not found in PATH={path_var}"),
        )
    }))
}

/// Maps a spawn failure (after our own checks passed) to a code.
pub fn spawn_error(arg0: &str, e: &io::Error) -> AgentError {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::ExecNotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::ExecPermissionDenied,
        _ => ErrorCode::ExecFailed,
    };
    AgentError::new(code, format!("cannot start {arg0}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn resolves_on_path_and_reports_precisely() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(bin.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(bin.join("data"), "x").unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(
            resolve_program("tool", &path, Path::new("/")).unwrap(),
            bin.join("tool")
        );
        assert_eq!(
            resolve_program("data", &path, Path::new("/"))
                .unwrap_err()
                .code,
            ErrorCode::ExecPermissionDenied
        );
        assert_eq!(
            resolve_program("nope", &path, Path::new("/"))
                .unwrap_err()
                .code,
            ErrorCode::ExecNotFound
        );
        assert_eq!(
            resolve_program("./tool", "", &bin).unwrap(),
            bin.join("./tool")
        );
        assert_eq!(
            resolve_program("./nope", "", &bin).unwrap_err().code,
            ErrorCode::ExecNotFound
        );
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let me = Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            name: Some("alice".into()),
            home: "/home/alice".into(),
        };
        let spec = ProcessSpec {
            argv: vec!["x".into()],
            env: vec![("PATH".into(), "/opt/bin".into()), ("A".into(), "1".into())],
            tty: true,
            ..Default::default()
        };
        let env = environment(&spec, &me);
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/opt/bin"));
        assert_eq!(get("HOME"), Some("/home/alice"));
        assert_eq!(get("USER"), Some("alice"));
        assert_eq!(get("LOGNAME"), Some("alice"));
        assert_eq!(get("TERM"), Some("xterm-256color"));
        assert_eq!(get("A"), Some("1"));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }

    #[test]
    fn the_cached_identity_follows_passwd_changes() {
        let d = tempfile::tempdir().unwrap();
        let passwd = d.path().join("passwd");
        fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        let me = |dir: &Path| lookup_current_identity(dir);
        assert_eq!(current_identity(d.path()), me(d.path()));
        // A change of the same size within the same clock tick still
        // changes the inode when written by rename, as editors and
        // useradd do.
        let tmp = d.path().join("passwd.new");
        fs::write(&tmp, "root:x:0:0:root:/home/r:/bin/sh\n").unwrap();
        fs::rename(&tmp, &passwd).unwrap();
        assert_eq!(current_identity(d.path()), me(d.path()));
        assert_eq!(current_identity(Path::new("/etc")), me(Path::new("/etc")));
    }

    #[test]
    fn invalid_specs_are_rejected_before_spawning() {
        let etc = Path::new("/etc");
        let spec = |argv: &[&str]| ProcessSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let code = |s: &ProcessSpec| build_command(s, etc).unwrap_err().code;
        assert_eq!(code(&spec(&[])), ErrorCode::ExecInvalid);
        assert_eq!(code(&spec(&["a\0b"])), ErrorCode::ExecInvalid);
        let mut s = spec(&["true"]);
        s.env.push(("A=B".into(), "x".into()));
        assert_eq!(code(&s), ErrorCode::ExecInvalid);
        let mut s = spec(&["true"]);
        s.cwd = Some("/nonexistent-dir".into());
        assert_eq!(code(&s), ErrorCode::ExecBadCwd);
        let mut s = spec(&["true"]);
        s.user = Some("no-such-user-here".into());
        assert_eq!(code(&s), ErrorCode::ExecUserUnknown);
        assert_eq!(
            code(&spec(&["no-such-program-here"])),
            ErrorCode::ExecNotFound
        );
    }
}
