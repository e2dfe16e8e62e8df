//! The contract between a runtime and a `ferry-vmm` process: what the VMM
//! process reads from a VM's state directory to build the VM.
//!
//! The runtime writes the VM's record (`vm.json`) and a [`Plan`]
//! (`plan.json`), then starts `ferry-vmm DIR`; the VMM process answers on the
//! control socket ([`crate::vm::control`]) and leaves `pid.json` and
//! `exit.json` ([`crate::vm::record`]). Nothing else passes between them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Dirs;

/// What ferry adds to the guest kernel command line: quiet boot, no waiting.
/// Not `init_on_free=1`: it zeroes all of guest RAM at boot (every page
/// becomes resident on the host) and saved nothing once memory is compressed.
/// `tsc=reliable`: kvmclock is the guest's clock; its watchdog need not
/// check the TSC against it. After a restore the two restart within a
/// fraction of a millisecond of each other (see the VMM's clock restore),
/// which the watchdog would still report as an unstable TSC, costing the
/// guest its work and log lines on every restore.
pub const GUEST_CMDLINE: &str = "quiet loglevel=3 tsc=reliable rdinit=/init";

/// File name of the plan in a VM's state directory.
pub const PLAN_FILE: &str = "plan.json";

/// How the VMM process builds its VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Launch {
    /// Boot the recorded kernel with this initramfs (the agent and its config).
    Boot {
        /// The initramfs.
        initramfs: PathBuf,
    },
    /// Restore a bundle, mapping guest memory from it.
    Restore {
        /// The bundle.
        bundle: PathBuf,
        /// The bundles an incremental one stands on, oldest first (checked
        /// by the runtime); their memory is laid down before the bundle's.
        #[serde(default)]
        parents: Vec<PathBuf>,
        /// Guest memory from a store instead of the bundle (which then holds
        /// none), fetched by the VMM on first touch.
        #[serde(default)]
        store: Option<crate::store::memory::StoreMemory>,
    },
    /// Continue a fork: state captured by the source VMM, memory layers whose
    /// descriptors this process inherited from it.
    Fork {
        /// The captured machine state.
        state: Box<ferry_vmm::VmState>,
        /// Memory layers, by inherited descriptor.
        memory: ferry_vmm::snapshot::MemoryLayersDesc,
    },
    /// Continue a migrated VM: state sent by the source, guest RAM (filled
    /// by `ferry receive`) in a memfd this process inherited.
    Incoming {
        /// The machine state.
        state: Box<ferry_vmm::VmState>,
        /// The inherited descriptor of the guest RAM memfd.
        ram_fd: i32,
    },
}

/// Everything the VMM process is told besides the VM's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The runtime's directories (fork layers, encoded disk bases).
    pub dirs: Dirs,
    /// How to build the VM.
    pub launch: Launch,
}

impl Plan {
    /// The plan file in the VM directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(PLAN_FILE)
    }
}

/// What a fork cost its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkReport {
    /// How long the source's vCPUs were stopped, in milliseconds.
    pub source_paused_ms: u64,
    /// Guest memory bytes copied (only pages dirtied since an earlier fork or restore).
    pub copied_bytes: u64,
}
