//! Failures as they cross into Python: an instance of the `FerryError`
//! subclass for the code, made by `ferry._errors.from_failure`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

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

    /// An argument with the wrong shape or value.
    pub fn invalid(message: impl Into<String>) -> Fail {
        Fail {
            hint: Some("see the signatures in ferry/__init__.py".into()),
            ..Fail::new("SDK_INVALID_ARGUMENT", message)
        }
    }

    /// A Python exception raised by a callback (a file object's `read` or
    /// `write`), carried through Rust code as text.
    pub fn python(what: &str, e: &PyErr) -> Fail {
        Fail::new("LOCAL_IO", format!("{what}: {e}"))
    }

    /// The exception Python sees.
    pub fn into_pyerr(self) -> PyErr {
        Python::with_gil(|py| {
            let made = py.import("ferry._errors").and_then(|m| {
                m.getattr("from_failure")?.call1((
                    &self.code,
                    &self.message,
                    self.hint.as_deref(),
                    self.retryable,
                ))
            });
            match made {
                Ok(exc) => PyErr::from_value(exc),
                // Only a broken install gets here: still say what failed.
                Err(_) => PyRuntimeError::new_err(format!("{}: {}", self.code, self.message)),
            }
        })
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

impl From<ferry_protocol::ClientError> for Fail {
    fn from(e: ferry_protocol::ClientError) -> Fail {
        Fail::from(ferry::Error::from(e))
    }
}

impl From<Fail> for PyErr {
    fn from(f: Fail) -> PyErr {
        f.into_pyerr()
    }
}

/// A result of the binding.
pub type Result<T, E = Fail> = std::result::Result<T, E>;
