//! Host directories in VMs: `--mount` copies a host tree into the VM's disk
//! once at boot; `--live-mount` shares a host directory through a virtio-fs
//! device served by the VMM process.
//!
//! Both are recorded in the [`crate::vm::record::VmRecord`], so they travel
//! in snapshot bundles as configuration. On restore, live mounts are served
//! again from the recorded host paths (or the ones `--remap-mount` gives);
//! copies need nothing, their files are on the disk. Forks share the live
//! mounts' host directories with their source.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_protocol::{Client, ExecRequest};
use serde::{Deserialize, Serialize};

use crate::error::Coded;

/// How a host path reaches the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// Copied into the VM's disk once, at boot (`--mount`).
    Copy,
    /// Shared live through virtio-fs (`--live-mount`).
    Live,
}

/// One mount of a VM, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Copy or live.
    pub kind: MountKind,
    /// Host path (absolute; canonical once the VM was created).
    pub host: PathBuf,
    /// Absolute path in the guest.
    pub guest: String,
    /// Copy: the copied tree is made read-only. Live: the share refuses writes.
    #[serde(default)]
    pub read_only: bool,
    /// virtio-fs tag of a live mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// Errors with mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The `HOST:GUEST[:ro|rw]` text does not parse.
    #[error("invalid mount {spec:?}: {reason}")]
    Invalid {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host path does not exist at boot.
    #[error("mount source {0} does not exist")]
    SourceMissing(PathBuf),
    /// A live mount must share a directory.
    #[error("live mount source {0} is not a directory")]
    NotADirectory(PathBuf),
    /// Copying into the guest failed.
    #[error("copying {host} into the guest at {guest} failed: {reason}")]
    CopyFailed {
        /// Host path.
        host: PathBuf,
        /// Guest path.
        guest: String,
        /// What went wrong.
        reason: String,
    },
    /// A live mount's host directory is missing when restoring.
    #[error(
        "live mount source {host} (mounted at {guest} in the guest) does not exist on this host"
    )]
    RestoreSourceMissing {
        /// The recorded (or remapped) host path.
        host: PathBuf,
        /// Guest path.
        guest: String,
    },
    /// A `--remap-mount` value is malformed or matches no mount.
    #[error("invalid --remap-mount {spec:?}: {reason}")]
    BadRemap {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Coded for MountError {
    fn code(&self) -> &str {
        match self {
            MountError::Invalid { .. } => "BOOT_MOUNT_INVALID",
            MountError::SourceMissing(_) => "BOOT_MOUNT_SOURCE_MISSING",
            MountError::NotADirectory(_) => "BOOT_MOUNT_NOT_A_DIRECTORY",
            MountError::CopyFailed { .. } => "BOOT_MOUNT_COPY_FAILED",
            MountError::RestoreSourceMissing { .. } => "RESTORE_MOUNT_SOURCE_MISSING",
            MountError::BadRemap { .. } => "RESTORE_REMAP_INVALID",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            MountError::Invalid { .. } => Some(
                "write HOST:GUEST or HOST:GUEST:ro (live mounts also :rw); GUEST is absolute"
                    .into(),
            ),
            MountError::SourceMissing(_) => Some("check the host path before the ':'".into()),
            MountError::NotADirectory(_) => {
                Some("share the directory holding it, or use --mount to copy a file".into())
            }
            MountError::CopyFailed { .. } => {
                Some("the guest needs tar and enough disk space for the copy".into())
            }
            MountError::RestoreSourceMissing { host, .. } => Some(format!(
                "pass --remap-mount {}=NEW_HOST_DIR to share another directory instead",
                host.display()
            )),
            MountError::BadRemap { .. } => Some(
                "write OLD_HOST_PATH=NEW_HOST_PATH, OLD being a host path the snapshot recorded (`ferry inspect BUNDLE`)"
                    .into(),
            ),
        }
    }
}

fn invalid(spec: &str, reason: impl Into<String>) -> MountError {
    MountError::Invalid {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

/// Checks a guest path is absolute, not `/`, and has no `.`/`..`; returns it
/// without redundant slashes.
fn normalize_guest(spec: &str, guest: &str) -> Result<String, MountError> {
    if !guest.starts_with('/') {
        return Err(invalid(spec, "the guest path must be absolute"));
    }
    let mut out = String::new();
    for part in guest.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(invalid(spec, "the guest path may not contain . or .."));
        }
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        return Err(invalid(spec, "cannot mount over the guest's /"));
    }
    Ok(out)
}

/// Parses `HOST:GUEST[:ro]` (and `:rw` for live mounts). The host path is
/// taken as given; [`prepare`] checks it.
pub fn parse(spec: &str, kind: MountKind) -> Result<MountRecord, MountError> {
    let (rest, read_only) = if let Some(r) = spec.strip_suffix(":ro") {
        (r, true)
    } else if let Some(r) = spec.strip_suffix(":rw") {
        (r, false)
    } else {
        (spec, false)
    };
    // The guest path is absolute: split at the last ":/".
    let at = rest
        .rfind(":/")
        .ok_or_else(|| invalid(spec, "expected HOST:GUEST with an absolute GUEST path"))?;
    let (host, guest) = (&rest[..at], &rest[at + 1..]);
    if host.is_empty() {
        return Err(invalid(spec, "the host path is empty"));
    }
    Ok(MountRecord {
        kind,
        host: PathBuf::from(host),
        guest: normalize_guest(spec, guest)?,
        read_only,
        tag: None,
    })
}

/// Parses the values of `--mount` (copies) and `--live-mount`.
pub fn parse_all(copies: &[String], live: &[String]) -> Result<Vec<MountRecord>, MountError> {
    copies
        .iter()
        .map(|s| parse(s, MountKind::Copy))
        .chain(live.iter().map(|s| parse(s, MountKind::Live)))
        .collect()
}

/// Checks every host path exists (live ones must be directories), makes
/// them canonical and gives live mounts their virtio-fs tags. Run before
/// anything of the VM exists.
pub fn prepare(mounts: &[MountRecord]) -> Result<Vec<MountRecord>, MountError> {
    let mut out = Vec::with_capacity(mounts.len());
    let mut live = 0;
    for m in mounts {
        let host = std::fs::canonicalize(&m.host)
            .map_err(|_| MountError::SourceMissing(m.host.clone()))?;
        let mut m = MountRecord { host, ..m.clone() };
        if m.kind == MountKind::Live {
            if !m.host.is_dir() {
                return Err(MountError::NotADirectory(m.host));
            }
            m.tag = Some(format!("ferry-live-{live}"));
            live += 1;
        }
        out.push(m);
    }
    let mut guests: Vec<&str> = out.iter().map(|m| m.guest.as_str()).collect();
    guests.sort_unstable();
    if let Some(w) = guests.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(w[0], "two mounts at the same guest path"));
    }
    Ok(out)
}

/// The virtio-fs devices the VMM attaches for the live mounts.
pub fn fs_devices(mounts: &[MountRecord]) -> Vec<ferry_vmm::FsConfig> {
    mounts
        .iter()
        .filter(|m| m.kind == MountKind::Live)
        .enumerate()
        .map(|(i, m)| ferry_vmm::FsConfig {
            tag: m.tag.clone().unwrap_or_else(|| format!("ferry-live-{i}")),
            shared_dir: m.host.clone(),
            read_only: m.read_only,
        })
        .collect()
}

/// What the guest agent mounts after switching into the root disk.
pub fn agent_mounts(mounts: &[MountRecord]) -> Vec<ferry_protocol::config::MountSpec> {
    fs_devices(mounts)
        .into_iter()
        .zip(mounts.iter().filter(|m| m.kind == MountKind::Live))
        .map(|(dev, m)| ferry_protocol::config::MountSpec {
            source: dev.tag,
            target: m.guest.clone(),
            fstype: "virtiofs".into(),
            options: None,
            read_only: m.read_only,
        })
        .collect()
}

/// Copies every `--mount` into the running guest: a directory as a tar
/// stream into `tar -x`, a file through the agent's file write. Read-only
/// copies are made unwritable (`chmod -R a-w`) and bind-mounted read-only
/// over themselves, which holds for root too.
pub fn copy_in(client: &Client, mounts: &[MountRecord]) -> Result<(), MountError> {
    for m in mounts.iter().filter(|m| m.kind == MountKind::Copy) {
        let fail = |reason: String| MountError::CopyFailed {
            host: m.host.clone(),
            guest: m.guest.clone(),
            reason,
        };
        if m.host.is_dir() {
            copy_dir(client, &m.host, &m.guest).map_err(fail)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            let f = std::fs::File::open(&m.host).map_err(|e| fail(e.to_string()))?;
            let mode = f
                .metadata()
                .map(|md| md.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            client
                .write_file(&m.guest, mode, true, f)
                .map_err(|e| fail(e.to_string()))?;
        }
        if m.read_only {
            run_guest(
                client,
                "chmod -R a-w \"$1\" && mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\"",
                &m.guest,
                None,
            )
            .map_err(|e| fail(format!("making it read-only: {e}")))?;
        }
    }
    Ok(())
}

fn copy_dir(client: &Client, host: &Path, guest: &str) -> Result<(), String> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(host)
        .args(["-cf", "-", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running tar on the host: {e}"))?;
    let stdout = tar.stdout.take().expect("piped");
    let result = run_guest(
        client,
        "mkdir -p \"$1\" && tar -xf - -C \"$1\"",
        guest,
        Some(Box::new(stdout)),
    );
    let mut err = String::new();
    if let Some(mut e) = tar.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = tar.wait().map_err(|e| e.to_string())?;
    result?;
    if !status.success() {
        return Err(format!("host tar: {status}: {}", err.trim()));
    }
    Ok(())
}

/// Runs `sh -c SCRIPT sh ARG` in the guest, feeding `stdin` if given.
fn run_guest(
    client: &Client,
    script: &str,
    arg: &str,
    stdin: Option<Box<dyn Read + Send>>,
) -> Result<(), String> {
    let mut req = ExecRequest::new(["sh", "-c", script, "sh", arg]);
    if stdin.is_some() {
        req = req.with_stdin();
    }
    let handle = client.exec(req).map_err(|e| e.to_string())?;
    let feeder = stdin.map(|mut input| {
        let mut sink = handle.input();
        std::thread::spawn(move || -> std::io::Result<()> {
            std::io::copy(&mut input, &mut sink)?;
            sink.flush()?;
            sink.close_stdin().map_err(std::io::Error::other)
        })
    });
    let out = handle.output().map_err(|e| e.to_string())?;
    let fed = feeder.map(|f| f.join());
    if !out.status.success() {
        return Err(format!(
            "{} ({:?})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    if let Some(Ok(Err(e))) = fed {
        return Err(format!("streaming into the guest: {e}"));
    }
    Ok(())
}

/// Parses `OLD=NEW` of `--remap-mount`.
pub fn parse_remap(spec: &str) -> Result<(PathBuf, PathBuf), MountError> {
    let bad = |reason: &str| MountError::BadRemap {
        spec: spec.to_string(),
        reason: reason.into(),
    };
    let (old, new) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected OLD=NEW"))?;
    if old.is_empty() || new.is_empty() {
        return Err(bad("both paths are needed"));
    }
    if !old.starts_with('/') {
        return Err(bad("OLD must be an absolute host path, as recorded"));
    }
    Ok((PathBuf::from(old), PathBuf::from(new)))
}

/// Before a restore: applies `--remap-mount` pairs (an OLD path also remaps
/// everything beneath it) and checks every live mount's host directory
/// exists. Copies are left alone: their files are in the disk.
pub fn remap_for_restore(
    mounts: &mut [MountRecord],
    remaps: &[(PathBuf, PathBuf)],
) -> Result<(), MountError> {
    let mut used = vec![false; remaps.len()];
    for m in mounts.iter_mut() {
        for (i, (old, new)) in remaps.iter().enumerate() {
            if let Ok(rest) = m.host.strip_prefix(old) {
                let target = if rest.as_os_str().is_empty() {
                    new.clone()
                } else {
                    new.join(rest)
                };
                m.host = std::fs::canonicalize(&target).unwrap_or(target);
                used[i] = true;
                break;
            }
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let (old, new) = &remaps[i];
        return Err(MountError::BadRemap {
            spec: format!("{}={}", old.display(), new.display()),
            reason: "no mount of the snapshot has this host path".into(),
        });
    }
    for m in mounts.iter().filter(|m| m.kind == MountKind::Live) {
        if !m.host.is_dir() {
            return Err(MountError::RestoreSourceMissing {
                host: m.host.clone(),
                guest: m.guest.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let m = parse("/src:/work", MountKind::Copy).unwrap();
        assert_eq!(
            (m.host.to_str().unwrap(), m.guest.as_str(), m.read_only),
            ("/src", "/work", false)
        );
        let m = parse("/a:b/c:/mnt/x//y/:ro", MountKind::Live).unwrap();
        assert_eq!(
            (m.host.to_str().unwrap(), m.guest.as_str(), m.read_only),
            ("/a:b/c", "/mnt/x/y", true)
        );
        assert!(!parse("rel:/x:rw", MountKind::Live).unwrap().read_only);
        for bad in [
            "/src",
            "/src:rel",
            ":/x",
            "/src:/",
            "/src:/a/../b",
            "/src:/a/./b",
        ] {
            let e = parse(bad, MountKind::Copy).unwrap_err();
            assert_eq!(e.code(), "BOOT_MOUNT_INVALID", "{bad}");
        }
    }

    #[test]
    fn prepare_checks_sources_and_assigns_tags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let d = dir.path().to_str().unwrap();
        let specs = [
            parse(&format!("{d}:/a"), MountKind::Live).unwrap(),
            parse(&format!("{d}/f:/b"), MountKind::Copy).unwrap(),
            parse(&format!("{d}/.:/c:ro"), MountKind::Live).unwrap(),
        ];
        let ready = prepare(&specs).unwrap();
        assert_eq!(ready[0].tag.as_deref(), Some("ferry-live-0"));
        assert_eq!(ready[1].tag, None);
        assert_eq!(ready[2].tag.as_deref(), Some("ferry-live-1"));
        assert_eq!(ready[2].host, std::fs::canonicalize(dir.path()).unwrap());
        let devs = fs_devices(&ready);
        assert_eq!(devs.len(), 2);
        assert!(devs[1].read_only);
        let agent = agent_mounts(&ready);
        assert_eq!(
            (
                agent[1].source.as_str(),
                agent[1].target.as_str(),
                agent[1].fstype.as_str()
            ),
            ("ferry-live-1", "/c", "virtiofs")
        );
        assert!(agent[1].read_only);

        let missing = parse(&format!("{d}/nope:/x"), MountKind::Copy).unwrap();
        assert_eq!(
            prepare(&[missing]).unwrap_err().code(),
            "BOOT_MOUNT_SOURCE_MISSING"
        );
        let live_file = parse(&format!("{d}/f:/x"), MountKind::Live).unwrap();
        assert_eq!(
            prepare(&[live_file]).unwrap_err().code(),
            "BOOT_MOUNT_NOT_A_DIRECTORY"
        );
        let twice = [specs[0].clone(), specs[0].clone()];
        assert_eq!(prepare(&twice).unwrap_err().code(), "BOOT_MOUNT_INVALID");
    }

    #[test]
    fn restore_remaps_and_reports_missing_sources() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        std::fs::create_dir_all(new.join("sub")).unwrap();
        let mut mounts = vec![
            MountRecord {
                kind: MountKind::Live,
                host: "/gone/proj".into(),
                guest: "/p".into(),
                read_only: false,
                tag: Some("ferry-live-0".into()),
            },
            MountRecord {
                kind: MountKind::Copy,
                host: "/gone/copy".into(),
                guest: "/c".into(),
                read_only: true,
                tag: None,
            },
        ];
        let e = remap_for_restore(&mut mounts.clone(), &[]).unwrap_err();
        assert_eq!(e.code(), "RESTORE_MOUNT_SOURCE_MISSING");
        assert!(e.to_string().contains("/gone/proj"));
        assert!(e.hint().unwrap().contains("--remap-mount /gone/proj="));

        // A parent path remaps what is beneath it.
        let remap = parse_remap(&format!("/gone={}", dir.path().display())).unwrap();
        let mut m2 = mounts.clone();
        std::fs::create_dir(dir.path().join("proj")).unwrap();
        remap_for_restore(&mut m2, std::slice::from_ref(&remap)).unwrap();
        assert_eq!(m2[0].host, dir.path().join("proj").canonicalize().unwrap());

        let exact = parse_remap(&format!("/gone/proj={}", new.display())).unwrap();
        remap_for_restore(&mut mounts, &[exact]).unwrap();
        assert_eq!(mounts[0].host, new.canonicalize().unwrap());
        assert_eq!(mounts[1].host, PathBuf::from("/gone/copy"));

        let unused = parse_remap("/elsewhere=/tmp").unwrap();
        assert_eq!(
            remap_for_restore(&mut mounts, &[unused])
                .unwrap_err()
                .code(),
            "RESTORE_REMAP_INVALID"
        );
        for bad in ["noequals", "=x", "rel=/x"] {
            assert_eq!(
                parse_remap(bad).unwrap_err().code(),
                "RESTORE_REMAP_INVALID"
            );
        }
    }

    #[test]
    fn records_serialize_compactly() {
        let m = MountRecord {
            kind: MountKind::Copy,
            host: "/h".into(),
            guest: "/g".into(),
            read_only: false,
            tag: None,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"copy","host":"/h","guest":"/g","read_only":false}"#
        );
        assert_eq!(serde_json::from_str::<MountRecord>(&json).unwrap(), m);
    }
}
