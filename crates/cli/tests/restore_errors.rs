//! `ferry restore` refuses bundles it cannot run before creating anything: wrong
//! architecture, CPU features this host lacks, damage, a newer format. These
//! checks need no guest, so they run on any machine.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::{Manifest, SectionKind};

fn bundle(path: &Path, arch: &str, features: Vec<String>) {
    write_bundle(path, arch, features, false);
}

fn write_bundle(path: &Path, arch: &str, features: Vec<String>, thin: bool) {
    let (guard, mut w) = FileBundle::create(path).unwrap();
    // A record that agrees with the manifest (64 MiB of RAM), so that the
    // check under test is the one that refuses.
    let record = br#"{"name":"frozen","id":"0123","created_at":0,"cpus":1,"memory_mib":64,"kernel":"/vmlinux","image":"counter.tar.gz","token":"00"}"#;
    w.section_bytes(SectionKind::Record, record).unwrap();
    w.section_bytes(SectionKind::VmState, b"{}").unwrap();
    w.section(SectionKind::MemoryData, |s| s.write_all(&[1u8; 4096]))
        .unwrap();
    let m = Manifest {
        format_version: 0,
        ferry_version: "test".into(),
        created_at: 0,
        arch: arch.into(),
        cpu: CpuInfo {
            vendor: "AuthenticAMD".into(),
            features,
        },
        vm_name: "frozen".into(),
        cpus: 1,
        memory_mib: 64,
        memory_regions: vec![MemoryRegion {
            guest_addr: 0,
            size: 64 << 20,
        }],
        memory_bytes: 4096,
        memory_stored_bytes: 4096,
        memory_prefetch_frames: Vec::new(),
        devices: vec![],
        disk: DiskInfo {
            size: 0,
            cluster_size: 65536,
            base_id: "0".repeat(64),
            base_clusters: 0,
            top_clusters: 0,
            thin,
            base_image: Some("counter.tar.gz".into()),
            base_cache_path: None,
        },
        sections: vec![],
        parent: None,
    };
    let out = w.finish(m).unwrap();
    guard.commit(out).unwrap();
}

fn restore(data: &Path, bundle: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--detach"])
        .arg(bundle)
        .env("FERRY_DATA_DIR", data)
        .env("FERRY_CACHE_DIR", data.join("cache"))
        .output()
        .unwrap()
}

fn assert_refused(out: &Output, code: &str, data: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("error[{code}]")),
        "want {code}: {err}"
    );
    assert!(err.contains("hint:"), "no hint: {err}");
    let vms = std::fs::read_dir(data.join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(vms, 0, "a refused restore must create nothing");
}

#[test]
fn another_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("arm.snap");
    bundle(&b, "aarch64", vec![]);
    assert_refused(
        &restore(tmp.path(), &b),
        "RESTORE_ARCH_MISMATCH",
        tmp.path(),
    );
}

#[test]
fn missing_cpu_features_are_listed() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm to ask for this host's CPU features");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("cpu.snap");
    bundle(
        &b,
        std::env::consts::ARCH,
        vec!["avx512vp2intersect-from-the-future".into()],
    );
    let out = restore(tmp.path(), &b);
    assert_refused(&out, "SNAPSHOT_CPU_INCOMPATIBLE", tmp.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("avx512vp2intersect-from-the-future"));
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("ok.snap");
    bundle(&b, "aarch64", vec![]);
    let bytes = std::fs::read(&b).unwrap();
    let cut = tmp.path().join("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert_refused(&restore(tmp.path(), &cut), "BUNDLE_TRUNCATED", tmp.path());
    let foreign = tmp.path().join("notes.txt");
    std::fs::write(&foreign, b"definitely not a bundle, just some text").unwrap();
    assert_refused(
        &restore(tmp.path(), &foreign),
        "BUNDLE_NOT_A_BUNDLE",
        tmp.path(),
    );
}

#[test]
fn a_thin_bundle_without_its_base_here_is_refused() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm to ask for this host's CPU features");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("thin.snap");
    write_bundle(&b, std::env::consts::ARCH, vec![], true);
    let out = restore(tmp.path(), &b);
    assert_refused(&out, "RESTORE_BASE_MISSING", tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("counter.tar.gz"), "names the image: {err}");
    assert!(err.contains("full bundle"), "points to full bundles: {err}");
    // Streamed in: the received copy is kept for a retry, and named.
    let streamed = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--detach", "-"])
        .stdin(std::fs::File::open(&b).unwrap())
        .env("FERRY_DATA_DIR", tmp.path())
        .env("FERRY_CACHE_DIR", tmp.path().join("cache"))
        .output()
        .unwrap();
    assert_refused(&streamed, "RESTORE_BASE_MISSING", tmp.path());
    let kept: Vec<_> = std::fs::read_dir(tmp.path().join("incoming"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1, "the received bundle is kept: {kept:?}");
    let err = String::from_utf8_lossy(&streamed.stderr);
    assert!(
        err.contains(&kept[0].display().to_string()),
        "the error names the kept bundle: {err}"
    );
    assert_eq!(
        std::fs::read(&kept[0]).unwrap(),
        std::fs::read(&b).unwrap(),
        "the kept bundle is what was sent"
    );
}
