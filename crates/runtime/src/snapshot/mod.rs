//! Snapshots, restores and forks of whole VMs, on top of the bundle format.

pub mod disk;
