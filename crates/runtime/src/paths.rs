//! Where ferry keeps its files.
//!
//! Cache (rebuildable assets): `$FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`,
//! else `~/.cache/ferry`. Data (VM state): `$FERRY_DATA_DIR`, else
//! `$XDG_DATA_HOME/ferry`, else `~/.local/share/ferry`.

use std::path::PathBuf;

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Root of ferry's cache: kernels, root filesystems, converted images.
pub fn cache_dir() -> PathBuf {
    env_dir("FERRY_CACHE_DIR").unwrap_or_else(|| {
        env_dir("XDG_CACHE_HOME")
            .unwrap_or_else(|| home().join(".cache"))
            .join("ferry")
    })
}

/// Root of ferry's data: one directory per VM.
pub fn data_dir() -> PathBuf {
    env_dir("FERRY_DATA_DIR").unwrap_or_else(|| {
        env_dir("XDG_DATA_HOME")
            .unwrap_or_else(|| home().join(".local/share"))
            .join("ferry")
    })
}
