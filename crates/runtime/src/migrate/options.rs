//! What a migration is asked to do, and how it fails: the part of the
//! migration the runtime and the VMM process share (see
//! [`crate::vm::control::ControlRequest::Migrate`]).

use serde::{Deserialize, Serialize};

/// How to migrate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// The pause the VM may see, in milliseconds: pre-copy rounds go on
    /// until the last round is estimated to fit it.
    pub downtime_ms: u64,
    /// Bytes per second at most on the link.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    /// The destination's one-time token (required over TCP).
    #[serde(default)]
    pub token: Option<String>,
}

/// A migration failure, with a stable code (see docs/errors.md).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct MigrateError {
    /// Stable code.
    pub code: String,
    /// What went wrong, and what became of the VM.
    pub message: String,
}

impl MigrateError {
    /// An error with `code`.
    pub fn new(code: &str, message: impl std::fmt::Display) -> MigrateError {
        MigrateError {
            code: code.to_string(),
            message: message.to_string(),
        }
    }
}

impl crate::error::Coded for MigrateError {
    fn code(&self) -> &str {
        &self.code
    }
}

/// The downtime budget when none is given, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
