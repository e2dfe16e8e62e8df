//! `ferry cp`: copy a file into or out of a running VM.

use std::path::PathBuf;

use ferry::{Failure, Runtime};

/// Arguments of `ferry cp`.
#[derive(clap::Args)]
pub struct Args {
    /// Source: a host path, or NAME:/path in a VM.
    pub src: String,
    /// Destination: a host path, or NAME:/path in a VM.
    pub dst: String,
}

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

/// Copies, printing bytes moved.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    match (parse(&args.src), parse(&args.dst)) {
        (Place::Host(src), Place::Guest { vm, path }) => {
            let path = guest_target(&path, &src);
            let n = rt.open_running(&vm)?.copy_in(&src, &path)?;
            eprintln!("copied {n} bytes to {vm}:{path}");
        }
        (Place::Guest { vm, path }, Place::Host(dst)) => {
            let dst = if dst.is_dir() {
                dst.join(
                    path.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or("file"),
                )
            } else {
                dst
            };
            let n = rt.open_running(&vm)?.copy_out(&path, &dst)?;
            eprintln!("copied {n} bytes to {}", dst.display());
        }
        (Place::Host(_), Place::Host(_)) => {
            return Err(usage("one side must be NAME:/path in a VM"))
        }
        (Place::Guest { .. }, Place::Guest { .. }) => {
            return Err(usage("copying between two VMs directly is not supported"))
        }
    }
    Ok(())
}

/// A guest path ending in `/` means "into this directory".
fn guest_target(path: &str, src: &std::path::Path) -> String {
    if path.ends_with('/') {
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{path}{name}")
    } else {
        path.to_string()
    }
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
            guest_target("/root/", std::path::Path::new("/tmp/f.bin")),
            "/root/f.bin"
        );
    }
}
