//! Debian's package manager: checking, installing and downloading packages, and
//! finding the mirror this host already uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::command::{is_root, output, run_logged};
use crate::error::InstallError;

/// Packages from `wanted` that dpkg does not report as installed.
pub fn missing_packages(wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| {
            let status = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            !matches!(status, Some(s) if s.contains("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

/// Makes sure `wanted` packages are installed, installing them with apt-get when
/// running as root (after `apt-get update`). Returns the packages it installed.
pub fn ensure_packages(wanted: &[&str], log: &Path) -> Result<Vec<String>, InstallError> {
    let missing = missing_packages(wanted);
    if missing.is_empty() {
        return Ok(missing);
    }
    if !is_root() {
        return Err(InstallError::MissingPackages(missing));
    }
    apt_update(log)?;
    run_logged(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        log,
        |_| {},
    )?;
    Ok(missing)
}

/// Refreshes apt's package lists.
pub fn apt_update(log: &Path) -> Result<(), InstallError> {
    run_logged(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
        log,
        |_| {},
    )
}

/// The version apt would install for `package` from its current lists, if any.
pub fn known_version(package: &str) -> Option<String> {
    output(Command::new("apt-cache").args(["policy", package])).and_then(|out| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:").map(str::trim))
            .filter(|v| *v != "(none)")
            .map(str::to_string)
    })
}

/// The version apt would install for `package`, refreshing lists once (as root) if
/// apt does not know the package yet.
pub fn candidate_version(package: &str, log: &Path) -> Result<String, InstallError> {
    if let Some(v) = known_version(package) {
        return Ok(v);
    }
    if is_root() {
        apt_update(log)?;
        if let Some(v) = known_version(package) {
            return Ok(v);
        }
    }
    Err(InstallError::UnknownPackage(package.to_string()))
}

/// The first package `package` depends on whose name starts with `prefix`
/// (resolves meta-packages such as `linux-image-cloud-amd64`).
pub fn dependency_with_prefix(package: &str, prefix: &str) -> Option<String> {
    let out = output(Command::new("apt-cache").args(["depends", package]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:").map(str::trim))
        .find(|d| d.starts_with(prefix))
        .map(str::to_string)
}

/// Downloads `package` (a `.deb`, not installed) into `dir` and returns its path.
pub fn download(package: &str, dir: &Path, log: &Path) -> Result<PathBuf, InstallError> {
    run_logged(
        &format!("apt-get download {package}"),
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir),
        log,
        |_| {},
    )?;
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .map_err(InstallError::io(format!("list {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| InstallError::UnknownPackage(package.to_string()))
}

/// Unpacks a `.deb`'s files into `dest` (no maintainer scripts run).
pub fn unpack(deb: &Path, dest: &Path, log: &Path) -> Result<(), InstallError> {
    run_logged(
        "dpkg-deb -x",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
        log,
        |_| {},
    )
}

/// The Debian mirror to bootstrap from: `$FERRY_DEBIAN_MIRROR`, else the first
/// non-security mirror in this host's apt sources.
pub fn mirror() -> Result<String, InstallError> {
    if let Ok(m) = std::env::var("FERRY_DEBIAN_MIRROR") {
        if !m.is_empty() {
            return Ok(m);
        }
    }
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let ext = p.extension().and_then(|e| e.to_str());
            if matches!(ext, Some("list") | Some("sources")) {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    texts.push(t);
                }
            }
        }
    }
    texts
        .iter()
        .flat_map(|t| mirror_uris(t))
        .find(|u| !u.contains("security") && u.trim_end_matches('/').ends_with("/debian"))
        .ok_or(InstallError::NoMirror)
}

/// URIs of `deb` entries in either one-line (`.list`) or deb822 (`.sources`) form.
fn mirror_uris(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("deb ") {
            // `deb [opts] URI suite comps`
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            if let Some(u) = rest.split_whitespace().next() {
                uris.push(u.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("URIs:") {
            uris.extend(rest.split_whitespace().map(str::to_string));
        }
    }
    uris
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_line_and_deb822_sources() {
        let list = "# comment\ndeb [arch=amd64 signed-by=/x] http://m.example/debian bookworm main\ndeb http://m.example/debian-security bookworm-security main\n";
        assert_eq!(
            mirror_uris(list),
            vec![
                "http://m.example/debian".to_string(),
                "http://m.example/debian-security".to_string()
            ]
        );
        let deb822 = "Types: deb\nURIs: http://a.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://a.example/debian-security\n";
        assert_eq!(
            mirror_uris(deb822),
            vec![
                "http://a.example/debian".to_string(),
                "http://a.example/debian-security".to_string()
            ]
        );
    }
}
