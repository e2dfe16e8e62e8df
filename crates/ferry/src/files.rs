//! Directory trees into and out of a guest, as tar streams through an exec
//! of the agent's own tar tools (the agent's file requests carry one file
//! each), or of the guest's `tar` under an agent from before the tools.

use std::io::Write;
use std::path::Path;

use ferry_protocol::{tools, Client, ExecEvent, ExecRequest};

use crate::error::{Error, Result};

/// How far a copy into or out of a VM has got, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    /// Bytes moved so far: file data for a file, the tar stream for a tree.
    pub bytes: u64,
    /// What there is to move, when known beforehand (for a tree coming out
    /// of a VM it is not).
    pub total: Option<u64>,
}

fn tar_failed(
    what: &str,
    tools: bool,
    status: &ferry_protocol::ExitStatus,
    stderr: &[u8],
) -> Error {
    Error::new(
        "COPY_TREE_FAILED",
        format!(
            "{what}: tar in the guest ended with {status:?}: {}",
            String::from_utf8_lossy(stderr).trim()
        ),
        Some(if tools {
            "check the guest path and the space left in the guest".into()
        } else {
            "this VM's agent predates its own tar tools: copying a directory tree needs `tar` in the guest".into()
        }),
    )
}

fn local_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::new("LOCAL_IO", format!("{what}: {e}"), None)
}

/// Whether `path` is a directory in the guest.
pub(crate) fn guest_is_dir(client: &Client, path: &str) -> Result<bool> {
    if path.trim_end_matches('/').is_empty() {
        return Ok(true);
    }
    match client.stat(path.trim_end_matches('/')) {
        Ok((_, mode)) => Ok(mode & S_IFMT == S_IFDIR),
        // A path that is not there is not a directory.
        Err(ferry_protocol::ClientError::Agent {
            code: ferry_protocol::ErrorCode::FileNotFound,
            ..
        }) => Ok(false),
        // An agent from before `Stat`: ask the guest's `test`.
        Err(_) => {
            let out = client.output(ExecRequest::new(["test", "-d", path]), None)?;
            Ok(out.status.success())
        }
    }
}

/// The file type bits of a mode, and their value for a directory (as in
/// `<sys/stat.h>`, the same on every Linux architecture).
const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;

/// Streams the host tree `local` into the guest directory `guest` (made if
/// missing), reporting the tar stream's bytes to `progress`. Returns the
/// bytes of file data sent.
pub(crate) fn tree_in(
    client: &Client,
    local: &Path,
    guest: &str,
    progress: &(dyn Fn(CopyProgress) + Sync),
) -> Result<u64> {
    let has_tools = tools::available(client);
    let argv = if has_tools {
        tools::tar_extract(guest)
    } else {
        let script = "mkdir -p \"$1\" && exec tar -x -f - -C \"$1\"";
        ["/bin/sh", "-c", script, "sh", guest]
            .map(String::from)
            .to_vec()
    };
    let mut child = client.exec(ExecRequest::new(argv).with_stdin())?;
    /// Writes the tar stream into the command's stdin, counting it.
    struct Stdin<'a> {
        input: ferry_protocol::ExecInput,
        sent: u64,
        total: u64,
        progress: &'a (dyn Fn(CopyProgress) + Sync),
    }
    impl Write for Stdin<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.input
                .write_stdin(buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.sent += buf.len() as u64;
            (self.progress)(CopyProgress {
                bytes: self.sent.min(self.total),
                total: Some(self.total),
            });
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let input = child.input();
    let total = tar_size(local);
    let (status, sent) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| -> std::io::Result<()> {
            let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(
                ferry_protocol::CHUNK_SIZE,
                Stdin {
                    input: input.clone(),
                    sent: 0,
                    total,
                    progress,
                },
            ));
            builder.follow_symlinks(false);
            builder.append_dir_all(".", local)?;
            let inner = builder.into_inner()?;
            inner.into_inner().map_err(|e| e.into_error())?;
            input
                .close_stdin()
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        let mut stderr = Vec::new();
        let status = loop {
            match child.next_event() {
                Ok(ExecEvent::Stdout(_)) => {}
                Ok(ExecEvent::Stderr(b)) => stderr.extend(b),
                Ok(ExecEvent::Exit(s)) => break Ok((s, stderr)),
                Err(e) => break Err(e),
            }
        };
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("tar thread panicked")));
        (status, sent)
    });
    let (status, stderr) = status?;
    if !status.success() {
        return Err(tar_failed("copy in", has_tools, &status, &stderr));
    }
    sent.map_err(local_err("read the host tree"))?;
    Ok(tree_bytes(local))
}

/// About how long the tar stream of `dir` is: a header and whole blocks of
/// data per entry, and the closing blocks.
fn tar_size(dir: &Path) -> u64 {
    fn entries(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => 512 + entries(&e.path()),
                Ok(t) if t.is_file() => {
                    512 + e
                        .metadata()
                        .map(|m| m.len().div_ceil(512) * 512)
                        .unwrap_or(0)
                }
                _ => 512,
            })
            .sum()
    }
    512 + entries(dir) + 1024
}

/// Total size of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Streams the guest tree `guest` into the host directory `local` (made if
/// missing), reporting the tar stream's bytes to `progress`. Returns the
/// bytes of file data received.
pub(crate) fn tree_out(
    client: &Client,
    guest: &str,
    local: &Path,
    progress: &(dyn Fn(CopyProgress) + Sync),
) -> Result<u64> {
    std::fs::create_dir_all(local).map_err(local_err("create the host directory"))?;
    let has_tools = tools::available(client);
    let argv = if has_tools {
        tools::tar_create(guest, false, &[])
    } else {
        ["tar", "-c", "-f", "-", "-C", guest, "."]
            .map(String::from)
            .to_vec()
    };
    let mut child = client.exec(ExecRequest::new(argv))?;
    let (reader, mut writer) = std::io::pipe().map_err(local_err("make a pipe"))?;
    let dest = local.to_path_buf();
    let unpacker = std::thread::spawn(move || -> std::io::Result<()> {
        let mut archive = tar::Archive::new(reader);
        // The archive is the guest's, so it cannot widen what the host user
        // has: modes keep their rwx bits only (no setuid, setgid or sticky
        // bit from a guest), owners and xattrs are not restored, and entries
        // stay inside `dest` (`unpack` refuses `..`, absolute paths and links
        // that lead out).
        archive.set_preserve_permissions(false);
        archive.unpack(&dest)
    });
    let mut stderr = Vec::new();
    let mut received = 0u64;
    let status = loop {
        match child.next_event()? {
            ExecEvent::Stdout(b) => {
                received += b.len() as u64;
                progress(CopyProgress {
                    bytes: received,
                    total: None,
                });
                if writer.write_all(&b).is_err() {
                    // The unpacker stopped; its error is reported below.
                }
            }
            ExecEvent::Stderr(b) => stderr.extend(b),
            ExecEvent::Exit(s) => break s,
        }
    };
    drop(writer);
    let unpacked = unpacker
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("untar thread panicked")));
    if !status.success() {
        return Err(tar_failed("copy out", has_tools, &status, &stderr));
    }
    unpacked.map_err(local_err("unpack into the host directory"))?;
    Ok(tree_bytes(local))
}
