//! `ferry logs`: the guest's serial console.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use ferry::{Failure, Runtime, Vm, VmStatus};

/// Arguments of `ferry logs`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    pub follow: bool,
}

/// Prints the console log.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    let machine = rt.open(&args.name)?;
    print_console(&machine, args.follow);
    Ok(())
}

/// Follows a VM's console until it stops.
pub fn follow(machine: &Vm) {
    print_console(machine, true);
}

fn print_console(machine: &Vm, follow: bool) {
    let path = machine.dir().join("console.log");
    let mut pos = 0u64;
    let mut out = std::io::stdout();
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            let _ = f.seek(SeekFrom::Start(pos));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            pos += buf.len() as u64;
            let _ = out.write_all(&buf);
            let _ = out.flush();
        }
        if !follow || !matches!(machine.status(), VmStatus::Running { .. }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
