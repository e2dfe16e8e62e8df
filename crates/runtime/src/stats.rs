//! Memory use of a VM: its VMM process and the guest RAM the host holds.

use serde::{Deserialize, Serialize};

/// What a VM costs the host in memory, read by its VMM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Resident bytes of the VMM process, guest RAM included.
    pub vmm_rss_bytes: u64,
    /// Proportional set size: shared pages (forks, raw bundles mapped from the
    /// page cache) divided among the processes sharing them.
    pub vmm_pss_bytes: u64,
    /// Resident bytes of guest RAM: what the guest has touched since it
    /// started or was restored.
    pub guest_resident_bytes: u64,
    /// Resident bytes that are not guest RAM: the VMM's own overhead.
    pub overhead_bytes: u64,
    /// Bytes of a lazily restored guest's memory not yet brought in from
    /// its bundle; `None` unless the VM was restored lazily.
    pub lazy_pending_bytes: Option<u64>,
}

/// Reads this process's memory use; `guest_ram` are the host address ranges
/// of guest RAM, `lazy` the (produced, total) bytes of a lazy restore.
pub fn of_process(guest_ram: &[(usize, usize)], lazy: Option<(u64, u64)>) -> Stats {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut stats = from_smaps(&smaps, guest_ram);
    stats.lazy_pending_bytes = lazy.map(|(done, total)| total.saturating_sub(done));
    stats
}

/// Sums `Rss` and `Pss` over the mappings of an smaps text.
fn from_smaps(smaps: &str, guest_ram: &[(usize, usize)]) -> Stats {
    let mut stats = Stats::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        }) {
            in_guest = guest_ram.iter().any(|&(g, len)| start < g + len && g < end);
            continue;
        }
        let kib = || -> u64 {
            words
                .clone()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                * 1024
        };
        match first {
            "Rss:" => {
                let b = kib();
                stats.vmm_rss_bytes += b;
                if in_guest {
                    stats.guest_resident_bytes += b;
                } else {
                    stats.overhead_bytes += b;
                }
            }
            "Pss:" => stats.vmm_pss_bytes += kib(),
            _ => {}
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_and_overhead_are_told_apart() {
        let smaps = "\
00400000-00500000 r-xp 00000000 08:01 1 /usr/bin/ferry-vmm
Size:               1024 kB
Rss:                 300 kB
Pss:                 300 kB
7f0000000000-7f0020000000 rw-s 00000000 00:01 2 /memfd:guest (deleted)
Size:             524288 kB
Rss:               40000 kB
Pss:               20000 kB
";
        let s = from_smaps(smaps, &[(0x7f00_0000_0000, 512 << 20)]);
        assert_eq!(s.vmm_rss_bytes, 40300 * 1024);
        assert_eq!(s.vmm_pss_bytes, 20300 * 1024);
        assert_eq!(s.guest_resident_bytes, 40000 * 1024);
        assert_eq!(s.overhead_bytes, 300 * 1024);
    }

    #[test]
    fn this_process_has_some_memory() {
        let s = of_process(&[], Some((10, 30)));
        assert!(s.vmm_rss_bytes > 0);
        assert_eq!(s.lazy_pending_bytes, Some(20));
    }
}
