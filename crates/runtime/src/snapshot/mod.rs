//! Snapshots, restores and forks of whole VMs, on top of the bundle format.

pub mod capture;
pub mod chain;
pub mod disk;
pub mod fork;
pub mod memory;
pub mod restore;
