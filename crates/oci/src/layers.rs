//! Applying image layers, in order, to a directory tree as an unprivileged
//! user: whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`)
//! remove what lower layers made; regular files, directories, symlinks and
//! hard links are written to the tree; ownership, modes the tree cannot hold,
//! xattrs and device nodes are recorded in [`Tree::meta`] for
//! [`crate::fixups`] to write into the ext4 image.
//!
//! No entry can reach outside the tree: paths are normalized (`..` stops at
//! the root) and symlinks met on the way are resolved inside the tree, as
//! if it were the root filesystem.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::OciError;

/// Most entries across all layers.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Most xattrs on one entry, and the most bytes of one value.
const MAX_XATTRS: usize = 64;
const MAX_XATTR_BYTES: usize = 64 << 10;
/// Most symlinks followed while resolving one path (as Linux's MAXSYMLINKS).
const MAX_SYMLINK_HOPS: usize = 40;

/// A node the tree cannot hold unprivileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// Character device (major, minor).
    Char(u32, u32),
    /// Block device (major, minor).
    Block(u32, u32),
    /// Named pipe.
    Fifo,
}

/// What a layer asked for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits, setuid/setgid/sticky included (no file type).
    pub perm: u32,
    /// Extended attributes.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// A device node or pipe, made only in the image.
    pub special: Option<Special>,
}

impl Meta {
    /// A directory owned by root with mode 0755: the root itself, and the
    /// parents a layer implies without listing them.
    fn root_dir() -> Meta {
        Meta {
            uid: 0,
            gid: 0,
            perm: 0o755,
            xattrs: Vec::new(),
            special: None,
        }
    }
}

/// A root filesystem being assembled.
#[derive(Debug)]
pub struct Tree {
    /// The directory holding it.
    pub root: PathBuf,
    /// What each path (relative, `""` for the root) should have in the image.
    pub meta: BTreeMap<PathBuf, Meta>,
    /// Uncompressed bytes written so far.
    pub bytes: u64,
    /// Limit on `bytes`.
    pub max_bytes: u64,
    entries: usize,
}

impl Tree {
    /// A tree in the empty directory `root`, whose root directory is root's
    /// with mode 0755, holding at most `max_bytes` of file data.
    pub fn new(root: &Path, max_bytes: u64) -> Self {
        let mut meta = BTreeMap::new();
        meta.insert(PathBuf::new(), Meta::root_dir());
        Self {
            root: root.to_path_buf(),
            meta,
            bytes: 0,
            max_bytes,
            entries: 0,
        }
    }

    /// Applies one layer blob (plain, gzip or zstd tar; told apart by its
    /// first bytes).
    pub fn apply_layer(&mut self, index: usize, blob: &Path) -> Result<(), OciError> {
        let err = |why: String| OciError::Layer { layer: index, why };
        let file = File::open(blob).map_err(|e| err(format!("open: {e}")))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let head = reader.fill_buf().map_err(|e| err(format!("read: {e}")))?;
        let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(reader))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::Decoder::with_buffer(reader).map_err(|e| err(format!("zstd: {e}")))?)
        } else {
            Box::new(reader)
        };
        let mut archive = tar::Archive::new(stream);
        let mut created = HashSet::new();
        let entries = archive.entries().map_err(|e| err(format!("tar: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| err(format!("tar: {e}")))?;
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(err(format!("more than {MAX_ENTRIES} entries")));
            }
            self.apply_entry(entry, &mut created).map_err(err)?;
        }
        Ok(())
    }

    fn apply_entry(
        &mut self,
        mut entry: tar::Entry<'_, Box<dyn Read>>,
        created: &mut HashSet<PathBuf>,
    ) -> Result<(), String> {
        let raw = entry
            .path()
            .map_err(|e| format!("entry path: {e}"))?
            .into_owned();
        let Some(rel) = normalize(&raw) else {
            return Ok(()); // The root itself: nothing to write.
        };
        let name = rel
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let parent = self.resolve(rel.parent().unwrap_or(Path::new("")), true)?;
        if name == ".wh..wh..opq" {
            self.make_opaque(&parent, created)?;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(format!("bad whiteout {}", raw.display()));
            }
            self.remove(&parent.join(hidden))?;
            return Ok(());
        }
        self.ensure_dir(&parent)?;
        let path = parent.join(rel.file_name().unwrap_or_default());
        let header = entry.header().clone();
        let mut meta = Meta {
            uid: header.uid().map_err(|e| format!("uid: {e}"))? as u32,
            gid: header.gid().map_err(|e| format!("gid: {e}"))? as u32,
            perm: header.mode().map_err(|e| format!("mode: {e}"))? & 0o7777,
            xattrs: xattrs(&mut entry)?,
            special: None,
        };
        let host = self.root.join(&path);
        let kind = header.entry_type();
        let existing = fs::symlink_metadata(&host).ok();
        let keep_dir = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
        if !keep_dir {
            self.remove(&path)?;
        }
        match kind {
            k if k.is_dir() => {
                if !keep_dir {
                    fs::create_dir(&host).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
                }
                set_perm(&host, meta.perm | 0o700)?;
            }
            k if k.is_file() || k == tar::EntryType::Continuous => {
                let size = header.size().map_err(|e| format!("size: {e}"))?;
                self.bytes += size;
                if self.bytes > self.max_bytes {
                    return Err(format!(
                        "the image holds more than {} bytes",
                        self.max_bytes
                    ));
                }
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&host)
                    .map_err(|e| format!("create {}: {e}", path.display()))?;
                std::io::copy(&mut (&mut entry).take(size), &mut out)
                    .map_err(|e| format!("write {}: {e}", path.display()))?;
                if let Ok(t) = header.mtime() {
                    let _ =
                        out.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
                }
                set_perm(&host, meta.perm | 0o600)?;
            }
            k if k.is_symlink() => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("link target: {e}"))?
                    .ok_or("symlink without a target")?;
                std::os::unix::fs::symlink(&target, &host)
                    .map_err(|e| format!("symlink {}: {e}", path.display()))?;
                meta.perm = 0o777;
            }
            k if k.is_hard_link() => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("link target: {e}"))?
                    .ok_or("hard link without a target")?;
                let target = normalize(&target).ok_or("hard link to the root")?;
                let target = self.resolve(&target, false)?;
                let source = self.root.join(&target);
                if !fs::symlink_metadata(&source).is_ok_and(|m| !m.is_dir()) {
                    return Err(format!(
                        "hard link {} to {}, which is not a file of the image",
                        path.display(),
                        target.display()
                    ));
                }
                fs::hard_link(&source, &host)
                    .map_err(|e| format!("link {}: {e}", path.display()))?;
                // One inode: the target's record stands for both.
                meta = self.meta.get(&target).cloned().unwrap_or(meta);
            }
            k if k.is_character_special() || k.is_block_special() || k.is_fifo() => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                meta.special = Some(if k.is_fifo() {
                    Special::Fifo
                } else if k.is_character_special() {
                    Special::Char(major, minor)
                } else {
                    Special::Block(major, minor)
                });
            }
            // PAX/GNU headers are consumed by the reader; anything else
            // (sockets have no tar type) is skipped.
            other => {
                tracing::debug!("skipping tar entry {} of type {other:?}", raw.display());
                return Ok(());
            }
        }
        created.insert(path.clone());
        self.meta.insert(path, meta);
        Ok(())
    }

    /// Resolves `rel` inside the tree: every symlink met is followed as if
    /// the tree were `/` (the last component only when `follow_last`).
    fn resolve(&self, rel: &Path, follow_last: bool) -> Result<PathBuf, String> {
        let mut out = PathBuf::new();
        let mut pending: Vec<std::ffi::OsString> = rel
            .components()
            .rev()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                out.pop();
                continue;
            }
            let candidate = out.join(&part);
            let is_last = pending.is_empty();
            match fs::symlink_metadata(self.root.join(&candidate)) {
                Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!("too many symlinks resolving {}", rel.display()));
                    }
                    let target = fs::read_link(self.root.join(&candidate))
                        .map_err(|e| format!("readlink {}: {e}", candidate.display()))?;
                    if target.is_absolute() {
                        out = PathBuf::new();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::Normal(n) => pending.push(n.to_os_string()),
                            Component::ParentDir => pending.push("..".into()),
                            _ => {}
                        }
                    }
                }
                _ => out = candidate,
            }
        }
        Ok(out)
    }

    /// Makes sure `dir` (resolved) is a directory, creating missing ones
    /// root-owned with mode 0755.
    fn ensure_dir(&mut self, dir: &Path) -> Result<(), String> {
        let mut at = PathBuf::new();
        for c in dir.components() {
            at.push(c);
            let host = self.root.join(&at);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!("{} is not a directory", at.display()));
                }
                Err(_) => {
                    fs::create_dir(&host).map_err(|e| format!("mkdir {}: {e}", at.display()))?;
                    self.meta.insert(at.clone(), Meta::root_dir());
                }
            }
        }
        Ok(())
    }

    /// Removes `path` and everything under it, from the tree and the records.
    fn remove(&mut self, path: &Path) -> Result<(), String> {
        if path.as_os_str().is_empty() {
            return Err("a layer may not remove the root".into());
        }
        let host = self.root.join(path);
        if let Ok(m) = fs::symlink_metadata(&host) {
            let r = if m.is_dir() {
                make_writable(&host);
                fs::remove_dir_all(&host)
            } else {
                fs::remove_file(&host)
            };
            r.map_err(|e| format!("remove {}: {e}", path.display()))?;
        }
        let under: Vec<PathBuf> = self
            .meta
            .range(path.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(path))
            .cloned()
            .collect();
        for k in under {
            self.meta.remove(&k);
        }
        Ok(())
    }

    /// An opaque directory: what lower layers put in `dir` goes; what this
    /// layer made there stays.
    fn make_opaque(&mut self, dir: &Path, created: &HashSet<PathBuf>) -> Result<(), String> {
        let mut children: Vec<PathBuf> = Vec::new();
        if let Ok(rd) = fs::read_dir(self.root.join(dir)) {
            for e in rd.flatten() {
                children.push(dir.join(e.file_name()));
            }
        }
        for (k, _) in self.meta.range(dir.to_path_buf()..) {
            if !k.starts_with(dir) {
                break;
            }
            if let Ok(rest) = k.strip_prefix(dir) {
                if let Some(first) = rest.components().next() {
                    children.push(dir.join(first));
                }
            }
        }
        children.sort();
        children.dedup();
        for child in children {
            if !created.iter().any(|c| c.starts_with(&child)) {
                self.remove(&child)?;
            }
        }
        Ok(())
    }
}

/// A tar path made relative, without `.` and with `..` stopping at the root;
/// None for the root itself.
fn normalize(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn xattrs(entry: &mut tar::Entry<'_, Box<dyn Read>>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let Some(exts) = entry.pax_extensions().map_err(|e| format!("pax: {e}"))? else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| format!("pax: {e}"))?;
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            if out.len() >= MAX_XATTRS || ext.value_bytes().len() > MAX_XATTR_BYTES {
                return Err("too many or too large xattrs".into());
            }
            out.push((name.to_string(), ext.value_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn set_perm(host: &Path, mode: u32) -> Result<(), String> {
    fs::set_permissions(host, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", host.display()))
}

/// Lets an unprivileged owner delete a tree holding read-only directories.
fn make_writable(dir: &Path) {
    let _ = set_perm(dir, 0o700);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}
