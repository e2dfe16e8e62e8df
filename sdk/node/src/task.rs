//! Blocking work on libuv's thread pool, resolved as a Promise.

use napi::bindgen_prelude::{AsyncTask, ToNapiValue, TypeName};
use napi::{Env, Task};

use crate::error::{Fail, Result};

type Work<T> = Box<dyn FnOnce() -> Result<T> + Send>;

/// A closure run off the event loop; its value resolves the Promise, its
/// [`Fail`] rejects it.
pub struct Blocking<T> {
    work: Option<Work<T>>,
}

impl<T: ToNapiValue + TypeName + Send + 'static> Task for Blocking<T> {
    type Output = T;
    type JsValue = T;

    fn compute(&mut self) -> napi::Result<T> {
        let work = self
            .work
            .take()
            .ok_or_else(|| Fail::new("SDK_INTERNAL", "a task ran twice"))?;
        work().map_err(Fail::into_napi)
    }

    fn resolve(&mut self, _env: Env, output: T) -> napi::Result<T> {
        Ok(output)
    }
}

/// Runs `work` on the thread pool.
pub fn blocking<T: ToNapiValue + TypeName + Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> AsyncTask<Blocking<T>> {
    AsyncTask::new(Blocking {
        work: Some(Box::new(work)),
    })
}
