//! The baked tarball on the host: compression chosen by the file name, written to
//! a temporary file in the destination directory and renamed into place only when
//! complete, so no partial image is ever visible under the output name.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::BakeError;

/// How the tarball is compressed, from the output file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `.tar`: no compression.
    None,
    /// `.tar.gz` or `.tgz`: gzip.
    Gzip,
    /// `.tar.zst` or `.tzst`: zstd.
    Zstd,
}

impl Compression {
    /// The compression for `path`, or `None` if its name is not a tarball name.
    pub fn for_path(path: &Path) -> Option<Compression> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(Compression::Gzip)
        } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
            Some(Compression::Zstd)
        } else if name.ends_with(".tar") {
            Some(Compression::None)
        } else {
            None
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Counts bytes that reach the file (after compression).
struct Counting {
    inner: BufWriter<File>,
    written: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder {
    Plain(Counting),
    Gzip(flate2::write::GzEncoder<Counting>),
    Zstd(zstd::stream::write::Encoder<'static, Counting>),
}

/// The output tarball while it is being written. Dropping it without
/// [`AtomicOutput::commit`] deletes the temporary file.
pub struct AtomicOutput {
    dest: PathBuf,
    tmp: PathBuf,
    encoder: Option<Encoder>,
    raw: u64,
    /// The journal's record of `tmp`: goes after `tmp` does.
    _journal: Option<crate::journal::Entry>,
}

impl AtomicOutput {
    /// Creates the temporary file next to `dest`. Fails with
    /// `BAKE_OUTPUT_UNWRITABLE` when the directory is missing or not writable,
    /// and `BAKE_OUTPUT_FORMAT` when the name has no tarball extension. With
    /// `data` (a runtime's data directory), the temporary file is recorded
    /// in its journal, so `ferry gc` finds it if this process is killed.
    pub fn create(dest: &Path, data: Option<&Path>) -> Result<AtomicOutput, BakeError> {
        let compression = Compression::for_path(dest).ok_or_else(|| BakeError::OutputFormat {
            path: dest.to_path_buf(),
        })?;
        let unwritable = |why: String| BakeError::OutputUnwritable {
            path: dest.to_path_buf(),
            why,
        };
        if dest.is_dir() {
            return Err(unwritable("it is a directory".into()));
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(unwritable(format!(
                "directory {} does not exist",
                dir.display()
            )));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}.bake-{}-{}.part",
            std::process::id(),
            crate::machine::random_hex(4).unwrap_or_default()
        ));
        let journal = data
            .map(|data| crate::journal::Entry::record(data, &tmp))
            .transpose()
            .map_err(|e| unwritable(format!("record the temporary file: {e}")))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| unwritable(e.to_string()))?;
        let counting = Counting {
            inner: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        };
        let encoder = match compression {
            Compression::None => Encoder::Plain(counting),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                counting,
                flate2::Compression::default(),
            )),
            Compression::Zstd => match zstd::stream::write::Encoder::new(counting, 3) {
                Ok(z) => Encoder::Zstd(z),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(unwritable(format!("zstd: {e}")));
                }
            },
        };
        Ok(AtomicOutput {
            dest: dest.to_path_buf(),
            tmp,
            encoder: Some(encoder),
            raw: 0,
            _journal: journal,
        })
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Uncompressed bytes written so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw
    }

    /// Bytes that reached the file so far (compressed).
    pub fn written_bytes(&self) -> u64 {
        match &self.encoder {
            Some(Encoder::Plain(c)) => c.written,
            Some(Encoder::Gzip(g)) => g.get_ref().written,
            Some(Encoder::Zstd(z)) => z.get_ref().written,
            None => 0,
        }
    }

    /// Appends uncompressed tarball bytes.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self.encoder.as_mut() {
            Some(Encoder::Plain(c)) => c.write_all(data)?,
            Some(Encoder::Gzip(g)) => g.write_all(data)?,
            Some(Encoder::Zstd(z)) => z.write_all(data)?,
            None => return Err(io::Error::other("output already finished")),
        }
        self.raw += data.len() as u64;
        Ok(())
    }

    /// Finishes compression, syncs the file, renames it over the destination and
    /// syncs the directory. Returns the final size in bytes.
    pub fn commit(mut self) -> io::Result<u64> {
        let counting = match self.encoder.take() {
            Some(Encoder::Plain(c)) => c,
            Some(Encoder::Gzip(g)) => g.finish()?,
            Some(Encoder::Zstd(z)) => z.finish()?,
            None => return Err(io::Error::other("output already finished")),
        };
        let size = counting.written;
        let file = counting.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest)?;
        if let Some(dir) = self.dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(size)
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        // Not committed (the encoder is still there, or commit failed before the
        // rename): the temporary file must not outlive us.
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn compression_follows_the_name() {
        let c = |s: &str| Compression::for_path(Path::new(s));
        assert_eq!(c("a.tar"), Some(Compression::None));
        assert_eq!(c("dir/a.tar.gz"), Some(Compression::Gzip));
        assert_eq!(c("a.TGZ"), Some(Compression::Gzip));
        assert_eq!(c("a.tar.zst"), Some(Compression::Zstd));
        assert_eq!(c("a.img"), None);
        assert_eq!(c("a.gz"), None);
    }

    #[test]
    fn each_format_round_trips_and_commit_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for name in ["x.tar", "x.tar.gz", "x.tar.zst"] {
            let dest = dir.path().join(name);
            let mut out = AtomicOutput::create(&dest, None).unwrap();
            let tmp = out.temp_path().to_path_buf();
            assert!(tmp.exists());
            assert_eq!(tmp.parent(), dest.parent(), "temp file in the same dir");
            out.write_all(&data[..1000]).unwrap();
            out.write_all(&data[1000..]).unwrap();
            assert_eq!(out.raw_bytes(), data.len() as u64);
            assert!(!dest.exists(), "nothing under the final name before commit");
            let size = out.commit().unwrap();
            assert_eq!(size, std::fs::metadata(&dest).unwrap().len());
            assert!(!tmp.exists());
            let mut back = Vec::new();
            let f = File::open(&dest).unwrap();
            match Compression::for_path(&dest).unwrap() {
                Compression::None => {
                    let mut f = f;
                    f.read_to_end(&mut back).unwrap();
                }
                Compression::Gzip => {
                    flate2::read::GzDecoder::new(f)
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Compression::Zstd => {
                    zstd::stream::read::Decoder::new(f)
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, data, "{name}");
        }
        assert_eq!(leftovers(dir.path()).len(), 3);
    }

    #[test]
    fn dropping_without_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.tar.gz");
        std::fs::write(&dest, b"previous image").unwrap();
        let mut out = AtomicOutput::create(&dest, None).unwrap();
        out.write_all(b"half an image").unwrap();
        drop(out);
        assert_eq!(leftovers(dir.path()), vec!["x.tar.gz".to_string()]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"previous image");
    }

    #[test]
    fn bad_destinations_are_refused() {
        use crate::Coded;
        let dir = tempfile::tempdir().unwrap();
        let err = |p: PathBuf| AtomicOutput::create(&p, None).err().unwrap();
        assert_eq!(
            err(dir.path().join("missing/x.tar")).code(),
            "BAKE_OUTPUT_UNWRITABLE"
        );
        assert_eq!(err(dir.path().join("x.img")).code(), "BAKE_OUTPUT_FORMAT");
        std::fs::create_dir(dir.path().join("d.tar")).unwrap();
        assert_eq!(
            err(dir.path().join("d.tar")).code(),
            "BAKE_OUTPUT_UNWRITABLE"
        );
        assert!(leftovers(dir.path()) == vec!["d.tar".to_string()]);
    }
}
