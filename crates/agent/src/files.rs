//! File transfer: atomic writes and chunked reads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_protocol::{
    read_frame, write_frame, ErrorCode, Message, ProtocolError, Stream, CHUNK_SIZE,
};

use crate::agent_log;
use crate::error::AgentError;

/// Sends an `Error`, which ends the operation; returns whether it was sent.
fn send_error(conn: &mut Box<dyn Stream>, e: AgentError) -> bool {
    write_frame(conn, &Message::error(e.code, e.message)).is_ok()
}

fn check_path(path: &str) -> Result<&Path, AgentError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.file_name().is_none() || path.contains('\0') {
        return Err(AgentError::new(
            ErrorCode::FileIo,
            format!("{path:?}: need an absolute path to a file"),
        ));
    }
    Ok(p)
}

/// A temp file next to the target, removed unless committed.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(target: &Path) -> io::Result<TempFile> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let path = target.with_file_name(format!(
            ".{name}.ferry-{}-{}.tmp",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    /// Sets the mode, fsyncs, renames over `target` and fsyncs the directory
    /// so the rename itself is durable.
    fn commit(mut self, target: &Path, mode: u32) -> io::Result<()> {
        let file = self.file.take().expect("file present until commit");
        // Explicit chmod: the create mode is subject to the umask.
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.path, target)?;
        self.path = PathBuf::new();
        if let Some(dir) = target.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Serves a `WriteFile`: acknowledges once the temp file exists, receives
/// data until `FileEnd`, then commits atomically. On failure the temp file
/// is removed and the target is untouched. Returns whether the connection
/// is at a request boundary afterwards.
pub fn write(conn: &mut Box<dyn Stream>, path: &str, mode: u32, create_parents: bool) -> bool {
    let mut tmp = match temp_for(path, create_parents) {
        Ok(t) => t,
        Err(e) => return send_error(conn, e),
    };
    if write_frame(conn, &Message::Ok).is_err() {
        return false;
    }
    let mut size = 0u64;
    let mut failed: Option<AgentError> = None;
    loop {
        match read_frame(conn) {
            Ok(Message::FileData(data)) => {
                if failed.is_some() {
                    continue;
                }
                let file = tmp.file.as_mut().expect("open until commit");
                match file.write_all(&data) {
                    Ok(()) => size += data.len() as u64,
                    Err(e) => {
                        let err = AgentError::file(path, &e);
                        // Tell the host now so it can stop sending; keep
                        // draining so it reads the error, not a reset.
                        if !send_error(conn, err.clone()) {
                            return false;
                        }
                        failed = Some(err);
                    }
                }
            }
            Ok(Message::FileEnd) => break,
            // The host does not follow the protocol: it is out of sync.
            Ok(other) => {
                if failed.is_none() {
                    send_error(
                        conn,
                        AgentError::new(
                            ErrorCode::Unexpected,
                            format!("{} during file write", other.name()),
                        ),
                    );
                }
                return false;
            }
            Err(ProtocolError::Closed) => return false,
            Err(e) => {
                if failed.is_none() {
                    send_error(conn, AgentError::new(e.code(), e.to_string()));
                }
                return false;
            }
        }
    }
    if failed.is_some() {
        // The error was sent; the host reads it after its FileEnd.
        return true;
    }
    match tmp.commit(Path::new(path), mode) {
        Ok(()) => write_frame(conn, &Message::FileWritten { size }).is_ok(),
        Err(e) => {
            agent_log!("write {path}: {e}");
            send_error(conn, AgentError::file(path, &e))
        }
    }
}

/// The temp file a write of `path` fills before it is renamed into place,
/// after the path is checked (and its parents made when asked).
fn temp_for(path: &str, create_parents: bool) -> Result<TempFile, AgentError> {
    let target = check_path(path)?;
    if create_parents {
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).map_err(|e| AgentError::file(path, &e))?;
        }
    }
    if target.is_dir() {
        return Err(AgentError::new(
            ErrorCode::FileIsDirectory,
            format!("{path}: is a directory"),
        ));
    }
    TempFile::create(target).map_err(|e| AgentError::file(path, &e))
}

/// Writes `data` to `path` atomically (temp file, fsync, rename), making
/// missing parents: a staged file of an `ExecBatch`.
pub fn write_whole(path: &str, mode: u32, data: &[u8]) -> Result<(), AgentError> {
    let mut tmp = temp_for(path, true)?;
    tmp.file
        .as_mut()
        .expect("open until commit")
        .write_all(data)
        .map_err(|e| AgentError::file(path, &e))?;
    tmp.commit(Path::new(path), mode)
        .map_err(|e| AgentError::file(path, &e))
}

/// Serves a `Stat`: a `FileInfo` with the full mode (type bits included) of
/// `path` itself (a final symlink is not followed), or an `Error`.
pub fn stat(conn: &mut Box<dyn Stream>, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let meta = check_path(path)
        .and_then(|_| std::fs::symlink_metadata(path).map_err(|e| AgentError::file(path, &e)));
    match meta {
        Ok(m) => write_frame(
            conn,
            &Message::FileInfo {
                size: m.len(),
                mode: m.mode(),
            },
        )
        .is_ok(),
        Err(e) => send_error(conn, e),
    }
}

/// Serves a `ReadFile`: `FileInfo`, data chunks, `FileEnd` (or an `Error`
/// in their place). Returns whether the connection is at a request boundary.
pub fn read(conn: &mut Box<dyn Stream>, path: &str) -> bool {
    let opened = (|| {
        check_path(path)?;
        let f = File::open(path).map_err(|e| AgentError::file(path, &e))?;
        let meta = f.metadata().map_err(|e| AgentError::file(path, &e))?;
        if meta.is_dir() {
            return Err(AgentError::new(
                ErrorCode::FileIsDirectory,
                format!("{path}: is a directory"),
            ));
        }
        Ok((f, meta))
    })();
    let (mut f, meta) = match opened {
        Ok(x) => x,
        Err(e) => return send_error(conn, e),
    };
    let info = Message::FileInfo {
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    };
    if write_frame(conn, &info).is_err() {
        return false;
    }
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return write_frame(conn, &Message::FileEnd).is_ok(),
            Ok(n) => {
                if write_frame(conn, &Message::FileData(buf[..n].to_vec())).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return send_error(conn, AgentError::file(path, &e)),
        }
    }
}
