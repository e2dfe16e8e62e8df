//! Disk streams framed by window, as a store hands them out piece by piece:
//! arbitrary bytes read as one frame with bounds, and arbitrary clusters
//! written framed, cut at their frames and read back unchanged, frame by
//! frame and whole.

#![no_main]

use arbitrary::Arbitrary;
use ferry_snapshot::disk::{self, FRAME_SPAN};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Stored bytes taken for one frame of a disk of `size` bytes.
    Frame {
        bytes: Vec<u8>,
        size: u32,
        cluster_shift: u8,
    },
    /// Clusters (index, fill byte, length) of a small disk, written framed.
    Clusters {
        clusters: Vec<(u16, u8, u16)>,
        cluster_shift: u8,
    },
}

fuzz_target!(|input: Input| match input {
    Input::Frame {
        bytes,
        size,
        cluster_shift,
    } => {
        let cs = 512u64 << (cluster_shift % 13);
        if let Some(n) = disk::frame_len(&bytes) {
            assert!(n <= bytes.len());
        }
        if let Ok((clusters, _)) = disk::read_frame(&bytes, cs, u64::from(size)) {
            let mut last = None;
            for (at, data) in &clusters {
                assert!(at % cs == 0 && !data.is_empty() && data.len() as u64 <= cs);
                assert!(at + data.len() as u64 <= u64::from(size));
                assert!(last.is_none_or(|l| l < *at));
                last = Some(*at);
            }
        }
    }
    Input::Clusters {
        clusters,
        cluster_shift,
    } => {
        // Up to 64 KiB clusters, 64 of them: bounded memory.
        let cs = 512u64 << (cluster_shift % 8);
        let mut want: Vec<(u64, Vec<u8>)> = Vec::new();
        for (index, fill, len) in clusters.into_iter().take(64) {
            let index = u64::from(index % 4096);
            if want.last().is_some_and(|(i, _)| *i >= index) {
                continue;
            }
            let len = (u64::from(len) % cs + 1) as usize;
            want.push((index, vec![fill; len]));
        }
        // Only the disk's last cluster may be short.
        let Some(&(last, _)) = want.last() else { return };
        for (_, data) in want.iter_mut().take_while(|(i, _)| *i != last) {
            data.resize(cs as usize, data[0]);
        }
        let size = last * cs + want.last().map_or(0, |(_, d)| d.len() as u64);
        let mut it = want.clone().into_iter();
        let mut stream = Vec::new();
        disk::write_clusters_framed(&mut stream, cs, || Ok(it.next())).unwrap();
        let stored: Vec<(u64, Vec<u8>)> = want
            .into_iter()
            .filter(|(_, d)| d.iter().any(|&b| b != 0))
            .map(|(i, d)| (i * cs, d))
            .collect();
        let mut whole = Vec::new();
        disk::read_clusters_within(&stream[..], cs, size, |at, d| {
            whole.push((at, d.to_vec()));
            Ok(())
        })
        .unwrap();
        assert!(whole == stored);
        let (mut rest, mut got, mut ended) = (&stream[..], Vec::new(), false);
        while !rest.is_empty() {
            assert!(!ended, "a frame after the end mark");
            let n = disk::frame_len(rest).unwrap();
            let (c, end) = disk::read_frame(&rest[..n], cs, size).unwrap();
            let spans: Vec<u64> = c.iter().map(|(at, _)| at / FRAME_SPAN).collect();
            assert!(spans.windows(2).all(|w| w[0] == w[1]), "one window a frame");
            got.extend(c);
            ended = end;
            rest = &rest[n..];
        }
        assert!(ended && got == stored);
    }
});
