//! The CLI's errors on bad input: a stable code, a hint, a non-zero exit, no panic,
//! and nothing left behind. These run on any machine; the ones that need installed
//! assets or a particular KVM say why when they skip.

use std::path::Path;
use std::process::{Command, Output};

fn ferry(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_DATA_DIR", data)
        .output()
        .expect("run ferry")
}

fn assert_code(out: &Output, code: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(
        stderr.contains(&format!("error[{code}]")),
        "expected {code}, got: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

fn vms_left(data: &Path) -> usize {
    std::fs::read_dir(data.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn unknown_vm_and_bad_names_are_clear_errors() {
    let data = tempfile::tempdir().unwrap();
    assert_code(
        &ferry(data.path(), &["exec", "ghost", "--", "true"]),
        "VM_NOT_FOUND",
    );
    assert_code(&ferry(data.path(), &["stop", "ghost"]), "VM_NOT_FOUND");
    assert_code(&ferry(data.path(), &["logs", "ghost"]), "VM_NOT_FOUND");
    assert_code(
        &ferry(data.path(), &["exec", "../etc", "--", "true"]),
        "VM_NAME_INVALID",
    );
    assert_code(
        &ferry(data.path(), &["cp", "/tmp/a", "/tmp/b"]),
        "CP_BAD_ARGUMENTS",
    );
}

#[test]
fn missing_image_and_kernel_fail_before_anything_is_created() {
    let data = tempfile::tempdir().unwrap();
    let out = ferry(data.path(), &["boot", "/no/such/image.tar", "--", "true"]);
    assert_code(&out, "IMAGE_NOT_FOUND");
    let not_rootfs = data.path().join("junk.tar");
    std::fs::write(&not_rootfs, b"not a tarball").unwrap();
    let out = ferry(
        data.path(),
        &["boot", not_rootfs.to_str().unwrap(), "--", "true"],
    );
    assert_code(&out, "IMAGE_NOT_ROOTFS");
    assert_eq!(vms_left(data.path()), 0);
}

#[test]
fn json_errors_are_machine_readable() {
    let data = tempfile::tempdir().unwrap();
    let out = ferry(data.path(), &["--json", "stop", "ghost"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "VM_NOT_FOUND");
    assert!(v["error"]["hint"].is_string());
}

/// On a host whose /dev/kvm is the PVM hypervisor, booting must fail at once with
/// KVM_PVM_UNSUPPORTED and a hint, and leave no VM behind.
#[test]
fn pvm_host_is_refused_with_a_hint() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host's KVM is not PVM");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let out = ferry(data.path(), &["boot", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if [
        "ASSETS_NOT_INSTALLED",
        "BOOT_AGENT_NOT_FOUND",
        "VMM_NOT_FOUND",
    ]
    .iter()
    .any(|c| stderr.contains(c))
    {
        eprintln!(
            "skipped: run `ferry install` and build ferry-agent and ferry-vmm first ({stderr})"
        );
        return;
    }
    assert_code(&out, "KVM_PVM_UNSUPPORTED");
    assert!(stderr.contains("test host"), "hint missing: {stderr}");
    assert_eq!(vms_left(data.path()), 0);
}
