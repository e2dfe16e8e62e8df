//! Whole bundles: written, reopened, and damaged in every way a transfer can.

use std::io::Write;
use std::path::Path;

use ferry_snapshot::format::{self, TRAILER_LEN};
use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::{Bundle, BundleWriter, Manifest, SectionKind};

fn manifest() -> Manifest {
    Manifest {
        format_version: 0,
        ferry_version: "test".into(),
        created_at: 1,
        arch: "x86_64".into(),
        cpu: CpuInfo {
            vendor: "AuthenticAMD".into(),
            features: vec!["sse2".into()],
        },
        vm_name: "counter".into(),
        cpus: 1,
        memory_mib: 1,
        memory_regions: vec![MemoryRegion {
            guest_addr: 0,
            size: 1 << 20,
        }],
        memory_bytes: 8192,
        devices: vec!["virtio-blk".into()],
        disk: DiskInfo {
            size: 0,
            cluster_size: 65536,
            base_id: "none".into(),
            base_clusters: 0,
            top_clusters: 0,
        },
        sections: vec![],
    }
}

fn write(path: &Path) {
    let (guard, mut w) = FileBundle::create(path).unwrap();
    w.section_bytes(SectionKind::VmState, b"{\"state\":1}")
        .unwrap();
    w.section(SectionKind::MemoryData, |s| s.write_all(&[0xAB; 8192]))
        .unwrap();
    let out = w.finish(manifest()).unwrap();
    guard.commit(out).unwrap();
}

#[test]
fn a_written_bundle_reads_back_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.snap");
    write(&p);
    let b = Bundle::open(&p).unwrap();
    b.verify().unwrap();
    assert_eq!(b.manifest().vm_name, "counter");
    assert_eq!(
        b.read_section(SectionKind::VmState).unwrap(),
        b"{\"state\":1}"
    );
    let mem = b.entry(SectionKind::MemoryData).unwrap();
    assert_eq!(
        mem.offset % 4096,
        0,
        "memory must be page aligned for mapping"
    );
    assert_eq!(mem.length, 8192);
    // Only the final file exists: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn streams_and_files_are_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.snap");
    write(&p);
    let mut w = BundleWriter::new(Vec::new()).unwrap();
    w.section_bytes(SectionKind::VmState, b"{\"state\":1}")
        .unwrap();
    w.section(SectionKind::MemoryData, |s| s.write_all(&[0xAB; 8192]))
        .unwrap();
    let streamed = w.finish(manifest()).unwrap();
    assert_eq!(streamed, std::fs::read(&p).unwrap());
}

#[test]
fn an_abandoned_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.snap");
    {
        let (_guard, mut w) = FileBundle::create(&p).unwrap();
        w.section_bytes(SectionKind::VmState, b"partial").unwrap();
        // Dropped without commit: as if the snapshot failed midway.
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn damage_is_reported_with_the_right_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.snap");
    write(&p);
    let good = std::fs::read(&p).unwrap();
    let bad = dir.path().join("bad.snap");
    let code = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        match Bundle::open(&bad).and_then(|b| b.verify()) {
            Ok(()) => "ok".to_string(),
            Err(e) => e.code().to_string(),
        }
    };
    // Truncated anywhere.
    for cut in [0, 100, 4096, good.len() / 2, good.len() - 1] {
        assert_eq!(code(&good[..cut]), "BUNDLE_TRUNCATED", "cut at {cut}");
    }
    // Flipped byte in a section, in the manifest, in the trailer.
    let mut flipped = good.clone();
    flipped[4096 + 5] ^= 0xFF;
    assert_eq!(code(&flipped), "BUNDLE_CORRUPT");
    let mut flipped = good.clone();
    let m = good.len() - TRAILER_LEN as usize - 10;
    flipped[m] ^= 0x01;
    assert_eq!(code(&flipped), "BUNDLE_CORRUPT");
    let mut flipped = good.clone();
    let t = good.len() - TRAILER_LEN as usize + 20;
    flipped[t] ^= 0x01;
    assert_ne!(code(&flipped), "ok");
    // Not a bundle at all.
    assert_eq!(
        code(b"hello, this is not a snapshot bundle at all"),
        "BUNDLE_NOT_A_BUNDLE"
    );
    // A newer format version.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(format::FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(code(&newer), "BUNDLE_VERSION_UNSUPPORTED");
    assert_eq!(code(&good), "ok");
}
