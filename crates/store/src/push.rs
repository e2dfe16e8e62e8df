//! A bundle into the store: cut into chunks, only the missing ones uploaded.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

use ferry_snapshot::frames::FrameEncoding;
use ferry_snapshot::{Bundle, SectionKind};
use serde::Serialize;

use crate::chunk::{self, CHUNK, MAX_CHUNK};
use crate::manifest::{BaseRef, ChunkRef, StoreManifest, FORMAT, FORMAT_VERSION};
use crate::{Remote, StoreError, StoreUrl};

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushReport {
    /// Where the VM is now: `s3://BUCKET/PREFIX/DIGEST`.
    pub url: String,
    /// The manifest's digest.
    pub digest: String,
    /// Chunks the VM is made of (distinct).
    pub chunks: u64,
    /// Of those, the ones the store lacked and got.
    pub uploaded_chunks: u64,
    /// Bytes sent for them (compressed), plus the manifest.
    pub uploaded_bytes: u64,
    /// Bytes all its chunks take in the store (compressed).
    pub stored_bytes: u64,
    /// Guest memory chunks (not all zero).
    pub memory_chunks: u64,
}

/// Chunks made so far, each once.
#[derive(Default)]
struct Made {
    seen: HashSet<String>,
    /// (object name, stored bytes) of every distinct chunk.
    objects: Vec<(String, Vec<u8>)>,
}

impl Made {
    /// Forgets every chunk added after `mark` (a count of objects).
    fn rollback(&mut self, mark: usize) {
        for (name, _) in self.objects.drain(mark..) {
            let sha = name.rsplit('/').next().unwrap_or_default().to_string();
            self.seen.remove(&sha);
        }
    }

    fn add(&mut self, at: u64, bytes: &[u8]) -> Result<ChunkRef, StoreError> {
        let sha = chunk::digest(bytes);
        if self.seen.insert(sha.clone()) {
            self.objects
                .push((chunk::object_name(&sha), chunk::encode(bytes)?));
        }
        Ok(ChunkRef {
            at,
            len: bytes.len() as u64,
            sha256: sha,
        })
    }
}

/// Reads up to `buf.len()` bytes; fewer only at the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, StoreError> {
    let mut n = 0;
    while n < buf.len() {
        let k = r
            .read(&mut buf[n..])
            .map_err(StoreError::io("read the disk image"))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Cuts a disk image's stream into 2 MiB pieces.
fn cut_even(r: &mut impl Read, made: &mut Made) -> Result<Vec<ChunkRef>, StoreError> {
    let mut pieces = Vec::new();
    let mut at = 0u64;
    let mut piece = vec![0u8; CHUNK as usize];
    loop {
        let n = read_full(r, &mut piece)?;
        if n == 0 {
            return Ok(pieces);
        }
        pieces.push(made.add(at, &piece[..n])?);
        at += n as u64;
    }
}

/// An image's pieces and the window each holds.
type Framed = (Vec<ChunkRef>, Vec<Option<u64>>);

/// Cuts a disk image's stream at its frames, when each is one window of
/// the disk (see [`ferry_snapshot::disk::write_clusters_framed`]): the
/// pieces and the window each holds. None when the stream is not so framed.
fn cut_by_frame(
    r: &mut impl Read,
    disk_size: u64,
    cluster_size: u64,
    made: &mut Made,
) -> Result<Option<Framed>, StoreError> {
    let mut pieces = Vec::new();
    let mut windows = Vec::new();
    let mut at = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    let mut ended = false;
    loop {
        if pending.len() < MAX_CHUNK as usize {
            let n = read_full(r, &mut buf[..MAX_CHUNK as usize - pending.len()])?;
            pending.extend_from_slice(&buf[..n]);
        }
        if pending.is_empty() {
            return Ok(ended.then_some((pieces, windows)));
        }
        let Some(n) = ferry_snapshot::disk::frame_len(&pending) else {
            return Ok(None);
        };
        let frame = &pending[..n];
        let Ok((clusters, end)) = ferry_snapshot::disk::read_frame(frame, cluster_size, disk_size)
        else {
            return Ok(None);
        };
        let Some(window) = chunk::piece_window(&clusters, end) else {
            return Ok(None);
        };
        let follows = match (window, windows.last().copied().flatten()) {
            (Some(w), Some(prev)) => w > prev,
            _ => true,
        };
        if ended || !follows {
            return Ok(None);
        }
        ended = end;
        pieces.push(made.add(at, frame)?);
        windows.push(window);
        at += n as u64;
        pending.drain(..n);
    }
}

/// Guest memory being cut into 2 MiB windows.
struct MemoryCutter {
    regions: Vec<(u64, u64)>,
    open: BTreeMap<u64, (u64, Vec<u8>)>,
    refs: Vec<ChunkRef>,
}

impl MemoryCutter {
    /// Copies `bytes` to guest address `addr`.
    fn put(&mut self, mut addr: u64, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            let &(ra, rl) = self
                .regions
                .iter()
                .find(|&&(a, l)| addr >= a && addr < a + l)
                .ok_or_else(|| {
                    StoreError::Unsupported(format!(
                        "bundle memory at {addr:#x} lies outside guest RAM"
                    ))
                })?;
            let window = addr / CHUNK * CHUNK;
            let start = window.max(ra);
            let end = (window + CHUNK).min(ra + rl);
            let (_, buf) = self
                .open
                .entry(window)
                .or_insert_with(|| (start, vec![0u8; (end - start) as usize]));
            let n = ((end - addr) as usize).min(bytes.len());
            let off = (addr - start) as usize;
            buf[off..off + n].copy_from_slice(&bytes[..n]);
            addr += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Closes every window below `addr`'s (all of them when None).
    fn close_below(&mut self, addr: Option<u64>, made: &mut Made) -> Result<(), StoreError> {
        let keep = match addr {
            Some(a) => self.open.split_off(&(a / CHUNK * CHUNK)),
            None => BTreeMap::new(),
        };
        for (_, (start, buf)) in std::mem::replace(&mut self.open, keep) {
            if buf.iter().any(|&b| b != 0) {
                self.refs.push(made.add(start, &buf)?);
            }
        }
        Ok(())
    }
}

/// Guest ranges of the bundle's prefetch frames.
fn prefetch_ranges(image: &ferry_snapshot::reader::MemoryImage) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in &image.prefetch {
        let f = &image.frames[i];
        let (fs, fe) = (f.offset, f.offset + f.len);
        for e in &image.extents {
            let (s, t) = (e.data_offset.max(fs), (e.data_offset + e.len).min(fe));
            if s < t {
                let g = e.guest_addr + (s - e.data_offset);
                match out.last_mut() {
                    Some((a, l)) if *a + *l == g => *l += t - s,
                    _ => out.push((g, t - s)),
                }
            }
        }
    }
    out
}

/// Cuts the bundle at `path` into chunks and its manifest, uploads what
/// `remote` lacks (the manifest last, so a VM is never named before all of
/// it is there) and returns what it did.
pub fn push_bundle(
    remote: &Remote,
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PushReport, StoreError> {
    let bundle = Bundle::open(path)?;
    progress("checking the bundle");
    bundle.verify()?;
    let manifest = bundle.manifest().clone();
    if manifest.parent.is_some() {
        return Err(StoreError::Unsupported(
            "this bundle is incremental (it holds only what changed since its parent): push a full bundle".into(),
        ));
    }
    let mut made = Made::default();
    let record = made.add(0, &bundle.read_section(SectionKind::Record)?)?;
    let state = made.add(0, &bundle.read_section(SectionKind::VmState)?)?;

    progress("cutting guest memory into chunks");
    let image = bundle.memory_image()?;
    let regions: Vec<(u64, u64)> = manifest
        .memory_regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    // Extents in guest order let finished windows be closed as the stream
    // goes; otherwise every window stays open until the end.
    let in_order = image.extents.windows(2).all(|w| {
        w[0].guest_addr + w[0].len <= w[1].guest_addr && w[0].data_offset < w[1].data_offset
    });
    let mut cutter = MemoryCutter {
        regions,
        open: BTreeMap::new(),
        refs: Vec::new(),
    };
    let mut buf = Vec::new();
    for frame in &image.frames {
        buf.resize(frame.len as usize, 0);
        bundle.read_frame(&image, frame, &mut buf)?;
        let (fs, fe) = (frame.offset, frame.offset + frame.len);
        let first = image
            .extents
            .partition_point(|e| e.data_offset + e.len <= fs);
        let mut last_addr = None;
        for e in image.extents[first..]
            .iter()
            .take_while(|e| e.data_offset < fe)
        {
            let (s, t) = (e.data_offset.max(fs), (e.data_offset + e.len).min(fe));
            if s >= t {
                continue;
            }
            let g = e.guest_addr + (s - e.data_offset);
            cutter.put(g, &buf[(s - fs) as usize..(t - fs) as usize])?;
            last_addr = Some(g + (t - s) - 1);
        }
        if in_order {
            if let Some(a) = last_addr {
                cutter.close_below(Some(a), &mut made)?;
            }
        }
    }
    cutter.close_below(None, &mut made)?;
    let mut memory = cutter.refs;
    memory.sort_by_key(|c| c.at);
    let memory_chunks = memory.len() as u64;

    progress("cutting the disk into chunks");
    let disk = &manifest.disk;
    let disk_base = match manifest.section(SectionKind::DiskBase) {
        Some(entry) => {
            let mark = made.objects.len();
            let mut r = bundle.section_reader(SectionKind::DiskBase)?;
            let framed = cut_by_frame(&mut r, disk.size, disk.cluster_size, &mut made)?;
            let (pieces, windows) = match framed {
                Some((pieces, windows)) => (pieces, Some(windows)),
                None => {
                    // Written before images were framed by window: cut in
                    // 2 MiB pieces, fetched whole before a restore.
                    made.rollback(mark);
                    let mut r = bundle.section_reader(SectionKind::DiskBase)?;
                    (cut_even(&mut r, &mut made)?, None)
                }
            };
            Some(BaseRef {
                len: entry.length,
                pieces,
                windows,
            })
        }
        None => None,
    };
    let mut disk_top = Vec::new();
    let mut window: Option<(u64, Vec<u8>)> = None;
    let mut failed = None;
    bundle.read_disk(SectionKind::DiskTop, |offset, bytes| {
        let w = offset / CHUNK * CHUNK;
        if window.as_ref().is_some_and(|(cur, _)| *cur != w) {
            let (cur, records) = window.take().expect("open window");
            match made.add(cur, &records) {
                Ok(r) => disk_top.push(r),
                Err(e) => failed = Some(e),
            }
        }
        let (_, records) = window.get_or_insert_with(|| (w, Vec::new()));
        records.extend_from_slice(&offset.to_le_bytes());
        records.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        records.extend_from_slice(bytes);
        Ok(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some((cur, records)) = window.take() {
        disk_top.push(made.add(cur, &records)?);
    }

    let prefetch_raw = image
        .prefetch
        .iter()
        .all(|&i| image.frames[i].encoding == FrameEncoding::Raw);
    let mut description = manifest.clone();
    description.sections = Vec::new();
    let store_manifest = StoreManifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        bundle: description,
        record,
        state,
        memory,
        memory_compressed: image.is_compressed(),
        prefetch: prefetch_ranges(&image),
        prefetch_raw,
        disk_base,
        disk_top,
    };

    let names: Vec<String> = made.objects.iter().map(|(n, _)| n.clone()).collect();
    progress(&format!(
        "asking the store which of {} chunks it has",
        names.len()
    ));
    let present = remote.exist(&names)?;
    let stored_bytes = made.objects.iter().map(|(_, b)| b.len() as u64).sum();
    let missing: Vec<(String, Vec<u8>)> = made
        .objects
        .into_iter()
        .zip(present)
        .filter(|(_, have)| !have)
        .map(|(o, _)| o)
        .collect();
    let uploaded_chunks = missing.len() as u64;
    let mut uploaded_bytes: u64 = missing.iter().map(|(_, b)| b.len() as u64).sum();
    progress(&format!(
        "uploading {uploaded_chunks} chunks ({uploaded_bytes} bytes)"
    ));
    remote.put_all(missing)?;
    let (bytes, digest) = store_manifest.encode();
    uploaded_bytes += bytes.len() as u64;
    remote.put(&StoreManifest::object_name(&digest), bytes)?;
    Ok(PushReport {
        url: StoreUrl::with_digest(remote.url(), &digest).to_string(),
        digest,
        chunks: names.len() as u64,
        uploaded_chunks,
        uploaded_bytes,
        stored_bytes,
        memory_chunks,
    })
}
