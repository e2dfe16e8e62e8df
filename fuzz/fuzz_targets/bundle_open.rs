//! A bundle file from arbitrary input, through everything a restore does with
//! one: open, verify, small sections, the memory layout, every frame decoded,
//! guest memory rebuilt, both disk streams read.
//!
//! Three kinds of input: the file verbatim; a file assembled around an
//! arbitrary manifest (right trailer and manifest checksum, so the JSON and
//! the section table are what is tested); and a bundle forged through the
//! writer from an arbitrary guest memory, disk and manifest, with arbitrary
//! edits to its tables, so every checksum is right and only validation stands
//! in the way. A forgery without edits must restore exactly its memory.

#![no_main]

use std::io::Write;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use ferry_snapshot::format::{self, Trailer, FORMAT_VERSION};
use ferry_snapshot::frames::{self, FrameEncoding, MemoryCompression, MAX_FRAME_LEN};
use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion, MAX_CLUSTER_SIZE, MAX_DISK_SIZE};
use ferry_snapshot::memory::{self, RegionView, PAGE};
use ferry_snapshot::reader::MemoryImage;
use ferry_snapshot::{disk, Bundle, BundleWriter, Manifest, SectionKind};
use libfuzzer_sys::fuzz_target;

const MIB: u64 = 1 << 20;
/// Largest guest memory the harness rebuilds in full.
const REBUILD_LIMIT: u64 = 64 * MIB;
/// Frames decoded per input at most (keeps each run short).
const MAX_DECODED_FRAMES: usize = 64;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Json { payload: Vec<u8>, json: Vec<u8> },
    Forged(Box<Forged>),
}

#[derive(Arbitrary, Debug)]
struct Forged {
    /// Guest RAM: 1 MiB below 192, else this % 4 + 1 MiB.
    ram: u8,
    /// Split RAM into two regions with a gap, at this page (0: one region).
    split: u16,
    /// Replaces the regions the harness derives from `ram`.
    regions: Option<Vec<(u64, u64)>>,
    /// memory_mib as written, when not the real one.
    memory_mib: Option<u32>,
    /// Non-zero runs: (page, pages, fill; 0 fill means noise).
    runs: Vec<(u16, u8, u8)>,
    zstd: bool,
    /// The prefetch set: (page, pages), and whether its frames stay raw.
    hot: Vec<(u16, u8)>,
    hot_raw: bool,
    /// Replaces the manifest's prefetch list.
    prefetch: Option<Vec<u64>>,
    /// Leave out the frame table: a version 1 layout (raw runs).
    v1: bool,
    disk: ForgedDisk,
    vm_state: Vec<u8>,
    /// Extra sections (kind index, bytes), duplicates included.
    extra: Vec<(u8, Vec<u8>)>,
    /// (table, byte offset, value): overwrite a little-endian u64 of the
    /// extents (0), frames (1) or memory data (2).
    edits: Vec<(u8, u16, u64)>,
}

#[derive(Arbitrary, Debug)]
struct ForgedDisk {
    size: u64,
    cluster_log: u8,
    base: Vec<(u16, u16, u8)>,
    top: Vec<(u16, u16, u8)>,
    /// Cluster counts as written, when not the real ones.
    counts: Option<(u64, u64)>,
    thin: bool,
}

const KINDS: [SectionKind; 7] = [
    SectionKind::VmState,
    SectionKind::MemoryData,
    SectionKind::MemoryExtents,
    SectionKind::DiskBase,
    SectionKind::DiskTop,
    SectionKind::Record,
    SectionKind::MemoryFrames,
];

fn path() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-fuzz-bundle-{}.snap", std::process::id()))
}

extern "C" fn remove_bundle() {
    let _ = std::fs::remove_file(path());
}

/// The bundle file of this process, removed when the fuzzer exits.
fn bundle_path() -> PathBuf {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function with no preconditions.
    ONCE.call_once(|| unsafe {
        libc::atexit(remove_bundle);
    });
    path()
}

fn base_manifest() -> Manifest {
    Manifest {
        format_version: 0,
        ferry_version: "fuzz".into(),
        created_at: 0,
        arch: "x86_64".into(),
        cpu: CpuInfo::default(),
        vm_name: "fuzz".into(),
        cpus: 1,
        memory_mib: 1,
        memory_regions: vec![],
        memory_bytes: 0,
        memory_stored_bytes: 0,
        memory_prefetch_frames: Vec::new(),
        devices: vec![],
        disk: DiskInfo {
            size: 0,
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

fn xorshift(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn poke(table: &mut [u8], at: u16, value: u64) {
    if table.len() >= 8 {
        let at = usize::from(at) % (table.len() - 7);
        table[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

fn cluster_stream(clusters: &[(u16, u16, u8)], cluster_size: u64) -> (Vec<u8>, u64) {
    let mut list: Vec<(u64, Vec<u8>)> = clusters
        .iter()
        .take(32)
        .map(|&(i, len, fill)| {
            let len = (u64::from(len) % cluster_size.max(1)).max(1) as usize;
            (u64::from(i), vec![fill | 1; len])
        })
        .collect();
    list.sort_by_key(|c| c.0);
    list.dedup_by_key(|c| c.0);
    if list.len() > 4 {
        let mut it = list.into_iter();
        let mut out = Vec::new();
        let n = disk::write_clusters(&mut out, || Ok(it.next())).expect("in memory");
        return (out, n);
    }
    // The same stream as `write_clusters` writes, compressed in one go:
    // a streaming encoder's setup would dominate the run time.
    let mut raw = Vec::new();
    for (i, bytes) in &list {
        raw.extend_from_slice(&i.to_le_bytes());
        raw.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        raw.extend_from_slice(bytes);
    }
    raw.extend_from_slice(&u64::MAX.to_le_bytes());
    (zstd::bulk::compress(&raw, 1).expect("in memory"), list.len() as u64)
}

/// Builds the forged bundle; returns it with the guest memory (by region)
/// it must restore to when nothing was edited and the manifest is honest.
fn forge(f: &Forged) -> (Vec<u8>, Option<Vec<(u64, Vec<u8>)>>) {
    // 1 MiB mostly (cheap to build and scan), up to 4 MiB (several frames).
    let ram = if f.ram < 192 { MIB } else { (u64::from(f.ram) % 4 + 1) * MIB };
    let split = u64::from(f.split) * PAGE % ram;
    let layout: Vec<(u64, u64)> = if split == 0 {
        vec![(0, ram)]
    } else {
        vec![(0, split), (ram + 16 * MIB, ram - split)]
    };
    let mut mem: Vec<(u64, Vec<u8>)> = layout
        .iter()
        .map(|&(g, len)| (g, vec![0u8; len as usize]))
        .collect();
    // Byte ranges written, per region: what the writer scans, as a capture
    // scans only resident pages.
    let mut touched: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new(); layout.len()];
    for (n, &(page, pages, fill)) in f.runs.iter().take(16).enumerate() {
        let at = u64::from(page) * PAGE % ram;
        let len = (u64::from(pages) * PAGE).min(ram - at);
        // Logical RAM offset -> region.
        let (mut at, mut len) = (at, len);
        for (i, &(_, rlen)) in layout.iter().enumerate() {
            if len == 0 {
                break;
            }
            if at < rlen {
                let n_here = len.min(rlen - at);
                touched[i].push(at..at + n_here);
                let bytes = &mut mem[i].1[at as usize..(at + n_here) as usize];
                if fill == 0 {
                    xorshift(n as u64 + 1, bytes);
                } else {
                    bytes.fill(fill);
                }
                len -= n_here;
                at = 0;
            } else {
                at -= rlen;
            }
        }
    }
    let views: Vec<RegionView<'_>> = mem
        .iter()
        .zip(touched)
        .map(|((g, bytes), t)| RegionView {
            guest_addr: *g,
            bytes,
            candidates: Some(t),
        })
        .collect();
    let runs = memory::find_runs(&views);
    let mut data = Vec::new();
    let mut hot: Vec<(u64, u64)> = Vec::new();
    for &(page, pages) in f.hot.iter().take(16) {
        let start = u64::from(page) * PAGE % ram;
        let len = (u64::from(pages) + 1) * PAGE;
        hot.push((start, len.min(ram - start)));
    }
    hot.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (g, len) in hot {
        match merged.last_mut() {
            Some((s, l)) if g <= *s + *l => *l = (*l).max(g + len - *s),
            _ => merged.push((g, len)),
        }
    }
    let mut prefetch = Vec::new();
    let (mut extents, mut table, stored) = if f.v1 {
        let ext = memory::write_runs(&views, &runs, &mut data).expect("in memory");
        (memory::encode_extents(&ext), None, data.len() as u64)
    } else {
        let compression = if f.zstd {
            MemoryCompression::Zstd(1)
        } else {
            MemoryCompression::None
        };
        let w = frames::write_frames(&views, &runs, &merged, f.hot_raw, &mut data, compression)
            .expect("in memory");
        prefetch = w.prefetch.clone();
        (
            memory::encode_extents(&w.extents),
            Some(frames::encode_frames(&w.frames)),
            w.stored_bytes,
        )
    };
    for &(t, at, value) in f.edits.iter().take(8) {
        match t % 3 {
            0 => poke(&mut extents, at, value),
            1 => {
                if let Some(t) = table.as_mut() {
                    poke(t, at, value)
                }
            }
            _ => poke(&mut data, at, value),
        }
    }

    let d = &f.disk;
    // 512 bytes to 8 MiB: past the 2 MiB limit sometimes.
    let cluster_size = 1u64 << (d.cluster_log % 15 + 9);
    // Mostly below 64 GiB, sometimes anything (past the 16 TiB limit).
    let disk_size = if d.size >> 63 == 1 {
        d.size
    } else {
        d.size % (64 * MIB * 1024)
    };
    let (base, base_n) = cluster_stream(&d.base, cluster_size);
    let (top, top_n) = cluster_stream(&d.top, cluster_size);

    let mut w = BundleWriter::new(Vec::new()).expect("in memory");
    w.section_bytes(SectionKind::VmState, &f.vm_state).unwrap();
    w.section_bytes(SectionKind::MemoryData, &data).unwrap();
    w.section_bytes(SectionKind::MemoryExtents, &extents).unwrap();
    if let Some(t) = &table {
        w.section_bytes(SectionKind::MemoryFrames, t).unwrap();
    }
    if !d.thin {
        w.section_bytes(SectionKind::DiskBase, &base).unwrap();
    }
    w.section_bytes(SectionKind::DiskTop, &top).unwrap();
    for (k, bytes) in f.extra.iter().take(4) {
        w.section_bytes(KINDS[usize::from(*k) % KINDS.len()], bytes)
            .unwrap();
    }
    let mut m = base_manifest();
    m.memory_mib = f.memory_mib.unwrap_or((ram / MIB) as u32);
    m.memory_regions = f
        .regions
        .clone()
        .unwrap_or_else(|| layout.clone())
        .into_iter()
        .take(80)
        .map(|(guest_addr, size)| MemoryRegion { guest_addr, size })
        .collect();
    m.memory_stored_bytes = stored;
    m.memory_prefetch_frames = f.prefetch.clone().unwrap_or(prefetch);
    m.disk.size = disk_size;
    m.disk.cluster_size = cluster_size;
    m.disk.thin = d.thin;
    (m.disk.base_clusters, m.disk.top_clusters) = d.counts.unwrap_or((base_n, top_n));
    let capacity = disk_size.div_ceil(cluster_size);
    let honest = f.edits.is_empty()
        && f.prefetch.is_none()
        && f.extra.is_empty()
        && f.regions.is_none()
        && f.memory_mib.is_none()
        && d.counts.is_none()
        && cluster_size <= MAX_CLUSTER_SIZE
        && disk_size <= MAX_DISK_SIZE
        && base_n <= capacity
        && top_n <= capacity;
    let bytes = w.finish(m).expect("in memory");
    (bytes, honest.then_some(mem))
}

/// Assembles a file around `json` as the manifest, with a right trailer.
fn with_manifest(payload: &[u8], json: &[u8]) -> Vec<u8> {
    let mut file = format::header();
    file.extend_from_slice(payload);
    file.resize(format::align_up(file.len() as u64) as usize, 0);
    let trailer = Trailer {
        version: FORMAT_VERSION,
        manifest_offset: file.len() as u64,
        manifest_len: json.len() as u64,
        manifest_checksum: format::checksum(json),
        file_len: (file.len() + json.len()) as u64 + format::TRAILER_LEN,
    };
    file.extend_from_slice(json);
    file.extend_from_slice(&trailer.encode());
    file
}

/// What every accepted memory image promises its users.
fn check_image(b: &Bundle, image: &MemoryImage) {
    let m = b.manifest();
    let data = b.entry(SectionKind::MemoryData).unwrap();
    assert_eq!(image.data_offset, data.offset);
    assert!(
        image.prefetch.windows(2).all(|w| w[0] < w[1])
            && image.prefetch.iter().all(|&i| i < image.frames.len()),
        "the prefetch list names frames of the table, in order"
    );
    let mut logical = 0u64;
    let mut prev_end = 0u64;
    for e in &image.extents {
        assert!(e.len > 0 && e.guest_addr % PAGE == 0 && e.len % PAGE == 0);
        assert_eq!(e.data_offset, logical, "extents back to back");
        assert!(e.guest_addr >= prev_end, "extents sorted, disjoint");
        let end = e.guest_addr + e.len;
        assert!(
            m.memory_regions
                .iter()
                .any(|r| e.guest_addr >= r.guest_addr && end <= r.guest_addr + r.size),
            "extent inside a region"
        );
        prev_end = end;
        logical += e.len;
    }
    assert!(logical <= m.ram_bytes(), "never more than guest RAM");
    let mut at = 0u64;
    let mut stored_end = 0u64;
    for f in &image.frames {
        assert_eq!(f.offset, at);
        assert!(f.len > 0 && f.len % PAGE == 0);
        assert!(f.stored_offset >= stored_end);
        stored_end = f.stored_offset + f.stored_len;
        assert!(stored_end <= data.length);
        match f.encoding {
            FrameEncoding::Raw => assert_eq!(f.stored_len, f.len),
            FrameEncoding::Zstd => assert!(f.len <= MAX_FRAME_LEN),
        }
        at += f.len;
    }
    assert_eq!(at, logical);
}

/// Rebuilds guest memory from the image the way a restore does: each extent
/// split at frame boundaries, each piece copied out of its decoded frame.
fn rebuild(b: &Bundle, image: &MemoryImage) -> Option<Vec<(u64, Vec<u8>)>> {
    let m = b.manifest();
    if m.ram_bytes() > REBUILD_LIMIT {
        return None;
    }
    let mut mem: Vec<(u64, Vec<u8>)> = m
        .memory_regions
        .iter()
        .map(|r| (r.guest_addr, vec![0u8; r.size as usize]))
        .collect();
    let mut decoded: Vec<Option<Vec<u8>>> = vec![None; image.frames.len()];
    for e in &image.extents {
        let mut at = e.data_offset;
        let end = e.data_offset + e.len;
        while at < end {
            let f = frames::frame_at(&image.frames, at).expect("frames cover the extents");
            let i = image.frames.partition_point(|x| x.offset < f.offset);
            if decoded[i].is_none() {
                if decoded.iter().flatten().count() >= MAX_DECODED_FRAMES {
                    return None;
                }
                let mut out = vec![0u8; f.len as usize];
                b.read_frame(image, f, &mut out).ok()?;
                assert_eq!(format::checksum(&out), f.checksum);
                decoded[i] = Some(out);
            }
            let bytes = decoded[i].as_ref().unwrap();
            let piece_end = end.min(f.offset + f.len);
            let guest = e.guest_addr + (at - e.data_offset);
            let len = (piece_end - at) as usize;
            let src = &bytes[(at - f.offset) as usize..][..len];
            let (g, region) = mem
                .iter_mut()
                .find(|(g, r)| guest >= *g && guest + len as u64 <= *g + r.len() as u64)
                .expect("piece inside a region");
            let off = (guest - *g) as usize;
            region[off..off + len].copy_from_slice(src);
            at = piece_end;
        }
    }
    Some(mem)
}

fn exercise(bytes: &[u8], expected: Option<Vec<(u64, Vec<u8>)>>) {
    let p = bundle_path();
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write the bundle");
    let b = match Bundle::open(&p) {
        Ok(b) => b,
        Err(e) => {
            assert!(expected.is_none(), "an honest forgery opens: {e}");
            return;
        }
    };
    let m = b.manifest().clone();
    let verified = b.verify();
    for kind in [SectionKind::VmState, SectionKind::Record] {
        if let Ok(s) = b.read_section(kind) {
            let _ = serde_json::from_slice::<serde_json::Value>(&s);
        }
    }
    b.check_memory_layout(m.ram_bytes())
        .expect("open checked the regions against memory_mib");
    let mut restored = None;
    match b.memory_image() {
        Ok(image) => {
            check_image(&b, &image);
            restored = rebuild(&b, &image);
        }
        Err(e) => assert!(expected.is_none(), "an honest forgery has memory: {e}"),
    }
    for kind in [SectionKind::DiskBase, SectionKind::DiskTop] {
        let _ = b.read_disk(kind, |at, bytes| {
            assert!(at % m.disk.cluster_size == 0);
            assert!(at + bytes.len() as u64 <= m.disk.size, "cluster inside the disk");
            Ok(())
        });
    }
    if let Some(mem) = expected {
        verified.expect("an honest forgery verifies");
        if let Some(got) = restored {
            assert!(got == mem, "restored memory differs from what was written");
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(bytes) => exercise(&bytes, None),
        Input::Json { payload, json } => {
            exercise(&with_manifest(&payload[..payload.len().min(3 * 4096)], &json), None)
        }
        Input::Forged(f) => {
            let (bytes, expected) = forge(&f);
            exercise(&bytes, expected);
        }
    }
});
