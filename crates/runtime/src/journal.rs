//! Files ferry builds outside its own directories: a bundle written beside
//! a path the user chose (`ferry snapshot NAME PATH`), a baked image beside
//! its output. Each is built under a staging name and renamed into place
//! when complete; a writer killed on the way leaves the staging file where
//! no sweep of ferry's directories would look. So, before creating one, the
//! writer records its path in the journal (`<data>/journal/PID-RANDOM`) and
//! drops the entry once the file is published or removed; [`sweep`] removes
//! the staging files of writers that died.

use std::path::{Path, PathBuf};

use crate::fsutil::{self, Freed};

/// The journal's directory under the data directory `data`.
pub fn dir(data: &Path) -> PathBuf {
    data.join("journal")
}

/// One staging file in the journal; the entry goes when this is dropped.
#[derive(Debug)]
pub struct Entry {
    path: PathBuf,
}

impl Entry {
    /// Records that this process is about to build `staging` (an absolute
    /// path is recorded, whatever the working directory is). The journal
    /// directory is made, private, when missing.
    pub fn record(data: &Path, staging: &Path) -> std::io::Result<Entry> {
        use std::io::Write;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::DirBuilderExt;
        let journal = dir(data);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&journal)?;
        let staging = std::path::absolute(staging)?;
        let path = journal.join(format!("{}-{}", std::process::id(), fsutil::random_hex(8)?));
        let mut f = fsutil::create_private(&path)?;
        f.write_all(staging.as_os_str().as_bytes())?;
        Ok(Entry { path })
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the staging files of journal entries whose process is gone, and
/// those entries. A recorded path is removed only if its name is a hidden
/// staging name carrying the dead writer's pid (`.NAME.…PID…`): an entry can
/// never make this delete a file the writer did not create.
pub fn sweep(data: &Path) -> Freed {
    let mut freed = Freed::default();
    let Ok(entries) = std::fs::read_dir(dir(data)) else {
        return freed;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if fsutil::process_exists(pid) {
            continue;
        }
        if let Ok(recorded) = std::fs::read(entry.path()) {
            use std::os::unix::ffi::OsStrExt;
            let staging = PathBuf::from(std::ffi::OsStr::from_bytes(&recorded));
            if is_staging_of(&staging, pid) && std::fs::symlink_metadata(&staging).is_ok() {
                let bytes = fsutil::disk_usage(&staging);
                if std::fs::remove_file(&staging).is_ok() {
                    freed.add(bytes);
                }
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
    freed
}

/// Whether `path` names a hidden staging file of process `pid`.
fn is_staging_of(path: &Path, pid: u32) -> bool {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return false;
    };
    let pid = pid.to_string();
    name.starts_with('.')
        && name
            .split(|c: char| !c.is_ascii_digit())
            .any(|digits| digits == pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_writers_staging_file_is_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        // A live writer (this process): kept while its entry lives.
        let mine = out.join(format!(".web.snap.partial-{}", std::process::id()));
        std::fs::write(&mine, b"partial").unwrap();
        let entry = Entry::record(&data, &mine).unwrap();
        assert_eq!(sweep(&data).count, 0);
        assert!(mine.exists());
        drop(entry);
        assert_eq!(std::fs::read_dir(dir(&data)).unwrap().count(), 0);

        // Entries of a dead process (pid beyond pid_max): its staging file
        // goes; a recorded path that is not its staging file stays.
        let dead = 999_999_999u32;
        let partial = out.join(format!(".web.snap.partial-{dead}"));
        let part = out.join(format!(".img.tar.bake-{dead}-0a1b.part"));
        let precious = out.join("precious.snap");
        for f in [&partial, &part, &precious] {
            std::fs::write(f, b"x").unwrap();
        }
        for (i, f) in [&partial, &part, &precious].into_iter().enumerate() {
            std::fs::write(
                dir(&data).join(format!("{dead}-{i}")),
                f.as_os_str().as_encoded_bytes(),
            )
            .unwrap();
        }
        assert_eq!(sweep(&data).count, 2);
        assert!(!partial.exists() && !part.exists());
        assert!(precious.exists());
        assert_eq!(std::fs::read_dir(dir(&data)).unwrap().count(), 0);
    }
}
