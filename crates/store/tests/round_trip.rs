//! Bundles through a store and back, against an in-memory object store (the
//! S3 server itself is exercised in the test hosts).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ferry_snapshot::frames::{self, MemoryCompression};
use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion};
use ferry_snapshot::memory::{self, RegionView};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::{Bundle, Manifest, SectionKind};
use ferry_store::{pull_bundle, push_bundle, Remote, StoreUrl};
use object_store::memory::InMemory;
use object_store::ObjectStore;

const RAM: usize = 16 << 20;
const DISK: u64 = 8 << 20;
const CLUSTER: u64 = 65536;

fn manifest(thin: bool) -> Manifest {
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
        memory_mib: (RAM >> 20) as u32,
        memory_regions: vec![MemoryRegion {
            guest_addr: 0,
            size: RAM as u64,
        }],
        memory_bytes: 0,
        memory_stored_bytes: 0,
        memory_prefetch_frames: Vec::new(),
        devices: vec!["virtio-blk".into()],
        disk: DiskInfo {
            size: DISK,
            cluster_size: CLUSTER,
            base_id: "id".into(),
            base_clusters: 0,
            top_clusters: 0,
            thin,
            base_image: Some("base".into()),
            base_cache_path: None,
        },
        sections: vec![],
        parent: None,
    }
}

fn noise(seed: u32, out: &mut [u8]) {
    let mut x = seed;
    for b in out {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        *b = (x >> 16) as u8;
    }
}

/// A VM's memory: text at the start, noise here and there.
fn guest_memory() -> Vec<u8> {
    let mut mem = vec![0u8; RAM];
    for (i, b) in mem[..3 << 20].iter_mut().enumerate() {
        *b = b"kernel text, repetitive "[i % 24];
    }
    noise(1, &mut mem[(5 << 20) + 4096..(5 << 20) + 300_000]);
    noise(2, &mut mem[(11 << 20)..(11 << 20) + 8192]);
    mem
}

fn clusters(seed: u32, at: &[u64]) -> Vec<(u64, Vec<u8>)> {
    at.iter()
        .map(|&i| {
            let mut c = vec![0u8; CLUSTER as usize];
            noise(seed + i as u32, &mut c);
            (i, c)
        })
        .collect()
}

/// How a test bundle carries its disk image.
#[derive(Clone, Copy, PartialEq)]
enum Base {
    /// One zstd frame per 2 MiB window, as ferry writes images.
    Framed,
    /// One zstd stream, as images were written before.
    Unframed,
    /// Not at all.
    Thin,
}

fn write_bundle(path: &Path, mem: &[u8], top: &[(u64, Vec<u8>)], base: Base, compressed: bool) {
    let thin = base == Base::Thin;
    let regions = [RegionView {
        guest_addr: 0,
        bytes: mem,
        candidates: None,
    }];
    let runs = memory::find_runs(&regions);
    let (guard, mut w) = FileBundle::create(path).unwrap();
    w.section_bytes(SectionKind::Record, b"{\"name\":\"counter\"}")
        .unwrap();
    w.section_bytes(SectionKind::VmState, b"{\"state\":1}")
        .unwrap();
    let compression = if compressed {
        MemoryCompression::Zstd(frames::DEFAULT_LEVEL)
    } else {
        MemoryCompression::None
    };
    let hot = [(5 << 20, 64 << 10)];
    let written = w
        .section(SectionKind::MemoryData, |s| {
            frames::write_frames(&regions, &runs, &hot, true, s, compression)
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
    let mut m = manifest(thin);
    if !thin {
        let image = clusters(100, &[0, 1, 40, 127]);
        let mut it = image.into_iter();
        m.disk.base_clusters = w
            .section(SectionKind::DiskBase, |s| {
                if base == Base::Framed {
                    ferry_snapshot::disk::write_clusters_framed(s, CLUSTER, || Ok(it.next()))
                } else {
                    ferry_snapshot::disk::write_clusters(s, || Ok(it.next()))
                }
            })
            .unwrap();
    }
    let mut it = top.iter().cloned();
    m.disk.top_clusters = w
        .section(SectionKind::DiskTop, |s| {
            ferry_snapshot::disk::write_clusters(s, || Ok(it.next()))
        })
        .unwrap();
    m.memory_bytes = written.extents.iter().map(|e| e.len).sum();
    m.memory_stored_bytes = written.stored_bytes;
    m.memory_prefetch_frames = written.prefetch;
    let out = w.finish(m).unwrap();
    guard.commit(out).unwrap();
}

fn read_memory(b: &Bundle) -> Vec<u8> {
    let image = b.memory_image().unwrap();
    let mut mem = vec![0u8; RAM];
    for f in &image.frames {
        let mut buf = vec![0u8; f.len as usize];
        b.read_frame(&image, f, &mut buf).unwrap();
        for e in &image.extents {
            let (s, t) = (
                e.data_offset.max(f.offset),
                (e.data_offset + e.len).min(f.offset + f.len),
            );
            if s < t {
                let g = (e.guest_addr + s - e.data_offset) as usize;
                mem[g..g + (t - s) as usize]
                    .copy_from_slice(&buf[(s - f.offset) as usize..(t - f.offset) as usize]);
            }
        }
    }
    mem
}

fn read_disk(b: &Bundle, kind: SectionKind) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    b.read_disk(kind, |off, bytes| {
        out.push((off, bytes.to_vec()));
        Ok(())
    })
    .unwrap();
    out
}

/// Clusters by byte offset, as a bundle reads them back.
fn offsets(clusters: &[(u64, Vec<u8>)]) -> Vec<(u64, Vec<u8>)> {
    clusters
        .iter()
        .map(|(i, b)| (i * CLUSTER, b.clone()))
        .collect()
}

fn store() -> (Arc<InMemory>, Remote) {
    let mem = Arc::new(InMemory::new());
    let url = StoreUrl::parse("s3://fleet/vms").unwrap();
    let remote = Remote::with_object_store(&url, mem.clone()).unwrap();
    (mem, remote)
}

#[test]
fn a_bundle_comes_back_whole_and_a_second_push_sends_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, remote) = store();
    let mem = guest_memory();
    let top = clusters(7, &[3, 64]);
    let first = dir.path().join("first.snap");
    write_bundle(&first, &mem, &top, Base::Framed, true);
    let report = push_bundle(&remote, &first, &mut |_| {}).unwrap();
    assert_eq!(report.uploaded_chunks, report.chunks, "{report:?}");
    // Memory: the 2 MiB windows at 0 and 2 MiB (text), 4 MiB and 10 MiB
    // (noise); the all-zero windows are not stored.
    assert_eq!(report.memory_chunks, 4, "{report:?}");
    assert!(report.url.ends_with(&report.digest));

    let back = dir.path().join("back.snap");
    let pulled = pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap();
    assert!(pulled.chunks > 0 && pulled.bundle_bytes > 0);
    let a = Bundle::open(&first).unwrap();
    let b = Bundle::open(&back).unwrap();
    b.verify().unwrap();
    assert!(read_memory(&b) == mem, "memory differs");
    for kind in [
        SectionKind::Record,
        SectionKind::VmState,
        SectionKind::DiskBase,
    ] {
        assert!(
            a.read_section(kind).unwrap() == b.read_section(kind).unwrap(),
            "{kind:?}"
        );
    }
    assert!(
        read_disk(&b, SectionKind::DiskTop) == offsets(&top),
        "disk writes differ"
    );
    assert!(read_disk(&b, SectionKind::DiskBase) == read_disk(&a, SectionKind::DiskBase));
    // The prefetch set survives: the same guest pages, in frames of their own.
    let hot = |x: &Bundle| {
        let image = x.memory_image().unwrap();
        image
            .prefetch
            .iter()
            .map(|&i| image.frames[i].len)
            .sum::<u64>()
    };
    assert_eq!(hot(&a), hot(&b));
    assert_eq!(a.manifest().disk.base_id, b.manifest().disk.base_id);

    // 8 KiB more of guest memory and one disk cluster: two memory windows
    // and one disk window change, nothing else is sent.
    let mut mem2 = mem.clone();
    noise(9, &mut mem2[(13 << 20)..(13 << 20) + 8192]);
    let mut top2 = top.clone();
    top2.push(clusters(8, &[65])[0].clone());
    let second = dir.path().join("second.snap");
    write_bundle(&second, &mem2, &top2, Base::Framed, true);
    let again = push_bundle(&remote, &second, &mut |_| {}).unwrap();
    assert_ne!(again.digest, report.digest);
    assert_eq!(
        again.uploaded_chunks, 2,
        "one memory window, one disk window: {again:?}"
    );
    let back2 = dir.path().join("back2.snap");
    pull_bundle(&remote, &again.digest, &back2, &mut |_| {}).unwrap();
    let b2 = Bundle::open(&back2).unwrap();
    assert!(read_memory(&b2) == mem2, "memory differs");
    assert!(
        read_disk(&b2, SectionKind::DiskTop) == offsets(&top2),
        "disk writes differ"
    );

    // The same bundle twice is the same VM: nothing to upload but its name.
    let same = push_bundle(&remote, &first, &mut |_| {}).unwrap();
    assert_eq!(
        (same.digest.as_str(), same.uploaded_chunks),
        (report.digest.as_str(), 0)
    );
}

#[test]
fn a_lazy_restore_bundle_has_all_but_memory_and_fetches_through_the_cache() {
    use ferry_store::pull::{fetch_manifest_bytes, write_bundle as build, Contents};
    use ferry_store::ChunkCache;
    let dir = tempfile::tempdir().unwrap();
    let (_, remote) = store();
    let mem = guest_memory();
    let top = clusters(7, &[3, 64]);
    let full = dir.path().join("full.snap");
    write_bundle(&full, &mem, &top, Base::Framed, true);
    let report = push_bundle(&remote, &full, &mut |_| {}).unwrap();
    let (m, _) = fetch_manifest_bytes(&remote, &report.digest).unwrap();
    let cache = ChunkCache::open(&dir.path().join("cache"), 64 << 20).unwrap();

    // Without the image (this host has it): thin, no memory, the disk writes.
    let skeleton = dir.path().join("skeleton.snap");
    let got = build(
        &remote,
        Some(&cache),
        &m,
        Contents::NoMemory {
            with_base: false,
            with_top: true,
        },
        &skeleton,
        &mut |_| {},
    )
    .unwrap();
    let b = Bundle::open(&skeleton).unwrap();
    b.verify().unwrap();
    assert!(b.manifest().disk.thin);
    assert!(b.manifest().section(SectionKind::DiskBase).is_none());
    assert_eq!(b.manifest().memory_bytes, 0);
    assert!(b.memory_image().unwrap().extents.is_empty());
    assert!(read_disk(&b, SectionKind::DiskTop) == offsets(&top));
    let a = Bundle::open(&full).unwrap();
    assert_eq!(
        a.read_section(SectionKind::VmState).unwrap(),
        b.read_section(SectionKind::VmState).unwrap()
    );
    assert!(got.fetched_bytes > 0);

    // Again, with the image: its pieces are fetched, what was fetched
    // before comes from the cache.
    let cached_before = cache.size().unwrap();
    assert_eq!(
        cached_before, got.fetched_bytes,
        "everything fetched was kept"
    );
    let with_base = dir.path().join("with-base.snap");
    let again = build(
        &remote,
        Some(&cache),
        &m,
        Contents::NoMemory {
            with_base: true,
            with_top: true,
        },
        &with_base,
        &mut |_| {},
    )
    .unwrap();
    let c = Bundle::open(&with_base).unwrap();
    assert!(!c.manifest().disk.thin);
    assert!(read_disk(&c, SectionKind::DiskBase) == read_disk(&a, SectionKind::DiskBase));
    // Only the image's pieces were fetched: all new to the cache.
    assert_eq!(cache.size().unwrap() - cached_before, again.fetched_bytes);
    assert!(again.fetched_bytes > 0);
    // The image is cut at its frames, one window of the disk each: a
    // restore can fetch it window by window, and each piece reads alone.
    let image = m.disk_base.as_ref().unwrap();
    let windows = image.windows.clone().expect("framed by window");
    assert_eq!(windows, vec![Some(0), Some(2 << 20), Some(6 << 20)]);
    let (pieces, _) = cache.fetch(&remote, &image.pieces).unwrap();
    let mut placed = Vec::new();
    for (i, (piece, w)) in pieces.iter().zip(&windows).enumerate() {
        let (clusters, ended) = ferry_store::chunk::base_records(piece, *w, DISK, CLUSTER).unwrap();
        assert_eq!(ended, i + 1 == pieces.len());
        placed.extend(clusters);
        // The same bytes are no piece of another window.
        assert_eq!(
            ferry_store::chunk::base_records(piece, Some(4 << 20), DISK, CLUSTER)
                .unwrap_err()
                .code(),
            "BUNDLE_CORRUPT"
        );
    }
    assert!(placed == offsets(&clusters(100, &[0, 1, 40, 127])));
    // Every memory chunk is there for a VMM to fetch, checked.
    let (bytes, _) = cache.fetch(&remote, &m.memory).unwrap();
    for (r, b) in m.memory.iter().zip(&bytes) {
        let at = r.at as usize;
        assert!(b[..] == mem[at..at + r.len as usize]);
    }
}

#[test]
fn an_image_written_as_one_stream_is_cut_evenly_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_, remote) = store();
    let p = dir.path().join("unframed.snap");
    write_bundle(
        &p,
        &guest_memory(),
        &clusters(3, &[1]),
        Base::Unframed,
        true,
    );
    let report = push_bundle(&remote, &p, &mut |_| {}).unwrap();
    let (m, _) = ferry_store::pull::fetch_manifest(&remote, &report.digest).unwrap();
    assert_eq!(m.disk_base.as_ref().unwrap().windows, None);
    let back = dir.path().join("back.snap");
    pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap();
    let (a, b) = (Bundle::open(&p).unwrap(), Bundle::open(&back).unwrap());
    assert!(
        a.read_section(SectionKind::DiskBase).unwrap()
            == b.read_section(SectionKind::DiskBase).unwrap()
    );
}

#[test]
fn raw_and_thin_bundles_round_trip_too() {
    let dir = tempfile::tempdir().unwrap();
    let (_, remote) = store();
    let mem = guest_memory();
    let p = dir.path().join("raw-thin.snap");
    write_bundle(&p, &mem, &[], Base::Thin, false);
    let report = push_bundle(&remote, &p, &mut |_| {}).unwrap();
    let back = dir.path().join("back.snap");
    pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap();
    let b = Bundle::open(&back).unwrap();
    b.verify().unwrap();
    assert!(!b.memory_image().unwrap().is_compressed());
    assert!(b.manifest().disk.thin);
    assert!(b.manifest().section(SectionKind::DiskBase).is_none());
    assert!(read_memory(&b) == mem, "memory differs");
}

#[test]
fn a_damaged_or_missing_chunk_or_manifest_fails_and_leaves_no_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (objects, remote) = store();
    let p = dir.path().join("a.snap");
    write_bundle(&p, &guest_memory(), &clusters(3, &[1]), Base::Framed, true);
    let report = push_bundle(&remote, &p, &mut |_| {}).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names: Vec<String> = remote
        .list("chunks/")
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names.len() as u64, report.chunks);
    let back = dir.path().join("back.snap");

    // One chunk replaced by another's bytes.
    let victim = object_store::path::Path::from(format!("vms/{}", names[0]));
    let other = object_store::path::Path::from(format!("vms/{}", names[1]));
    let saved = rt.block_on(async { objects.get(&victim).await.unwrap().bytes().await.unwrap() });
    let wrong = rt.block_on(async { objects.get(&other).await.unwrap().bytes().await.unwrap() });
    rt.block_on(objects.put(&victim, wrong.into())).unwrap();
    let e = pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap_err();
    assert_eq!(e.code(), "BUNDLE_CORRUPT", "{e}");
    assert!(!back.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no partial file left"
    );

    // The chunk gone.
    rt.block_on(objects.delete(&victim)).unwrap();
    let e = pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap_err();
    assert_eq!(e.code(), "BUNDLE_CORRUPT", "{e}");
    rt.block_on(objects.put(&victim, saved.into())).unwrap();
    pull_bundle(&remote, &report.digest, &back, &mut |_| {}).unwrap();

    // A manifest that is not what its name says, and one that is not there.
    let m = object_store::path::Path::from(format!("vms/manifests/{}", report.digest));
    rt.block_on(objects.put(&m, b"{}".to_vec().into())).unwrap();
    let e = pull_bundle(
        &remote,
        &report.digest,
        &dir.path().join("x.snap"),
        &mut |_| {},
    )
    .unwrap_err();
    assert_eq!(e.code(), "BUNDLE_CORRUPT", "{e}");
    let e = pull_bundle(
        &remote,
        &"0".repeat(64),
        &dir.path().join("x.snap"),
        &mut |_| {},
    )
    .unwrap_err();
    assert_eq!(e.code(), "STORE_NOT_FOUND", "{e}");
    let _ = Write::flush(&mut std::io::stdout());
}

#[test]
fn gc_removes_only_old_chunks_no_manifest_names() {
    let dir = tempfile::tempdir().unwrap();
    let (objects, remote) = store();
    let p = dir.path().join("a.snap");
    write_bundle(&p, &guest_memory(), &clusters(3, &[1]), Base::Framed, true);
    let first = push_bundle(&remote, &p, &mut |_| {}).unwrap();
    let mut mem = guest_memory();
    // Inside a window the first push stored: its old version is the first's alone.
    noise(4, &mut mem[(5 << 20) + 310_000..(5 << 20) + 314_096]);
    write_bundle(&p, &mem, &clusters(3, &[1]), Base::Framed, true);
    let second = push_bundle(&remote, &p, &mut |_| {}).unwrap();
    assert_eq!(second.uploaded_chunks, 1);
    let now = 4_000_000_000;
    // Both VMs named: nothing goes, however old.
    let r = ferry_store::gc::collect(&remote, 0, now).unwrap();
    assert_eq!((r.manifests, r.removed), (2, 0), "{r:?}");
    // The first VM forgotten: the chunk only it named goes, unless young.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = object_store::path::Path::from(format!("vms/manifests/{}", first.digest));
    rt.block_on(objects.delete(&m)).unwrap();
    let young = ferry_store::gc::collect(&remote, 3600, chrono_now()).unwrap();
    assert_eq!((young.removed, young.kept_young), (0, 1), "{young:?}");
    let r = ferry_store::gc::collect(&remote, 0, now).unwrap();
    assert_eq!((r.manifests, r.removed), (1, 1), "{r:?}");
    // What is left still restores.
    pull_bundle(
        &remote,
        &second.digest,
        &dir.path().join("b.snap"),
        &mut |_| {},
    )
    .unwrap();
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
