//! The CLI's errors on bad input: a stable code, a hint, exit status 125, no
//! panic, and nothing left behind. These run on any machine; the ones that need installed
//! assets or a particular KVM say why when they skip.

use std::path::Path;
use std::process::{Command, Output};

fn ferry(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_DATA_DIR", data)
        .env_remove("NO_COLOR")
        .output()
        .expect("run ferry")
}

/// The one JSON object an error prints on stderr under `--json`.
fn json_error(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stderr).unwrap();
    for key in ["code", "message", "hint", "retryable"] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    assert!(v["retryable"].is_boolean());
    v
}

fn assert_code(out: &Output, code: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "ferry's own failure: {stderr}"
    );
    assert!(
        stderr.contains(&format!("error[{code}]")),
        "expected {code}, got: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    // Not a terminal: no colour.
    assert!(!stderr.contains('\x1b'), "styled: {stderr}");
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
    assert!(out.stdout.is_empty());
    let v = json_error(&out);
    assert_eq!(v["code"], "VM_NOT_FOUND");
    assert!(v["hint"].is_string());
    assert_eq!(v["retryable"], false);
    // After the subcommand too.
    let v = json_error(&ferry(data.path(), &["exec", "--json", "ghost", "true"]));
    assert_eq!(v["code"], "VM_NOT_FOUND");
}

#[test]
fn usage_errors_have_a_code_and_exit_125() {
    let data = tempfile::tempdir().unwrap();
    assert_code(
        &ferry(data.path(), &["stop", "--bogus", "x"]),
        "USAGE_INVALID",
    );
    assert_code(&ferry(data.path(), &["exec", "web"]), "USAGE_INVALID");
    assert_code(&ferry(data.path(), &["no-such-command"]), "USAGE_INVALID");
    let v = json_error(&ferry(data.path(), &["--json", "exec", "web"]));
    assert_eq!(v["code"], "USAGE_INVALID");
    assert!(v["hint"].as_str().unwrap().contains("Usage:"), "{v}");
    let v = json_error(&ferry(
        data.path(),
        &["fork", "web", "--count", "2", "--new-name", "a", "--json"],
    ));
    assert_eq!(v["code"], "USAGE_INVALID");
}

#[test]
fn help_and_version_print_and_succeed() {
    let data = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["exec", "--help"],
        &["--version"],
        &["--json", "--help"],
    ] {
        let out = ferry(data.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
    let out = ferry(data.path(), &["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["exec", "ps", "pause", "resume", "kill", "completions"] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
}

#[test]
fn completion_scripts_are_printed() {
    let data = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = ferry(data.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ferry"), "{shell}");
        assert!(text.contains("snapshot"), "{shell}: subcommands");
    }
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
        // A workspace build's agent is dynamic; `cargo xtask install` makes a static one.
        "AGENT_NOT_STATIC",
        "VMM_NOT_FOUND",
    ]
    .iter()
    .any(|c| stderr.contains(c))
    {
        eprintln!(
            "skipped: run `ferry install` and build a static ferry-agent and ferry-vmm first ({stderr})"
        );
        return;
    }
    assert_code(&out, "KVM_PVM_UNSUPPORTED");
    assert!(stderr.contains("test host"), "hint missing: {stderr}");
    assert_eq!(vms_left(data.path()), 0);
}
