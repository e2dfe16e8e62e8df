//! A log file of bounded size: once it reaches its limit, `NAME` becomes
//! `NAME.1` (replacing the previous one) and a new `NAME` is started, so at
//! most about twice the limit is kept. `ferry-vmm` writes its `vmm.log`
//! through one.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Size at which a VMM process's `vmm.log` is rotated to `vmm.log.1`.
pub const VMM_LOG_LIMIT: u64 = 8 << 20;

/// An append-only log file (mode 0600) that rotates at a size limit, between
/// lines (a line longer than the limit makes a part that long).
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    limit: u64,
    file: File,
    /// Bytes in the current file, as far as this writer knows.
    size: u64,
    /// Whether the last write ended a line: rotation waits for one, so no
    /// line is split between two files.
    line_done: bool,
    /// Descriptors made to point at the current file after each rotation.
    follow: Vec<RawFd>,
}

/// `NAME.1`, where the previous part of the log `path` is kept.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

impl RotatingLog {
    /// Opens `path` for appending (creating it; mode 0600 either way),
    /// rotating once it holds `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> std::io::Result<RotatingLog> {
        let file = crate::fsutil::open_private_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            limit,
            file,
            size,
            line_done: true,
            follow: Vec::new(),
        })
    }

    /// Makes this process's stdout and stderr the log, now and after every
    /// rotation, so what is written to them directly (a panic message, a
    /// last error line) lands in the current file and never keeps a rotated
    /// one growing.
    pub fn with_stdio(self) -> std::io::Result<RotatingLog> {
        self.following(&[libc::STDOUT_FILENO, libc::STDERR_FILENO])
    }

    /// Points each descriptor of `fds` at the log, now and after every rotation.
    pub fn following(mut self, fds: &[RawFd]) -> std::io::Result<RotatingLog> {
        self.follow = fds.to_vec();
        self.redirect()?;
        Ok(self)
    }

    fn redirect(&self) -> std::io::Result<()> {
        for &fd in &self.follow {
            // SAFETY: dup2 makes `fd` another descriptor of the open log file
            // (closing what `fd` was); `self.file` stays open across the call
            // and no memory is touched.
            if unsafe { libc::dup2(self.file.as_raw_fd(), fd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Moves the current file to `NAME.1` and starts a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        match std::fs::rename(&self.path, rotated_path(&self.path)) {
            Ok(()) => {}
            // Removed from under us: start a new one all the same.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.file = crate::fsutil::open_private_append(&self.path)?;
        self.size = 0;
        self.redirect()
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.line_done
            && self.size > 0
            && self.size.saturating_add(buf.len() as u64) > self.limit
        {
            if let Err(e) = self.rotate() {
                // Keep logging where we are; try again after another `limit`.
                self.size = 0;
                let _ = writeln!(
                    self.file,
                    "log rotation of {} failed: {e}",
                    self.path.display()
                );
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        if n > 0 {
            self.line_done = buf[n - 1] == b'\n';
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_log_rotates_at_its_limit_and_keeps_the_newest_two_parts() {
        crate::fsutil::permissive_umask();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        // What the runtime leaves: the file exists already, made under its umask.
        std::fs::write(&path, b"start\n").unwrap();
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        for i in 0..500 {
            writeln!(log, "line {i:04} of the log").unwrap();
        }
        log.flush().unwrap();
        let (now, before) = (lines(&path), lines(&rotated_path(&path)));
        // `writeln!` writes a line in pieces: a part may end one line past
        // the limit, never more, and no line is split.
        let line = "line 0000 of the log\n".len() as u64;
        assert!(std::fs::metadata(&path).unwrap().len() <= 1000 + line);
        assert!(std::fs::metadata(rotated_path(&path)).unwrap().len() <= 1000 + line);
        assert_eq!(now.last().unwrap(), "line 0499 of the log");
        // Nothing is lost between the two parts: they join up.
        let joined: Vec<String> = before.iter().chain(&now).cloned().collect();
        let first: usize = joined[0][5..9].parse().unwrap();
        let expected: Vec<String> = (first..500)
            .map(|i| format!("line {i:04} of the log"))
            .collect();
        assert_eq!(joined, expected);
        assert!(!dir.path().join("vmm.log.2").exists());
        for p in [path.clone(), rotated_path(&path)] {
            assert_eq!(crate::fsutil::mode_of(&p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn followed_descriptors_move_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        // Stands in for stderr.
        let other = File::create(dir.path().join("elsewhere")).unwrap();
        let fd = other.as_raw_fd();
        let mut log = RotatingLog::open(&path, 100)
            .unwrap()
            .following(&[fd])
            .unwrap();
        let mut direct = &other;
        direct.write_all(b"direct one\n").unwrap();
        log.write_all(&[b'x'; 99]).unwrap();
        log.write_all(b"\n").unwrap();
        log.write_all(b"after\n").unwrap();
        direct.write_all(b"direct two\n").unwrap();
        assert_eq!(lines(&path), ["after", "direct two"]);
        assert_eq!(lines(&rotated_path(&path))[0], "direct one");
        assert!(lines(&dir.path().join("elsewhere")).is_empty());
    }
}
