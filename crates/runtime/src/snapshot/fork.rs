//! Forking a running (or paused) VM: the source pauses only while its state is
//! captured and its memory and disk are turned copy-on-write; each sibling runs
//! in its own VMM process, sharing both with the source. N siblings come from
//! one pause of the source.
//!
//! Not carried to a sibling, by design: host port forwards, the RNG state (the
//! guest kernel is reseeded), the wall clock (set from the host), the hostname
//! (the new name). Live vsock connections are reset; listeners survive.

use std::sync::Arc;
use std::time::Duration;

pub use crate::plan::ForkReport;

use crate::machine::{random_hex, BootError, Machine};
use crate::vm::control::ControlRequest;
use crate::vm::record::{self, VmRecord};

/// One sibling to make: its name and its own host port forwards (the
/// source's are never inherited).
#[derive(Debug, Clone, Default)]
pub struct Sibling {
    /// The new VM's name.
    pub name: String,
    /// Its host port forwards.
    pub ports: Vec<crate::forward::PortForward>,
}

/// Forks `source` into one running VM per entry of `siblings`, all from one
/// pause of the source, and returns them once every guest agent answers with
/// its clock, RNG and hostname refreshed. If any sibling fails, none is left.
///
/// The source's lock ([`Machine::lock`]) is held until its VMM has started
/// the siblings: no snapshot, stop or other fork of it runs meanwhile.
pub fn fork(
    source: &Machine,
    siblings: &[Sibling],
) -> Result<(Vec<Machine>, ForkReport), BootError> {
    let mut phases = crate::progress::Phases::from_env();
    if siblings.is_empty() {
        return Err(BootError::Prepare(
            "a fork needs at least one sibling".into(),
        ));
    }
    let mut source_lock = Some(source.lock()?);
    // Read again under the lock: whoever held it may have stopped the source.
    let src = Machine::open_running(&source.config, source.name())?;
    let registry = src.registry();
    let mut made: Vec<Machine> = Vec::new();
    let result = (|| {
        for (i, s) in siblings.iter().enumerate() {
            if siblings[..i].iter().any(|o| o.name == s.name) {
                return Err(BootError::Prepare(format!(
                    "sibling name {} given twice",
                    s.name
                )));
            }
            let mut rec: VmRecord = src.record.clone();
            rec.name = s.name.clone();
            rec.id = random_hex(8)?;
            rec.created_at = record::now();
            rec.ephemeral = false;
            rec.ports = s.ports.clone();
            // Its own MAC address.
            if let Some(net) = &mut rec.net {
                net.mac = crate::net::mac_for_id(&rec.id);
            }
            crate::forward::check_available(&rec.ports, &registry)?;
            let (dir, owner) = registry.create(&rec)?;
            made.push(Machine {
                record: rec,
                dir,
                config: Arc::clone(&src.config),
                owner: Some(Arc::new(owner)),
            });
        }
        let resp = src.control(
            &ControlRequest::Fork {
                dirs: made.iter().map(|m| m.dir.root.clone()).collect(),
            },
            Duration::from_secs(120),
        )?;
        // The source's part is done: the siblings run in processes of their own.
        drop(source_lock.take());
        let report: ForkReport = resp
            .info
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        phases.mark("source frozen and siblings started");
        for sibling in &made {
            sibling.wait_for_vmm_started()?;
        }
        phases.mark("sibling VMMs up");
        for sibling in &made {
            super::restore::Refresh::new(Some(sibling.name()))?.on_hello(sibling)?;
        }
        phases.mark("agents answer; clock, RNG and names refreshed");
        Ok(report)
    })();
    match result {
        Ok(report) => {
            for sibling in &made {
                sibling.release();
            }
            Ok((made, report))
        }
        Err(e) => {
            for m in made {
                let _ = m.remove();
            }
            Err(e)
        }
    }
}
