//! Guest memory tables and frames straight from arbitrary bytes: the extent
//! table, the frame table and each frame's stored bytes, decoded with bounds;
//! and arbitrary guest memory written as frames and read back unchanged.

#![no_main]

use arbitrary::Arbitrary;
use ferry_snapshot::format;
use ferry_snapshot::frames::{self, FrameEncoding, MemoryCompression, MemoryFrame, MAX_FRAME_LEN};
use ferry_snapshot::memory::{self, RegionView, PAGE};
use ferry_snapshot::MemoryExtent;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Tables and payload as stored, decoded as a reader would.
    Tables {
        regions: Vec<(u64, u64)>,
        extents: Vec<u8>,
        frames: Vec<u8>,
        data: Vec<u8>,
        v1: bool,
    },
    /// Tables built from entries that are mostly plausible (small page
    /// numbers), then encoded, then edited: deeper than raw bytes get.
    Entries {
        regions: Vec<(u16, u16)>,
        extents: Vec<(Num, Num, Num)>,
        frames: Vec<(Num, Num, Num, Num, u8, bool)>,
        data: Vec<u8>,
        edits: Vec<(bool, u16, u64)>,
        v1: bool,
    },
    /// One frame described arbitrarily over arbitrary stored bytes.
    Frame {
        len_pages: u16,
        zstd: bool,
        checksum: u64,
        stored: Vec<u8>,
        compress_first: bool,
    },
    /// Guest memory written as frames and read back.
    RoundTrip {
        pages: u8,
        fills: Vec<(u8, u8, u8)>,
        zstd: bool,
        /// A prefetch set (page, pages), and whether its frames stay raw.
        hot: Vec<(u8, u8)>,
        hot_raw: bool,
    },
}

/// A table field: a page count (the common case) or any value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Pages(u8),
    Raw(u64),
}

impl Num {
    fn get(self) -> u64 {
        match self {
            Num::Pages(n) => u64::from(n) * PAGE,
            Num::Raw(v) => v,
        }
    }
}

fn poke(table: &mut [u8], at: u16, value: u64) {
    if table.len() >= 8 {
        let at = usize::from(at) % (table.len() - 7);
        table[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

/// Decodes the tables as a reader does and checks what it promises; then
/// decodes every frame.
fn tables(regions: &[(u64, u64)], extents: &[u8], table: &[u8], data: &[u8], v1: bool) {
    let data_len = data.len() as u64;
    let limit = if v1 { data_len } else { u64::MAX };
    let Ok(ext) = memory::decode_extents(extents, regions, limit) else {
        return;
    };
    let logical = ext.last().map_or(0, |e| e.data_offset + e.len);
    assert_eq!(logical, ext.iter().map(|e| e.len).sum::<u64>());
    for e in &ext {
        assert!(regions
            .iter()
            .any(|&(s, l)| e.guest_addr >= s && e.guest_addr - s + e.len <= l));
    }
    if v1 {
        assert!(logical <= data_len);
        return;
    }
    let Ok(fr) = frames::decode_frames(table, data_len, logical) else {
        return;
    };
    let mut at = 0;
    for f in &fr {
        assert_eq!(f.offset, at);
        assert!(f.stored_offset + f.stored_len <= data_len);
        if f.encoding == FrameEncoding::Raw {
            assert_eq!(f.stored_len, f.len);
        }
        at += f.len;
    }
    assert_eq!(at, logical);
    for e in &ext {
        let f = frames::frame_at(&fr, e.data_offset).expect("a frame holds every extent");
        assert!(f.offset <= e.data_offset);
    }
    decode_all(&fr, data);
}

/// Decodes every frame the table accepted from `data`.
fn decode_all(frames_: &[MemoryFrame], data: &[u8]) {
    for f in frames_.iter().take(64) {
        assert!(f.len <= MAX_FRAME_LEN);
        let stored = &data[f.stored_offset as usize..(f.stored_offset + f.stored_len) as usize];
        let mut out = vec![0u8; f.len as usize];
        if frames::decode_frame(f, stored, &mut out).is_ok() {
            assert_eq!(format::checksum(&out), f.checksum);
        }
    }
}

fuzz_target!(|input: Input| match input {
    Input::Tables {
        regions,
        extents,
        frames: table,
        data,
        v1,
    } => {
        let regions: Vec<(u64, u64)> = regions.into_iter().take(8).collect();
        tables(&regions, &extents, &table, &data, v1);
    }
    Input::Entries {
        regions,
        extents,
        frames: fr,
        mut data,
        edits,
        v1,
    } => {
        let regions: Vec<(u64, u64)> = regions
            .iter()
            .take(4)
            .map(|&(s, l)| (u64::from(s) * PAGE, u64::from(l) * PAGE))
            .collect();
        let ext: Vec<MemoryExtent> = extents
            .iter()
            .take(16)
            .map(|&(g, l, d)| MemoryExtent {
                guest_addr: g.get(),
                len: l.get(),
                data_offset: d.get(),
            })
            .collect();
        // Frames whose `fill` is odd get stored bytes that decode and a
        // checksum that matches: the success path needs both.
        let mut frames_: Vec<MemoryFrame> = Vec::new();
        for &(o, l, so, sl, fill, zstd) in fr.iter().take(16) {
            let mut f = MemoryFrame {
                offset: o.get(),
                len: l.get(),
                stored_offset: so.get(),
                stored_len: sl.get(),
                encoding: if zstd {
                    FrameEncoding::Zstd
                } else {
                    FrameEncoding::Raw
                },
                checksum: u64::from(fill),
            };
            let at = usize::try_from(f.stored_offset).unwrap_or(usize::MAX);
            if fill & 1 == 1 && f.len <= 1 << 20 && at <= 4 << 20 {
                let content = vec![fill; f.len as usize];
                f.checksum = format::checksum(&content);
                let stored = if zstd {
                    zstd::bulk::compress(&content, 1).expect("in memory")
                } else {
                    content
                };
                f.stored_len = stored.len() as u64;
                if data.len() < at + stored.len() {
                    data.resize(at + stored.len(), 0);
                }
                data[at..at + stored.len()].copy_from_slice(&stored);
            }
            frames_.push(f);
        }
        let mut extents = memory::encode_extents(&ext);
        let mut table = frames::encode_frames(&frames_);
        for &(which, at, value) in edits.iter().take(4) {
            poke(if which { &mut extents } else { &mut table }, at, value);
        }
        tables(&regions, &extents, &table, &data, v1);
    }
    Input::Frame {
        len_pages,
        zstd,
        checksum,
        stored,
        compress_first,
    } => {
        let stored = if zstd && compress_first {
            zstd::bulk::compress(&stored, 1).expect("in memory")
        } else {
            stored
        };
        let f = MemoryFrame {
            offset: 0,
            len: u64::from(len_pages) * PAGE,
            stored_offset: 0,
            stored_len: stored.len() as u64,
            encoding: if zstd {
                FrameEncoding::Zstd
            } else {
                FrameEncoding::Raw
            },
            checksum,
        };
        // Frames past 8 MiB only cost the harness time: the cap is checked
        // above this size as below it.
        if frames::check_frame(&f).is_err() || f.len > 8 << 20 {
            return;
        }
        let mut out = vec![0u8; f.len as usize];
        if frames::decode_frame(&f, &stored, &mut out).is_ok() {
            assert_eq!(format::checksum(&out), checksum);
        }
    }
    Input::RoundTrip {
        pages,
        fills,
        zstd,
        hot,
        hot_raw,
    } => {
        // Mostly small; at 255, 2 MiB and a bit: three frames.
        let pages = if pages == 255 {
            520
        } else {
            usize::from(pages) % 32 + 1
        };
        let len = pages * PAGE as usize;
        let mut mem = vec![0u8; len];
        let mut touched = Vec::new();
        for (i, &(page, n, fill)) in fills.iter().take(16).enumerate() {
            let at = usize::from(page) * PAGE as usize % len;
            let end = (at + usize::from(n) * 512).min(len);
            for (j, b) in mem[at..end].iter_mut().enumerate() {
                *b = if fill == 0 { (i * 31 + j * 7) as u8 } else { fill };
            }
            touched.push(at as u64..end as u64);
        }
        // Large memory is scanned only where it was written, as a capture
        // scans only resident pages; small memory is scanned whole.
        let regions = [RegionView {
            guest_addr: 0x10_0000,
            bytes: &mem,
            candidates: (pages > 32).then_some(touched),
        }];
        let runs = memory::find_runs(&regions);
        let mut data = Vec::new();
        let compression = if zstd {
            MemoryCompression::Zstd(1)
        } else {
            MemoryCompression::None
        };
        // Guest ranges, sorted and merged, as a recording reports them.
        let mut set: Vec<(u64, u64)> = Vec::new();
        let mut hot: Vec<(u64, u64)> = hot
            .iter()
            .take(8)
            .map(|&(p, n)| {
                let at = u64::from(p) * PAGE % len as u64;
                (0x10_0000 + at, ((u64::from(n) % 8 + 1) * PAGE).min(len as u64 - at))
            })
            .collect();
        hot.sort_unstable();
        for (g, l) in hot {
            match set.last_mut() {
                Some((s, sl)) if g <= *s + *sl => *sl = (*sl).max(g + l - *s),
                _ => set.push((g, l)),
            }
        }
        let w = frames::write_frames(&regions, &runs, &set, hot_raw, &mut data, compression)
            .expect("in memory");
        frames::check_prefetch(&w.prefetch, w.frames.len()).expect("the prefetch list is valid");
        for &i in &w.prefetch {
            let f = &w.frames[i as usize];
            assert!(!hot_raw || f.encoding == frames::FrameEncoding::Raw, "hot frames raw");
        }
        let ext = memory::decode_extents(
            &memory::encode_extents(&w.extents),
            &[(0x10_0000, len as u64)],
            len as u64,
        )
        .expect("written extents decode");
        let logical: u64 = ext.iter().map(|e| e.len).sum();
        let fr = frames::decode_frames(&frames::encode_frames(&w.frames), data.len() as u64, logical)
            .expect("written frames decode");
        let mut stream = vec![0u8; logical as usize];
        for f in &fr {
            let stored = &data[f.stored_offset as usize..(f.stored_offset + f.stored_len) as usize];
            frames::decode_frame(f, stored, &mut stream[f.offset as usize..(f.offset + f.len) as usize])
                .expect("written frames decode");
        }
        let mut back = vec![0u8; len];
        for e in &ext {
            let at = (e.guest_addr - 0x10_0000) as usize;
            back[at..at + e.len as usize]
                .copy_from_slice(&stream[e.data_offset as usize..(e.data_offset + e.len) as usize]);
        }
        assert!(back == mem, "memory changed across frames");
    }
});
