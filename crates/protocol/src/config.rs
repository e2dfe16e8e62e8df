//! The configuration ferry writes into each VM's initramfs for the agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the agent finds its config inside the initramfs.
pub const CONFIG_PATH: &str = "/ferry/config.json";

/// Everything the agent needs to bring a guest up, stored as JSON at
/// [`CONFIG_PATH`]. The agent deletes the file after reading it; the token
/// then lives only in the agent's memory.
///
/// Unknown fields are ignored, so a newer host can add fields an older
/// agent does not know yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Hex token the host must present (see [`crate::Token`]).
    pub token: String,
    /// Guest hostname.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// The root filesystem.
    #[serde(default)]
    pub root: RootConfig,
    /// The supervised main process. When it exits, the VM powers off. When
    /// absent, the agent only serves the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<MainCommand>,
    /// Additional filesystems mounted after the root switch, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountSpec>,
    /// Vsock port to serve on.
    #[serde(default = "default_port")]
    pub vsock_port: u32,
    /// The guest's network interface, when the VM has one (`ferry boot --net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
}

/// Static IPv4 configuration of the guest's network interface. The agent
/// applies it at boot, before any process runs, and writes
/// `/etc/resolv.conf` from `dns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interface name, e.g. `eth0`.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// The guest's address.
    pub address: std::net::Ipv4Addr,
    /// Prefix length of the local network (e.g. 24).
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: std::net::Ipv4Addr,
    /// Name servers for `/etc/resolv.conf`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
}

fn default_interface() -> String {
    "eth0".to_string()
}

/// The root filesystem the agent switches into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootConfig {
    /// Block device, e.g. `/dev/vda`.
    #[serde(default = "default_root_device")]
    pub device: String,
    /// Filesystem type, e.g. `ext4`.
    #[serde(default = "default_root_fstype")]
    pub fstype: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Extra mount data passed to the filesystem (e.g. `"discard"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

impl Default for RootConfig {
    fn default() -> Self {
        RootConfig {
            device: default_root_device(),
            fstype: default_root_fstype(),
            read_only: false,
            options: None,
        }
    }
}

/// The main process the agent supervises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainCommand {
    /// Program and arguments (`argv[0]` searched on `PATH`).
    pub argv: Vec<String>,
    /// Environment added to the defaults (`PATH`, `HOME`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User to run as (`name`, `uid`, `name:group`, `uid:gid`); root if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A filesystem to mount once the root is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Device or source (e.g. `/dev/vdb`, `tmpfs`).
    pub source: String,
    /// Absolute mount point in the new root; created if missing.
    pub target: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount data (e.g. `"size=64m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

fn default_hostname() -> String {
    "ferry".to_string()
}

fn default_root_device() -> String {
    "/dev/vda".to_string()
}

fn default_root_fstype() -> String {
    "ext4".to_string()
}

fn default_port() -> u32 {
    crate::AGENT_VSOCK_PORT
}

impl AgentConfig {
    /// A config with defaults for everything but the token.
    pub fn new(token: &crate::Token) -> Self {
        AgentConfig {
            token: token.as_hex().to_string(),
            hostname: default_hostname(),
            root: RootConfig::default(),
            command: None,
            mounts: Vec::new(),
            vsock_port: default_port(),
            network: None,
        }
    }

    /// Serializes to pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_vec_pretty(self).expect("AgentConfig serializes")
    }

    /// Parses JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_json_gets_defaults() {
        let c = AgentConfig::from_json(br#"{"token":"abcd"}"#).unwrap();
        assert_eq!(c.token, "abcd");
        assert_eq!(c.hostname, "ferry");
        assert_eq!(c.root.device, "/dev/vda");
        assert_eq!(c.root.fstype, "ext4");
        assert!(!c.root.read_only);
        assert_eq!(c.command, None);
        assert!(c.mounts.is_empty());
        assert_eq!(c.vsock_port, crate::AGENT_VSOCK_PORT);
        assert_eq!(c.network, None);
    }

    #[test]
    fn network_config_round_trips_with_default_interface() {
        let c = AgentConfig::from_json(
            br#"{"token":"ab","network":{"address":"10.0.2.15","prefix_len":24,"gateway":"10.0.2.2","dns":["10.0.2.3"]}}"#,
        )
        .unwrap();
        let n = c.network.clone().unwrap();
        assert_eq!(n.interface, "eth0");
        assert_eq!(n.address, std::net::Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.prefix_len, 24);
        assert_eq!(n.gateway, std::net::Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(n.dns, vec![std::net::Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(AgentConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn full_config_round_trips_and_ignores_unknown_fields() {
        let mut c = AgentConfig::new(&crate::Token::from_hex(&"01".repeat(32)).unwrap());
        c.hostname = "vm1".into();
        c.root.read_only = true;
        c.command = Some(MainCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: BTreeMap::from([("A".into(), "b".into())]),
            workdir: Some("/srv".into()),
            user: Some("nobody".into()),
        });
        c.mounts.push(MountSpec {
            source: "/dev/vdb".into(),
            target: "/data".into(),
            fstype: "ext4".into(),
            options: None,
            read_only: false,
        });
        let json = c.to_json();
        assert_eq!(AgentConfig::from_json(&json).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["future_field"] = serde_json::json!(1);
        assert_eq!(
            AgentConfig::from_json(&serde_json::to_vec(&v).unwrap()).unwrap(),
            c
        );
    }
}
