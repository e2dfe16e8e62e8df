//! virtio-fs: shares one host directory with the guest, served in the VMM
//! process by a passthrough FUSE server ([`server::Server`]).
//!
//! Two queues: queue 0 ("hiprio") carries FORGET and INTERRUPT requests,
//! which get no reply; queue 1 carries every other request. No DAX window is
//! offered (the transport reports no shared memory regions), so file data
//! always travels through the queues.
//!
//! The guest mounts it with `mount -t virtiofs TAG DIR`. Containment of the
//! guest inside the shared directory is described in [`resolve`].

pub mod protocol;
pub mod resolve;
pub mod server;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};

use super::{QueueContext, VirtioError, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;
use server::{Server, ServerState};

/// Virtio device id of file system devices.
pub const DEVICE_TYPE: u32 = 26;
/// Longest mount tag (bytes) the configuration space holds.
pub const TAG_MAX: usize = 36;
/// Number of queues: hiprio plus one request queue.
pub const NUM_QUEUES: usize = 2;
/// Largest request read from the guest: a maximal WRITE plus headers.
const MAX_REQUEST: usize = server::MAX_IO as usize + 4096;

/// What to share, as given in the VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    /// Mount tag the guest uses (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// Host directory shared.
    pub shared_dir: PathBuf,
    /// Refuse every change with `EROFS`.
    #[serde(default)]
    pub read_only: bool,
}

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than [`TAG_MAX`] bytes.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    BadTag(String),
    /// The shared directory cannot be opened.
    #[error("cannot open shared directory {path}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The saved state was made for another mount tag.
    #[error("saved virtio-fs state is for tag {saved:?}, the device has tag {actual:?}")]
    TagMismatch {
        /// Tag in the state.
        saved: String,
        /// Tag of the device.
        actual: String,
    },
}

/// Serializable state of a [`Fs`] device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// Mount tag.
    pub tag: String,
    /// Read-only share.
    pub read_only: bool,
    /// The FUSE server's nodes and handles.
    pub server: ServerState,
}

/// The virtio-fs device.
pub struct Fs {
    config: FsConfig,
    server: Server,
}

fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > TAG_MAX {
        return Err(FsError::BadTag(tag.to_string()));
    }
    Ok(())
}

impl Fs {
    /// Shares `config.shared_dir`.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        check_tag(&config.tag)?;
        let server =
            Server::new(&config.shared_dir, config.read_only).map_err(|source| FsError::Open {
                path: config.shared_dir.clone(),
                source,
            })?;
        Ok(Self {
            config: config.clone(),
            server,
        })
    }

    /// Rebuilds the device from saved state over `config.shared_dir` (which
    /// may be another directory than at the save: every node is looked up
    /// again by name).
    pub fn restore(config: &FsConfig, state: &FsState) -> Result<Self, FsError> {
        check_tag(&config.tag)?;
        if state.tag != config.tag {
            return Err(FsError::TagMismatch {
                saved: state.tag.clone(),
                actual: config.tag.clone(),
            });
        }
        let server = Server::restore(&config.shared_dir, config.read_only, &state.server).map_err(
            |source| FsError::Open {
                path: config.shared_dir.clone(),
                source,
            },
        )?;
        Ok(Self {
            config: config.clone(),
            server,
        })
    }

    /// Captures the device state.
    pub fn save(&self) -> FsState {
        FsState {
            tag: self.config.tag.clone(),
            read_only: self.config.read_only,
            server: self.server.save(),
        }
    }

    /// The configuration the device was made from.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub(crate) fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    /// `struct virtio_fs_config`: the tag, NUL-padded, and the number of
    /// request queues.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_MAX + 4];
        c[..self.config.tag.len()].copy_from_slice(self.config.tag.as_bytes());
        c[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        c
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
                let len = self.serve(mem, chain);
                queue.add_used(mem, head, len)?;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        ctx.notify(idx)
    }

    /// Serves one request chain; returns the bytes written to the guest.
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                tracing::warn!("virtio-fs: descriptor chain outside guest memory");
                return 0;
            }
        };
        let len = reader.available_bytes().min(MAX_REQUEST);
        let mut req = vec![0u8; len];
        if reader.read_exact(&mut req).is_err() {
            tracing::warn!("virtio-fs: unreadable request");
            return 0;
        }
        let Some(reply) = self.server.handle(&req) else {
            return 0;
        };
        let n = reply.len().min(writer.available_bytes());
        if n < reply.len() {
            tracing::warn!("virtio-fs: reply of {} bytes truncated to {n}", reply.len());
        }
        match writer.write_all(&reply[..n]) {
            Ok(()) => n as u32,
            Err(e) => {
                tracing::warn!("virtio-fs: cannot write reply: {e}");
                0
            }
        }
    }
}
