//! x86_64 specifics: memory layout, CPUID, registers, MP table, Linux boot.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
