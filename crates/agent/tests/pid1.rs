//! The PID 1 path, run on the host inside fresh pid, mount, UTS, IPC and
//! network namespaces: a tmpfs "initramfs" holding the agent as /init and
//! its config, and an ext4 root disk on a loop device. It checks the real
//! boot sequence (early mounts, config, root mount, switch_root, system
//! mounts, hostname, main process, power-off) short of a real kernel boot.
//!
//! Needs root, util-linux `unshare`/`losetup`, `mkfs.ext4` and loop
//! devices; skipped otherwise. Everything it mounts lives in its own mount
//! namespace, and `reboot()` in a child pid namespace only ends that
//! namespace.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_protocol::{console, AgentConfig, ExitKind, MainCommand, Token};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-agent");

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies a binary and the shared libraries it needs (test builds are
/// dynamically linked) into `root`.
fn install_binary(root: &Path, bin: &str, at: &str) {
    let dst = root.join(at.trim_start_matches('/'));
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(bin, &dst).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    for word in String::from_utf8(ldd.stdout).unwrap().split_whitespace() {
        if word.starts_with('/') && Path::new(word).exists() {
            let d = root.join(word.trim_start_matches('/'));
            fs::create_dir_all(d.parent().unwrap()).unwrap();
            fs::copy(fs::canonicalize(word).unwrap(), &d).unwrap();
        }
    }
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn root_is_writable() -> bool {
    let probe = std::env::temp_dir().join(format!("ferry-pid1-probe-{}", std::process::id()));
    let ok = fs::write(&probe, "x").is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

#[test]
fn boots_as_pid1_switches_root_and_powers_off_when_main_exits() {
    let ready = nix::unistd::getuid().is_root()
        && [
            "unshare",
            "losetup",
            "mkfs.ext4",
            "debugfs",
            "chroot",
            "ldd",
        ]
        .iter()
        .all(|t| tool(t))
        && Path::new("/dev/loop-control").exists();
    if !ready {
        eprintln!("skipped: needs root, unshare, losetup, mkfs.ext4 and loop devices");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();

    // The root disk: only the new root has /bin/agent, so the main process
    // can only start if switch_root worked.
    let src = tmp.path().join("rootsrc");
    for d in ["etc", "tmp", "run", "dev", "proc", "sys", "root"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(src.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(src.join("etc/hosts"), "127.0.0.1\tlocalhost\n").unwrap();
    install_binary(&src, BIN, "/bin/agent");
    install_binary(&src, "/bin/sh", "/bin/sh");
    let img = tmp.path().join("root.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let losetup = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    if !losetup.status.success() {
        eprintln!(
            "skipped: no free loop device ({})",
            String::from_utf8_lossy(&losetup.stderr).trim()
        );
        return;
    }
    let dev = Loop(
        String::from_utf8(losetup.stdout)
            .unwrap()
            .trim()
            .to_string(),
    );

    // The "initramfs".
    let stage = tmp.path().join("stage");
    for d in ["dev", "proc", "sys", "newroot", "ferry"] {
        fs::create_dir_all(stage.join(d)).unwrap();
    }
    install_binary(&stage, BIN, "/init");
    let mut config = AgentConfig::new(&Token::generate().unwrap());
    config.hostname = "pid1-test".into();
    config.root.device = dev.0.clone();
    // Records what the guest looks like on the root disk, then exits 7.
    // Only the new root has /bin/sh, so it starts only if switch_root worked.
    let script = r#"{
        read h < /proc/sys/kernel/hostname; echo "hostname=$h"
        read f < /sys/class/net/lo/flags; echo "lo=$f"
        echo "pwd=$(pwd) who=$WHO"
        while read l; do echo "hosts: $l"; done < /etc/hosts
        while read a b c d mp rest; do echo "mount: $mp"; done < /proc/self/mountinfo
        [ -e /ferry ] && echo initramfs-visible
        [ -e /newroot ] && echo newroot-visible
    } > /result.txt; exit 7"#;
    config.command = Some(MainCommand {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: [("WHO".to_string(), "main".to_string())].into(),
        workdir: Some("/root".into()),
        user: None,
    });
    fs::write(stage.join("ferry/config.json"), config.to_json()).unwrap();
    let initramfs: PathBuf = tmp.path().join("initramfs");
    fs::create_dir(&initramfs).unwrap();

    let out = Command::new("timeout")
        .args([
            "60", "unshare", "--fork", "--pid", "--mount", "--uts", "--net", "--ipc",
        ])
        .args(["--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o mode=0755 ferry-initramfs \"$1\" && cp -a \"$2\"/. \"$1\"/ \
             && exec chroot \"$1\" /init",
        )
        .arg("sh")
        .arg(&initramfs)
        .arg(&stage)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{log}");

    assert!(
        root_is_writable(),
        "the host's filesystems must be untouched"
    );
    assert!(!log.contains("FERRY-AGENT-FATAL"), "{log}");
    assert!(log.contains("ferry-agent: starting, protocol"), "{log}");
    assert!(log.contains("main process started"), "{log}");
    let exit = log.lines().find_map(console::parse_main_exit);
    assert_eq!(exit, Some(ExitKind::Code(7)), "{log}");
    assert!(log.contains("shutting down: Poweroff"), "{log}");
    // The agent ends VMs by reset; reboot(RB_AUTOBOOT) in a child pid namespace
    // kills its init with SIGHUP, which unshare reports as its own status.
    let st = out.status;
    assert!(
        st.signal() == Some(libc::SIGHUP) || st.code() == Some(128 + libc::SIGHUP),
        "unexpected status {st:?}\n{log}"
    );
    assert!(!log.contains(&config.token), "token leaked to the log");

    // What the main process saw, read back from the (cleanly unmounted)
    // disk image.
    drop(dev);
    let cat = Command::new("debugfs")
        .args(["-R", "cat /result.txt"])
        .arg(&img)
        .output()
        .unwrap();
    let result = String::from_utf8_lossy(&cat.stdout).into_owned();
    let lines: Vec<&str> = result.lines().collect();
    assert!(lines.contains(&"hostname=pid1-test"), "{result}");
    // IFF_UP | IFF_LOOPBACK
    assert!(lines.contains(&"lo=0x9"), "{result}");
    assert!(lines.contains(&"pwd=/root who=main"), "{result}");
    assert!(
        lines.contains(&"hosts: 127.0.0.1\tlocalhost")
            || lines.contains(&"hosts: 127.0.0.1 localhost"),
        "{result}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hosts: 127.0.1.1") && l.ends_with("pid1-test")),
        "{result}"
    );
    for mp in [
        "/",
        "/proc",
        "/sys",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/tmp",
        "/run",
        "/sys/fs/cgroup",
    ] {
        assert!(
            lines.contains(&format!("mount: {mp}").as_str()),
            "{mp} not mounted:\n{result}"
        );
    }
    assert!(!lines.contains(&"initramfs-visible"), "{result}");
    assert!(!lines.contains(&"newroot-visible"), "{result}");
}
