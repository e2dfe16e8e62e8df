//! The migration stream: length-prefixed messages over any byte stream (a
//! TCP connection, an ssh pipe), and the block batches that carry guest
//! memory and disk clusters in them.
//!
//! A message is one tag byte, a u32 LE payload length and the payload.
//! Control messages carry JSON; `Blocks` carry a zstd-compressed batch (see
//! [`encode_blocks`]). Everything read is bounded: a payload is at most
//! [`MAX_PAYLOAD`] bytes and a batch decodes to at most [`MAX_BATCH`].

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of this protocol; both ends must speak the same.
pub const VERSION: u32 = 1;

/// Largest payload either end accepts.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Largest decoded block batch.
pub const MAX_BATCH: usize = 16 << 20;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Source: protocol version and token ([`Hello`]).
    Hello = 1,
    /// Destination: the token is good.
    Welcome = 2,
    /// Either end: stop, with a code and message ([`Refusal`]).
    Refused = 3,
    /// Source: what is coming ([`Begin`]).
    Begin = 4,
    /// Destination: ready, and whether it holds the disk base ([`Ready`]).
    Ready = 5,
    /// Source: a piece of the encoded disk base.
    Base = 6,
    /// Source: the disk base is complete.
    BaseEnd = 7,
    /// Source: a batch of guest memory pages.
    Memory = 8,
    /// Source: a batch of disk clusters.
    Disk = 9,
    /// Source: a pre-copy round is complete ([`RoundEnd`]).
    RoundEnd = 10,
    /// Source: the VM is paused and everything is sent; its state ([`Final`]).
    Final = 11,
    /// Destination: the VM runs here ([`Running`]).
    Running = 12,
    /// Source: the source VM stops now.
    Ack = 13,
}

impl Tag {
    /// Every tag, for reading one back from its byte.
    const ALL: [Tag; 13] = [
        Tag::Hello,
        Tag::Welcome,
        Tag::Refused,
        Tag::Begin,
        Tag::Ready,
        Tag::Base,
        Tag::BaseEnd,
        Tag::Memory,
        Tag::Disk,
        Tag::RoundEnd,
        Tag::Final,
        Tag::Running,
        Tag::Ack,
    ];

    fn from_byte(b: u8) -> Option<Tag> {
        Tag::ALL.into_iter().find(|&t| t as u8 == b)
    }
}

/// The source's first message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u32,
    /// The token `ferry receive` printed; none over `--via`/`--stdio`.
    #[serde(default)]
    pub token: Option<String>,
}

/// Why an end stops the migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable error code.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// The root disk as the destination needs to know it before any data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskDesc {
    /// Bytes.
    pub size: u64,
    /// Cluster size of the block batches.
    pub cluster_size: u64,
    /// Content id (SHA-256) of the encoded base stream.
    pub base_id: String,
    /// Clusters the base holds.
    pub base_clusters: u64,
    /// What the VM booted from, for messages.
    #[serde(default)]
    pub base_image: Option<String>,
    /// Where the source keeps the base, relative to its cache directory.
    #[serde(default)]
    pub base_cache_path: Option<String>,
}

impl DiskDesc {
    /// The same, as a thin bundle's disk: for finding the base on this host.
    pub fn info(&self) -> ferry_snapshot::manifest::DiskInfo {
        ferry_snapshot::manifest::DiskInfo {
            size: self.size,
            cluster_size: self.cluster_size,
            base_id: self.base_id.clone(),
            base_clusters: self.base_clusters,
            top_clusters: 0,
            thin: true,
            base_image: self.base_image.clone(),
            base_cache_path: self.base_cache_path.clone(),
        }
    }
}

/// What the source is about to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Begin {
    /// The VM's record (its name, size, forwards, mounts).
    pub record: crate::vm::record::VmRecord,
    /// Guest RAM regions: (guest address, length).
    pub memory_regions: Vec<(u64, u64)>,
    /// Architecture of the source.
    pub arch: String,
    /// CPU vendor and the features the guest was shown.
    pub cpu: ferry_snapshot::manifest::CpuInfo,
    /// The root disk.
    pub disk: DiskDesc,
}

/// The destination's answer to [`Begin`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// It holds the disk base already: the source skips it.
    pub have_base: bool,
}

/// The end of a pre-copy round, for the destination's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundEnd {
    /// Round number, from 0.
    pub round: u32,
    /// Pages sent in it.
    pub pages: u64,
}

/// The paused VM's machine state: the last message before the switch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Final {
    /// vCPUs, interrupt controllers, clock, devices.
    pub state: ferry_vmm::VmState,
}

/// The VM runs on the destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    /// Its name there.
    pub name: String,
    /// Milliseconds from [`Final`] arriving to the VM answering.
    pub restore_ms: u64,
}

/// Writes one message.
pub fn send(w: &mut impl Write, tag: Tag, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::other("migration message too large"))?;
    let mut head = [0u8; 5];
    head[0] = tag as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Writes one JSON message.
pub fn send_json(w: &mut impl Write, tag: Tag, value: &impl Serialize) -> io::Result<()> {
    send(
        w,
        tag,
        &serde_json::to_vec(value).map_err(io::Error::other)?,
    )
}

/// Reads one message; `Ok(None)` at a clean end of the stream.
pub fn recv(r: &mut impl Read) -> io::Result<Option<(Tag, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let tag = Tag::from_byte(head[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown migration message {}", head[0]),
        )
    })?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("four bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("migration message of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((tag, payload)))
}

/// Parses a JSON payload.
pub fn json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One block of a batch: its index (page or cluster number) and its bytes;
/// empty bytes stand for a block of zeros.
pub type Block = (u64, Vec<u8>);

/// Encodes blocks as a batch: u32 count, then per block u64 index and u32
/// length, then the bytes of every block back to back; compressed with zstd.
pub fn encode_blocks(blocks: &[Block], level: i32) -> io::Result<Vec<u8>> {
    let data: usize = blocks.iter().map(|b| b.1.len()).sum();
    let mut raw = Vec::with_capacity(4 + blocks.len() * 12 + data);
    raw.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for (index, bytes) in blocks {
        raw.extend_from_slice(&index.to_le_bytes());
        raw.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    }
    for (_, bytes) in blocks {
        raw.extend_from_slice(bytes);
    }
    zstd::bulk::compress(&raw, level)
}

/// Decodes a batch of [`encode_blocks`], refusing blocks longer than
/// `block_size` and batches that decode past [`MAX_BATCH`].
pub fn decode_blocks(payload: &[u8], block_size: u64) -> io::Result<Vec<Block>> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("block batch: {what}"));
    let raw =
        zstd::bulk::decompress(payload, MAX_BATCH).map_err(|_| bad("not zstd or too large"))?;
    let count = u32::from_le_bytes(
        raw.get(..4)
            .ok_or_else(|| bad("short"))?
            .try_into()
            .expect("four"),
    ) as usize;
    let table_end = 4 + count.checked_mul(12).ok_or_else(|| bad("count"))?;
    let table = raw.get(4..table_end).ok_or_else(|| bad("short table"))?;
    let mut at = table_end;
    let mut out = Vec::with_capacity(count);
    for entry in table.chunks_exact(12) {
        let index = u64::from_le_bytes(entry[..8].try_into().expect("eight"));
        let len = u32::from_le_bytes(entry[8..].try_into().expect("four")) as usize;
        if len as u64 > block_size {
            return Err(bad("block longer than its size"));
        }
        let bytes = raw.get(at..at + len).ok_or_else(|| bad("short data"))?;
        out.push((index, bytes.to_vec()));
        at += len;
    }
    if at != raw.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_batches_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        send_json(&mut buf, Tag::Ready, &Ready { have_base: true }).unwrap();
        let blocks = vec![(7, vec![1u8; 4096]), (9, Vec::new())];
        send(&mut buf, Tag::Memory, &encode_blocks(&blocks, 1).unwrap()).unwrap();
        let mut r = &buf[..];
        let (tag, p) = recv(&mut r).unwrap().unwrap();
        assert_eq!(tag, Tag::Ready);
        assert!(json::<Ready>(&p).unwrap().have_base);
        let (tag, p) = recv(&mut r).unwrap().unwrap();
        assert_eq!(tag, Tag::Memory);
        assert_eq!(decode_blocks(&p, 4096).unwrap(), blocks);
        assert!(recv(&mut r).unwrap().is_none());
        // A block longer than the block size, an unknown tag, a huge length.
        assert!(decode_blocks(&encode_blocks(&[(0, vec![0; 8192])], 1).unwrap(), 4096).is_err());
        assert!(recv(&mut &[99u8, 0, 0, 0, 0][..]).is_err());
        assert!(recv(&mut &[1u8, 0xff, 0xff, 0xff, 0xff][..]).is_err());
        // Truncated in the middle of a payload.
        assert!(recv(&mut &buf[..8]).is_err());
        for t in Tag::ALL {
            assert_eq!(Tag::from_byte(t as u8), Some(t));
        }
        assert_eq!(Tag::from_byte(0), None);
    }
}
