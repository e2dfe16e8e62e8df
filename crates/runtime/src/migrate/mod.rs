//! Live migration: a running VM moves to another host while it keeps
//! running, frozen only for the last round of changed pages and its state.
//!
//! The source's VMM process sends ([`send`]) over a Unix socket that the
//! runtime relays to the destination (a TCP connection or a command's
//! pipes, [`link`]); `ferry receive` takes it in ([`receive`]) and starts the
//! VM from guest RAM filled while the source still ran. The protocol is in
//! [`wire`]; docs/migration.md describes it and its guarantees.

pub mod link;
pub mod options;
pub mod receive;
pub mod send;
pub mod wire;

pub use options::{MigrateError, MigrateOptions, DEFAULT_DOWNTIME_MS};

use std::io::Write;

use serde::{Deserialize, Serialize};

/// One pre-copy round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Guest pages sent.
    pub pages: u64,
    /// Bytes on the link.
    pub bytes: u64,
    /// How long it took, in milliseconds.
    pub ms: u64,
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReport {
    /// The VM's name on the destination.
    pub destination: String,
    /// From the start to the destination's confirmation, in milliseconds.
    pub total_ms: u64,
    /// From the pause here to the VM answering on the destination.
    pub downtime_ms: u64,
    /// What the last round was estimated to take before the pause.
    pub estimated_final_ms: u64,
    /// How long the destination took to start the VM once it had everything.
    pub destination_restore_ms: u64,
    /// The pre-copy rounds, the first sending all of memory.
    pub rounds: Vec<RoundReport>,
    /// Pages sent while paused.
    pub final_pages: u64,
    /// Bytes sent while paused (pages, disk clusters, state).
    pub final_bytes: u64,
    /// Bytes of the VM's own disk clusters.
    pub disk_bytes: u64,
    /// Bytes of the disk base (0 when the destination had it).
    pub disk_base_bytes: u64,
    /// Bytes on the link in all.
    pub bytes: u64,
}

impl crate::machine::Machine {
    /// Migrates this running VM live to `link`'s destination. Returns once
    /// the destination runs it; this VM is then gone. On any failure before
    /// the destination confirms, the VM runs on here where it was, and the
    /// error says so.
    pub fn migrate(
        &self,
        mut link: link::Link,
        opts: &MigrateOptions,
    ) -> Result<MigrateReport, MigrateError> {
        use std::time::Duration;
        let vm_err = |e: crate::vm::VmError| {
            use crate::error::Coded;
            MigrateError::new(e.code(), &e)
        };
        // Held until the VMM has exited: no snapshot, fork or stop meanwhile.
        let lock = self.lock().map_err(vm_err)?;
        self.require_running().map_err(vm_err)?;
        let socket = self.dir.root.join(format!(
            "migrate-{}.sock",
            crate::fsutil::random_hex(4).map_err(|e| MigrateError::new("MIGRATE_FAILED", e))?
        ));
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| MigrateError::new("MIGRATE_FAILED", format!("relay socket: {e}")))?;
        let req = crate::vm::control::ControlRequest::Migrate {
            socket: socket.clone(),
            options: opts.clone(),
        };
        // Set once the VMM has answered: a VMM that refused without ever
        // connecting does not keep the relay waiting.
        let answered = std::sync::atomic::AtomicBool::new(false);
        let resp = std::thread::scope(|scope| {
            let answered = &answered;
            let mut reader = std::mem::replace(&mut link.reader, Box::new(std::io::empty()));
            let mut writer = std::mem::replace(&mut link.writer, Box::new(std::io::sink()));
            let relay = scope.spawn(move || -> std::io::Result<()> {
                // The VMM connects at once, or not at all (a refusal ends the wait).
                listener.set_nonblocking(true)?;
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let vmm = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if std::time::Instant::now() > deadline
                                || answered.load(std::sync::atomic::Ordering::SeqCst)
                            {
                                return Err(std::io::Error::other("the VMM did not connect"));
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e),
                    }
                };
                vmm.set_nonblocking(false)?;
                let mut to_vmm = vmm.try_clone()?;
                // From the destination: ends with the link; not joined, a
                // silent link must not hold the migration's end. Either
                // direction ending ends the VMM's stream both ways, so the
                // VMM never waits on a link that is gone.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut reader, &mut to_vmm);
                    let _ = to_vmm.shutdown(std::net::Shutdown::Both);
                });
                let mut from_vmm = vmm;
                let copied = std::io::copy(&mut from_vmm, &mut writer);
                let _ = writer.flush();
                drop(writer);
                if copied.is_err() {
                    let _ = from_vmm.shutdown(std::net::Shutdown::Both);
                }
                copied.map(drop)
            });
            let resp = self.control(&req, Duration::from_secs(24 * 3600));
            answered.store(true, std::sync::atomic::Ordering::SeqCst);
            // Whatever the answer, the link has served: close it so the
            // relay's threads end.
            link.close();
            let _ = relay.join();
            resp
        });
        let _ = std::fs::remove_file(&socket);
        let resp = resp.map_err(|e| {
            use crate::error::Coded;
            let runs = match self.status() {
                crate::vm::VmStatus::Running { .. } => "it still runs here",
                crate::vm::VmStatus::Stopped { .. } => "it has stopped here",
            };
            MigrateError::new(
                e.code(),
                format!("{e}; {} was not migrated and {runs}", self.record.name),
            )
        })?;
        let report: MigrateReport = resp
            .info
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        // The VM runs on the destination now; this copy goes.
        self.wait_exited(Duration::from_secs(30));
        let _ = self.remove_locked(&lock);
        Ok(report)
    }
}

/// Opens the link to `target`, refusing TCP without a token.
pub fn open_link(target: &link::Target, opts: &MigrateOptions) -> Result<link::Link, MigrateError> {
    if matches!(target, link::Target::Tcp(_)) && opts.token.is_none() {
        return Err(MigrateError::new(
            "MIGRATE_TOKEN_MISSING",
            "a migration over TCP needs the token `ferry receive` printed",
        ));
    }
    link::Link::open(target).map_err(|e| {
        MigrateError::new(
            "MIGRATE_LINK_BROKEN",
            format!("cannot reach the destination: {e}; the VM runs on here"),
        )
    })
}
