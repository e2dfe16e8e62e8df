//! `ferry cp`: copy files and directory trees into or out of a running VM.

use std::path::{Path, PathBuf};

use ferry::{CopyProgress, Failure, Runtime};

use crate::cli::cp::Args;
use crate::output::Output;
use crate::progress::Display;

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Host(PathBuf),
    Guest { vm: String, path: String },
}

fn parse(s: &str) -> Place {
    match s.split_once(':') {
        Some((vm, path))
            if !vm.is_empty() && !vm.contains('/') && ferry::parse::vm_name(vm).is_ok() =>
        {
            Place::Guest {
                vm: vm.to_string(),
                path: path.to_string(),
            }
        }
        _ => Place::Host(PathBuf::from(s)),
    }
}

fn usage(message: &str) -> Failure {
    Failure {
        code: "CP_BAD_ARGUMENTS".into(),
        message: message.into(),
        hint: Some(
            "ferry cp ./local NAME:/guest/path  or  ferry cp NAME:/guest/path ./local".into(),
        ),
    }
}

/// Copies, then says how many bytes of file data moved and where to.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let display = Display::new(out.json);
    let (bytes, to) = match (parse(&args.src), parse(&args.dst)) {
        (Place::Host(src), Place::Guest { vm, path }) => {
            let machine = rt.open_running(&vm)?;
            // As cp(1) and `docker cp`: an existing directory receives the
            // source under its own name.
            let path = if path.ends_with('/') || machine.is_dir(&path)? {
                into_guest_dir(&path, &src)
            } else {
                path
            };
            let bar = display.bytes(&format!("copying to {vm}:{path}"), None);
            let n = machine.copy_in_with_progress(&src, &path, &|p| update(&bar, p))?;
            (n, format!("{vm}:{path}"))
        }
        (Place::Guest { vm, path }, Place::Host(dst)) => {
            let machine = rt.open_running(&vm)?;
            let dst = if dst.is_dir() {
                dst.join(guest_name(&path))
            } else {
                dst
            };
            let bar = display.bytes(&format!("copying to {}", dst.display()), None);
            let n = machine.copy_out_with_progress(&path, &dst, &|p| update(&bar, p))?;
            (n, dst.display().to_string())
        }
        (Place::Host(_), Place::Host(_)) => {
            return Err(usage("one side must be NAME:/path in a VM"))
        }
        (Place::Guest { .. }, Place::Guest { .. }) => {
            return Err(usage("copying between two VMs directly is not supported"))
        }
    };
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "bytes": bytes, "to": to }));
    } else {
        eprintln!("copied {bytes} bytes to {to}");
    }
    Ok(())
}

fn update(bar: &crate::progress::Bar, p: CopyProgress) {
    bar.set(p.bytes, p.total);
}

/// The last component of a guest path (`/a/b/` gives `b`).
fn guest_name(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit('/').next() {
        Some("") | None => "root",
        Some(name) => name,
    }
}

/// `src` copied into the guest directory `dir`: `dir/NAME`.
fn into_guest_dir(dir: &str, src: &Path) -> String {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}/{name}", dir.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_recognised() {
        assert_eq!(
            parse("web:/etc/hosts"),
            Place::Guest {
                vm: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(parse("./a:b"), Place::Host("./a:b".into()));
        assert_eq!(parse("/tmp/x"), Place::Host("/tmp/x".into()));
        assert_eq!(
            into_guest_dir("/root/", std::path::Path::new("/tmp/f.bin")),
            "/root/f.bin"
        );
        assert_eq!(
            into_guest_dir("/root", std::path::Path::new("/tmp/tree")),
            "/root/tree"
        );
        assert_eq!(guest_name("/var/log/"), "log");
        assert_eq!(guest_name("/etc/hosts"), "hosts");
    }
}
