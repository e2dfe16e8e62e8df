//! The initramfs ferry writes for each VM: the guest agent as /init plus its config.
//!
//! The archive is an uncompressed "newc" cpio, the format the kernel unpacks
//! into its initial rootfs. It holds:
//!
//! | path                 | kind                 | mode |
//! |----------------------|----------------------|------|
//! | `/dev`               | directory            | 0755 |
//! | `/dev/console`       | char device 5:1      | 0600 |
//! | `/proc`, `/sys`      | directories          | 0555 |
//! | `/newroot`           | directory            | 0755 |
//! | `/ferry`             | directory            | 0700 |
//! | `/ferry/config.json` | the [`AgentConfig`]  | 0600 |
//! | `/init`              | the agent binary     | 0755 |
//!
//! `/dev/console` is there so the kernel can give `/init` its console on
//! fds 0-2 before devtmpfs is mounted. Timestamps and owners are fixed
//! (0), so equal inputs give byte-identical archives. The file carries the
//! VM's token, so it is written with mode 0600.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ferry_protocol::AgentConfig;

/// Failure to build an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The agent binary could not be read.
    #[error("agent binary {}: {source}", path.display())]
    Agent {
        /// The agent path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed.
    #[error("writing initramfs {}: {source}", path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes newc cpio entries to a stream.
struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: newc entries are limited to 4 GiB"),
            )
        })?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize (with NUL), check
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | perm, 2, 0, (0, 0))
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | perm, 1, 0, (major, minor))
    }

    fn file(&mut self, name: &str, perm: u32, size: u64, data: &mut dyn Read) -> io::Result<()> {
        self.header(name, S_IFREG | perm, 1, size, (0, 0))?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {size} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad()
    }

    fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        Ok(self.out)
    }
}

/// Writes the initramfs for a VM to `out`, atomically: a temp file in the
/// same directory is written, fsynced and renamed over `out`.
pub fn write_initramfs(
    agent_binary: &Path,
    config: &AgentConfig,
    out: &Path,
) -> Result<(), InitramfsError> {
    let agent_err = |source| InitramfsError::Agent {
        path: agent_binary.to_path_buf(),
        source,
    };
    let write_err = |source| InitramfsError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut agent = File::open(agent_binary).map_err(agent_err)?;
    let meta = agent.metadata().map_err(agent_err)?;
    if !meta.is_file() {
        return Err(agent_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let config_json = config.to_json();

    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // NamedTempFile is created 0600 and removed if we fail before persisting.
    let tmp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(write_err)?;
    let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let body = (|| -> io::Result<()> {
        w.dir("dev", 0o755)?;
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.dir("proc", 0o555)?;
        w.dir("sys", 0o555)?;
        w.dir("newroot", 0o755)?;
        w.dir("ferry", 0o700)?;
        w.file(
            "ferry/config.json",
            0o600,
            config_json.len() as u64,
            &mut &config_json[..],
        )?;
        w.file("init", 0o755, meta.len(), &mut agent)?;
        w.finish()?.flush()
    })();
    match body {
        Ok(()) => {}
        // A short read means the agent binary changed under us.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(agent_err(e)),
        Err(e) => return Err(write_err(e)),
    }
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{MainCommand, Token};
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, PartialEq)]
    struct Entry {
        name: String,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// An independent newc reader, strict about the format.
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert!(b.len() >= 110, "truncated header");
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, nlink, size, rdev, namesize, check) = (
                field(1),
                field(4),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
                field(12),
            );
            assert_eq!(check, 0);
            assert_eq!(b[110 + namesize - 1], 0, "name must be NUL-terminated");
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (110 + namesize).next_multiple_of(4);
            let offset = total - b.len();
            assert_eq!(offset % 4, 0, "entries are 4-byte aligned");
            if name == "TRAILER!!!" {
                assert!(b[data_start.min(b.len())..].iter().all(|&x| x == 0));
                return out;
            }
            let data = b[data_start..data_start + size].to_vec();
            out.push(Entry {
                name,
                mode,
                nlink,
                rdev,
                data,
            });
            b = &b[(data_start + size).next_multiple_of(4)..];
        }
    }

    fn config() -> AgentConfig {
        let mut c = AgentConfig::new(&Token::generate().unwrap());
        c.hostname = "unit".into();
        c.command = Some(MainCommand {
            argv: vec!["/bin/true".into()],
            env: Default::default(),
            workdir: None,
            user: None,
        });
        c
    }

    #[test]
    fn archive_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        // Odd length to exercise padding.
        let agent_bytes: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&agent, &agent_bytes).unwrap();
        let cfg = config();
        let out = d.path().join("initramfs.cpio");
        write_initramfs(&agent, &cfg, &out).unwrap();

        let bytes = std::fs::read(&out).unwrap();
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "proc",
                "sys",
                "newroot",
                "ferry",
                "ferry/config.json",
                "init"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("init").mode, 0o100_755);
        assert_eq!(get("init").data, agent_bytes);
        assert_eq!(get("ferry/config.json").mode, 0o100_600);
        assert_eq!(
            AgentConfig::from_json(&get("ferry/config.json").data).unwrap(),
            cfg
        );
        assert_eq!(get("dev/console").mode, 0o020_600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("dev").mode, 0o040_755);
        assert_eq!(get("dev").nlink, 2);
        assert_eq!(get("ferry").mode, 0o040_700);
        assert_eq!(get("newroot").mode, 0o040_755);
        // The archive holds the token: only its owner may read it.
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);

        // Deterministic, and atomically replaced on rewrite.
        write_initramfs(&agent, &cfg, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn matches_the_system_cpio_when_available() {
        // Cross-check with GNU cpio's reader when installed.
        let Ok(st) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("skipped: cpio not installed");
            return;
        };
        assert!(st.status.success());
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        std::fs::write(&agent, b"#!/bin/sh\n").unwrap();
        let out = d.path().join("i.cpio");
        write_initramfs(&agent, &config(), &out).unwrap();
        let list = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            list.status.success(),
            "{}",
            String::from_utf8_lossy(&list.stderr)
        );
        let text = String::from_utf8(list.stdout).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("crw-------") && l.ends_with(" dev/console")),
            "{text}"
        );
    }

    #[test]
    fn missing_agent_is_reported_and_nothing_written() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("i.cpio");
        let err = write_initramfs(&d.path().join("nope"), &config(), &out).unwrap_err();
        assert!(matches!(err, InitramfsError::Agent { .. }), "{err}");
        let err = write_initramfs(d.path(), &config(), &out).unwrap_err();
        assert!(matches!(err, InitramfsError::Agent { .. }), "{err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
