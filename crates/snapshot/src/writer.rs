//! Writing bundles in one pass, to a file (atomically) or any stream.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::format::{self, align_up, Trailer, ALIGN, FORMAT_VERSION};
use crate::frames::{self, MemoryCompression, WrittenMemory};
use crate::manifest::{Manifest, SectionEntry};
use crate::memory::{self, RegionView};
use crate::{BundleError, SectionKind};

/// Counts and checksums what passes through.
pub struct SectionWriter<'a, W: Write> {
    out: &'a mut W,
    hasher: xxhash_rust::xxh3::Xxh3,
    len: u64,
}

impl<W: Write> Write for SectionWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> SectionWriter<'_, W> {
    /// Bytes written to this section so far.
    pub fn position(&self) -> u64 {
        self.len
    }
}

/// Writes a bundle section by section; [`BundleWriter::finish`] adds the manifest
/// and trailer.
pub struct BundleWriter<W: Write> {
    out: W,
    pos: u64,
    sections: Vec<SectionEntry>,
}

const ZEROS: [u8; ALIGN as usize] = [0; ALIGN as usize];

impl<W: Write> BundleWriter<W> {
    /// Starts a bundle on `out` with the file header.
    pub fn new(mut out: W) -> Result<Self, BundleError> {
        out.write_all(&format::header())
            .map_err(BundleError::io("write bundle header"))?;
        Ok(BundleWriter {
            out,
            pos: ALIGN,
            sections: Vec::new(),
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Writes one section whose payload `fill` produces. Returns what `fill` returns.
    pub fn section<T>(
        &mut self,
        kind: SectionKind,
        fill: impl FnOnce(&mut SectionWriter<'_, W>) -> std::io::Result<T>,
    ) -> Result<T, BundleError> {
        let offset = self.pos;
        let mut sw = SectionWriter {
            out: &mut self.out,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            len: 0,
        };
        let value = fill(&mut sw).map_err(BundleError::io(format!("write {kind:?} section")))?;
        let (len, checksum) = (sw.len, sw.hasher.digest());
        let padded = align_up(offset + len);
        self.out
            .write_all(&ZEROS[..(padded - offset - len) as usize])
            .map_err(BundleError::io("pad section"))?;
        self.pos = padded;
        self.sections.push(SectionEntry {
            kind,
            offset,
            length: len,
            checksum,
        });
        Ok(value)
    }

    /// Writes a section holding `bytes`.
    pub fn section_bytes(&mut self, kind: SectionKind, bytes: &[u8]) -> Result<(), BundleError> {
        self.section(kind, |w| w.write_all(bytes))
    }

    /// Writes guest memory as its three sections (data frames, extents,
    /// frame table): the page `runs` of `regions`, with the pages in `hot`
    /// (the prefetch set) in frames of their own, stored raw if `hot_raw`.
    pub fn memory_sections(
        &mut self,
        regions: &[RegionView<'_>],
        runs: &[(u64, u64)],
        hot: &[(u64, u64)],
        hot_raw: bool,
        compression: MemoryCompression,
    ) -> Result<WrittenMemory, BundleError> {
        let written = self.section(SectionKind::MemoryData, |s| {
            frames::write_frames(regions, runs, hot, hot_raw, s, compression)
        })?;
        self.section_bytes(
            SectionKind::MemoryExtents,
            &memory::encode_extents(&written.extents),
        )?;
        self.section_bytes(
            SectionKind::MemoryFrames,
            &frames::encode_frames(&written.frames),
        )?;
        Ok(written)
    }

    /// Sections written so far.
    pub fn sections(&self) -> &[SectionEntry] {
        &self.sections
    }

    /// Writes the manifest (its `sections` and `format_version` filled in here) and
    /// the trailer, and returns the stream.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<W, BundleError> {
        manifest.sections = std::mem::take(&mut self.sections);
        manifest.format_version = FORMAT_VERSION;
        let json = serde_json::to_vec(&manifest).expect("manifest serializes");
        let trailer = Trailer {
            version: FORMAT_VERSION,
            manifest_offset: self.pos,
            manifest_len: json.len() as u64,
            manifest_checksum: format::checksum(&json),
            file_len: self.pos + json.len() as u64 + format::TRAILER_LEN,
        };
        self.out
            .write_all(&json)
            .and_then(|()| self.out.write_all(&trailer.encode()))
            .and_then(|()| self.out.flush())
            .map_err(BundleError::io("write manifest"))?;
        Ok(self.out)
    }
}

/// A bundle being written to a temporary file next to its final path. Nothing
/// appears at the final path until [`FileBundle::commit`]; dropping it removes the
/// temporary file, so an interrupted snapshot never leaves a bundle that looks valid.
/// The file is readable and writable by its owner only (mode 0600) from its
/// creation on: a bundle holds guest memory and the VM's agent token.
pub struct FileBundle {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

/// Where process `pid` writes the bundle for `dest` until it is complete:
/// `.NAME.partial-PID` beside it (watching its size shows the progress).
pub fn partial_path(dest: &Path, pid: u32) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    dest.with_file_name(format!(".{name}.partial-{pid}"))
}

impl FileBundle {
    /// Where [`FileBundle::create`] builds the bundle for `dest` in this
    /// process: `.NAME.partial-PID` beside it.
    pub fn staging_path(dest: &Path) -> PathBuf {
        partial_path(dest, std::process::id())
    }

    /// Creates the temporary file and a writer on it.
    pub fn create(
        dest: &Path,
    ) -> Result<(FileBundle, BundleWriter<std::io::BufWriter<File>>), BundleError> {
        let tmp = Self::staging_path(dest);
        let file =
            create_private(&tmp).map_err(BundleError::io(format!("create {}", tmp.display())))?;
        let writer = BundleWriter::new(std::io::BufWriter::with_capacity(1 << 20, file))?;
        Ok((
            FileBundle {
                tmp,
                dest: dest.to_path_buf(),
                committed: false,
            },
            writer,
        ))
    }

    /// Makes the finished file durable and moves it into place.
    pub fn commit(mut self, out: std::io::BufWriter<File>) -> Result<(), BundleError> {
        let file = out
            .into_inner()
            .map_err(|e| BundleError::io("flush bundle")(e.into_error()))?;
        file.sync_all().map_err(BundleError::io("sync bundle"))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(BundleError::io("move bundle into place"))?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(BundleError::io("sync directory"))?;
        }
        self.committed = true;
        Ok(())
    }
}

/// Creates (or truncates) `path` with mode 0600, whatever the umask and
/// whatever modes a leftover at `path` had.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

impl Drop for FileBundle {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn bundles_are_0600_from_creation_on() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.snap");
        // A leftover partial file of this pid with wide modes: its modes must
        // not carry over (and the umask never widens 0600).
        let leftover = dir
            .path()
            .join(format!(".b.snap.partial-{}", std::process::id()));
        std::fs::write(&leftover, b"old").unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (guard, w) = FileBundle::create(&dest).unwrap();
        assert_eq!(guard.tmp, leftover);
        assert_eq!(mode(&guard.tmp), 0o600);
        let manifest = crate::manifest::Manifest {
            format_version: 0,
            ferry_version: "test".into(),
            created_at: 1,
            arch: "x86_64".into(),
            cpu: crate::manifest::CpuInfo::default(),
            vm_name: "b".into(),
            cpus: 1,
            memory_mib: 0,
            memory_regions: Vec::new(),
            memory_bytes: 0,
            memory_stored_bytes: 0,
            memory_prefetch_frames: Vec::new(),
            devices: Vec::new(),
            disk: crate::manifest::DiskInfo {
                size: 0,
                cluster_size: 65536,
                base_id: "none".into(),
                base_clusters: 0,
                top_clusters: 0,
                thin: false,
                base_image: None,
                base_cache_path: None,
            },
            sections: Vec::new(),
            parent: None,
        };
        let out = w.finish(manifest).unwrap();
        guard.commit(out).unwrap();
        assert_eq!(mode(&dest), 0o600);
    }
}
