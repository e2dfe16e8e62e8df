//! Boots a VM, runs a command in it and streams its output as it comes.
//!
//! `cargo run -p ferry --example boot_and_stream`

use ferry::{BootOptions, ChildEvent, Config, ExecOptions, Runtime};
use std::io::Write;

fn main() -> Result<(), ferry::Error> {
    let rt = Runtime::new(Config::default())?;
    let vm = rt.boot(BootOptions {
        ephemeral: true,
        ..BootOptions::default()
    })?;
    let script = "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo done >&2";
    let mut child = vm.spawn(&["sh", "-c", script], &ExecOptions::default())?;
    let status = loop {
        match child.next_event()? {
            ChildEvent::Stdout(b) => std::io::stdout().write_all(&b).expect("stdout"),
            ChildEvent::Stderr(b) => std::io::stderr().write_all(&b).expect("stderr"),
            ChildEvent::Exit(s) => break s,
        }
    };
    println!("exited with {:?}", status.code());
    vm.remove()?;
    Ok(())
}
