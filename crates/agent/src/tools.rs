//! Tools the host runs inside a guest as `/proc/1/exe TOOL ARGS...`: the
//! agent's own static binary, so copying directory trees, making
//! directories and exporting a root filesystem need nothing from the image
//! (no shell, no `tar`, no libc: a `scratch` image works).
//!
//! ```text
//! ferry-agent tools                     lists the tools (the host's probe)
//! ferry-agent tar-create DIR [--one-file-system] [--skip-contents PATH]...
//! ferry-agent tar-extract DIR           (made if missing)
//! ferry-agent mkdir DIR                 (with its parents)
//! ```
//!
//! `tar-create` writes a tar of DIR to stdout with numeric owners, modes,
//! times, hard links, device nodes and extended attributes; like GNU tar it
//! exits 1 when files changed or vanished while being read (the archive is
//! still complete) and 2 on any other error.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_protocol::tools::{LIST, MKDIR, TAR_CREATE, TAR_EXTRACT};

/// Runs `tool` with `args` if it is one of the tools the host may ask for
/// (see [`ferry_protocol::tools`]).
pub fn run(tool: &str, args: &[String]) -> Option<ExitCode> {
    let result = match tool {
        LIST => {
            println!("{TAR_CREATE}\n{TAR_EXTRACT}\n{MKDIR}");
            Ok(ExitCode::SUCCESS)
        }
        TAR_CREATE => tar_create(args),
        TAR_EXTRACT => tar_extract(args),
        MKDIR => match args {
            [dir] => std::fs::create_dir_all(dir)
                .map(|_| ExitCode::SUCCESS)
                .map_err(|e| format!("{dir}: {e}")),
            _ => Err("usage: mkdir DIR".into()),
        },
        _ => return None,
    };
    Some(result.unwrap_or_else(|e| {
        eprintln!("ferry-agent {tool}: {e}");
        ExitCode::from(2)
    }))
}

fn tar_create(args: &[String]) -> Result<ExitCode, String> {
    let mut dir = None;
    let mut one_fs = false;
    let mut skip = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--one-file-system" => one_fs = true,
            "--skip-contents" => {
                let p = it.next().ok_or("--skip-contents needs a path")?;
                skip.push(plain(Path::new(p)));
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    let dir = dir.ok_or("usage: tar-create DIR [--one-file-system] [--skip-contents PATH]...")?;
    let root = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !root.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let stdout = io::stdout().lock();
    let mut walk = Walk {
        builder: tar::Builder::new(BufWriter::with_capacity(1 << 20, stdout)),
        base: dir,
        device: one_fs.then_some(root.dev()),
        skip,
        links: HashMap::new(),
        changed: false,
    };
    walk.entry(Path::new("."), &root)
        .map_err(|e| format!("write: {e}"))?;
    let changed = walk.changed;
    walk.builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| format!("write: {e}"))?;
    Ok(if changed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One `tar-create`: the archive and what the walk has seen.
struct Walk<W: Write> {
    builder: tar::Builder<W>,
    /// The directory archived; entries are named relative to it, `./` first.
    base: PathBuf,
    /// With `--one-file-system`, the device the walk stays on.
    device: Option<u64>,
    /// Directories archived without their contents (see [`plain`]).
    skip: Vec<PathBuf>,
    /// Files with more than one link already archived, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    /// Something changed or vanished while it was read.
    changed: bool,
}

impl<W: Write> Walk<W> {
    fn warn(&mut self, name: &Path, e: impl std::fmt::Display) {
        eprintln!("ferry-agent tar-create: {}: {e}", name.display());
        self.changed = true;
    }

    /// Archives `name` (relative to the base), and below it for a
    /// directory. Only errors writing the archive are returned.
    fn entry(&mut self, name: &Path, meta: &Metadata) -> io::Result<()> {
        let path = self.base.join(name);
        let kind = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(meta.mtime().max(0) as u64);
        header.set_size(0);
        if kind.is_dir() {
            self.xattrs(name, &path)?;
            header.set_entry_type(tar::EntryType::Directory);
            self.append(&mut header, name, true, None, io::empty())?;
            let stay = self.device.is_none_or(|d| d == meta.dev());
            if stay && !self.skip.contains(&plain(name)) {
                self.children(name, &path)?;
            }
        } else if kind.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key).cloned() {
                    header.set_entry_type(tar::EntryType::Link);
                    return self.append(&mut header, name, false, Some(&first), io::empty());
                }
                self.links.insert(key, name.to_path_buf());
            }
            let size = meta.len();
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    self.warn(name, e);
                    return Ok(());
                }
            };
            self.xattrs(name, &path)?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            // Exactly `size` bytes whatever the file does meanwhile: a file
            // that shrinks is padded with zeros, one that grows is cut.
            let mut data = CountingReader {
                inner: file,
                read: 0,
            }
            .take(size)
            .chain(io::repeat(0))
            .take(size);
            self.append(&mut header, name, false, None, &mut data)?;
            if data.into_inner().into_inner().0.into_inner().read != size {
                self.warn(name, "file changed as we read it");
            }
        } else if kind.is_symlink() {
            let target = match std::fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.warn(name, e);
                    return Ok(());
                }
            };
            self.xattrs(name, &path)?;
            header.set_entry_type(tar::EntryType::Symlink);
            self.append(&mut header, name, false, Some(&target), io::empty())?;
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            header.set_entry_type(if kind.is_char_device() {
                tar::EntryType::Char
            } else if kind.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            self.xattrs(name, &path)?;
            let rdev = meta.rdev();
            header.set_device_major(libc::major(rdev))?;
            header.set_device_minor(libc::minor(rdev))?;
            self.append(&mut header, name, false, None, io::empty())?;
        }
        // Sockets are not archived (as GNU tar).
        Ok(())
    }

    /// Appends an entry named as GNU tar names them (`./`, `./dir/`,
    /// `./dir/file`; the tar crate would drop the `./`), with GNU long-name
    /// records for names and link targets over 100 bytes.
    fn append(
        &mut self,
        header: &mut tar::Header,
        name: &Path,
        dir: bool,
        link: Option<&Path>,
        data: impl Read,
    ) -> io::Result<()> {
        let mut path = name.as_os_str().as_bytes().to_vec();
        if dir && !path.ends_with(b"/") {
            path.push(b'/');
        }
        self.long_record(tar::EntryType::GNULongName, &path)?;
        set_field(&mut header.as_old_mut().name, &path);
        if let Some(link) = link {
            let target = link.as_os_str().as_bytes();
            self.long_record(tar::EntryType::GNULongLink, target)?;
            set_field(&mut header.as_old_mut().linkname, target);
        }
        header.set_cksum();
        self.builder.append(header, data)
    }

    /// The GNU record carrying `value` for the next entry when it does not
    /// fit its 100-byte field.
    fn long_record(&mut self, kind: tar::EntryType, value: &[u8]) -> io::Result<()> {
        if value.len() <= 100 {
            return Ok(());
        }
        let mut header = tar::Header::new_gnu();
        set_field(&mut header.as_old_mut().name, b"././@LongLink");
        header.set_mode(0o644);
        header.set_entry_type(kind);
        let mut data = value.to_vec();
        data.push(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, &data[..])
    }

    /// Archives the children of directory `name`, in name order.
    fn children(&mut self, name: &Path, path: &Path) -> io::Result<()> {
        let mut names: Vec<OsString> = match std::fs::read_dir(path) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect(),
            Err(e) => {
                self.warn(name, e);
                return Ok(());
            }
        };
        names.sort();
        for child in names {
            let child_name = name.join(&child);
            match std::fs::symlink_metadata(path.join(&child)) {
                Ok(meta) => self.entry(&child_name, &meta)?,
                Err(e) => self.warn(&child_name, e),
            }
        }
        Ok(())
    }

    /// A PAX header with `path`'s extended attributes, before its entry
    /// (`SCHILY.xattr.NAME` records, as GNU tar writes and reads them).
    fn xattrs(&mut self, name: &Path, path: &Path) -> io::Result<()> {
        let keys = match xattr::list(path) {
            Ok(k) => k,
            // No xattr support on this filesystem (proc, sysfs...).
            Err(_) => return Ok(()),
        };
        let mut data = Vec::new();
        for key in keys {
            match xattr::get(path, &key) {
                Ok(Some(value)) => {
                    let mut record_key = b"SCHILY.xattr.".to_vec();
                    record_key.extend_from_slice(key.as_bytes());
                    data.extend(pax_record(&record_key, &value));
                }
                Ok(None) => {}
                Err(e) => self.warn(name, format!("xattr {}: {e}", key.to_string_lossy())),
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut header = tar::Header::new_ustar();
        header.set_path("PaxHeader")?;
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, &data[..])
    }
}

/// One PAX record, `LEN KEY=VALUE\n`, where LEN counts the whole record
/// including its own digits.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut record = len.to_string().into_bytes();
    record.push(b' ');
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// Fills a fixed header field with the start of `value`, zero padded (a
/// long value's whole text is in the record before the entry).
fn set_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

/// `path` without `.`, `..` and `/` components: `./proc`, `/proc/` and
/// `proc` name the same entry.
fn plain(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}

/// Counts what a reader gave.
struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn tar_extract(args: &[String]) -> Result<ExitCode, String> {
    let [dir] = args else {
        return Err("usage: tar-extract DIR".into());
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut archive = tar::Archive::new(io::stdin().lock());
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // `unpack` keeps every entry inside `dir` (no `..`, no absolute paths).
    archive
        .unpack(dir)
        .map_err(|e| format!("unpack into {dir}: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn archive(dir: &Path, skip: Vec<PathBuf>) -> (Vec<u8>, bool) {
        let meta = std::fs::metadata(dir).unwrap();
        let mut walk = Walk {
            builder: tar::Builder::new(Vec::new()),
            base: dir.to_path_buf(),
            device: Some(meta.dev()),
            skip,
            links: HashMap::new(),
            changed: false,
        };
        walk.entry(Path::new("."), &meta).unwrap();
        let changed = walk.changed;
        (walk.builder.into_inner().unwrap(), changed)
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for value in [0usize, 1, 5, 90, 995, 9990] {
            let r = pax_record(b"SCHILY.xattr.user.k", &vec![b'v'; value]);
            let text = String::from_utf8(r.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{text}");
        }
    }

    #[test]
    fn trees_round_trip_with_links_modes_and_skipped_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::create_dir_all(src.join("proc/self")).unwrap();
        std::fs::write(src.join("a/b/file"), b"data").unwrap();
        std::fs::set_permissions(
            src.join("a/b/file"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        std::fs::hard_link(src.join("a/b/file"), src.join("a/hard")).unwrap();
        std::os::unix::fs::symlink("b/file", src.join("a/link")).unwrap();
        let long = "x".repeat(150);
        std::fs::write(src.join(&long), b"long").unwrap();

        let (bytes, changed) = archive(&src, vec![plain(Path::new("./proc/"))]);
        assert!(!changed);
        let names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        // Named as GNU tar names them.
        assert_eq!(names[0], "./");
        assert!(names.contains(&"./proc/".to_string()), "{names:?}");
        assert!(names.contains(&"./a/b/file".to_string()), "{names:?}");
        assert!(names.contains(&format!("./{long}")), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("./proc/s")),
            "{names:?}"
        );

        let dest = tmp.path().join("dest");
        let mut a = tar::Archive::new(&bytes[..]);
        a.set_preserve_permissions(true);
        a.unpack(&dest).unwrap();
        assert_eq!(std::fs::read(dest.join("a/b/file")).unwrap(), b"data");
        let file = std::fs::metadata(dest.join("a/b/file")).unwrap();
        assert_eq!(file.mode() & 0o7777, 0o4750);
        assert_eq!(file.nlink(), 2);
        assert_eq!(
            file.ino(),
            std::fs::metadata(dest.join("a/hard")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read_link(dest.join("a/link")).unwrap(),
            PathBuf::from("b/file")
        );
        assert_eq!(std::fs::read(dest.join(&long)).unwrap(), b"long");
        assert!(dest.join("proc").is_dir());
    }
}
