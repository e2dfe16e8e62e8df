//! ferry runtime library: guest assets, VM lifecycle, and the Rust API.

pub mod initramfs;
