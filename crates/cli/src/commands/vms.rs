//! `ferry kill`, `ferry pause` and `ferry resume`, and what every command
//! acting on VMs by name shares: each name in turn, printed once done (with
//! `--json`, `{"ok": true, "names": [...]}` at the end).

use ferry::{Failure, Runtime};

use crate::cli::vms::Args;
use crate::output::Output;

/// What to do with each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// End it at once.
    Kill,
    /// Freeze its vCPUs.
    Pause,
    /// Let it run again.
    Resume,
}

/// Applies `action` to each VM.
pub fn run(rt: &Runtime, args: Args, action: Action, out: &Output) -> Result<(), Failure> {
    each(&args.names, out, |name| {
        let vm = rt.open_running(name)?;
        match action {
            Action::Kill => {
                vm.kill()?;
                // As `ferry stop`: a VM that lives only as long as its session goes.
                if vm.ephemeral() {
                    vm.remove()?;
                }
            }
            Action::Pause => vm.pause()?,
            Action::Resume => vm.resume()?,
        }
        Ok(())
    })
}

/// Runs `act` on each name in order, stopping at the first failure; prints
/// each name once done, or the JSON summary at the end.
pub fn each(
    names: &[String],
    out: &Output,
    mut act: impl FnMut(&str) -> Result<(), Failure>,
) -> Result<(), Failure> {
    for name in names {
        act(name)?;
        if !out.json {
            println!("{name}");
        }
    }
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "names": names }));
    }
    Ok(())
}
