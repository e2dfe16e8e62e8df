//! Forking a running VM: the source pauses only while its state is captured and
//! its memory and disk are turned copy-on-write; the sibling runs in its own VMM
//! process, sharing both with the source.
//!
//! Not carried to the sibling, by design: host port forwards, the RNG state (the
//! guest kernel is reseeded), the wall clock (set from the host), the hostname
//! (the new name). Live vsock connections are reset; listeners survive.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::machine::{BootError, Machine};
use crate::vm::control::{self, ControlRequest};
use crate::vm::record::{self, VmRecord};
use crate::vm::Registry;

/// Written into the sibling's directory by the source VMM before it starts the
/// sibling's VMM process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkPlan {
    /// The captured machine state.
    pub state: ferry_vmm::VmState,
    /// Memory layers; their descriptors are inherited by the sibling's process.
    pub memory: ferry_vmm::snapshot::MemoryLayersDesc,
}

/// File name of the plan in the sibling's directory.
pub const PLAN_FILE: &str = "fork.json";

/// What a fork cost the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ForkReport {
    /// How long the source's vCPUs were stopped, in milliseconds.
    pub source_paused_ms: u64,
    /// Guest memory bytes copied (only pages dirtied since an earlier fork or restore).
    pub copied_bytes: u64,
}

/// Where frozen disk layers shared by forks live.
pub fn layers_dir() -> PathBuf {
    crate::paths::data_dir().join("layers")
}

/// Forks `source` into a new running VM named `new_name`, with its own host port
/// forwards `ports` (the source's are never inherited).
pub fn fork(
    source: &str,
    new_name: &str,
    ports: Vec<crate::forward::PortForward>,
) -> Result<(Machine, ForkReport), BootError> {
    let mut phases = crate::progress::Phases::from_env();
    let src = Machine::open_running(source)?;
    let mut rec: VmRecord = src.record.clone();
    rec.name = new_name.to_string();
    rec.id = crate::machine::random_hex(8);
    rec.created_at = record::now();
    rec.ephemeral = false;
    // The source keeps its host ports; a fork gets only the ones asked for, and
    // its own MAC address.
    rec.ports = ports;
    if let Some(net) = &mut rec.net {
        net.mac = crate::net::mac_for_id(&rec.id);
    }
    let registry = Registry::default();
    crate::forward::check_available(&rec.ports, &registry)?;
    let dir = registry.create(&rec)?;
    let sibling = Machine { record: rec, dir };
    let result = (|| {
        let resp = control::request(
            &src.dir.control(),
            &ControlRequest::Fork {
                dir: sibling.dir.root.clone(),
            },
            Duration::from_secs(120),
        )?;
        if !resp.ok {
            return Err(BootError::Vmm {
                code: resp.code.unwrap_or_else(|| "FORK_FAILED".into()),
                message: resp.message.unwrap_or_default(),
                hint: None,
            });
        }
        let report: ForkReport = resp
            .info
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        phases.mark("source frozen and sibling started");
        sibling.wait_for_vmm_started()?;
        phases.mark("sibling VMM up");
        let session = sibling.wait_for_agent()?;
        phases.mark("agent answers");
        super::restore::refresh_guest(&session, Some(new_name));
        phases.mark("clock, RNG and name");
        Ok(report)
    })();
    match result {
        Ok(report) => Ok((sibling, report)),
        Err(e) => {
            let _ = sibling.remove();
            Err(e)
        }
    }
}
