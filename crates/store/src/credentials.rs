//! Credentials, region and endpoint, found where AWS tools look for them:
//! the environment first, then the shared files (`~/.aws/credentials`,
//! `~/.aws/config`) under `AWS_PROFILE` (or `default`).
//!
//! The files are read here rather than through the AWS SDK's config loader:
//! ferry needs four keys of one profile, and that loader would bring a second
//! HTTP stack for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// What a client needs to reach a store. Never printed: `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Access {
    /// Access key id.
    pub key_id: String,
    /// Secret access key.
    pub secret: String,
    /// Session token of temporary credentials.
    pub token: Option<String>,
    /// Region (`us-east-1` when nothing says otherwise).
    pub region: String,
    /// A self-hosted server's URL; AWS itself when absent.
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("key_id", &self.key_id)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Reads the sections of an INI file: `[name]` headers, `key = value` lines,
/// `#` and `;` comments.
fn ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn read_ini(path: &Path) -> HashMap<String, HashMap<String, String>> {
    std::fs::read_to_string(path)
        .map(|t| ini(&t))
        .unwrap_or_default()
}

/// Resolves access from `env` (a lookup, so tests need not touch the
/// process environment) and the files it points to.
pub fn resolve(env: &dyn Fn(&str) -> Option<String>) -> Result<Access, StoreError> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let home = var("HOME").map(PathBuf::from).unwrap_or_default();
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let creds_file = var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".aws/credentials"));
    let config_file = var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".aws/config"));
    let creds = read_ini(&creds_file);
    let config = read_ini(&config_file);
    let in_creds = creds.get(&profile);
    let in_config = if profile == "default" {
        config.get("default")
    } else {
        config.get(&format!("profile {profile}"))
    };
    let file = |key: &str| {
        in_creds
            .and_then(|s| s.get(key))
            .or_else(|| in_config.and_then(|s| s.get(key)))
            .cloned()
    };
    let key_id = var("AWS_ACCESS_KEY_ID").or_else(|| file("aws_access_key_id"));
    let secret = var("AWS_SECRET_ACCESS_KEY").or_else(|| file("aws_secret_access_key"));
    let (Some(key_id), Some(secret)) = (key_id, secret) else {
        return Err(StoreError::Credentials(format!(
            "no S3 credentials: neither AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY nor profile {profile:?} in {}",
            creds_file.display()
        )));
    };
    let token = var("AWS_SESSION_TOKEN").or_else(|| file("aws_session_token"));
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .or_else(|| file("region"))
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = var("AWS_ENDPOINT_URL_S3")
        .or_else(|| var("AWS_ENDPOINT_URL"))
        .or_else(|| file("endpoint_url"));
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(StoreError::Credentials(format!(
                "the S3 endpoint {e:?} is not an http:// or https:// URL"
            )));
        }
    }
    Ok(Access {
        key_id,
        secret,
        token,
        region,
        endpoint,
    })
}

/// [`resolve`] from the process environment.
pub fn from_env() -> Result<Access, StoreError> {
    resolve(&|k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_environment_wins_over_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n[other]\naws_access_key_id=O\naws_secret_access_key=o\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "# comment\n[default]\nregion = eu-west-3\n[profile other]\nregion=garage\nendpoint_url = http://127.0.0.1:3900\n",
        )
        .unwrap();
        let home = dir.path().display().to_string();
        let a = resolve(&env(&[("HOME", home.clone())])).unwrap();
        assert_eq!(
            (a.key_id.as_str(), a.secret.as_str()),
            ("FILEKEY", "filesecret")
        );
        assert_eq!(
            (a.region.as_str(), a.endpoint.as_deref()),
            ("eu-west-3", None)
        );
        let a = resolve(&env(&[
            ("HOME", home.clone()),
            ("AWS_PROFILE", "other".into()),
        ]))
        .unwrap();
        assert_eq!((a.key_id.as_str(), a.region.as_str()), ("O", "garage"));
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        let a = resolve(&env(&[
            ("HOME", home),
            ("AWS_ACCESS_KEY_ID", "ENVKEY".into()),
            ("AWS_SECRET_ACCESS_KEY", "envsecret".into()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ENDPOINT_URL", "http://h:1".into()),
            ("AWS_ENDPOINT_URL_S3", "http://s3:2".into()),
        ]))
        .unwrap();
        assert_eq!(
            (a.key_id.as_str(), a.secret.as_str()),
            ("ENVKEY", "envsecret")
        );
        assert_eq!(a.endpoint.as_deref(), Some("http://s3:2"));
        assert!(
            !format!("{a:?}").contains("envsecret"),
            "the secret is never printed"
        );
    }

    #[test]
    fn missing_credentials_or_a_bad_endpoint_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().display().to_string();
        let e = resolve(&env(&[("HOME", home.clone())])).unwrap_err();
        assert_eq!(e.code(), "STORE_CREDENTIALS");
        let e = resolve(&env(&[
            ("HOME", home),
            ("AWS_ACCESS_KEY_ID", "k".into()),
            ("AWS_SECRET_ACCESS_KEY", "s".into()),
            ("AWS_ENDPOINT_URL", "ftp://x".into()),
        ]))
        .unwrap_err();
        assert_eq!(e.code(), "STORE_CREDENTIALS");
    }
}
