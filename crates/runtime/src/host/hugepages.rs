//! Transparent huge pages for guest memory.
//!
//! Guest RAM lives in a memfd (shared memory) so it can be snapshotted and
//! forked without copies. With 4 KiB host pages every first touch of a guest
//! page is a nested page fault, i.e. a VM exit; with 2 MiB pages KVM maps 512
//! times as much per fault. Linux gives shared memory huge pages only where
//! `shmem_enabled` allows it; `advise` limits them to mappings that ask
//! (ferry's VMM does, other programs are unaffected).

use std::path::Path;

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// What `ensure_shmem_advise` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmemHugePages {
    /// Already allowed for mappings that ask (`advise`, `within_size`, `always` or `force`).
    Available,
    /// Was `never`; switched to `advise`.
    Enabled,
    /// Not allowed and this process may not change it.
    Unavailable(String),
}

/// The selected value of a sysfs THP setting such as `always [never] advise`.
fn selected(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// Makes shared-memory huge pages available to mappings that ask for them,
/// switching `never` to `advise` when running as root.
pub fn ensure_shmem_advise() -> ShmemHugePages {
    ensure_at(Path::new(SHMEM_ENABLED))
}

fn ensure_at(path: &Path) -> ShmemHugePages {
    let Ok(text) = std::fs::read_to_string(path) else {
        return ShmemHugePages::Unavailable("this kernel has no transparent huge pages".into());
    };
    match selected(&text) {
        Some("advise" | "within_size" | "always" | "force") => ShmemHugePages::Available,
        Some("deny") => ShmemHugePages::Unavailable(format!("{} is `deny`", path.display())),
        _ => match std::fs::write(path, "advise") {
            Ok(()) => ShmemHugePages::Enabled,
            Err(e) => ShmemHugePages::Unavailable(format!(
                "{} is `never` and cannot be changed ({e}); as root: echo advise > {}",
                path.display(),
                path.display()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_selected_value() {
        assert_eq!(
            selected("always within_size advise [never] deny force"),
            Some("never")
        );
        assert_eq!(selected("[advise] never"), Some("advise"));
        assert_eq!(selected("garbage"), None);
    }

    #[test]
    fn switches_never_to_advise() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shmem_enabled");
        std::fs::write(&p, "always within_size advise [never] deny force\n").unwrap();
        assert_eq!(ensure_at(&p), ShmemHugePages::Enabled);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "advise");
        std::fs::write(&p, "always within_size [advise] never deny force\n").unwrap();
        assert_eq!(ensure_at(&p), ShmemHugePages::Available);
        std::fs::write(&p, "always within_size advise never [deny] force\n").unwrap();
        assert!(matches!(ensure_at(&p), ShmemHugePages::Unavailable(_)));
        assert!(matches!(
            ensure_at(&dir.path().join("missing")),
            ShmemHugePages::Unavailable(_)
        ));
    }
}
