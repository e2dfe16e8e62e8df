//! What the library promises without a VM: handles are thread-safe, runtimes
//! are independent, a missing VMM is a clear error naming what was tried.

use ferry::{BootOptions, Config, Runtime, Vm};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn handles_are_send_and_sync() {
    assert_send_sync::<Runtime>();
    assert_send_sync::<Vm>();
    assert_send_sync::<ferry::Error>();
    assert_send_sync::<ferry::PortHandle>();
}

/// A VM record made directly in a runtime's data directory, as a boot would.
fn plant_vm(config: &Config, name: &str) {
    let rec = ferry_runtime::vm::VmRecord {
        name: name.into(),
        id: "0123456789abcdef".into(),
        created_at: 0,
        cpus: 1,
        memory_mib: 256,
        kernel: "/nonexistent/vmlinux".into(),
        image: "base".into(),
        command: None,
        token: "00".repeat(32),
        ephemeral: false,
        mounts: Vec::new(),
        ports: Vec::new(),
        net: None,
        exec_defaults: None,
    };
    let (_, owner) = ferry_runtime::vm::Registry::new(&config.dirs)
        .create(&rec)
        .expect("create record");
    // A complete VM, no longer this process's alone.
    owner.release();
}

#[test]
fn two_runtimes_with_different_dirs_do_not_see_each_other() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = Config::with_dirs(a_dir.path().join("data"), a_dir.path().join("cache"));
    let b = Config::with_dirs(b_dir.path().join("data"), b_dir.path().join("cache"));
    plant_vm(&a, "only-in-a");
    let (ra, rb) = (Runtime::new(a).unwrap(), Runtime::new(b).unwrap());
    assert_eq!(
        ra.list()
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["only-in-a"]
    );
    assert!(rb.list().is_empty());
    assert_eq!(rb.open("only-in-a").unwrap_err().code(), "VM_NOT_FOUND");
    assert_eq!(ra.open("only-in-a").unwrap().name(), "only-in-a");
}

#[test]
fn a_boot_without_a_vmm_names_every_place_tried() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/ferry-vmm");
    let config = Config {
        vmm: Some(missing.clone()),
        // Assets are checked first: give it files that exist.
        kernel: Some(dir.path().join("vmlinux")),
        rootfs: Some(dir.path().join("rootfs.ext4")),
        agent: Some("/bin/sh".into()),
        ..Config::with_dirs(dir.path().join("data"), dir.path().join("cache"))
    };
    std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
    // An ext4 superblock magic at 1080 makes the file an image.
    let mut ext4 = vec![0u8; 2048];
    ext4[1080] = 0x53;
    ext4[1081] = 0xef;
    std::fs::write(dir.path().join("rootfs.ext4"), ext4).unwrap();
    let cold = || BootOptions {
        cold: true,
        ..BootOptions::default()
    };
    let rt = Runtime::new(config.clone()).unwrap();
    // /bin/sh is dynamically linked: no guest could start it as its init.
    let err = rt.boot(cold()).unwrap_err();
    assert_eq!(err.code(), "AGENT_NOT_STATIC", "{err}");
    assert!(err.hint().is_some());

    // A static agent (an ELF header without an interpreter is enough to
    // pass the check), but no VMM where the configuration says.
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    elf[64..68].copy_from_slice(&1u32.to_le_bytes());
    let agent = dir.path().join("ferry-agent");
    std::fs::write(&agent, elf).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = Runtime::new(Config {
        agent: Some(agent),
        ..config
    })
    .unwrap();
    let err = rt.boot(cold()).unwrap_err();
    assert_eq!(err.code(), "VMM_NOT_FOUND", "{err}");
    assert!(err.message().contains(&missing.display().to_string()));
    assert!(rt.list().is_empty(), "nothing was created");
}

#[test]
fn listing_and_describing_a_vm_never_shows_its_agent_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::with_dirs(dir.path().join("data"), dir.path().join("cache"));
    plant_vm(&config, "secret");
    let rt = Runtime::new(config).unwrap();
    let token = "00".repeat(32);
    let vm = rt.open("secret").unwrap();
    // What `ferry ls --json` and `ferry inspect NAME --json` print, and
    // what a debug log line of the handle would.
    let shown = [
        serde_json::to_string(&rt.list()).unwrap(),
        serde_json::to_string(&vm.info()).unwrap(),
        format!("{vm:?}"),
        format!("{:?}", rt.list()),
    ];
    for text in shown {
        assert!(text.contains("secret"), "{text}");
        assert!(!text.contains(&token), "the token shows in {text}");
    }
}

#[test]
fn gc_removes_leftovers_and_keeps_vms() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::with_dirs(dir.path().join("data"), dir.path().join("cache"));
    plant_vm(&config, "kept");
    let rt = Runtime::new(config.clone()).unwrap();
    assert_eq!(rt.gc().unwrap().total().count, 0);
    // A staging file of a process that is gone (no pid is this large).
    let left = config.dirs.vms().join("kept/.root.img.tmp-4194399");
    std::fs::write(&left, b"half a disk").unwrap();
    let report = rt.sweep();
    assert_eq!(report.of(ferry::GcKind::Staging).count, 1);
    assert!(!left.exists());
    assert_eq!(rt.list().len(), 1);
}
