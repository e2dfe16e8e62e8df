//! Freezes a VM into a bundle file and thaws it: the program inside carries on.
//!
//! `cargo run -p ferry --example snapshot_restore -- /tmp/demo.snap`

use ferry::{
    BootOptions, Config, ExecOptions, RestoreOptions, RestoreSource, Runtime, SnapshotOptions,
};

fn main() -> Result<(), ferry::Error> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/ferry-example.snap".into());
    let rt = Runtime::new(Config::default())?;
    let vm = rt.boot(BootOptions::default())?;
    // State that lives only in guest memory: a tmpfs file.
    vm.exec(
        &["sh", "-c", "echo 41 > /run/count"],
        &ExecOptions::default(),
    )?;
    let report = vm.snapshot_to_path(path.as_ref(), &SnapshotOptions::default())?;
    println!(
        "bundle: {} bytes, VM paused {} ms",
        report.bytes, report.paused_ms
    );
    // The VM now lives in the bundle; thaw it (here, or on another host).
    let vm = rt.restore(RestoreSource::Path(path.into()), RestoreOptions::default())?;
    let out = vm.exec(
        &["sh", "-c", "echo $(( $(cat /run/count) + 1 ))"],
        &ExecOptions::default(),
    )?;
    print!(
        "after the restore: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    vm.remove()?;
    Ok(())
}
