//! Running external tools with their output captured to a log file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::InstallError;

/// Runs `cmd`, appending stdout and stderr to `log`. `on_line` sees each line as it
/// arrives (for progress display). Fails with the log's tail on a non-zero exit.
pub fn run_logged(
    what: &str,
    cmd: &mut Command,
    log: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<(), InstallError> {
    use std::io::Write;
    let mut logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(InstallError::io(format!("open log {}", log.display())))?;
    let _ = writeln!(logf, "$ {cmd:?}");
    let (reader, writer) = std::io::pipe().map_err(InstallError::io("create pipe"))?;
    let writer2 = writer.try_clone().map_err(InstallError::io("clone pipe"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(InstallError::io(format!("start {what}")))?;
    // Drop our copies of the write end (held by `cmd`) so EOF arrives when the child exits.
    drop(std::mem::replace(cmd, Command::new("true")));
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.map_err(InstallError::io("read output"))?;
        let line = String::from_utf8_lossy(&line);
        let _ = writeln!(logf, "{line}");
        on_line(&line);
    }
    let status = child
        .wait()
        .map_err(InstallError::io(format!("wait for {what}")))?;
    if status.success() {
        return Ok(());
    }
    Err(InstallError::CommandFailed {
        what: what.to_string(),
        status: status.to_string(),
        log: log.to_path_buf(),
        tail: tail(log, 20),
    })
}

/// Runs `cmd` and returns its stdout, or None if it could not run or failed.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of a file (reads at most the last 64 KiB).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = String::new();
    let _ = f.read_to_string(&mut buf);
    let lines: Vec<&str> = buf.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Searches PATH (plus the sbin directories non-root PATHs often miss) for a program.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
