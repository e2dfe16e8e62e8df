//! The agent's tools: commands the host runs in a guest through an ordinary
//! exec of the agent's own binary (`/proc/1/exe TOOL ARGS...`), so copying
//! directory trees and exporting a root filesystem need nothing from the
//! image. Agents from before the tools answer the probe with a usage error;
//! the host then falls back to the guest's own `tar` and `mkdir`.

/// The agent binary as every process in the guest sees it (PID 1's
/// executable), whatever root the guest switched to.
pub const AGENT_EXE: &str = "/proc/1/exe";
/// Lists the tools, one per line (the probe).
pub const LIST: &str = "tools";
/// Writes a tar of a directory to stdout.
pub const TAR_CREATE: &str = "tar-create";
/// Unpacks a tar from stdin into a directory.
pub const TAR_EXTRACT: &str = "tar-extract";
/// Makes a directory and its parents.
pub const MKDIR: &str = "mkdir";

fn argv<'a>(tool: &'a str, args: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    [AGENT_EXE, tool]
        .into_iter()
        .chain(args)
        .map(str::to_string)
        .collect()
}

/// The probe's command line.
pub fn list() -> Vec<String> {
    argv(LIST, [])
}

/// Whether the agent behind `client` has the tools: runs the probe.
pub fn available(client: &crate::Client) -> bool {
    matches!(
        client.output(crate::ExecRequest::new(list()), None),
        Ok(out) if out.status.success() && listed(&out.stdout)
    )
}

/// Whether the probe's standard output names every tool the host uses.
pub fn listed(stdout: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stdout);
    [TAR_CREATE, TAR_EXTRACT, MKDIR]
        .iter()
        .all(|t| text.lines().any(|l| l == *t))
}

/// `tar-create DIR`: numeric owners, modes, times, hard links, device nodes
/// and extended attributes. With `one_file_system` it does not descend into
/// other filesystems; directories in `skip_contents` are archived empty.
/// Exits 1 when files changed while being read (the archive is complete).
pub fn tar_create(dir: &str, one_file_system: bool, skip_contents: &[&str]) -> Vec<String> {
    let mut v = argv(TAR_CREATE, [dir]);
    if one_file_system {
        v.push("--one-file-system".into());
    }
    for s in skip_contents {
        v.push("--skip-contents".into());
        v.push(s.to_string());
    }
    v
}

/// `tar-extract DIR`: owners, modes, times and extended attributes kept;
/// entries stay inside DIR, which is made if missing.
pub fn tar_extract(dir: &str) -> Vec<String> {
    argv(TAR_EXTRACT, [dir])
}

/// `mkdir DIR`, with its parents.
pub fn mkdir(dir: &str) -> Vec<String> {
    argv(MKDIR, [dir])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_and_the_probe() {
        assert_eq!(
            tar_create("/", true, &["/proc", "/sys"]),
            [
                "/proc/1/exe",
                "tar-create",
                "/",
                "--one-file-system",
                "--skip-contents",
                "/proc",
                "--skip-contents",
                "/sys"
            ]
        );
        assert!(listed(b"tar-create\ntar-extract\nmkdir\n"));
        assert!(!listed(b"usage: ferry-agent serve"));
    }
}
