//! Guest assets ferry needs before it can boot anything: the guest kernel and the
//! base root filesystem. All are built on this machine and cached.

pub mod kernel;
pub mod rootfs;

use std::path::{Path, PathBuf};

use crate::error::InstallError;
use crate::progress::{Event, Progress};

pub use kernel::Kernel;
pub use rootfs::Rootfs;

/// Everything `ferry install` prepares.
#[derive(Debug, Clone)]
pub struct Assets {
    /// The guest kernel.
    pub kernel: Kernel,
    /// The base root filesystem.
    pub rootfs: Rootfs,
}

/// Holds the build of the asset published at `dir` for this process: a
/// second ferry (another test run, a second `ferry install`) building the
/// same asset waits here, then finds it built, rather than building it too.
fn claim_build(dir: &Path) -> Result<std::fs::File, InstallError> {
    crate::fsutil::lock_build(dir).map_err(InstallError::io("lock asset build"))
}

/// Log file for asset builds, under the cache directory `cache`.
pub fn install_log(cache: &Path) -> PathBuf {
    cache.join("logs/install.log")
}

/// Prepares all assets in the cache directory `cache`, building what is not
/// cached. Idempotent.
pub fn ensure_all(cache: &Path, progress: &dyn Progress) -> Result<Assets, InstallError> {
    let log = install_log(cache);
    std::fs::create_dir_all(log.parent().expect("log has a parent"))
        .map_err(InstallError::io("create cache directory"))?;
    crate::net::ensure_host_packages(&log)?;
    use crate::host::hugepages::{ensure_shmem_advise, ShmemHugePages};
    match ensure_shmem_advise() {
        ShmemHugePages::Available => {}
        ShmemHugePages::Enabled => progress.event(
            "host",
            Event::Note(
                "shared-memory huge pages set to `advise`, so guest memory uses 2 MiB pages",
            ),
        ),
        ShmemHugePages::Unavailable(why) => progress.event(
            "host",
            Event::Note(&format!(
                "guest memory will use 4 KiB pages (slower first touches): {why}"
            )),
        ),
    }
    let kernel = kernel::ensure(cache, &log, progress)?;
    let rootfs = rootfs::ensure(cache, &log, progress)?;
    Ok(Assets { kernel, rootfs })
}
