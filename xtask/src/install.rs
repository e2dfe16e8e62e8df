//! `cargo xtask install`: ferry's release binaries into `PREFIX/bin`, its
//! man pages into `PREFIX/share/man/man1`.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::workspace;

/// Builds `ferry`, `ferry-vmm` and `ferry-agent` and installs them into
/// `prefix/bin`, each replaced atomically, and the man pages the build
/// rendered into `prefix/share/man/man1`.
pub fn run(prefix: &Path) -> Result<()> {
    let prefix = expand_home(prefix);
    let bin = prefix.join("bin");
    let man = prefix.join("share/man/man1");
    // Checked before the build, which takes minutes.
    check_writable(&bin)?;
    check_writable(&man)?;
    let binaries = workspace::build_binaries()?;
    for src in [&binaries.ferry, &binaries.vmm, &binaries.agent] {
        let name = src.file_name().context("binary without a file name")?;
        let dest = bin.join(name);
        copy_executable(src, &dest)?;
        println!("installed {}", dest.display());
    }
    let pages = install_man_pages(&binaries.man, &man)?;
    println!("installed {pages} man pages into {}", man.display());
    let agent = bin.join(ferry_runtime::config::AGENT_NAME);
    match ferry_runtime::config::is_static_elf(&agent) {
        Ok(true) => {}
        Ok(false) => bail!(
            "{} is not a static executable; the guest cannot start it as /init",
            agent.display()
        ),
        Err(e) => bail!("read {}: {e}", agent.display()),
    }
    if !on_path(&bin) {
        println!(
            "note: {} is not on PATH; add it, or set FERRY_VMM and FERRY_AGENT",
            bin.display()
        );
    }
    Ok(())
}

/// Copies every `*.1` page from `from` into `to`, each replaced atomically;
/// returns how many.
fn install_man_pages(from: &Path, to: &Path) -> Result<usize> {
    let mut pages: Vec<PathBuf> = fs::read_dir(from)
        .with_context(|| format!("read {}", from.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    if pages.is_empty() {
        bail!("no man pages in {}", from.display());
    }
    for page in &pages {
        let name = page.file_name().context("page without a file name")?;
        copy_file(page, &to.join(name), 0o644)?;
    }
    Ok(pages.len())
}

/// `~/x` as `$HOME/x` (a shell leaves `--prefix=~/x` unexpanded).
fn expand_home(prefix: &Path) -> PathBuf {
    match (prefix.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => prefix.to_path_buf(),
    }
}

/// Creates `dir` if missing and makes sure a file can be created in it.
fn check_writable(dir: &Path) -> Result<()> {
    let refuse = |e: std::io::Error| -> anyhow::Error {
        if e.kind() == ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS) {
            anyhow::anyhow!(
                "cannot write to {}: {e}; pick a prefix this user can write, \
                 e.g. --prefix ~/.local",
                dir.display()
            )
        } else {
            anyhow::anyhow!("cannot install into {}: {e}", dir.display())
        }
    };
    fs::create_dir_all(dir).map_err(refuse)?;
    let probe = dir.join(format!(".ferry-install-probe.{}", std::process::id()));
    fs::File::create(&probe).map_err(refuse)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Copies `src` to `dest` through a temporary name beside it, mode 0755,
/// then renames it into place: `dest` is never seen half-written, and a
/// running `dest` keeps its old file.
fn copy_executable(src: &Path, dest: &Path) -> Result<()> {
    copy_file(src, dest, 0o755)
}

/// [`copy_executable`] with any mode.
fn copy_file(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    let name = dest
        .file_name()
        .context("destination without a file name")?;
    let tmp = dest.with_file_name(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        fs::copy(src, &tmp)
            .with_context(|| format!("copy {} to {}", src.display(), tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", tmp.display()))?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn on_path(dir: &Path) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d == dir))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "xtask-install-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn copy_executable_installs_an_identical_executable_file() {
        let dir = temp_dir("copy");
        let src = dir.join("src-binary");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o600)).unwrap();

        let bin = dir.join("prefix/bin");
        check_writable(&bin).unwrap();
        let dest = bin.join("ferry");
        fs::write(&dest, b"old").unwrap();
        copy_executable(&src, &dest).unwrap();

        assert_eq!(fs::read(&dest).unwrap(), data);
        let mode = fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let left: Vec<_> = fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("ferry")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn man_pages_are_installed_and_nothing_else() {
        let dir = temp_dir("man");
        let from = dir.join("out/man");
        fs::create_dir_all(&from).unwrap();
        fs::write(from.join("ferry.1"), b".TH ferry 1").unwrap();
        fs::write(from.join("ferry-exec.1"), b".TH ferry-exec 1").unwrap();
        fs::write(from.join("notes.txt"), b"x").unwrap();
        let to = dir.join("prefix/share/man/man1");
        check_writable(&to).unwrap();
        assert_eq!(install_man_pages(&from, &to).unwrap(), 2);
        assert_eq!(fs::read(to.join("ferry.1")).unwrap(), b".TH ferry 1");
        let mode = fs::metadata(to.join("ferry-exec.1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!to.join("notes.txt").exists());
        assert!(install_man_pages(&dir.join("none"), &to).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_source_leaves_nothing_behind() {
        let dir = temp_dir("missing");
        let dest = dir.join("ferry-vmm");
        assert!(copy_executable(&dir.join("absent"), &dest).is_err());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tilde_is_the_home_directory() {
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                expand_home(Path::new("~/.local")),
                PathBuf::from(home).join(".local")
            );
        }
        assert_eq!(
            expand_home(Path::new("/usr/local")),
            Path::new("/usr/local")
        );
    }
}
