//! virtio-blk backed by a [`ferry_disk::Disk`] (raw image or copy-on-write layer),
//! served synchronously.

use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;

use ferry_disk::{Disk, FillSource, Filler};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};

use super::{QueueContext, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Virtio device id of block devices.
pub const DEVICE_TYPE: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the serial number returned by GET_ID.
pub const ID_BYTES: usize = 20;

const REQUEST_HEADER_LEN: usize = 16;
/// Data segments per request the guest may use (queue size minus header and status).
const SEG_MAX: u32 = super::QUEUE_MAX_SIZE as u32 - 2;
/// Size of the bounce buffer between the image and guest memory.
const CHUNK: usize = 128 << 10;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: ferry_disk::DiskError,
    },
    /// The image's size could not be read.
    #[error("cannot stat disk image {path}")]
    Metadata {
        /// Image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image size differs from the saved one.
    #[error("disk image has {actual} sectors, saved state expects {saved}")]
    CapacityMismatch {
        /// Sectors in the saved state.
        saved: u64,
        /// Sectors of the image.
        actual: u64,
    },
    /// The read-only setting differs from the saved one.
    #[error("disk read-only setting changed (saved {saved}, now {actual})")]
    ReadOnlyMismatch {
        /// Saved setting.
        saved: bool,
        /// Requested setting.
        actual: bool,
    },
    /// The saved disk id is too long.
    #[error("disk id longer than {ID_BYTES} bytes")]
    InvalidId,
    /// Flushing the image failed.
    #[error("cannot flush the disk image")]
    Flush(#[source] io::Error),
}

/// How to attach a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Raw image file or ferry copy-on-write layer.
    pub path: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.
    #[serde(default)]
    pub read_only: bool,
}

/// Serializable state of a block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Whether the guest sees a read-only disk.
    pub read_only: bool,
    /// Capacity the guest knows, in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Serial the guest reads with GET_ID (kept stable across hosts).
    pub disk_id: Vec<u8>,
}

/// A virtio block device.
pub struct Block {
    disk: Arc<Disk>,
    /// Set while the disk is filled from elsewhere (a restore from a store):
    /// each request's range is in place before it is served.
    fill: Option<Arc<Filler>>,
    read_only: bool,
    capacity_sectors: u64,
    disk_id: [u8; ID_BYTES],
}

fn open_image(config: &BlockConfig) -> Result<(Arc<Disk>, u64, std::fs::Metadata), BlockError> {
    let disk = Disk::open(&config.path, config.read_only).map_err(|source| BlockError::Open {
        path: config.path.clone(),
        source,
    })?;
    let meta = std::fs::metadata(&config.path).map_err(|source| BlockError::Metadata {
        path: config.path.clone(),
        source,
    })?;
    let sectors = disk.size() / SECTOR_SIZE;
    Ok((Arc::new(disk), sectors, meta))
}

impl Block {
    /// Opens the image described by `config`.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let (disk, capacity_sectors, meta) = open_image(config)?;
        let mut disk_id = [0u8; ID_BYTES];
        let id = format!("{:x}{:x}", meta.dev(), meta.ino());
        let n = id.len().min(ID_BYTES);
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            disk,
            fill: None,
            read_only: config.read_only,
            capacity_sectors,
            disk_id,
        })
    }

    /// Reopens the image for a restored guest, checking it still matches.
    pub fn restore(config: &BlockConfig, state: &BlockState) -> Result<Self, BlockError> {
        if config.read_only != state.read_only {
            return Err(BlockError::ReadOnlyMismatch {
                saved: state.read_only,
                actual: config.read_only,
            });
        }
        if state.disk_id.len() > ID_BYTES {
            return Err(BlockError::InvalidId);
        }
        let (disk, capacity_sectors, _) = open_image(config)?;
        if capacity_sectors != state.capacity_sectors {
            return Err(BlockError::CapacityMismatch {
                saved: state.capacity_sectors,
                actual: capacity_sectors,
            });
        }
        let mut disk_id = [0u8; ID_BYTES];
        disk_id[..state.disk_id.len()].copy_from_slice(&state.disk_id);
        Ok(Self {
            disk,
            fill: None,
            read_only: state.read_only,
            capacity_sectors,
            disk_id,
        })
    }

    /// Captures the device state.
    pub fn save(&self) -> BlockState {
        let len = self
            .disk_id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ID_BYTES);
        BlockState {
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            disk_id: self.disk_id[..len].to_vec(),
        }
    }

    /// Fills the disk from `source` as the guest reaches it (see
    /// [`ferry_disk::fill`]); the returned filler completes it.
    pub fn fill_from(&mut self, source: Arc<dyn FillSource>) -> std::io::Result<Arc<Filler>> {
        let filler = Filler::new(Arc::clone(&self.disk), source)?;
        self.fill = Some(Arc::clone(&filler));
        Ok(filler)
    }

    /// Places what `[offset, offset + len)` needs from a fill in progress.
    fn filled(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match &self.fill {
            Some(f) => f.ensure(offset, len as u64),
            None => Ok(()),
        }
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Makes every completed write durable (no-op for read-only disks).
    pub fn flush_backing(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.disk.flush()
    }

    /// Switches the device to the image `config` names, which must have the
    /// same size and read-only setting; the guest notices nothing. Writes to
    /// the old image are flushed first. Meant for a paused VM (a fork moves
    /// both VMs onto new copy-on-write layers over the frozen image).
    pub fn replace_backing(&mut self, config: &BlockConfig) -> Result<(), BlockError> {
        if config.read_only != self.read_only {
            return Err(BlockError::ReadOnlyMismatch {
                saved: self.read_only,
                actual: config.read_only,
            });
        }
        let (disk, capacity_sectors, _) = open_image(config)?;
        if capacity_sectors != self.capacity_sectors {
            return Err(BlockError::CapacityMismatch {
                saved: self.capacity_sectors,
                actual: capacity_sectors,
            });
        }
        // The old disk's fill ends before it is left (a fork completes it
        // first; this is the backstop).
        if let Some(fill) = self.fill.take() {
            fill.complete().map_err(BlockError::Flush)?;
        }
        self.flush_backing().map_err(BlockError::Flush)?;
        self.disk = disk;
        Ok(())
    }

    pub(crate) fn avail_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// `struct virtio_blk_config` up to `seg_max`.
    pub(crate) fn config_space(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        // size_max (8..12) stays 0: not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    pub(crate) fn activate(&mut self, acked_features: u64) {
        tracing::debug!("virtio-blk: activated with features {acked_features:#x}");
    }

    pub(crate) fn process_queue(
        &mut self,
        idx: usize,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let queue = ctx.queue(idx)?;
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.handle_request(mem, chain);
                queue.add_used(mem, head, len)?;
            }
            // Re-check after enabling notifications so no request slips through.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        ctx.notify(idx)
    }

    /// Serves one request; returns the number of bytes written to the guest.
    fn handle_request(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                tracing::warn!("virtio-blk: descriptor chain outside guest memory");
                return 0;
            }
        };
        let writable = writer.available_bytes();
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        if writable == 0 || reader.read_exact(&mut hdr).is_err() {
            tracing::warn!("virtio-blk: malformed request");
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let (status, data_written) = match req_type {
            VIRTIO_BLK_T_IN => self.read_sectors(sector, &mut writer),
            VIRTIO_BLK_T_OUT => (self.write_sectors(sector, &mut reader), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match writer.write_all(&self.disk_id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        (data_written + 1) as u32
    }

    /// Byte offset of a request if `[sector, sector + len)` lies inside the disk.
    fn checked_range(&self, sector: u64, len: usize) -> Option<u64> {
        if !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.capacity_sectors * SECTOR_SIZE).then_some(start)
    }

    fn read_sectors(
        &mut self,
        sector: u64,
        writer: &mut Writer<'_, crate::DirtySlice<'_>>,
    ) -> (u8, usize) {
        let len = writer.available_bytes();
        let Some(mut offset) = self.checked_range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        if let Err(e) = self.filled(offset, len) {
            tracing::warn!("virtio-blk: fetching the disk at {offset}: {e}");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if let Err(e) = self.disk.read_at(&mut buf[..n], offset) {
                tracing::warn!("virtio-blk: read at {offset}: {e}");
                return (VIRTIO_BLK_S_IOERR, done);
            }
            if writer.write_all(&buf[..n]).is_err() {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            done += n;
            offset += n as u64;
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write_sectors(&mut self, sector: u64, reader: &mut Reader<'_, crate::DirtySlice<'_>>) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = reader.available_bytes();
        let Some(mut offset) = self.checked_range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        if let Err(e) = self.filled(offset, len) {
            tracing::warn!("virtio-blk: fetching the disk at {offset}: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if reader.read_exact(&mut buf[..n]).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            if let Err(e) = self.disk.write_at(&buf[..n], offset) {
                tracing::warn!("virtio-blk: write at {offset}: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
            done += n;
            offset += n as u64;
        }
        VIRTIO_BLK_S_OK
    }

    fn flush(&mut self) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_OK;
        }
        match self.disk.flush() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk: flush: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::{self, DriverQueue};
    use crate::virtio::{VirtioDevice, VirtioDeviceState};
    use vm_memory::{Address, Bytes, GuestAddress};

    const HDR: GuestAddress = GuestAddress(0x10000);
    const DATA: GuestAddress = GuestAddress(0x20000);
    const STATUS: GuestAddress = GuestAddress(0x30000);

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        mem: GuestMemoryMmap,
        t: MmioTransport,
        q: DriverQueue,
    }

    fn image(dir: &tempfile::TempDir, sectors: usize) -> PathBuf {
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    fn fixture(read_only: bool, features: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 64);
        let mem = testing::memory();
        let block = Block::new(&BlockConfig {
            path: path.clone(),
            read_only,
        })
        .unwrap();
        let mut t = MmioTransport::new(VirtioDevice::Block(block), mem.clone()).unwrap();
        let mut q = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut t, features, &mut [&mut q]);
        Fixture {
            _dir: dir,
            path,
            mem,
            t,
            q,
        }
    }

    fn header(mem: &GuestMemoryMmap, req: u32, sector: u64) {
        mem.write_obj(req, HDR).unwrap();
        mem.write_obj(0u32, HDR.unchecked_add(4)).unwrap();
        mem.write_obj(sector, HDR.unchecked_add(8)).unwrap();
        mem.write_obj(0xffu8, STATUS).unwrap();
    }

    impl Fixture {
        /// Submits a request with the given data buffer; returns (status, used len).
        fn submit(&mut self, req: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
            header(&self.mem, req, sector);
            let mut bufs = vec![(HDR, 16, false)];
            if let Some((len, writable)) = data {
                bufs.push((DATA, len, writable));
            }
            bufs.push((STATUS, 1, true));
            let head = self.q.add_chain(&self.mem, &bufs);
            self.t.handle_queue_event(0);
            let (id, len) = self.q.next_used(&self.mem).expect("request completed");
            assert_eq!(id, head);
            (self.mem.read_obj(STATUS).unwrap(), len)
        }
    }

    const BASE: u64 = 1 << VIRTIO_F_VERSION_1;

    /// The whole 32 KiB disk as one cluster of 0xEE, or a store that is away.
    struct OneWindow {
        fetches: std::sync::atomic::AtomicU32,
        away: bool,
    }

    impl ferry_disk::FillSource for OneWindow {
        fn window(&self) -> u64 {
            ferry_disk::CLUSTER_SIZE
        }
        fn windows(&self) -> Vec<u64> {
            vec![0]
        }
        fn fetch(&self, _start: u64) -> io::Result<ferry_disk::fill::Clusters> {
            self.fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.away {
                return Err(io::Error::other("store away"));
            }
            Ok(vec![(0, vec![0xEE; 64 * 512])])
        }
    }

    fn filled_fixture(away: bool) -> (Fixture, Arc<OneWindow>) {
        let mut f = fixture(false, BASE);
        let layer = f._dir.path().join("top.layer");
        ferry_disk::create_layer(&layer, &f.path, None).unwrap();
        let mut block = Block::new(&BlockConfig {
            path: layer,
            read_only: false,
        })
        .unwrap();
        let source = Arc::new(OneWindow {
            fetches: Default::default(),
            away,
        });
        block.fill_from(source.clone()).unwrap();
        f.t = MmioTransport::new(VirtioDevice::Block(block), f.mem.clone()).unwrap();
        f.q = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut f.t, BASE, &mut [&mut f.q]);
        (f, source)
    }

    #[test]
    fn a_disk_being_filled_serves_each_window_after_it_arrived_and_fetches_it_once() {
        let (mut f, source) = filled_fixture(false);
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 3, Some((1024, true))),
            (VIRTIO_BLK_S_OK, 1025)
        );
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, DATA).unwrap();
        assert!(
            got.iter().all(|&b| b == 0xEE),
            "the fetched window, not the image"
        );
        f.mem.write_slice(&[7u8; 512], DATA).unwrap();
        assert_eq!(
            f.submit(VIRTIO_BLK_T_OUT, 5, Some((512, false))).0,
            VIRTIO_BLK_S_OK
        );
        f.submit(VIRTIO_BLK_T_IN, 5, Some((512, true)));
        f.mem.read_slice(&mut got[..512], DATA).unwrap();
        assert!(got[..512].iter().all(|&b| b == 7));
        assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_window_that_cannot_be_fetched_fails_the_request_not_the_device() {
        let (mut f, source) = filled_fixture(true);
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 0, Some((512, true))).0,
            VIRTIO_BLK_S_IOERR
        );
        f.mem.write_slice(&[7u8; 512], DATA).unwrap();
        assert_eq!(
            f.submit(VIRTIO_BLK_T_OUT, 0, Some((512, false))).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        let image = std::fs::read(&f.path).unwrap();
        assert_eq!(image[0], 0, "the image below is untouched");
    }

    #[test]
    fn config_reports_capacity_and_features() {
        let mut f = fixture(true, BASE);
        let mut cap = [0u8; 8];
        f.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 64);
        let VirtioDevice::Block(b) = f.t.device() else {
            unreachable!()
        };
        assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    }

    #[test]
    fn read_write_flush() {
        let mut f = fixture(false, BASE | 1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 3, Some((1024, true))),
            (VIRTIO_BLK_S_OK, 1025)
        );
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, DATA).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3));
        assert!(got[512..].iter().all(|&b| b == 4));

        f.mem.write_slice(&[0xabu8; 512], DATA).unwrap();
        assert_eq!(
            f.submit(VIRTIO_BLK_T_OUT, 10, Some((512, false))),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(f.submit(VIRTIO_BLK_T_FLUSH, 0, None), (VIRTIO_BLK_S_OK, 1));
        let disk = std::fs::read(&f.path).unwrap();
        assert!(disk[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
        assert!(disk[11 * 512..12 * 512].iter().all(|&b| b == 11));
        assert!(f.t.interrupt().eventfd().read().is_ok());
    }

    #[test]
    fn large_read_spans_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 1024);
        let mem = testing::memory();
        let block = Block::new(&BlockConfig {
            path,
            read_only: true,
        })
        .unwrap();
        let mut t = MmioTransport::new(VirtioDevice::Block(block), mem.clone()).unwrap();
        let mut q = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut t, BASE, &mut [&mut q]);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let big = GuestAddress(0x100000);
        q.add_chain(
            &mem,
            &[(HDR, 16, false), (big, 512 * 1024, true), (STATUS, 1, true)],
        );
        t.handle_queue_event(0);
        assert_eq!(q.next_used(&mem).map(|u| u.1), Some(512 * 1024 + 1));
        assert_eq!(mem.read_obj::<u8>(STATUS).unwrap(), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; 512 * 1024];
        mem.read_slice(&mut got, big).unwrap();
        for (i, chunk) in got.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8), "sector {i}");
        }
    }

    #[test]
    fn errors_have_correct_status() {
        let mut f = fixture(false, BASE);
        // Past the end of the disk.
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 63, Some((1024, true))).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            f.submit(VIRTIO_BLK_T_OUT, 64, Some((512, false))).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, u64::MAX, Some((512, true))).0,
            VIRTIO_BLK_S_IOERR
        );
        // Not a whole number of sectors.
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 0, Some((100, true))).0,
            VIRTIO_BLK_S_IOERR
        );
        // Unknown request type.
        assert_eq!(f.submit(42, 0, None), (VIRTIO_BLK_S_UNSUPP, 1));
    }

    #[test]
    fn read_only_rejects_writes() {
        let mut f = fixture(true, BASE | 1 << VIRTIO_BLK_F_RO);
        f.mem.write_slice(&[0xcdu8; 512], DATA).unwrap();
        assert_eq!(
            f.submit(VIRTIO_BLK_T_OUT, 0, Some((512, false))).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(f.submit(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
        let disk = std::fs::read(&f.path).unwrap();
        assert!(disk[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn get_id_returns_serial() {
        let mut f = fixture(false, BASE);
        let (status, len) = f.submit(VIRTIO_BLK_T_GET_ID, 0, Some((ID_BYTES as u32, true)));
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, ID_BYTES as u32 + 1));
        let mut id = [0u8; ID_BYTES];
        f.mem.read_slice(&mut id, DATA).unwrap();
        let VirtioDevice::Block(b) = f.t.device() else {
            unreachable!()
        };
        let expected = b.save().disk_id;
        assert!(!expected.is_empty());
        assert_eq!(&id[..expected.len()], &expected[..]);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mut f = fixture(false, BASE | 1 << VIRTIO_RING_F_EVENT_IDX);
        // Ask for an interrupt only after the second used entry (index 1).
        f.q.set_used_event(&f.mem, 1);
        f.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(
            f.t.interrupt().eventfd().read().is_err(),
            "first completion not signalled"
        );
        f.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(
            f.t.interrupt().eventfd().read().is_ok(),
            "second completion signalled"
        );
    }

    #[test]
    fn state_round_trip() {
        let f = fixture(true, BASE);
        let VirtioDevice::Block(b) = f.t.device() else {
            unreachable!()
        };
        let saved = b.save();
        assert_eq!(saved.capacity_sectors, 64);
        let json = serde_json::to_string(&VirtioDeviceState::Block(saved.clone())).unwrap();
        let VirtioDeviceState::Block(parsed) = serde_json::from_str(&json).unwrap() else {
            panic!("wrong variant");
        };
        let cfg = BlockConfig {
            path: f.path.clone(),
            read_only: true,
        };
        assert_eq!(Block::restore(&cfg, &parsed).unwrap().save(), saved);

        let writable = BlockConfig {
            path: f.path.clone(),
            read_only: false,
        };
        assert!(matches!(
            Block::restore(&writable, &parsed),
            Err(BlockError::ReadOnlyMismatch { .. })
        ));
        std::fs::write(&f.path, vec![0u8; 512]).unwrap();
        assert!(matches!(
            Block::restore(&cfg, &parsed),
            Err(BlockError::CapacityMismatch {
                saved: 64,
                actual: 1
            })
        ));
    }

    #[test]
    fn quiesce_serves_pending_notifications_and_restore_kicks() {
        let mut f = fixture(false, BASE);
        header(&f.mem, VIRTIO_BLK_T_IN, 5);
        let head = f.q.add_chain(
            &f.mem,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        // The guest notified, but the event loop paused before serving it.
        f.t.queue_evts()[0].write(1).unwrap();
        f.t.quiesce().unwrap();
        assert_eq!(f.q.next_used(&f.mem), Some((head, 513)));
        assert_eq!(f.mem.read_obj::<u8>(STATUS).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(f.mem.read_obj::<u8>(DATA).unwrap(), 5);

        // A restored transport re-raises its pending interrupt and queues.
        let saved = f.t.save();
        assert_ne!(saved.interrupt_status, 0);
        let VirtioDeviceState::Block(bs) = &saved.device else {
            unreachable!()
        };
        let cfg = BlockConfig {
            path: f.path.clone(),
            read_only: false,
        };
        let dev = VirtioDevice::Block(Block::restore(&cfg, bs).unwrap());
        let restored = MmioTransport::restore(dev, f.mem.clone(), &saved).unwrap();
        assert!(
            restored.interrupt().eventfd().read().is_err(),
            "quiet at first"
        );
        restored.kick_after_restore().unwrap();
        assert_eq!(restored.interrupt().eventfd().read().unwrap(), 1);
        assert_eq!(restored.queue_evts()[0].read().unwrap(), 1);
    }

    #[test]
    fn backing_is_replaced_in_place() {
        let mut f = fixture(false, BASE);
        let other = f.path.with_file_name("other.img");
        std::fs::write(&other, vec![0x5au8; 64 * 512]).unwrap();
        let VirtioDevice::Block(b) = f.t.device_mut() else {
            unreachable!()
        };
        let cfg = |path: &std::path::Path, read_only| BlockConfig {
            path: path.to_path_buf(),
            read_only,
        };
        assert!(matches!(
            b.replace_backing(&cfg(&other, true)),
            Err(BlockError::ReadOnlyMismatch { .. })
        ));
        let small = f.path.with_file_name("small.img");
        std::fs::write(&small, vec![0u8; 512]).unwrap();
        assert!(matches!(
            b.replace_backing(&cfg(&small, false)),
            Err(BlockError::CapacityMismatch {
                saved: 64,
                actual: 1
            })
        ));
        b.replace_backing(&cfg(&other, false)).unwrap();
        assert_eq!(
            f.submit(VIRTIO_BLK_T_IN, 7, Some((512, true))),
            (VIRTIO_BLK_S_OK, 513)
        );
        assert_eq!(f.mem.read_obj::<u8>(DATA).unwrap(), 0x5a);
    }
}
