//! Guest memory frames: the `MemoryData` payload cut into independently
//! decodable pieces, each zstd-compressed or stored raw.
//!
//! The memory extents describe a logical stream, the stored page runs
//! concatenated. Frames cut that stream into pieces of at most [`FRAME_LEN`]
//! bytes. A zstd frame is a complete zstd frame, so it decodes alone (random
//! access) or in order (streams). A raw frame starts on a page boundary in the
//! file, so a restore can map it lazily instead of reading it; frames that do
//! not shrink enough are stored raw.
//!
//! Frame table (`MemoryFrames` section): u64 count, then per frame, all u64
//! little-endian: logical offset, length, stored offset (in `MemoryData`), stored
//! length, encoding (0 raw, 1 zstd), xxh3-64 of the decoded bytes.

use std::io::Write;

use crate::memory::{MemoryExtent, RegionView, PAGE};
use crate::BundleError;

/// Logical bytes per frame: large enough for zstd to find repeats, small
/// enough to decode in parallel and to read one page's frame cheaply.
pub const FRAME_LEN: u64 = 256 << 10;
/// Longest frame a reader accepts (bounds its buffers).
pub const MAX_FRAME_LEN: u64 = 64 << 20;
/// Default zstd level: fast enough to keep the snapshot pause short.
pub const DEFAULT_LEVEL: i32 = 3;
const ENTRY_LEN: usize = 48;

/// How guest memory is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCompression {
    /// Every frame raw (mappable straight from the file).
    None,
    /// zstd at this level, raw where it does not pay.
    Zstd(i32),
}

/// How one frame is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEncoding {
    /// The bytes themselves, page aligned in the file.
    Raw,
    /// One zstd frame.
    Zstd,
}

/// One frame of the memory stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFrame {
    /// Offset in the logical stream (what extents' `data_offset` point into).
    pub offset: u64,
    /// Decoded length (whole pages).
    pub len: u64,
    /// Offset of the stored bytes inside the `MemoryData` payload.
    pub stored_offset: u64,
    /// Stored length.
    pub stored_len: u64,
    /// Raw or zstd.
    pub encoding: FrameEncoding,
    /// xxh3-64 of the decoded bytes.
    pub checksum: u64,
}

/// What [`write_frames`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenMemory {
    /// Where each run went in the logical stream.
    pub extents: Vec<MemoryExtent>,
    /// The frames, in file order.
    pub frames: Vec<MemoryFrame>,
    /// Bytes written to the payload (padding included).
    pub stored_bytes: u64,
    /// Indexes of the frames holding the prefetch set, in order.
    pub prefetch: Vec<u64>,
}

/// Counts what passes through to `inner`.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    pos: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to_page(&mut self) -> std::io::Result<()> {
        const ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
        let pad = self.pos.next_multiple_of(PAGE) - self.pos;
        self.put(&ZEROS[..pad as usize])
    }
}

/// A frame's bytes and how they will be stored.
struct Encoded {
    raw: Vec<u8>,
    zstd: Option<Vec<u8>>,
}

fn encode(raw: Vec<u8>, compression: MemoryCompression) -> std::io::Result<Encoded> {
    let zstd = match compression {
        MemoryCompression::None => None,
        MemoryCompression::Zstd(level) => {
            let z = zstd::bulk::compress(&raw, level)?;
            // Decoding costs time on restore and a raw frame maps for free:
            // compress only when it saves at least an eighth.
            (z.len() < raw.len() - raw.len() / 8).then_some(z)
        }
    };
    Ok(Encoded { raw, zstd })
}

/// A frame's bytes, and whether they belong to the prefetch set.
type Pending = (Vec<u8>, bool);

/// How frames are stored: the prefetch set's, and the others.
#[derive(Clone, Copy)]
struct Encodings {
    hot: MemoryCompression,
    rest: MemoryCompression,
}

impl Encodings {
    fn of(&self, hot: bool) -> MemoryCompression {
        if hot {
            self.hot
        } else {
            self.rest
        }
    }
}

/// Encodes frames in parallel, keeping their order.
fn encode_batch(batch: Vec<Pending>, enc: Encodings) -> std::io::Result<Vec<Encoded>> {
    if batch.len() < 2 || enc.rest == MemoryCompression::None {
        return batch
            .into_iter()
            .map(|(b, hot)| encode(b, enc.of(hot)))
            .collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .into_iter()
            .map(|(b, hot)| s.spawn(move || encode(b, enc.of(hot))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Encodes a batch of frames and appends them to `out` and `frames`, and
/// the indexes of the prefetched ones to `prefetch`.
fn flush<W: Write>(
    batch: Vec<Pending>,
    enc: Encodings,
    out: &mut Counting<'_, W>,
    frames: &mut Vec<MemoryFrame>,
    prefetch: &mut Vec<u64>,
) -> std::io::Result<()> {
    let hot: Vec<bool> = batch.iter().map(|p| p.1).collect();
    for (e, hot) in encode_batch(batch, enc)?.into_iter().zip(hot) {
        if hot {
            prefetch.push(frames.len() as u64);
        }
        let offset = frames.last().map_or(0, |f| f.offset + f.len);
        let checksum = crate::format::checksum(&e.raw);
        let (encoding, bytes) = match &e.zstd {
            Some(z) => (FrameEncoding::Zstd, z.as_slice()),
            None => {
                out.pad_to_page()?;
                (FrameEncoding::Raw, e.raw.as_slice())
            }
        };
        frames.push(MemoryFrame {
            offset,
            len: e.raw.len() as u64,
            stored_offset: out.pos,
            stored_len: bytes.len() as u64,
            encoding,
            checksum,
        });
        out.put(bytes)?;
    }
    Ok(())
}

/// Cuts `[g, g + len)` where it enters or leaves the sorted, merged
/// ranges `hot`: (start, length, inside `hot`) pieces, in order.
fn split_by(hot: &[(u64, u64)], g: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let (mut at, end) = (g, g + len);
    let mut i = hot.partition_point(|&(s, l)| s + l <= at);
    while at < end {
        match hot.get(i) {
            Some(&(s, l)) if s <= at => {
                let stop = end.min(s + l);
                out.push((at, stop - at, true));
                at = stop;
                i += 1;
            }
            Some(&(s, _)) if s < end => {
                out.push((at, s - at, false));
                at = s;
            }
            _ => {
                out.push((at, end - at, false));
                at = end;
            }
        }
    }
    out
}

/// Writes the page runs `runs` of `regions` to `out` as frames, returning the
/// extents (into the logical stream) and the frame table. Pages inside
/// `hot` (guest ranges, sorted and merged: the prefetch set) go into frames
/// of their own, whose indexes are returned too, stored raw if `hot_raw`.
pub fn write_frames(
    regions: &[RegionView<'_>],
    runs: &[(u64, u64)],
    hot: &[(u64, u64)],
    hot_raw: bool,
    out: &mut impl Write,
    compression: MemoryCompression,
) -> std::io::Result<WrittenMemory> {
    let mut out = Counting { inner: out, pos: 0 };
    let mut extents = Vec::with_capacity(runs.len());
    let mut frames = Vec::new();
    let mut prefetch = Vec::new();
    let mut logical = 0u64;
    // Frames waiting to be encoded, and the one being filled.
    let enc = Encodings {
        hot: if hot_raw {
            MemoryCompression::None
        } else {
            compression
        },
        rest: compression,
    };
    let mut batch: Vec<Pending> = Vec::new();
    let mut current: Vec<u8> = Vec::with_capacity(FRAME_LEN as usize);
    let mut current_hot = false;
    let batch_len = workers() * 2;
    for &(g, len) in runs {
        let r = regions
            .iter()
            .find(|r| g >= r.guest_addr && g + len <= r.guest_addr + r.bytes.len() as u64)
            .ok_or_else(|| std::io::Error::other("run outside guest memory"))?;
        extents.push(MemoryExtent {
            guest_addr: g,
            len,
            data_offset: logical,
        });
        logical += len;
        for (pg, plen, is_hot) in split_by(hot, g, len) {
            if is_hot != current_hot && !current.is_empty() {
                batch.push((
                    std::mem::replace(&mut current, Vec::with_capacity(FRAME_LEN as usize)),
                    current_hot,
                ));
            }
            current_hot = is_hot;
            let at = (pg - r.guest_addr) as usize;
            let mut bytes = &r.bytes[at..at + plen as usize];
            while !bytes.is_empty() {
                let room = FRAME_LEN as usize - current.len();
                let (now, rest) = bytes.split_at(room.min(bytes.len()));
                current.extend_from_slice(now);
                bytes = rest;
                if current.len() == FRAME_LEN as usize {
                    batch.push((
                        std::mem::replace(&mut current, Vec::with_capacity(FRAME_LEN as usize)),
                        current_hot,
                    ));
                }
            }
            if batch.len() >= batch_len {
                flush(
                    std::mem::take(&mut batch),
                    enc,
                    &mut out,
                    &mut frames,
                    &mut prefetch,
                )?;
            }
        }
    }
    if !current.is_empty() {
        batch.push((current, current_hot));
    }
    flush(batch, enc, &mut out, &mut frames, &mut prefetch)?;
    Ok(WrittenMemory {
        extents,
        frames,
        stored_bytes: out.pos,
        prefetch,
    })
}

/// Encodes the frame table.
pub fn encode_frames(frames: &[MemoryFrame]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + frames.len() * ENTRY_LEN);
    v.extend_from_slice(&(frames.len() as u64).to_le_bytes());
    for f in frames {
        let encoding: u64 = match f.encoding {
            FrameEncoding::Raw => 0,
            FrameEncoding::Zstd => 1,
        };
        for word in [
            f.offset,
            f.len,
            f.stored_offset,
            f.stored_len,
            encoding,
            f.checksum,
        ] {
            v.extend_from_slice(&word.to_le_bytes());
        }
    }
    v
}

/// Most bytes a zstd frame of `len` decoded bytes may take stored: zstd's
/// worst-case bound for incompressible input. A larger stored frame is refused
/// before it is read.
pub fn max_stored_len(len: u64) -> u64 {
    let len = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(MAX_FRAME_LEN as usize);
    zstd::zstd_safe::compress_bound(len) as u64
}

/// Checks one frame's shape, wherever it came from: a zstd frame decodes to
/// whole pages, at most [`MAX_FRAME_LEN`] bytes, from no more than
/// [`max_stored_len`] stored bytes; a raw frame stores exactly the bytes it
/// decodes to. Called before any buffer is sized from the frame.
pub fn check_frame(frame: &MemoryFrame) -> Result<(), BundleError> {
    let ok = frame.len > 0
        && frame.len.is_multiple_of(PAGE)
        && frame.stored_len > 0
        && match frame.encoding {
            FrameEncoding::Raw => frame.stored_len == frame.len,
            FrameEncoding::Zstd => {
                frame.len <= MAX_FRAME_LEN && frame.stored_len <= max_stored_len(frame.len)
            }
        };
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadManifest(format!(
            "memory frame at offset {}: {} bytes stored as {} ({:?}) is not a valid frame",
            frame.offset, frame.len, frame.stored_len, frame.encoding
        )))
    }
}

/// Decodes and validates a frame table: frames cover the logical stream
/// (`logical_len` bytes) in order without gaps, lie inside the payload
/// (`data_len` bytes) in increasing order, and raw frames are page aligned.
/// Every frame decodes to at most [`MAX_FRAME_LEN`] bytes, and a zstd frame
/// stores at most [`max_stored_len`] of its length.
pub fn decode_frames(
    bytes: &[u8],
    data_len: u64,
    logical_len: u64,
) -> Result<Vec<MemoryFrame>, BundleError> {
    let bad = |why: String| BundleError::BadManifest(format!("memory frames: {why}"));
    if bytes.len() < 8 {
        return Err(bad("too short".into()));
    }
    let count = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if count
        .checked_mul(ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(8))
        != Some(bytes.len() as u64)
    {
        return Err(bad("count does not match size".into()));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let mut frames: Vec<MemoryFrame> = Vec::with_capacity(count as usize);
    let (mut logical, mut stored_end) = (0u64, 0u64);
    for i in 0..count as usize {
        let at = 8 + i * ENTRY_LEN;
        let encoding = match word(at + 32) {
            0 => FrameEncoding::Raw,
            1 => FrameEncoding::Zstd,
            n => return Err(bad(format!("frame {i} has unknown encoding {n}"))),
        };
        let f = MemoryFrame {
            offset: word(at),
            len: word(at + 8),
            stored_offset: word(at + 16),
            stored_len: word(at + 24),
            encoding,
            checksum: word(at + 40),
        };
        if f.len > logical_len - logical {
            return Err(bad(format!(
                "frame {i} reaches past the {logical_len} bytes of guest memory the extents fill"
            )));
        }
        if f.offset != logical
            || f.len == 0
            || f.len > MAX_FRAME_LEN
            || !f.len.is_multiple_of(PAGE)
            || f.stored_len == 0
        {
            return Err(bad(format!("frame {i} is out of sequence or misshapen")));
        }
        let end = f
            .stored_offset
            .checked_add(f.stored_len)
            .filter(|&e| f.stored_offset >= stored_end && e <= data_len)
            .ok_or_else(|| bad(format!("frame {i} lies outside the memory data")))?;
        if f.encoding == FrameEncoding::Raw
            && (f.stored_len != f.len || !f.stored_offset.is_multiple_of(PAGE))
        {
            return Err(bad(format!("raw frame {i} is not page aligned")));
        }
        if f.encoding == FrameEncoding::Zstd && f.stored_len > max_stored_len(f.len) {
            return Err(bad(format!(
                "zstd frame {i} stores {} bytes, more than {} bytes can take",
                f.stored_len, f.len
            )));
        }
        logical += f.len;
        stored_end = end;
        frames.push(f);
    }
    if logical != logical_len {
        return Err(bad(format!(
            "frames hold {logical} bytes, extents need {logical_len}"
        )));
    }
    Ok(frames)
}

/// Checks a prefetch list against a frame table of `frames` frames:
/// strictly increasing frame indexes, each inside the table.
pub fn check_prefetch(prefetch: &[u64], frames: usize) -> Result<(), BundleError> {
    let sorted = prefetch.windows(2).all(|w| w[0] < w[1]);
    if !sorted || prefetch.last().is_some_and(|&i| i >= frames as u64) {
        return Err(BundleError::BadManifest(format!(
            "memory prefetch list: {} frame indexes, not increasing or not below {frames}",
            prefetch.len()
        )));
    }
    Ok(())
}

/// The frame holding logical offset `at` (frames as decoded: sorted, no gaps).
pub fn frame_at(frames: &[MemoryFrame], at: u64) -> Option<&MemoryFrame> {
    let i = frames.partition_point(|f| f.offset + f.len <= at);
    frames.get(i).filter(|f| f.offset <= at)
}

/// Decodes one frame's stored bytes into `out` (exactly `frame.len` bytes)
/// and checks the result against the frame's checksum.
///
/// Decoding is bounded by `out`: a zstd frame must be exactly one frame, its
/// header may not announce another size than `frame.len`, and a frame that
/// decodes to more than `frame.len` bytes fails while decoding, without
/// writing past `out` or allocating.
pub fn decode_frame(frame: &MemoryFrame, stored: &[u8], out: &mut [u8]) -> Result<(), BundleError> {
    let bad = |why: String| {
        BundleError::Corrupt(format!("memory frame at offset {}: {why}", frame.offset))
    };
    check_frame(frame)?;
    if stored.len() as u64 != frame.stored_len || out.len() as u64 != frame.len {
        return Err(bad("buffer sizes do not match the frame".into()));
    }
    match frame.encoding {
        FrameEncoding::Raw => out.copy_from_slice(stored),
        FrameEncoding::Zstd => {
            use zstd::zstd_safe;
            match zstd_safe::find_frame_compressed_size(stored) {
                Ok(n) if n == stored.len() => {}
                Ok(n) => {
                    return Err(bad(format!(
                        "{} stored bytes hold a zstd frame of {n} bytes",
                        stored.len()
                    )))
                }
                Err(_) => return Err(bad("not a zstd frame".into())),
            }
            match zstd_safe::get_frame_content_size(stored) {
                Ok(Some(n)) if n != frame.len => {
                    return Err(bad(format!(
                        "zstd frame announces {n} bytes, the frame table {}",
                        frame.len
                    )))
                }
                Ok(_) => {}
                Err(_) => return Err(bad("not a zstd frame".into())),
            }
            // One decoder per thread: a restore decodes many small frames.
            thread_local! {
                static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            let n = DECODER
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    let d = match &mut *cell {
                        Some(d) => d,
                        empty => empty.insert(zstd::bulk::Decompressor::new()?),
                    };
                    d.decompress_to_buffer(stored, out)
                })
                .map_err(|e| bad(e.to_string()))?;
            if n != out.len() {
                return Err(bad(format!("decoded {n} of {} bytes", out.len())));
            }
        }
    }
    if crate::format::checksum(out) != frame.checksum {
        return Err(bad("checksum mismatch".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::find_runs;

    /// Guest memory with compressible runs, one incompressible run and zeros.
    fn guest() -> Vec<u8> {
        let mut mem = vec![0u8; 8 << 20];
        for (i, b) in mem[..3 << 20].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        // xorshift noise: zstd cannot shrink it.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in &mut mem[(5 << 20)..(5 << 20) + 1_100_000] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        mem[(7 << 20) + 5] = 9;
        mem
    }

    fn written(mem: &[u8], c: MemoryCompression) -> (Vec<u8>, WrittenMemory) {
        written_hot(mem, c, &[])
    }

    fn written_hot(
        mem: &[u8],
        c: MemoryCompression,
        hot: &[(u64, u64)],
    ) -> (Vec<u8>, WrittenMemory) {
        let regions = [RegionView {
            guest_addr: 0x10_0000,
            bytes: mem,
            candidates: None,
        }];
        let runs = find_runs(&regions);
        let mut data = Vec::new();
        let w = write_frames(&regions, &runs, hot, true, &mut data, c).unwrap();
        assert_eq!(w.stored_bytes, data.len() as u64);
        (data, w)
    }

    fn rebuild(mem_len: usize, data: &[u8], w: &WrittenMemory, table: &[u8]) -> Vec<u8> {
        let logical_len: u64 = w.extents.iter().map(|e| e.len).sum();
        let frames = decode_frames(table, data.len() as u64, logical_len).unwrap();
        let mut stream = vec![0u8; logical_len as usize];
        for f in &frames {
            let stored = &data[f.stored_offset as usize..(f.stored_offset + f.stored_len) as usize];
            decode_frame(
                f,
                stored,
                &mut stream[f.offset as usize..(f.offset + f.len) as usize],
            )
            .unwrap();
        }
        let mut back = vec![0u8; mem_len];
        for e in &w.extents {
            let at = (e.guest_addr - 0x10_0000) as usize;
            back[at..at + e.len as usize]
                .copy_from_slice(&stream[e.data_offset as usize..(e.data_offset + e.len) as usize]);
        }
        back
    }

    #[test]
    fn compressed_frames_round_trip_and_shrink() {
        let mem = guest();
        let (data, w) = written(&mem, MemoryCompression::Zstd(DEFAULT_LEVEL));
        assert!(w.frames.iter().any(|f| f.encoding == FrameEncoding::Zstd));
        // The noise does not compress: its frames are stored raw, page aligned.
        let raw: Vec<_> = w
            .frames
            .iter()
            .filter(|f| f.encoding == FrameEncoding::Raw)
            .collect();
        assert!(!raw.is_empty());
        assert!(raw.iter().all(|f| f.stored_offset % PAGE == 0));
        assert!(data.len() < 3 << 20, "stored {} bytes", data.len());
        let table = encode_frames(&w.frames);
        assert_eq!(rebuild(mem.len(), &data, &w, &table), mem);
    }

    #[test]
    fn prefetched_pages_get_frames_of_their_own() {
        let mem = guest();
        let base = 0x10_0000u64;
        // Two pages inside the compressible part, a zero page (stored
        // nowhere), and two pages across a frame edge.
        let hot = [
            (base + 5 * PAGE, 2 * PAGE),
            (base + (7 << 20) + PAGE, PAGE),
            (base + (1 << 20) - PAGE, 2 * PAGE),
        ];
        let mut sorted = hot.to_vec();
        sorted.sort_unstable();
        let (data, w) = written_hot(&mem, MemoryCompression::Zstd(DEFAULT_LEVEL), &sorted);
        // Each stored hot page lies in a raw frame that holds hot pages only.
        let stream_of = |g: u64| {
            let e = w
                .extents
                .iter()
                .find(|e| g >= e.guest_addr && g < e.guest_addr + e.len)?;
            Some(e.data_offset + (g - e.guest_addr))
        };
        let mut hot_pages = 0;
        let mut hot_frames = Vec::new();
        for &(g, len) in &sorted {
            for p in (g..g + len).step_by(PAGE as usize) {
                let Some(at) = stream_of(p) else { continue };
                let i = w.frames.partition_point(|f| f.offset + f.len <= at) as u64;
                let f = &w.frames[i as usize];
                assert!(
                    f.len <= 2 * PAGE,
                    "hot page {p:#x} in a frame of {} bytes",
                    f.len
                );
                assert_eq!(f.encoding, FrameEncoding::Raw, "hot page {p:#x}");
                hot_pages += 1;
                if !hot_frames.contains(&i) {
                    hot_frames.push(i);
                }
            }
        }
        assert_eq!(hot_pages, 4, "the zero page is stored nowhere");
        hot_frames.sort_unstable();
        assert_eq!(
            w.prefetch, hot_frames,
            "the prefetch list names those frames"
        );
        check_prefetch(&w.prefetch, w.frames.len()).unwrap();
        assert!(check_prefetch(&[2, 1], 9).is_err());
        assert!(check_prefetch(&[1, 9], 9).is_err());
        assert!(data.len() < 3 << 20, "compressed as before");
        let table = encode_frames(&w.frames);
        assert_eq!(rebuild(mem.len(), &data, &w, &table), mem);
        assert_eq!(
            split_by(&sorted, base, 4 * PAGE),
            vec![(base, 4 * PAGE, false)]
        );
        assert_eq!(
            split_by(&sorted, base + 4 * PAGE, 4 * PAGE),
            vec![
                (base + 4 * PAGE, PAGE, false),
                (base + 5 * PAGE, 2 * PAGE, true),
                (base + 7 * PAGE, PAGE, false)
            ]
        );
    }

    #[test]
    fn uncompressed_frames_are_the_plain_page_runs() {
        let mem = guest();
        let (data, w) = written(&mem, MemoryCompression::None);
        assert!(w.frames.iter().all(|f| f.encoding == FrameEncoding::Raw));
        let logical: u64 = w.extents.iter().map(|e| e.len).sum();
        assert_eq!(data.len() as u64, logical, "no padding between raw frames");
        let table = encode_frames(&w.frames);
        assert_eq!(rebuild(mem.len(), &data, &w, &table), mem);
    }

    #[test]
    fn a_frame_is_found_by_logical_offset() {
        let mem = guest();
        let (_, w) = written(&mem, MemoryCompression::Zstd(1));
        for f in &w.frames {
            assert_eq!(frame_at(&w.frames, f.offset), Some(f));
            assert_eq!(frame_at(&w.frames, f.offset + f.len - 1), Some(f));
        }
        let end = w.frames.last().map(|f| f.offset + f.len).unwrap();
        assert_eq!(frame_at(&w.frames, end), None);
    }

    #[test]
    fn corrupt_frames_are_clear_errors() {
        let mem = guest();
        let (mut data, w) = written(&mem, MemoryCompression::Zstd(DEFAULT_LEVEL));
        let f = *w
            .frames
            .iter()
            .find(|f| f.encoding == FrameEncoding::Zstd)
            .unwrap();
        let mut out = vec![0u8; f.len as usize];
        // A flipped byte inside a zstd frame: either zstd or the checksum notices.
        data[(f.stored_offset + f.stored_len / 2) as usize] ^= 0x55;
        let stored = &data[f.stored_offset as usize..(f.stored_offset + f.stored_len) as usize];
        let err = decode_frame(&f, stored, &mut out).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_CORRUPT");
        assert!(err.to_string().contains("memory frame at offset"), "{err}");
        // A cut frame.
        let err = decode_frame(&f, &stored[..stored.len() - 1], &mut out).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_CORRUPT");
    }

    #[test]
    fn a_zstd_frame_must_be_one_whole_frame_of_its_size() {
        let page = vec![5u8; PAGE as usize];
        let z = zstd::bulk::compress(&page, 3).unwrap();
        let frame = |stored: &[u8]| MemoryFrame {
            offset: 0,
            len: PAGE,
            stored_offset: 0,
            stored_len: stored.len() as u64,
            encoding: FrameEncoding::Zstd,
            checksum: crate::format::checksum(&page),
        };
        let mut out = vec![0u8; PAGE as usize];
        decode_frame(&frame(&z), &z, &mut out).unwrap();
        // Two frames back to back, each decoding to a page: two pages in all.
        let two = [z.clone(), z.clone()].concat();
        let err = decode_frame(&frame(&two), &two, &mut out).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_CORRUPT");
        // Not zstd at all.
        let junk = vec![0x11u8; 64];
        assert!(decode_frame(&frame(&junk), &junk, &mut out).is_err());
        // A frame whose declared size is over the cap is refused before its
        // buffers are even compared.
        let huge = MemoryFrame {
            len: 2 * MAX_FRAME_LEN,
            ..frame(&z)
        };
        let err = decode_frame(&huge, &z, &mut out).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_MANIFEST_INVALID");
    }

    #[test]
    fn hostile_frame_tables_are_rejected() {
        let ok = MemoryFrame {
            offset: 0,
            len: PAGE,
            stored_offset: 0,
            stored_len: PAGE,
            encoding: FrameEncoding::Raw,
            checksum: 0,
        };
        assert!(decode_frames(&encode_frames(&[ok]), PAGE, PAGE).is_ok());
        for bad in [
            MemoryFrame { offset: 1, ..ok },
            MemoryFrame { len: 0, ..ok },
            MemoryFrame {
                stored_offset: 8,
                ..ok
            },
            MemoryFrame {
                stored_offset: u64::MAX,
                ..ok
            },
            MemoryFrame {
                stored_len: 10,
                ..ok
            },
        ] {
            let err = decode_frames(&encode_frames(&[bad]), 2 * PAGE, PAGE).unwrap_err();
            assert_eq!(err.code(), "BUNDLE_MANIFEST_INVALID");
        }
        // Frames must cover exactly what the extents need.
        assert!(decode_frames(&encode_frames(&[ok]), PAGE, 2 * PAGE).is_err());
        // Unknown encodings and cut tables.
        let mut t = encode_frames(&[ok]);
        t[8 + 32] = 7;
        assert!(decode_frames(&t, PAGE, PAGE).is_err());
        assert!(decode_frames(&t[..20], PAGE, PAGE).is_err());
    }
}
