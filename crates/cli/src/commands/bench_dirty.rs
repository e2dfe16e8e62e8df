//! `ferry bench-dirty NAME start|take|stop`: the guest pages a running VM
//! changed (by the guest or its devices), as one JSON line, for the tests and
//! `cargo xtask bench`.

use ferry::{DirtyAction, Failure, Runtime};

use crate::cli::bench_dirty::{Action, Args};

/// Runs the action and prints `{"pages": N}`.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    let vm = rt.open_running(&args.name)?;
    let pages = vm.dirty_pages(match args.action {
        Action::Start => DirtyAction::Start,
        Action::Take => DirtyAction::Take,
        Action::Stop => DirtyAction::Stop,
    })?;
    println!("{}", serde_json::json!({ "pages": pages }));
    Ok(())
}
