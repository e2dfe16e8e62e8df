//! Guest memory tables and frames straight from arbitrary bytes: the extent
//! table, the frame table and each frame's stored bytes, decoded with bounds;
//! and arbitrary guest memory written as frames and read back unchanged.

#![no_main]

use arbitrary::Arbitrary;
use ferry_snapshot::format;
use ferry_snapshot::frames::{self, FrameEncoding, MemoryCompression, MemoryFrame, MAX_FRAME_LEN};
use ferry_snapshot::memory::{self, RegionView, PAGE};
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
    },
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
        let data_len = data.len() as u64;
        let limit = if v1 { data_len } else { u64::MAX };
        let Ok(ext) = memory::decode_extents(&extents, &regions, limit) else {
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
        let Ok(fr) = frames::decode_frames(&table, data_len, logical) else {
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
        decode_all(&fr, &data);
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
    Input::RoundTrip { pages, fills, zstd } => {
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
        let w = frames::write_frames(&regions, &runs, &mut data, compression).expect("in memory");
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
