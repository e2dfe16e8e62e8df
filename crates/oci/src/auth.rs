//! Registry credentials from Docker's client config (`$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`): the base64 `auth` entry, or `username` and
//! `password`, of the registry's `auths` entry. Credential helpers are not run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token; never printed.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// Where Docker's client config is.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` from Docker's client config, if it has any.
pub fn credentials_for(registry: &str) -> Option<Credentials> {
    let text = std::fs::read(docker_config_path()?).ok()?;
    lookup(&text, registry)
}

fn lookup(config: &[u8], registry: &str) -> Option<Credentials> {
    let config: DockerConfig = serde_json::from_slice(config).ok()?;
    // Entries may be written as URLs ("https://host/v1/") or bare hosts.
    let entry = config.auths.iter().find_map(|(key, entry)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        (host == registry).then_some(entry)
    })?;
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some(Credentials {
            username: user.to_string(),
            password: pass.to_string(),
        });
    }
    Some(Credentials {
        username: entry.username.clone()?,
        password: entry.password.clone()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_are_found_by_host_and_decoded() {
        let config = br#"{"auths":{
            "127.0.0.1:5001":{"auth":"dXNlcjpwYTpzcw=="},
            "https://other.example/v1/":{"username":"u","password":"p"}}}"#;
        let c = lookup(config, "127.0.0.1:5001").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(lookup(config, "other.example").unwrap().username, "u");
        assert!(lookup(config, "127.0.0.1:5000").is_none());
        assert!(lookup(b"not json", "x").is_none());
        assert!(!format!("{c:?}").contains("pa:ss"));
    }
}
