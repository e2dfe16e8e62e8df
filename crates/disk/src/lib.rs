//! Block storage for ferry VMs.
//!
//! A [`Disk`] is either a raw image file or a copy-on-write [`layer`] over another
//! disk. Layers let many VMs (forks, restores of one bundle) share a frozen base
//! and keep their own writes apart: a layer stores only the clusters written
//! through it, and reads fall through to the disk below for everything else.

pub mod fill;
pub mod layer;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use fill::{FillSource, FillStats, Filler};
pub use layer::{
    create_layer, create_layer_unsynced, rebase_layer, Layer, LayerInfo, CLUSTER_SIZE,
};

/// Errors opening or creating disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file could not be opened.
    #[error("open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A layer's header is damaged or from an unknown version.
    #[error("{path}: {why}")]
    BadLayer {
        /// The layer file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Layers refer to each other in a loop or too deeply.
    #[error("{0}: backing chain deeper than {max}", max = layer::MAX_CHAIN)]
    ChainTooDeep(PathBuf),
    /// I/O on an open disk.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A disk image: raw or layered.
#[derive(Debug)]
pub enum Disk {
    /// A plain image file; reads past its end return zeros.
    Raw {
        /// The open file.
        file: File,
        /// Its size in bytes.
        size: u64,
        /// Whether writes are refused.
        read_only: bool,
    },
    /// A copy-on-write layer over another disk.
    Layer(Layer),
}

impl Disk {
    /// Opens `path`, detecting a layer by its header; anything else is raw.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        Self::open_depth(path, read_only, 0)
    }

    pub(crate) fn open_depth(
        path: &Path,
        read_only: bool,
        depth: usize,
    ) -> Result<Disk, DiskError> {
        if depth > layer::MAX_CHAIN {
            return Err(DiskError::ChainTooDeep(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        if layer::is_layer(&file)? {
            return Ok(Disk::Layer(Layer::open_file(path, file, read_only, depth)?));
        }
        let size = file.metadata()?.len();
        Ok(Disk::Raw {
            file,
            size,
            read_only,
        })
    }

    /// Size the guest sees, in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw { size, .. } => *size,
            Disk::Layer(l) => l.size(),
        }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        match self {
            Disk::Raw { read_only, .. } => *read_only,
            Disk::Layer(l) => l.read_only(),
        }
    }

    /// Fills `buf` from `offset`. Bytes beyond the disk's end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            Disk::Raw { file, size, .. } => read_raw(file, *size, buf, offset),
            Disk::Layer(l) => l.read_at(buf, offset),
        }
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        match self {
            Disk::Raw { file, .. } => file.write_all_at(buf, offset),
            Disk::Layer(l) => l.write_at(buf, offset),
        }
    }

    /// Places a whole cluster that arrived from elsewhere unless the disk
    /// holds it already (see [`Layer::fill_cluster`]); only layers are filled.
    pub fn fill_cluster(&self, offset: u64, bytes: &[u8]) -> std::io::Result<bool> {
        match self {
            Disk::Raw { .. } => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only a layer can be filled",
            )),
            Disk::Layer(l) => l.fill_cluster(offset, bytes),
        }
    }

    /// Indexes of the `cluster`-sized clusters that may hold data, ascending:
    /// a raw file's data ranges (holes skipped without reading them) and, for a
    /// layer, its own clusters plus those of every disk below it.
    pub fn clusters_with_data(&self, cluster: u64) -> std::io::Result<Vec<u64>> {
        match self {
            Disk::Raw { file, size, .. } => raw_data_clusters(file, *size, cluster),
            Disk::Layer(l) => {
                let mut all = l.backing().clusters_with_data(cluster)?;
                all.extend(l.own_clusters(cluster));
                all.sort_unstable();
                all.dedup();
                Ok(all)
            }
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        match self {
            Disk::Raw {
                file, read_only, ..
            } => {
                if *read_only {
                    Ok(())
                } else {
                    file.sync_data()
                }
            }
            Disk::Layer(l) => l.flush(),
        }
    }

    /// Hands what was written to the page cache (a layer's bitmap included)
    /// without waiting for it to be durable: enough for another process to
    /// open the disk next, as a VMM does right after a restore writes it.
    pub fn write_back(&self) -> std::io::Result<()> {
        match self {
            Disk::Raw { .. } => Ok(()),
            Disk::Layer(l) => l.write_back(),
        }
    }
}

fn raw_data_clusters(file: &File, size: u64, cluster: u64) -> std::io::Result<Vec<u64>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            // ENXIO: no data after pos.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start))
            .map_err(std::io::Error::from)?
            .min(size);
        let (first, last) = (start / cluster, end.div_ceil(cluster));
        for c in first..last {
            if out.last() != Some(&c) {
                out.push(c);
            }
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

fn read_raw(file: &File, size: u64, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..avail], offset)?;
    buf[avail..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_disk_reads_zeros_past_end_and_refuses_writes_when_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("raw.img");
        std::fs::write(&p, [7u8; 1000]).unwrap();
        let d = Disk::open(&p, true).unwrap();
        assert_eq!(d.size(), 1000);
        let mut buf = [1u8; 100];
        d.read_at(&mut buf, 950).unwrap();
        assert_eq!(&buf[..50], &[7u8; 50]);
        assert_eq!(&buf[50..], &[0u8; 50]);
        assert_eq!(
            d.write_at(b"x", 0).unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn missing_file_is_an_open_error_naming_it() {
        let e = Disk::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"));
    }
}
