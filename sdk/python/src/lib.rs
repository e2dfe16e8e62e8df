//! `ferry._native`: ferry's library API (the [`ferry`] crate) for CPython,
//! never through the `ferry` CLI. The pure-Python package around it
//! (`python/ferry`) gives it its keyword arguments, file objects, context
//! managers, the asyncio layer and the smolvm-shaped `Machine`.
//!
//! Every call that waits (a boot, an exec, a snapshot, a read from a
//! spawned command) releases the GIL while it waits, so other Python
//! threads run and `ferry.aio` can run calls on executor threads side by
//! side.

mod calls;
mod child;
mod error;
mod io;
mod migrate;
mod pool;
mod runtime;
mod store;
mod vm;

use pyo3::prelude::*;

/// The module `ferry._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::register(m)?;
    vm::register(m)?;
    child::register(m)?;
    pool::register(m)?;
    migrate::register(m)?;
    store::register(m)?;
    Ok(())
}
