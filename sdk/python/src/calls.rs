//! How calls cross from Python into the Rust API: the GIL released while
//! they wait, and the arguments several classes take (ports, durations).

use std::time::Duration;

use pyo3::prelude::*;

use crate::error::{Fail, Result};

/// Runs `work` with the GIL released.
pub(crate) fn blocking<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T> + Send,
) -> PyResult<T> {
    py.allow_threads(work).map_err(PyErr::from)
}

/// Parses port specs (`[HOST_IP:]HOST:GUEST`).
pub(crate) fn ports(specs: &[String]) -> Result<Vec<ferry::PortForward>> {
    specs
        .iter()
        .map(|s| s.parse().map_err(|e| Fail::from(ferry::Error::from(e))))
        .collect()
}

/// Seconds as Python gives them, as a duration (negative, NaN or huge is
/// refused rather than panicking).
pub(crate) fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| Fail::invalid(format!("{what} {s} is not a number of seconds")))
}

/// Where and how `Vm.migrate` sends the VM.
pub(crate) fn migrate_target(
    dest: String,
    token: Option<String>,
    downtime_ms: Option<u64>,
    bandwidth_limit: Option<u64>,
    via: Option<String>,
) -> Result<(ferry::MigrateTarget, ferry::MigrateOptions)> {
    let target = ferry::MigrateTarget::from_parts(&dest, via)
        .map_err(|e| Fail::new("SDK_INVALID_ARGUMENT", e))?;
    if bandwidth_limit == Some(0) {
        return Err(Fail::new(
            "SDK_INVALID_ARGUMENT",
            "bandwidth_limit is bytes per second, at least 1",
        ));
    }
    Ok((
        target,
        ferry::MigrateOptions {
            downtime_ms: downtime_ms.unwrap_or(ferry::DEFAULT_DOWNTIME_MS),
            bandwidth_limit,
            token,
        },
    ))
}
