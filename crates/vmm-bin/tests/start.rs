//! What `ferry-vmm` does before it has a VM: its log is private and gets
//! what it says, even when it cannot start.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_vmm_that_cannot_start_says_why_in_a_private_log() {
    let dir: PathBuf = std::env::temp_dir().join(format!("ferry-vmm-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // As the runtime opens it: created under the caller's umask, and the
    // VMM's stdout and stderr.
    let log = dir.join("vmm.log");
    let out = std::fs::File::create(&log).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_ferry-vmm"))
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("error[VMM_BAD_STATE]"), "{text}");
    assert_eq!(mode(&log), 0o600);
    assert_eq!(mode(&dir.join("exit.json")), 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}
