//! Starting a process with `posix_spawn`, without forking the agent.
//!
//! glibc's `posix_spawn` runs the child on its own stack in the agent's
//! address space (`CLONE_VM | CLONE_VFORK`) until it calls `execve`, so no
//! page tables are copied and the agent takes no copy-on-write faults
//! afterwards. Under nested virtualization that is a large part of what
//! starting a short command costs. It covers what most execs need: stdio,
//! a new session, a working directory and a clean signal state. Anything
//! else (another user, a controlling terminal) goes through `Command` and
//! `fork`.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};

/// What to start: everything already encoded for `execve`.
pub struct SpawnArgs<'a> {
    /// Absolute path of the executable.
    pub program: &'a CStr,
    /// Arguments, `argv[0]` first.
    pub argv: &'a [CString],
    /// `KEY=value` strings.
    pub env: &'a [CString],
    /// Working directory.
    pub cwd: &'a CStr,
    /// Descriptors that become the child's fds 0, 1 and 2.
    pub stdio: [BorrowedFd<'a>; 3],
}

/// Owns an initialized `posix_spawn_file_actions_t`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        let mut fa = MaybeUninit::uninit();
        // SAFETY: init writes the whole structure before we read it.
        check(unsafe { libc::posix_spawn_file_actions_init(fa.as_mut_ptr()) })?;
        // SAFETY: initialized just above.
        Ok(FileActions(unsafe { fa.assume_init() }))
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialized in new() and destroyed only here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owns an initialized `posix_spawnattr_t`.
struct Attr(libc::posix_spawnattr_t);

impl Attr {
    fn new() -> io::Result<Attr> {
        let mut attr = MaybeUninit::uninit();
        // SAFETY: init writes the whole structure before we read it.
        check(unsafe { libc::posix_spawnattr_init(attr.as_mut_ptr()) })?;
        // SAFETY: initialized just above.
        Ok(Attr(unsafe { attr.assume_init() }))
    }
}

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialized in new() and destroyed only here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// posix_spawn functions return an errno value instead of setting errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Every signal, 1 to 64: the child starts with all of them at their
/// default. An exec'd command must not inherit what the agent happens to
/// ignore (std ignores `SIGPIPE`; an agent started from a background shell
/// ignores `SIGINT` and `SIGQUIT`, which would make Ctrl-C on a pty do
/// nothing). `SIGKILL` and `SIGSTOP` cannot be changed and glibc skips them.
fn to_default() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the whole set.
    let mut set = unsafe {
        let mut set = MaybeUninit::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    };
    // sigaddset refuses glibc's internal signals (32 and 33), so the bits
    // are set directly: a sigset_t starts with the kernel's 64-bit mask,
    // bit n-1 standing for signal n.
    const _: () = assert!(std::mem::size_of::<libc::sigset_t>() >= 8);
    const _: () = assert!(std::mem::align_of::<libc::sigset_t>() >= 8);
    // SAFETY: the set is at least 8 bytes and 8-aligned (checked above)
    // and any bit pattern is a valid sigset_t.
    unsafe { *std::ptr::from_mut(&mut set).cast::<u64>() = u64::MAX };
    set
}

/// Pointers to the strings, NULL-terminated, for `execve`.
fn pointers(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// Starts the process and returns its pid. The child gets `stdio` as fds
/// 0-2, starts a new session, changes into `cwd`, has an empty signal mask
/// and every signal at its default (see [`to_default`]), and execs
/// `program`. A failure of any of these steps in the child is returned as
/// its errno; the child is then already reaped.
pub fn spawn(args: &SpawnArgs<'_>) -> io::Result<libc::pid_t> {
    let mut actions = FileActions::new()?;
    for (target, fd) in args.stdio.iter().enumerate() {
        // SAFETY: `actions` is initialized; the fds are open for the call.
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut actions.0, fd.as_raw_fd(), target as i32)
        })?;
    }
    // SAFETY: as above; glibc copies the path.
    check(unsafe {
        libc::posix_spawn_file_actions_addchdir_np(&mut actions.0, args.cwd.as_ptr())
    })?;

    let mut attr = Attr::new()?;
    // SAFETY: the sigset_t is initialized by sigemptyset before use.
    let empty = unsafe {
        let mut set = MaybeUninit::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    };
    let sigdefault = to_default();
    let flags = libc::POSIX_SPAWN_SETSID
        | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short
        | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short;
    // SAFETY: `attr` is initialized; the sets are initialized and copied.
    unsafe {
        check(libc::posix_spawnattr_setflags(&mut attr.0, flags))?;
        check(libc::posix_spawnattr_setsigmask(&mut attr.0, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(
            &mut attr.0,
            &sigdefault,
        ))?;
    }

    let argv = pointers(args.argv);
    let envp = pointers(args.env);
    let mut pid: libc::pid_t = 0;
    // SAFETY: all pointers are valid, NUL-terminated C strings and
    // NULL-terminated arrays that outlive the call; glibc waits for the
    // child to exec (or fail) before it returns.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            args.program.as_ptr(),
            &actions.0,
            &attr.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// Sets every signal the process may change back to its default, as
/// [`spawn`] does for its children; for the `fork` path, in the child before
/// `execve`. Raw `rt_sigaction` calls, because glibc's wrapper refuses its
/// internal signals (32 and 33); safe after a fork.
pub fn reset_signal_dispositions() {
    /// The kernel's `struct sigaction` on x86_64 and aarch64.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `dfl` is a valid kernel sigaction with SIG_DFL as handler,
        // 8 is the size of the kernel's signal set, no old action is asked
        // for; errors are ignored (nothing to undo).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
}
