//! ferry runtime library: guest assets, VM lifecycle, and the Rust API.

pub mod assets;
pub mod bake;
pub mod error;
pub mod forward;
pub mod fsutil;
pub mod host;
pub mod images;
pub mod initramfs;
pub mod machine;
pub mod mounts;
pub mod net;
pub mod paths;
pub mod progress;
pub mod snapshot;
pub mod template;
pub mod vm;
pub mod vmm_process;

pub use error::{Coded, Failure, InstallError};

/// Serializes tests that change process-wide environment variables.
#[cfg(test)]
pub(crate) static TEST_ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
