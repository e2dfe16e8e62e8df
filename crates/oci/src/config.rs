//! The parts of an OCI image config ferry honours: the platform, the default
//! command (Entrypoint + Cmd), Env, WorkingDir and User, and the layers'
//! uncompressed digests.

use serde::{Deserialize, Serialize};

use crate::error::OciError;

/// Largest image config accepted (they are a few KiB).
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// What an image asks of the VM that runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Platform, e.g. `linux/amd64`.
    pub platform: String,
    /// Entrypoint followed by Cmd: the default command.
    pub command: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Working directory, if set.
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, if set.
    pub user: Option<String>,
    /// sha256 digests of the uncompressed layers, in order.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ImageSpec {
    /// Parses an image config blob.
    pub fn parse(bytes: &[u8], reference: &str) -> Result<Self, OciError> {
        let invalid = |why: String| OciError::Invalid {
            reference: reference.to_string(),
            why,
        };
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(invalid(format!("image config of {} bytes", bytes.len())));
        }
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("image config: {e}")))?;
        let c = raw.config.unwrap_or_default();
        let mut command = c.entrypoint.unwrap_or_default();
        command.extend(c.cmd.unwrap_or_default());
        let env = c.env.unwrap_or_default();
        if env.iter().any(|e| !e.contains('=') || e.starts_with('=')) {
            return Err(invalid("an Env entry is not NAME=value".into()));
        }
        Ok(Self {
            platform: format!("{}/{}", raw.os, raw.architecture),
            command,
            env,
            workdir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            diff_ids: raw.rootfs.unwrap_or_default().diff_ids,
        })
    }

    /// Env as name/value pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_and_cmd_join_and_fields_are_read() {
        let s = ImageSpec::parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/busybox"],
            "Cmd":["echo","hi"],"Env":["A=1","PATH=/bin"],"WorkingDir":"/work","User":"1234:1234"},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(s.platform, "linux/amd64");
        assert_eq!(s.command, ["/bin/busybox", "echo", "hi"]);
        assert_eq!(s.env_pairs()[0], ("A".into(), "1".into()));
        assert_eq!(s.workdir.as_deref(), Some("/work"));
        assert_eq!(s.user.as_deref(), Some("1234:1234"));
        assert_eq!(s.diff_ids, ["sha256:aa"]);
        let bare = ImageSpec::parse(br#"{"architecture":"amd64","os":"linux"}"#, "x").unwrap();
        assert!(bare.command.is_empty() && bare.user.is_none());
        for bad in [&b"\"nope\""[..], br#"{"config":{"Env":["NOVALUE"]}}"#] {
            assert_eq!(
                ImageSpec::parse(bad, "x").unwrap_err().code(),
                "IMAGE_INVALID"
            );
        }
    }
}
