//! The host ferry runs on: its package manager and the tools ferry drives.

pub mod command;
pub mod debian;
pub mod hugepages;
