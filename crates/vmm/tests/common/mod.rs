//! Helpers for KVM tests with tiny hand-assembled guests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_vmm::VmConfig;

/// Load and entry address of the test "kernels".
pub const ENTRY: u64 = 0x100_0000;

/// Whether KVM can run the tests here; prints why not.
pub fn kvm_ready() -> bool {
    if let Some(reason) = ferry_vmm::kvm_unavailable_reason() {
        eprintln!("skipping: {reason}");
        return false;
    }
    true
}

/// Writes a minimal ELF64 executable with one PT_LOAD segment at `ENTRY`.
pub fn write_elf(path: &Path, code: &[u8]) {
    let mut f = vec![0u8; 64 + 56];
    f[0..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&ENTRY.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
    f[ph + 16..ph + 24].copy_from_slice(&ENTRY.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&ENTRY.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    std::fs::write(path, f).unwrap();
}

/// A test guest: its directory, console log and config.
pub struct Guest {
    pub dir: tempfile::TempDir,
    pub console: PathBuf,
    pub config: VmConfig,
}

/// A guest running `code` with `cpus` vCPUs and 64 MiB.
pub fn guest(code: &[u8], cpus: u8) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("blob.elf");
    write_elf(&kernel, code);
    let console = dir.path().join("console.log");
    let mut config = VmConfig::new(&kernel, &console);
    config.cpus = cpus;
    config.memory_mib = 64;
    config.allow_pvm = true;
    Guest {
        dir,
        console,
        config,
    }
}

/// Polls `path` until `done(text)` or the timeout; returns the text.
pub fn wait_for(path: &Path, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) || start.elapsed() > timeout {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
