//! What `mke2fs -d` cannot copy from a tree an unprivileged user wrote: the
//! layers' owners, modes the tree holds differently, xattrs, device nodes and
//! pipes. They become a `debugfs -w -f SCRIPT` run on the finished image, so
//! the image carries the layers' ownership without root.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{io, OciError};
use crate::layers::{Special, Tree};

/// The debugfs commands for `tree`; xattr values are written as files under
/// `scratch` (which must exist). Paths debugfs cannot quote (holding `"` or a
/// newline, or not UTF-8) keep the tree's owner and mode, with a warning.
pub fn debugfs_script(tree: &Tree, scratch: &Path) -> Result<String, OciError> {
    let mut script = String::new();
    let mut values = 0usize;
    for (rel, meta) in &tree.meta {
        let Some(text) = rel.to_str() else {
            tracing::warn!(
                "{} keeps the unpacking user's owner: not UTF-8",
                rel.display()
            );
            continue;
        };
        if text.contains('"') || text.contains('\n') {
            tracing::warn!("{text:?} keeps the unpacking user's owner: debugfs cannot name it");
            continue;
        }
        let path = format!("\"/{text}\"");
        // What the image holds before the fix-ups: a new node has nothing
        // worth keeping; a file has what mke2fs copied from the tree.
        let (uid, gid, mode) = match meta.special {
            Some(special) => {
                let (node, kind) = match special {
                    Special::Fifo => ("p".to_string(), libc::S_IFIFO),
                    Special::Char(a, b) => (format!("c {a} {b}"), libc::S_IFCHR),
                    Special::Block(a, b) => (format!("b {a} {b}"), libc::S_IFBLK),
                };
                // debugfs's mknod names the node in its working directory.
                let parent = rel.parent().and_then(Path::to_str).unwrap_or_default();
                let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let _ = writeln!(script, "cd \"/{parent}\"\nmknod \"{name}\" {node}\ncd /");
                (None, None, kind)
            }
            None => {
                let Ok(m) = std::fs::symlink_metadata(tree.root.join(rel)) else {
                    continue;
                };
                (Some(m.uid()), Some(m.gid()), m.mode())
            }
        };
        let want = (mode & libc::S_IFMT) | meta.perm;
        let fresh = meta.special.is_some();
        if Some(meta.uid) != uid {
            let _ = writeln!(script, "sif {path} uid {}", meta.uid);
        }
        if Some(meta.gid) != gid {
            let _ = writeln!(script, "sif {path} gid {}", meta.gid);
        }
        if (fresh || want != mode) && mode & libc::S_IFMT != libc::S_IFLNK {
            let _ = writeln!(script, "sif {path} mode 0{want:o}");
        }
        for (name, value) in &meta.xattrs {
            if name.contains('"') || name.contains(char::is_whitespace) {
                continue;
            }
            values += 1;
            let file = scratch.join(format!("xattr-{values}"));
            std::fs::write(&file, value).map_err(io("write an xattr value"))?;
            let _ = writeln!(script, "ea_set -f {} {path} {name}", file.display());
        }
    }
    Ok(script)
}
