//! Bundles whose checksums are all valid but whose content is hostile: forged
//! through the writer, so only the reader's validation stands between them and
//! a restore. Each is refused with a stable code before anything is decoded.

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_snapshot::frames::{self, FrameEncoding, MemoryFrame, MAX_FRAME_LEN};
use ferry_snapshot::manifest::{
    CpuInfo, DiskInfo, MemoryRegion, MAX_CLUSTER_SIZE, MAX_DISK_SIZE, MAX_MEMORY_REGIONS,
};
use ferry_snapshot::memory::{self, PAGE};
use ferry_snapshot::{disk, SectionKind};
use ferry_snapshot::{format, Bundle, BundleError, BundleWriter, Manifest, MemoryExtent};

const MIB: u64 = 1 << 20;

fn manifest() -> Manifest {
    Manifest {
        format_version: 0,
        ferry_version: "test".into(),
        created_at: 1,
        arch: "x86_64".into(),
        cpu: CpuInfo::default(),
        vm_name: "hostile".into(),
        cpus: 1,
        memory_mib: 1,
        memory_regions: vec![MemoryRegion {
            guest_addr: 0,
            size: MIB,
        }],
        memory_bytes: 0,
        memory_stored_bytes: 0,
        memory_prefetch_frames: Vec::new(),
        devices: vec![],
        disk: DiskInfo {
            size: 1 << 30,
            cluster_size: 65536,
            base_id: "0".repeat(64),
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

/// Writes `sections` and `m` as a bundle: every checksum is right.
fn forge(dir: &Path, sections: &[(SectionKind, Vec<u8>)], m: Manifest) -> PathBuf {
    let mut w = BundleWriter::new(Vec::new()).unwrap();
    for (kind, bytes) in sections {
        w.section_bytes(*kind, bytes).unwrap();
    }
    let bytes = w.finish(m).unwrap();
    let p = dir.join(format!("forged-{}.snap", format::checksum(&bytes)));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn code<T: std::fmt::Debug>(r: Result<T, BundleError>) -> &'static str {
    r.unwrap_err().code()
}

/// Opening a bundle with this manifest (and a small memory section) fails
/// with the manifest code.
fn refused_at_open(mutate: impl FnOnce(&mut Manifest)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest();
    mutate(&mut m);
    let p = forge(
        dir.path(),
        &[(SectionKind::MemoryData, vec![1; PAGE as usize])],
        m,
    );
    let err = Bundle::open(&p).unwrap_err();
    assert_eq!(err.code(), "BUNDLE_MANIFEST_INVALID", "{err}");
    err.to_string()
}

#[test]
fn the_valid_forgery_opens() {
    let dir = tempfile::tempdir().unwrap();
    let p = forge(
        dir.path(),
        &[(SectionKind::VmState, b"{}".to_vec())],
        manifest(),
    );
    let b = Bundle::open(&p).unwrap();
    b.verify().unwrap();
    b.check_memory_layout(MIB).unwrap();
}

#[test]
fn overlapping_memory_regions_are_refused() {
    let why = refused_at_open(|m| {
        m.memory_mib = 2;
        m.memory_regions = vec![
            MemoryRegion {
                guest_addr: 0,
                size: MIB,
            },
            MemoryRegion {
                guest_addr: MIB / 2,
                size: MIB,
            },
        ];
    });
    assert!(why.contains("overlaps"), "{why}");
    // Out of order counts as overlapping: regions are listed by address.
    refused_at_open(|m| {
        m.memory_mib = 2;
        m.memory_regions = vec![
            MemoryRegion {
                guest_addr: 4 * MIB,
                size: MIB,
            },
            MemoryRegion {
                guest_addr: 0,
                size: MIB,
            },
        ];
    });
}

#[test]
fn unaligned_empty_or_wrapping_memory_regions_are_refused() {
    for region in [
        MemoryRegion {
            guest_addr: 100,
            size: MIB,
        },
        MemoryRegion {
            guest_addr: 0,
            size: MIB + 1,
        },
        MemoryRegion {
            guest_addr: u64::MAX - PAGE + 1,
            size: MIB,
        },
    ] {
        refused_at_open(|m| m.memory_regions = vec![region]);
    }
    refused_at_open(|m| {
        m.memory_regions.push(MemoryRegion {
            guest_addr: 8 * MIB,
            size: 0,
        })
    });
    refused_at_open(|m| m.memory_regions.clear());
    refused_at_open(|m| {
        m.memory_mib = MAX_MEMORY_REGIONS as u32 + 1;
        m.memory_regions = (0..=MAX_MEMORY_REGIONS as u64)
            .map(|i| MemoryRegion {
                guest_addr: i * 2 * MIB,
                size: MIB,
            })
            .collect();
    });
}

#[test]
fn memory_regions_must_add_up_to_the_ram_size() {
    let why = refused_at_open(|m| m.memory_mib = 2);
    assert!(why.contains("bytes of RAM"), "{why}");
    refused_at_open(|m| m.memory_regions[0].size = 2 * MIB);
}

#[test]
fn the_vm_state_ram_size_is_checked_against_the_regions() {
    let dir = tempfile::tempdir().unwrap();
    let p = forge(dir.path(), &[], manifest());
    let b = Bundle::open(&p).unwrap();
    assert!(b.check_memory_layout(MIB).is_ok());
    assert_eq!(
        code(b.check_memory_layout(2 * MIB)),
        "BUNDLE_MANIFEST_INVALID"
    );
    assert_eq!(code(b.check_memory_layout(0)), "BUNDLE_MANIFEST_INVALID");
}

#[test]
fn a_section_listed_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = forge(
        dir.path(),
        &[
            (SectionKind::VmState, b"{}".to_vec()),
            (SectionKind::VmState, b"{\"other\":1}".to_vec()),
        ],
        manifest(),
    );
    assert_eq!(code(Bundle::open(&p)), "BUNDLE_MANIFEST_INVALID");
}

#[test]
fn disk_sizes_past_the_limit_or_the_clusters_are_refused() {
    let why = refused_at_open(|m| m.disk.size = MAX_DISK_SIZE + 1);
    assert!(why.contains("16 TiB"), "{why}");
    refused_at_open(|m| m.disk.size = u64::MAX);
    // The limit itself is fine.
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest();
    m.disk.size = MAX_DISK_SIZE;
    Bundle::open(&forge(dir.path(), &[], m)).unwrap();
    // Cluster sizes that are no power of two, too large, or zero.
    for cs in [0, 3, 65535, MAX_CLUSTER_SIZE * 2, 1 << 40] {
        refused_at_open(|m| m.disk.cluster_size = cs);
    }
    // More clusters stored than the disk has.
    refused_at_open(|m| {
        m.disk.size = 10 * 65536;
        m.disk.top_clusters = 11;
    });
    refused_at_open(|m| {
        m.disk.size = 0;
        m.disk.base_clusters = 1;
    });
}

/// A bundle with one frame over guest memory: `frame` is stored from
/// `stored`, and the extents fill `extent_len` bytes at guest address 0.
fn frame_bundle(
    dir: &Path,
    m: Manifest,
    extents: &[MemoryExtent],
    frames_: &[MemoryFrame],
    stored: Vec<u8>,
) -> Bundle {
    let p = forge(
        dir,
        &[
            (SectionKind::MemoryData, stored),
            (SectionKind::MemoryExtents, memory::encode_extents(extents)),
            (SectionKind::MemoryFrames, frames::encode_frames(frames_)),
        ],
        m,
    );
    let b = Bundle::open(&p).unwrap();
    b.verify().unwrap();
    b
}

fn extent(guest_addr: u64, len: u64, data_offset: u64) -> MemoryExtent {
    MemoryExtent {
        guest_addr,
        len,
        data_offset,
    }
}

/// One page of 7s as a zstd frame at the start of the memory data: the page,
/// its frame and the stored bytes.
fn zstd_page() -> (Vec<u8>, MemoryFrame, Vec<u8>) {
    let page = vec![7u8; PAGE as usize];
    let z = zstd::bulk::compress(&page, 3).unwrap();
    let f = MemoryFrame {
        offset: 0,
        len: PAGE,
        stored_offset: 0,
        stored_len: z.len() as u64,
        encoding: FrameEncoding::Zstd,
        checksum: format::checksum(&page),
    };
    (page, f, z)
}

#[test]
fn a_good_zstd_frame_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let (page, f, z) = zstd_page();
    let b = frame_bundle(dir.path(), manifest(), &[extent(0, PAGE, 0)], &[f], z);
    let image = b.memory_image().unwrap();
    let mut out = vec![0u8; PAGE as usize];
    b.read_frame(&image, &image.frames[0], &mut out).unwrap();
    assert_eq!(out, page);
}

#[test]
fn a_prefetch_list_naming_frames_that_are_not_there_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f, z) = zstd_page();
    for (list, ok) in [(vec![0], true), (vec![1], false), (vec![0, 0], false)] {
        let m = Manifest {
            memory_prefetch_frames: list.clone(),
            ..manifest()
        };
        let b = frame_bundle(dir.path(), m, &[extent(0, PAGE, 0)], &[f], z.clone());
        match b.memory_image() {
            Ok(image) => assert!(ok && image.prefetch == [0], "{list:?} accepted"),
            Err(e) => {
                assert!(!ok, "{list:?} refused: {e}");
                assert_eq!(e.code(), "BUNDLE_MANIFEST_INVALID");
            }
        }
    }
}

#[test]
fn frames_reaching_past_guest_ram_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    // The extents fill all of the 1 MiB of RAM; the frame claims 2 MiB.
    let f = MemoryFrame {
        offset: 0,
        len: 2 * MIB,
        stored_offset: 0,
        stored_len: 100,
        encoding: FrameEncoding::Zstd,
        checksum: 0,
    };
    let b = frame_bundle(
        dir.path(),
        manifest(),
        &[extent(0, MIB, 0)],
        &[f],
        vec![0; 100],
    );
    let err = b.memory_image().unwrap_err();
    assert_eq!(err.code(), "BUNDLE_MANIFEST_INVALID", "{err}");
    assert!(err.to_string().contains("reaches past"), "{err}");
}

#[test]
fn frames_over_the_frame_cap_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest();
    m.memory_mib = 2 * (MAX_FRAME_LEN / MIB) as u32;
    m.memory_regions[0].size = m.ram_bytes();
    let len = 2 * MAX_FRAME_LEN;
    let f = MemoryFrame {
        offset: 0,
        len,
        stored_offset: 0,
        stored_len: 100,
        encoding: FrameEncoding::Zstd,
        checksum: 0,
    };
    let b = frame_bundle(dir.path(), m, &[extent(0, len, 0)], &[f], vec![0; 100]);
    assert_eq!(code(b.memory_image()), "BUNDLE_MANIFEST_INVALID");
    // Handed straight to the reader, the frame is refused before any buffer
    // is sized from it.
    let image = ferry_snapshot::reader::MemoryImage {
        data_offset: b.entry(SectionKind::MemoryData).unwrap().offset,
        extents: vec![],
        frames: vec![f],
        prefetch: vec![],
    };
    assert_eq!(
        code(b.read_frame(&image, &f, &mut [])),
        "BUNDLE_MANIFEST_INVALID"
    );
}

#[test]
fn frames_stored_past_their_section_or_oversized_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemoryFrame {
        offset: 0,
        len: PAGE,
        stored_offset: 0,
        stored_len: 100,
        encoding: FrameEncoding::Zstd,
        checksum: 0,
    };
    // Stored bytes beyond the memory-data section.
    let past = MemoryFrame {
        stored_offset: 50,
        ..base
    };
    // More stored bytes than any page can compress to.
    let bloated = MemoryFrame {
        stored_len: 2 * PAGE,
        ..base
    };
    for (f, data_len) in [(past, 100), (bloated, 2 * PAGE as usize)] {
        let b = frame_bundle(
            dir.path(),
            manifest(),
            &[extent(0, PAGE, 0)],
            &[f],
            vec![0; data_len],
        );
        assert_eq!(code(b.memory_image()), "BUNDLE_MANIFEST_INVALID", "{f:?}");
    }
}

#[test]
fn extents_outside_ram_or_not_back_to_back_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = |extents: &[MemoryExtent], data_len: usize| {
        let p = forge(
            dir.path(),
            &[
                (SectionKind::MemoryData, vec![1; data_len]),
                (SectionKind::MemoryExtents, memory::encode_extents(extents)),
            ],
            manifest(),
        );
        Bundle::open(&p).unwrap().memory_image()
    };
    assert!(raw(&[extent(0, PAGE, 0), extent(2 * PAGE, PAGE, PAGE)], 8192).is_ok());
    // Past the end of the 1 MiB region.
    assert_eq!(
        code(raw(&[extent(MIB, PAGE, 0)], 4096)),
        "BUNDLE_MANIFEST_INVALID"
    );
    // Two extents reading the same bytes of the payload.
    assert_eq!(
        code(raw(&[extent(0, PAGE, 0), extent(2 * PAGE, PAGE, 0)], 8192)),
        "BUNDLE_MANIFEST_INVALID"
    );
}

/// A zstd frame of two pages, described as one page whose checksum matches
/// its first page. With `content_size` its header says how long it is, and it
/// is refused before decoding; without, only a bounded decode notices.
fn overlong_frame(content_size: bool) -> (MemoryFrame, Vec<u8>) {
    let mut two = vec![3u8; 2 * PAGE as usize];
    two[PAGE as usize..].fill(4);
    let z = if content_size {
        zstd::bulk::compress(&two, 3).unwrap()
    } else {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&two).unwrap();
        enc.finish().unwrap()
    };
    let f = MemoryFrame {
        offset: 0,
        len: PAGE,
        stored_offset: 0,
        stored_len: z.len() as u64,
        encoding: FrameEncoding::Zstd,
        checksum: format::checksum(&two[..PAGE as usize]),
    };
    (f, z)
}

#[test]
fn a_frame_decoding_to_more_than_its_size_is_refused_while_decoding() {
    let dir = tempfile::tempdir().unwrap();
    for content_size in [true, false] {
        let (f, z) = overlong_frame(content_size);
        let b = frame_bundle(dir.path(), manifest(), &[extent(0, PAGE, 0)], &[f], z);
        // The table is well formed: the lie shows only when decoding.
        let image = b.memory_image().unwrap();
        let mut out = vec![0u8; PAGE as usize];
        let err = b
            .read_frame(&image, &image.frames[0], &mut out)
            .unwrap_err();
        assert_eq!(err.code(), "BUNDLE_CORRUPT", "{err}");
        let why = if content_size {
            "announces 8192 bytes"
        } else {
            "too small"
        };
        assert!(err.to_string().contains(why), "{err}");
    }
}

fn disk_bundle(dir: &Path, size: u64, clusters: &[(u64, Vec<u8>)], top_clusters: u64) -> Bundle {
    let mut stream = Vec::new();
    let mut it = clusters.iter().cloned();
    disk::write_clusters(&mut stream, || Ok(it.next())).unwrap();
    let mut m = manifest();
    m.disk.size = size;
    m.disk.cluster_size = 512;
    m.disk.top_clusters = top_clusters;
    Bundle::open(&forge(dir, &[(SectionKind::DiskTop, stream)], m)).unwrap()
}

#[test]
fn disk_clusters_stay_inside_the_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    // A 1000-byte disk: its second cluster is 488 bytes.
    let ok = disk_bundle(dir.path(), 1000, &[(1, vec![1; 488])], 1);
    let mut seen = Vec::new();
    let n = ok
        .read_disk(SectionKind::DiskTop, |at, b| {
            seen.push((at, b.len()));
            Ok(())
        })
        .unwrap();
    assert_eq!((n, seen), (1, vec![(512, 488)]));
    // A full cluster there would write past the end of the disk.
    let past = disk_bundle(dir.path(), 1000, &[(1, vec![1; 512])], 1);
    assert_eq!(
        code(past.read_disk(SectionKind::DiskTop, |_, _| Ok(()))),
        "BUNDLE_CORRUPT"
    );
    // Fewer clusters than the manifest says.
    let short = disk_bundle(dir.path(), 1000, &[(0, vec![1; 512])], 2);
    assert_eq!(
        code(short.read_disk(SectionKind::DiskTop, |_, _| Ok(()))),
        "BUNDLE_CORRUPT"
    );
    // Only disk sections are disk streams.
    assert_eq!(
        code(short.read_disk(SectionKind::VmState, |_, _| Ok(()))),
        "BUNDLE_MANIFEST_INVALID"
    );
}

#[test]
fn a_huge_cluster_size_allocates_nothing() {
    let mut stream = Vec::new();
    disk::write_clusters(&mut stream, || Ok(None)).unwrap();
    for cs in [0, 1 << 40, u64::MAX] {
        assert_eq!(
            code(disk::read_clusters(&stream[..], cs, 1, |_, _| Ok(()))),
            "BUNDLE_MANIFEST_INVALID"
        );
        assert_eq!(
            code(disk::read_clusters_within(
                &stream[..],
                cs,
                1,
                |_, _| Ok(())
            )),
            "BUNDLE_MANIFEST_INVALID"
        );
    }
}
