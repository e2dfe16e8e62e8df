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
        memory_stored_bytes: 8192,
        memory_prefetch_frames: Vec::new(),
        devices: vec!["virtio-blk".into()],
        disk: DiskInfo {
            size: 0,
            cluster_size: 65536,
            base_id: "none".into(),
            base_clusters: 0,
            top_clusters: 0,
            thin: false,
            base_image: None,
            base_cache_path: None,
        },
        sections: vec![],
        parent: None,
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

/// A bundle whose memory is compressed frames over a guest with text, noise
/// and zeros; returns the guest memory it holds.
fn write_compressed(path: &Path, thin: bool) -> Vec<u8> {
    use ferry_snapshot::frames::{self, MemoryCompression};
    use ferry_snapshot::memory::{self, RegionView};
    let mut mem = vec![0u8; 4 << 20];
    for (i, b) in mem[..(3 << 20) / 2].iter_mut().enumerate() {
        *b = b"guest text, highly repetitive "[i % 30];
    }
    let mut x = 7u32;
    for b in &mut mem[(2 << 20)..(2 << 20) + 300_000] {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        *b = (x >> 16) as u8;
    }
    let regions = [RegionView {
        guest_addr: 0,
        bytes: &mem,
        candidates: None,
    }];
    let runs = memory::find_runs(&regions);
    let (guard, mut w) = FileBundle::create(path).unwrap();
    w.section_bytes(SectionKind::VmState, b"{}").unwrap();
    let written = w
        .section(SectionKind::MemoryData, |s| {
            frames::write_frames(
                &regions,
                &runs,
                &[],
                false,
                s,
                MemoryCompression::Zstd(frames::DEFAULT_LEVEL),
            )
        })
        .unwrap();
    w.section_bytes(
        SectionKind::MemoryExtents,
        &memory::encode_extents(&written.extents),
    )
    .unwrap();
    w.section_bytes(
        SectionKind::MemoryFrames,
        &frames::encode_frames(&written.frames),
    )
    .unwrap();
    let mut m = manifest();
    m.memory_regions = vec![MemoryRegion {
        guest_addr: 0,
        size: mem.len() as u64,
    }];
    m.memory_mib = (mem.len() >> 20) as u32;
    m.memory_bytes = written.extents.iter().map(|e| e.len).sum();
    m.memory_stored_bytes = written.stored_bytes;
    m.disk.thin = thin;
    m.disk.base_image = Some("base".into());
    let out = w.finish(m).unwrap();
    guard.commit(out).unwrap();
    mem
}

/// Guest memory rebuilt from a bundle, frame by frame.
fn read_back(b: &Bundle, len: usize) -> Result<Vec<u8>, ferry_snapshot::BundleError> {
    let image = b.memory_image()?;
    let mut stream = Vec::new();
    for f in &image.frames {
        let mut buf = vec![0u8; f.len as usize];
        b.read_frame(&image, f, &mut buf)?;
        stream.extend_from_slice(&buf);
    }
    let mut mem = vec![0u8; len];
    for e in &image.extents {
        let (g, d) = (e.guest_addr as usize, e.data_offset as usize);
        mem[g..g + e.len as usize].copy_from_slice(&stream[d..d + e.len as usize]);
    }
    Ok(mem)
}

#[test]
fn compressed_memory_round_trips_and_is_randomly_accessible() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.snap");
    let mem = write_compressed(&p, false);
    let b = Bundle::open(&p).unwrap();
    b.verify().unwrap();
    let image = b.memory_image().unwrap();
    assert!(image.is_compressed());
    assert!(
        b.manifest().memory_stored_bytes < b.manifest().memory_bytes / 2,
        "{} stored for {}",
        b.manifest().memory_stored_bytes,
        b.manifest().memory_bytes
    );
    assert_eq!(read_back(&b, mem.len()).unwrap(), mem);
    // One page read alone: only its frame is decoded.
    let e = image.extents[0];
    let f = ferry_snapshot::frames::frame_at(&image.frames, e.data_offset + 4096).unwrap();
    let mut buf = vec![0u8; f.len as usize];
    b.read_frame(&image, f, &mut buf).unwrap();
    let at = (e.data_offset + 4096 - f.offset) as usize;
    assert_eq!(
        &buf[at..at + 4096],
        &mem[(e.guest_addr + 4096) as usize..(e.guest_addr + 8192) as usize]
    );
    // The same bundle streamed is the same bytes as the file.
    assert_eq!(std::fs::read(&p).unwrap().len() as u64, b.len());
}

#[test]
fn a_corrupt_memory_frame_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.snap");
    write_compressed(&p, false);
    let image = Bundle::open(&p).unwrap().memory_image().unwrap();
    let f = image
        .frames
        .iter()
        .find(|f| f.encoding == ferry_snapshot::frames::FrameEncoding::Zstd)
        .unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[(image.data_offset + f.stored_offset + f.stored_len / 2) as usize] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    let b = Bundle::open(&p).unwrap();
    // The whole-bundle check catches it, and so does decoding that frame alone.
    assert_eq!(b.verify().unwrap_err().code(), "BUNDLE_CORRUPT");
    let err = read_back(&b, 4 << 20).unwrap_err();
    assert_eq!(err.code(), "BUNDLE_CORRUPT");
    assert!(err.to_string().contains("memory frame"), "{err}");
}

#[test]
fn a_thin_manifest_round_trips_and_old_manifests_read_as_full() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("thin.snap");
    write_compressed(&p, true);
    let b = Bundle::open(&p).unwrap();
    assert!(b.manifest().disk.thin);
    assert_eq!(b.manifest().disk.base_image.as_deref(), Some("base"));
    assert!(b.manifest().section(SectionKind::DiskBase).is_none());
    // A manifest written before thin bundles existed has no such fields.
    let mut json = serde_json::to_value(manifest()).unwrap();
    let disk = json["disk"].as_object_mut().unwrap();
    for k in ["thin", "base_image", "base_cache_path"] {
        disk.remove(k);
    }
    json.as_object_mut().unwrap().remove("memory_stored_bytes");
    let old: Manifest = serde_json::from_value(json).unwrap();
    assert!(!old.disk.thin);
    assert_eq!(old.memory_stored_bytes, 0);
}

#[test]
fn version_1_memory_reads_as_one_raw_frame() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v1.snap");
    let (guard, mut w) = FileBundle::create(&p).unwrap();
    w.section(SectionKind::MemoryData, |s| s.write_all(&[0xAB; 8192]))
        .unwrap();
    w.section_bytes(
        SectionKind::MemoryExtents,
        &ferry_snapshot::memory::encode_extents(&[ferry_snapshot::MemoryExtent {
            guest_addr: 4096,
            len: 8192,
            data_offset: 0,
        }]),
    )
    .unwrap();
    let out = w.finish(manifest()).unwrap();
    guard.commit(out).unwrap();
    let b = Bundle::open(&p).unwrap();
    let image = b.memory_image().unwrap();
    assert!(!image.is_compressed());
    assert_eq!(image.frames.len(), 1);
    let mut mem = read_back(&b, 1 << 20).unwrap();
    assert!(mem[4096..4096 + 8192].iter().all(|&x| x == 0xAB));
    mem[4096..4096 + 8192].fill(0);
    assert!(mem.iter().all(|&x| x == 0));
}
