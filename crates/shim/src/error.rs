//! The shim's errors: each carries a stable code (documented in
//! `docs/errors.md`) and says what to do, and becomes the ttrpc status
//! containerd shows the user (`ctr: CODE: message (hint)`).

use containerd_shim::protos::ttrpc;

/// What a task request failed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimError {
    /// Stable code, e.g. `SHIM_SPEC_INVALID`, or a ferry error's own code.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// How containerd should take it.
    pub kind: Kind,
}

/// The gRPC status class of an error, which containerd maps to its own
/// error kinds (`not found`, `failed precondition`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request names a task or process this shim does not have.
    NotFound,
    /// The request itself is wrong (a bad spec, a missing executable).
    Invalid,
    /// The task is not in a state that allows the request.
    Precondition,
    /// Anything else: the VM or the host failed.
    Internal,
}

/// Results of the shim's own operations.
pub type Result<T> = std::result::Result<T, ShimError>;

impl ShimError {
    /// An error with `code`, `message` and `hint`.
    pub fn new(kind: Kind, code: &str, message: impl Into<String>, hint: &str) -> ShimError {
        ShimError {
            code: code.to_string(),
            message: message.into(),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
            kind,
        }
    }

    /// No task `id` (or no process `exec_id` in it) in this shim.
    pub fn not_found(id: &str, exec_id: &str) -> ShimError {
        let what = if exec_id.is_empty() {
            format!("no task {id:?} in this shim")
        } else {
            format!("no process {exec_id:?} in task {id:?}")
        };
        ShimError::new(
            Kind::NotFound,
            "SHIM_TASK_NOT_FOUND",
            what,
            "`ctr task ls` lists the tasks; create the task first",
        )
    }

    /// The one-line text containerd shows.
    pub fn display(&self) -> String {
        match &self.hint {
            Some(h) => format!("{}: {} (hint: {h})", self.code, self.message),
            None => format!("{}: {}", self.code, self.message),
        }
    }
}

impl std::fmt::Display for ShimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl std::error::Error for ShimError {}

impl From<ferry::Error> for ShimError {
    fn from(e: ferry::Error) -> ShimError {
        let kind = match e.code() {
            "IMAGE_NOT_FOUND" | "IMAGE_NOT_ROOTFS" | "EXEC_NOT_FOUND" => Kind::Invalid,
            "VM_NOT_FOUND" => Kind::NotFound,
            "VM_NOT_RUNNING" => Kind::Precondition,
            _ => Kind::Internal,
        };
        ShimError {
            code: e.code().to_string(),
            message: e.message().to_string(),
            hint: e.hint().map(str::to_string),
            kind,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        let code = match e.kind {
            Kind::NotFound => ttrpc::Code::NOT_FOUND,
            Kind::Invalid => ttrpc::Code::INVALID_ARGUMENT,
            Kind::Precondition => ttrpc::Code::FAILED_PRECONDITION,
            Kind::Internal => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_the_code_the_message_and_the_hint() {
        let e = ShimError::not_found("web", "");
        assert_eq!(e.kind, Kind::NotFound);
        let text = e.display();
        assert!(
            text.starts_with("SHIM_TASK_NOT_FOUND: no task \"web\""),
            "{text}"
        );
        assert!(text.contains("hint: `ctr task ls`"), "{text}");
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert!(s.message.contains("SHIM_TASK_NOT_FOUND"));
            }
            other => panic!("{other:?}"),
        }
        let exec = ShimError::not_found("web", "sh1");
        assert!(exec.message.contains("process \"sh1\""));
    }
}
