//! Resolving `user` specs from the guest's `/etc/passwd` and `/etc/group`.
//!
//! Parsed by hand rather than through libc's `getpwnam`: the agent is a
//! static binary, and glibc's NSS cannot load its modules there.

use std::fs;
use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (including the primary group).
    pub groups: Vec<u32>,
    /// User name, when the uid has a passwd entry.
    pub name: Option<String>,
    /// Home directory (`/` when unknown).
    pub home: String,
}

/// A `user` spec that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// No such user name in /etc/passwd.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// No such group name in /etc/group.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// Empty or otherwise unusable spec.
    #[error("invalid user spec {0:?}")]
    Invalid(String),
}

/// One /etc/passwd line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One /etc/group line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member user names.
    pub members: Vec<String>,
}

/// Parses passwd content; malformed lines are skipped like libc does.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses group content; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`, mixes allowed)
/// against passwd and group databases.
///
/// A numeric uid without a passwd entry gets the same number as its gid
/// (not root's group), no supplementary groups, and home `/`.
pub fn resolve_in(
    spec: &str,
    passwd: &[PasswdEntry],
    group: &[GroupEntry],
) -> Result<Identity, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part
            .parse()
            .map_err(|_| UserError::Invalid(spec.to_string()))?,
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                group
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?
                    .gid
            }
        },
        None => entry.map_or(uid, |e| e.gid),
    };
    let mut groups = vec![gid];
    if let Some(e) = entry {
        for g in group {
            if g.members.contains(&e.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        name: entry.map(|e| e.name.clone()),
        home: entry
            .map(|e| e.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".to_string()),
    })
}

/// Resolves `spec` using `<etc_dir>/passwd` and `<etc_dir>/group`. Missing
/// files count as empty (numeric specs still work).
pub fn resolve(spec: &str, etc_dir: &Path) -> Result<Identity, UserError> {
    let read = |name: &str| fs::read_to_string(etc_dir.join(name)).unwrap_or_default();
    resolve_in(
        spec,
        &parse_passwd(&read("passwd")),
        &parse_group(&read("group")),
    )
}

/// The identity of uid 0 as found in passwd (home usually `/root`).
pub fn root_identity(etc_dir: &Path) -> Identity {
    resolve("0", etc_dir).unwrap_or(Identity {
        uid: 0,
        gid: 0,
        groups: vec![0],
        name: Some("root".into()),
        home: "/root".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n\
        bob:x:1001:100::/home/bob:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:\n\
        sudo:x:27:alice\n\
        docker:x:999:bob,alice\n\
        alice:x:1000:\n\
        nogroup:x:65534:\n";

    fn r(spec: &str) -> Result<Identity, UserError> {
        resolve_in(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn names_and_numbers() {
        let a = r("alice").unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, vec![1000, 27, 999]);
        assert_eq!(a.home, "/home/alice");
        assert_eq!(a.name.as_deref(), Some("alice"));
        assert_eq!(r("1000").unwrap(), a);
        let b = r("bob:docker").unwrap();
        assert_eq!((b.uid, b.gid), (1001, 999));
        assert_eq!(b.groups, vec![999]);
        let n = r("nobody:65534").unwrap();
        assert_eq!(
            (n.uid, n.gid, n.home.as_str()),
            (65534, 65534, "/nonexistent")
        );
        let root = r("0").unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn unknown_numeric_uid_gets_its_own_gid() {
        let u = r("4242").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 4242));
        assert_eq!(u.groups, vec![4242]);
        assert_eq!(u.name, None);
        assert_eq!(u.home, "/");
        assert_eq!(r("4242:7").unwrap().gid, 7);
    }

    #[test]
    fn errors() {
        assert_eq!(r("mallory"), Err(UserError::UnknownUser("mallory".into())));
        assert_eq!(
            r("alice:wheel"),
            Err(UserError::UnknownGroup("wheel".into()))
        );
        assert!(matches!(r(""), Err(UserError::Invalid(_))));
        assert!(matches!(r("alice:"), Err(UserError::Invalid(_))));
        assert!(matches!(r(":0"), Err(UserError::Invalid(_))));
    }

    #[test]
    fn resolve_reads_files_and_tolerates_missing_ones() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(resolve("12", d.path()).unwrap().gid, 12);
        assert!(resolve("alice", d.path()).is_err());
        fs::write(d.path().join("passwd"), PASSWD).unwrap();
        fs::write(d.path().join("group"), GROUP).unwrap();
        assert_eq!(
            resolve("alice", d.path()).unwrap().groups,
            vec![1000, 27, 999]
        );
        assert_eq!(root_identity(d.path()).home, "/root");
    }
}
