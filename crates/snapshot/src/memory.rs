//! Guest memory in a bundle: only pages that are not all zero, stored as runs.
//!
//! The `MemoryData` payload is the concatenation of runs; `MemoryExtents` says
//! where each run belongs. Runs are page aligned in both the file and guest
//! memory, so a restore can map them straight from the file, copy-on-write.

use std::io::Write;

use crate::BundleError;

/// Page size of guest memory.
pub const PAGE: u64 = 4096;
/// More runs than this cost too many mappings; small zero gaps are then stored.
pub const MAX_EXTENTS: usize = 16_384;

/// One run of guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryExtent {
    /// Guest physical address (page aligned).
    pub guest_addr: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Offset inside the `MemoryData` payload (page aligned).
    pub data_offset: u64,
}

/// A guest memory region as the writer sees it.
pub struct RegionView<'a> {
    /// Guest physical start.
    pub guest_addr: u64,
    /// The region's bytes.
    pub bytes: &'a [u8],
    /// Byte ranges (relative to the region) that may hold data; everything else is
    /// known to be zero and is not read at all. None: scan the whole region.
    pub candidates: Option<Vec<std::ops::Range<u64>>>,
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the common all-zero case stays cheap.
    let mut words = page.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The pages to scan in a region of `len` bytes: `candidates` widened to
/// whole pages, clipped to the region, sorted and merged, so that no page is
/// scanned twice and runs come out in address order whatever order or
/// overlaps the candidates had.
fn scan_ranges(len: u64, candidates: Option<&[std::ops::Range<u64>]>) -> Vec<(u64, u64)> {
    let Some(candidates) = candidates else {
        return vec![(0, len.div_ceil(PAGE) * PAGE)];
    };
    let mut pages: Vec<(u64, u64)> = candidates
        .iter()
        .map(|r| (r.start / PAGE * PAGE, r.end.min(len).div_ceil(PAGE) * PAGE))
        .filter(|(s, e)| s < e)
        .collect();
    pages.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(pages.len());
    for (s, e) in pages {
        match merged.last_mut() {
            Some((_, me)) if s <= *me => *me = (*me).max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Finds the non-zero page runs of `regions` (guest address, length).
pub fn find_runs(regions: &[RegionView<'_>]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        for (start, end) in scan_ranges(r.bytes.len() as u64, r.candidates.as_deref()) {
            let mut p = start;
            while p < end {
                let len = PAGE.min(r.bytes.len() as u64 - p);
                if !is_zero(&r.bytes[p as usize..(p + len) as usize]) {
                    let g = r.guest_addr + p;
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == g => *l += PAGE,
                        _ => runs.push((g, PAGE)),
                    }
                }
                p += PAGE;
            }
        }
    }
    merge_gaps(runs, MAX_EXTENTS)
}

/// Runs covering the pages at the given guest addresses (sorted, page
/// aligned), zero pages included: what an incremental bundle stores. Runs
/// are merged over the smallest gaps while there are too many.
pub fn runs_of_pages(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &g in pages {
        match runs.last_mut() {
            Some((s, l)) if *s + *l == g => *l += PAGE,
            _ => runs.push((g, PAGE)),
        }
    }
    merge_gaps(runs, MAX_EXTENTS)
}

/// Merges the smallest gaps until at most `max` runs remain.
fn merge_gaps(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = PAGE;
    while runs.len() > max {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (s, l) in runs {
            match merged.last_mut() {
                Some((ms, ml)) if s - (*ms + *ml) <= gap => *ml = s + l - *ms,
                _ => merged.push((s, l)),
            }
        }
        runs = merged;
        gap *= 2;
    }
    runs
}

/// Writes the runs' bytes to `out` and returns the extents describing them.
pub fn write_runs(
    regions: &[RegionView<'_>],
    runs: &[(u64, u64)],
    out: &mut impl Write,
) -> std::io::Result<Vec<MemoryExtent>> {
    let mut extents = Vec::with_capacity(runs.len());
    let mut offset = 0u64;
    for &(g, len) in runs {
        let r = regions
            .iter()
            .find(|r| g >= r.guest_addr && g + len <= r.guest_addr + r.bytes.len() as u64)
            .ok_or_else(|| std::io::Error::other("run outside guest memory"))?;
        let at = (g - r.guest_addr) as usize;
        out.write_all(&r.bytes[at..at + len as usize])?;
        extents.push(MemoryExtent {
            guest_addr: g,
            len,
            data_offset: offset,
        });
        offset += len;
    }
    Ok(extents)
}

/// Encodes extents: u64 count, then (guest_addr, len, data_offset) little-endian.
pub fn encode_extents(extents: &[MemoryExtent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + extents.len() * 24);
    v.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    for e in extents {
        v.extend_from_slice(&e.guest_addr.to_le_bytes());
        v.extend_from_slice(&e.len.to_le_bytes());
        v.extend_from_slice(&e.data_offset.to_le_bytes());
    }
    v
}

/// Decodes and validates extents against the guest regions `(start, size)` and the
/// length of the memory payload: page aligned, inside memory, sorted, no overlaps,
/// and laid out back to back in the payload (each starts where the one before
/// it ends, as the writers lay them out), so the payload they use is never
/// longer than the guest memory they fill.
pub fn decode_extents(
    bytes: &[u8],
    regions: &[(u64, u64)],
    data_len: u64,
) -> Result<Vec<MemoryExtent>, BundleError> {
    let bad = |why: &str| BundleError::BadManifest(format!("memory extents: {why}"));
    if bytes.len() < 8 {
        return Err(bad("too short"));
    }
    let count = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if count > MAX_EXTENTS as u64 * 4 || bytes.len() as u64 != 8 + count * 24 {
        return Err(bad("count does not match size"));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let mut out: Vec<MemoryExtent> = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 8 + i * 24;
        let e = MemoryExtent {
            guest_addr: word(at),
            len: word(at + 8),
            data_offset: word(at + 16),
        };
        if e.len == 0
            || !e.guest_addr.is_multiple_of(PAGE)
            || !e.len.is_multiple_of(PAGE)
            || !e.data_offset.is_multiple_of(PAGE)
        {
            return Err(bad("not page aligned"));
        }
        let gend = e
            .guest_addr
            .checked_add(e.len)
            .ok_or_else(|| bad("overflow"))?;
        let dend = e
            .data_offset
            .checked_add(e.len)
            .ok_or_else(|| bad("overflow"))?;
        if dend > data_len {
            return Err(bad("points past the memory data"));
        }
        if !regions
            .iter()
            .any(|&(s, l)| e.guest_addr >= s && s.checked_add(l).is_some_and(|end| gend <= end))
        {
            return Err(bad("outside guest memory"));
        }
        if let Some(prev) = out.last() {
            if e.guest_addr < prev.guest_addr + prev.len {
                return Err(bad("unsorted or overlapping"));
            }
        }
        let expected = out.last().map_or(0, |p| p.data_offset + p.len);
        if e.data_offset != expected {
            return Err(bad("not laid out back to back in the memory data"));
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_zero_pages_are_stored_and_round_trip() {
        let mut mem = vec![0u8; 64 * PAGE as usize];
        mem[5 * 4096 + 7] = 1;
        mem[6 * 4096] = 2; // adjacent page: one run
        mem[40 * 4096 + 4095] = 3;
        let regions = [RegionView {
            guest_addr: 0x10_0000,
            bytes: &mem,
            candidates: None,
        }];
        let runs = find_runs(&regions);
        assert_eq!(
            runs,
            vec![
                (0x10_0000 + 5 * PAGE, 2 * PAGE),
                (0x10_0000 + 40 * PAGE, PAGE)
            ]
        );
        let mut data = Vec::new();
        let extents = write_runs(&regions, &runs, &mut data).unwrap();
        assert_eq!(data.len() as u64, 3 * PAGE);
        let decoded = decode_extents(
            &encode_extents(&extents),
            &[(0x10_0000, mem.len() as u64)],
            data.len() as u64,
        )
        .unwrap();
        assert_eq!(decoded, extents);
        // Rebuild memory from the extents: identical.
        let mut back = vec![0u8; mem.len()];
        for e in &decoded {
            let at = (e.guest_addr - 0x10_0000) as usize;
            back[at..at + e.len as usize]
                .copy_from_slice(&data[e.data_offset as usize..(e.data_offset + e.len) as usize]);
        }
        assert_eq!(back, mem);
    }

    #[test]
    fn candidate_ranges_limit_the_scan() {
        let mut mem = vec![0u8; 16 * PAGE as usize];
        mem[2 * 4096] = 9;
        mem[10 * 4096] = 9;
        let regions = [RegionView {
            guest_addr: 0,
            bytes: &mem,
            candidates: Some(std::iter::once(0..4 * PAGE).collect()),
        }];
        assert_eq!(find_runs(&regions), vec![(2 * PAGE, PAGE)]);
    }

    #[test]
    fn overlapping_or_unsorted_candidates_scan_each_page_once() {
        let mut mem = vec![0u8; 16 * PAGE as usize];
        mem[2 * 4096] = 9;
        mem[3 * 4096 + 1] = 9;
        mem[10 * 4096] = 9;
        let regions = [RegionView {
            guest_addr: 0,
            bytes: &mem,
            // Two ranges inside one page, one overlapping them, out of order,
            // and one past the region.
            candidates: Some(vec![
                10 * PAGE..10 * PAGE + 1,
                2 * PAGE + 10..2 * PAGE + 20,
                2 * PAGE + 100..2 * PAGE + 200,
                PAGE..4 * PAGE,
                40 * PAGE..50 * PAGE,
            ]),
        }];
        assert_eq!(
            find_runs(&regions),
            vec![(2 * PAGE, 2 * PAGE), (10 * PAGE, PAGE)]
        );
    }

    #[test]
    fn too_many_runs_are_merged_across_small_gaps() {
        let runs: Vec<(u64, u64)> = (0..100).map(|i| (i * 2 * PAGE, PAGE)).collect();
        let merged = merge_gaps(runs, 10);
        assert!(merged.len() <= 10);
        let covered: u64 = merged.iter().map(|r| r.1).sum();
        assert!(covered >= 100 * PAGE);
    }

    #[test]
    fn hostile_extents_are_rejected() {
        let regions = [(0u64, 16 * PAGE)];
        let enc = |e: MemoryExtent| encode_extents(&[e]);
        let ok = MemoryExtent {
            guest_addr: 0,
            len: PAGE,
            data_offset: 0,
        };
        assert!(decode_extents(&enc(ok), &regions, PAGE).is_ok());
        for bad in [
            MemoryExtent {
                guest_addr: 1,
                ..ok
            },
            MemoryExtent { len: 0, ..ok },
            MemoryExtent {
                guest_addr: 16 * PAGE,
                ..ok
            },
            MemoryExtent {
                data_offset: PAGE,
                ..ok
            },
            MemoryExtent {
                guest_addr: u64::MAX - 4095,
                ..ok
            },
        ] {
            assert_eq!(
                decode_extents(&enc(bad), &regions, PAGE)
                    .unwrap_err()
                    .code(),
                "BUNDLE_MANIFEST_INVALID"
            );
        }
        let overlapping = encode_extents(&[
            ok,
            MemoryExtent {
                data_offset: PAGE,
                ..ok
            },
        ]);
        assert!(decode_extents(&overlapping, &regions, 2 * PAGE).is_err());
        assert!(decode_extents(&[1, 2, 3], &regions, PAGE).is_err());
    }
}
