//! The engine under ferry's public API (the `ferry` crate), its CLI and its
//! `ferry-vmm` process: guest assets, VM lifecycle, snapshots. Programs that
//! embed ferry use the `ferry` crate; this one is not a stable interface.

pub mod assets;
pub mod bake;
pub mod boot;
pub mod codes;
pub mod config;
pub mod error;
pub mod forward;
pub mod fsutil;
pub mod gc;
pub mod host;
pub mod images;
pub mod initramfs;
pub mod journal;
pub mod logfile;
pub mod machine;
pub mod migrate;
pub mod mounts;
pub mod net;
pub mod oci_images;
pub mod paths;
pub mod plan;
pub mod progress;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod template;
pub mod vm;
pub mod vmm_process;

pub use config::{Config, Dirs};
pub use error::{Coded, Failure, InstallError};
