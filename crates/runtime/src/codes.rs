//! Every stable error code ferry reports, with what it means and what to do.
//!
//! The list is `docs/errors.md`, compiled in and parsed on first use: that
//! document is the one place codes are described, and its tests check it
//! against the codes the source uses, both ways.

use std::sync::OnceLock;

/// One documented error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeDoc {
    /// The code, e.g. `VM_NAME_TAKEN`.
    pub code: &'static str,
    /// What went wrong (Markdown, as written in `docs/errors.md`).
    pub meaning: &'static str,
    /// What to do about it (Markdown).
    pub action: &'static str,
}

/// The document the list is read from.
const DOC: &str = include_str!("../../../docs/errors.md");

/// Every documented code, in the order of `docs/errors.md`.
pub fn all() -> &'static [CodeDoc] {
    static ALL: OnceLock<&'static [CodeDoc]> = OnceLock::new();
    ALL.get_or_init(|| Vec::leak(DOC.lines().filter_map(parse_row).collect()))
}

/// The documentation of `code`, if it is documented.
///
/// ```
/// let doc = ferry_runtime::codes::lookup("VM_NAME_TAKEN").unwrap();
/// assert!(!doc.action.is_empty());
/// assert!(ferry_runtime::codes::lookup("NO_SUCH_CODE").is_none());
/// ```
pub fn lookup(code: &str) -> Option<&'static CodeDoc> {
    all().iter().find(|d| d.code == code)
}

/// Parses a table row `` | `CODE` | meaning | what to do | ``; anything else
/// (prose, headers, separators, malformed rows) gives `None`.
fn parse_row(line: &'static str) -> Option<CodeDoc> {
    let inner = line.trim().strip_prefix("| `")?.strip_suffix('|')?;
    let (code, rest) = inner.split_once('`')?;
    let mut cells = rest.split('|').map(str::trim);
    let (before, meaning, action) = (cells.next()?, cells.next()?, cells.next()?);
    if !before.is_empty() || cells.next().is_some() || meaning.is_empty() || action.is_empty() {
        return None;
    }
    Some(CodeDoc {
        code,
        meaning,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    /// Literals of the code shape that are not error codes: prefixes, each
    /// with the reason. Single words (`HOME`, `PATH`) never have the shape.
    const NOT_CODE_PREFIXES: &[(&str, &str)] = &[
        (
            "FERRY_",
            "ferry's own environment variables (FERRY_AGENT, FERRY_LOG, ...)",
        ),
        ("XDG_", "XDG base directory environment variables"),
        (
            "AWS_",
            "the AWS environment variables an S3 store's access is read from",
        ),
        ("CONFIG_", "Linux kernel configuration options"),
        (
            "KVM_GET_",
            "KVM ioctl names, quoted in messages about the call that failed",
        ),
        (
            "KVM_SET_",
            "KVM ioctl names, quoted in messages about the call that failed",
        ),
        (
            "KVM_CREATE_",
            "KVM ioctl names, quoted in messages about the call that failed",
        ),
    ];

    /// Literals of the code shape that are not error codes: exact names.
    const NOT_CODES: &[(&str, &str)] = &[
        ("KVM_KVMCLOCK_CTRL", "a KVM ioctl name, quoted in a message"),
        (
            "CARGO_PKG_VERSION",
            "the Cargo environment variable read by env!",
        ),
        (
            "DEBIAN_FRONTEND",
            "the environment variable that keeps apt-get non-interactive",
        ),
        (
            "DOCKER_CONFIG",
            "the environment variable naming Docker's client config directory",
        ),
        (
            "TTRPC_ADDRESS",
            "the environment variable containerd gives its shims its ttrpc address in",
        ),
    ];

    /// Documented in advance, not used by the source yet: remove once used.
    const PENDING: &[&str] = &[];

    /// Documented, used now, about to be replaced: once the source no longer
    /// uses one, drop it here and decide its row in docs/errors.md.
    const LEAVING: &[(&str, &str)] = &[];

    /// Whether `s` has the shape `[A-Z][A-Z0-9]*(_[A-Z0-9]+)+`.
    fn code_shaped(s: &str) -> bool {
        s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.contains('_')
            && s.split('_').all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            })
    }

    fn not_a_code(s: &str) -> bool {
        NOT_CODE_PREFIXES.iter().any(|(p, _)| s.starts_with(p))
            || NOT_CODES.iter().any(|(n, _)| *n == s)
    }

    /// String literals of the code shape in one line: `"` + code + `"`.
    fn literals(line: &str) -> Vec<&str> {
        let bytes = line.as_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'"' {
                i += 1;
                continue;
            }
            let start = i + 1;
            let mut end = start;
            while end < bytes.len()
                && (bytes[end].is_ascii_uppercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            if end < bytes.len() && bytes[end] == b'"' && code_shaped(&line[start..end]) {
                found.push(&line[start..end]);
                i = end + 1;
            } else {
                i += 1;
            }
        }
        found
    }

    /// Every `.rs` file under `dir`, leaving out `tests/` directories and
    /// `tests.rs` files.
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if name != "tests" {
                    rust_files(&path, out);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                out.push(path);
            }
        }
    }

    /// Code-shaped literals in the workspace's `crates/*/src` and `sdk/*/src`, each with the
    /// places it occurs, outside comments and `#[cfg(test)] mod tests { ... }`
    /// blocks (which rustfmt closes with a `}` alone on a line).
    fn used_codes() -> BTreeMap<String, Vec<String>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        // The crates, and the SDKs' native parts (sdk/node).
        for dir in ["crates", "sdk"] {
            for krate in std::fs::read_dir(root.join(dir)).unwrap() {
                let src = krate.unwrap().path().join("src");
                if src.is_dir() {
                    rust_files(&src, &mut files);
                }
            }
        }
        assert!(files.len() > 50, "found only {} source files", files.len());
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let mut in_tests = false;
            for (n, line) in lines.iter().enumerate() {
                if in_tests {
                    in_tests = *line != "}";
                    continue;
                }
                if *line == "#[cfg(test)]"
                    && lines
                        .get(n + 1)
                        .is_some_and(|l| l.starts_with("mod tests {"))
                {
                    in_tests = true;
                    continue;
                }
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for code in literals(line) {
                    let at = file.strip_prefix(&root).unwrap_or(&file).display();
                    used.entry(code.to_string())
                        .or_default()
                        .push(format!("{at}:{}", n + 1));
                }
            }
        }
        used.retain(|code, _| !not_a_code(code));
        used
    }

    fn documented() -> BTreeSet<&'static str> {
        all().iter().map(|d| d.code).collect()
    }

    #[test]
    fn every_code_in_the_source_is_documented() {
        let documented = documented();
        let missing: Vec<String> = used_codes()
            .into_iter()
            .filter(|(code, _)| !documented.contains(code.as_str()))
            .map(|(code, at)| format!("{code} (used at {})", at.join(", ")))
            .collect();
        assert!(
            missing.is_empty(),
            "codes missing from docs/errors.md (document them, or list a literal \
             that is no error code in NOT_CODES with the reason):\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn every_documented_code_is_used_in_the_source() {
        let used = used_codes();
        let excused =
            |code: &str| PENDING.contains(&code) || LEAVING.iter().any(|(c, _)| *c == code);
        let unused: Vec<&str> = documented()
            .into_iter()
            .filter(|code| !used.contains_key(*code) && !excused(code))
            .collect();
        assert!(
            unused.is_empty(),
            "codes documented in docs/errors.md but used nowhere: {unused:?}"
        );
    }

    #[test]
    fn pending_and_leaving_codes_are_documented() {
        for code in PENDING.iter().chain(LEAVING.iter().map(|(c, _)| c)) {
            assert!(lookup(code).is_some(), "{code} is not in docs/errors.md");
        }
    }

    #[test]
    fn no_code_is_documented_twice() {
        let mut seen = BTreeSet::new();
        let twice: Vec<&str> = all()
            .iter()
            .map(|d| d.code)
            .filter(|code| !seen.insert(*code))
            .collect();
        assert!(twice.is_empty(), "documented more than once: {twice:?}");
    }

    #[test]
    fn every_table_row_is_a_code_with_meaning_and_action() {
        let rows = DOC.lines().filter(|l| l.trim().starts_with("| `")).count();
        assert_eq!(rows, all().len(), "a table row does not parse");
        assert!(all().len() > 100, "only {} codes parsed", all().len());
        for d in all() {
            assert!(code_shaped(d.code), "{:?} is not code-shaped", d.code);
            assert!(
                !not_a_code(d.code),
                "{} is documented but in NOT_CODES",
                d.code
            );
        }
    }

    #[test]
    fn lookup_finds_documented_codes() {
        let d = lookup("BUNDLE_CORRUPT").unwrap();
        assert_eq!(d.code, "BUNDLE_CORRUPT");
        assert!(d.meaning.contains("checksum"));
        assert!(lookup("bundle_corrupt").is_none());
    }

    #[test]
    fn literals_are_found_as_the_pattern_says() {
        assert_eq!(
            literals(r#"a("FORK_IO", "x") => "VM_IO", "LOWER_case", "NOUNDERSCORE""#),
            ["FORK_IO", "VM_IO"]
        );
        assert_eq!(
            literals(r#""_A_B" "A__B" "A_B_" "KVM_SET_CPUID2""#),
            ["KVM_SET_CPUID2"]
        );
        assert!(code_shaped("AGENT_AUTH_FAILED"));
        assert!(!code_shaped("9_A") && !code_shaped("A") && !code_shaped("A_b"));
    }
}
