//! Failures as they cross into JavaScript: a JSON object in the message of
//! the rejected `Error`, which the JS layer turns into a `FerryError`.

/// A failure with ferry's stable code.
#[derive(Debug, Clone)]
pub struct Fail {
    code: String,
    message: String,
    hint: Option<String>,
    retryable: bool,
}

impl Fail {
    /// A failure of the binding itself (never retryable).
    pub fn new(code: &str, message: impl Into<String>) -> Fail {
        Fail {
            code: code.into(),
            message: message.into(),
            hint: None,
            retryable: false,
        }
    }

    /// An option with the wrong shape or value.
    pub fn invalid(message: impl Into<String>) -> Fail {
        Fail {
            hint: Some("see the option types in index.d.ts".into()),
            ..Fail::new("SDK_INVALID_ARGUMENT", message)
        }
    }

    /// The error JavaScript sees.
    pub fn into_napi(self) -> napi::Error {
        let json = serde_json::json!({
            "ferryError": true,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        });
        napi::Error::from_reason(json.to_string())
    }
}

impl From<ferry::Error> for Fail {
    fn from(e: ferry::Error) -> Fail {
        Fail {
            code: e.code().into(),
            message: e.message().into(),
            hint: e.hint().map(Into::into),
            retryable: e.retryable(),
        }
    }
}

impl From<Fail> for napi::Error {
    fn from(f: Fail) -> napi::Error {
        f.into_napi()
    }
}

/// What napi throws when an exported function returns a [`Fail`]
/// synchronously (bad options, before any work starts).
impl From<Fail> for napi::JsError {
    fn from(f: Fail) -> Self {
        napi::JsError::from(f.into_napi())
    }
}

/// A result of the binding.
pub type Result<T, E = Fail> = std::result::Result<T, E>;
