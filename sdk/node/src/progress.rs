//! `onProgress` callbacks: events of long work sent to JavaScript from the
//! thread doing it.

use std::time::{Duration, Instant};

use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::JsFunction;
use napi_derive::napi;

/// One progress event.
#[napi(object)]
pub struct ProgressEvent {
    /// The work: "provision", "snapshot", "restore".
    pub step: String,
    /// "started", "phase", "output", "bytes", "note" or "finished".
    pub kind: String,
    pub text: Option<String>,
    /// Bytes done so far ("bytes").
    pub bytes: Option<f64>,
    /// Seconds since the work started ("finished").
    pub seconds: Option<f64>,
}

/// Bytes events at most this often: the callback runs on the event loop.
const BYTES_EVERY: Duration = Duration::from_millis(200);

/// Sends progress events to an optional callback.
pub struct Reporter {
    tsfn: Option<ThreadsafeFunction<ProgressEvent, ErrorStrategy::Fatal>>,
    step: &'static str,
    started: Instant,
    last_bytes: Option<Instant>,
}

impl Reporter {
    /// A reporter for `step` calling `callback` (none: reports nothing).
    /// Called on the JavaScript thread.
    pub fn new(step: &'static str, callback: Option<JsFunction>) -> napi::Result<Reporter> {
        let tsfn = callback
            .map(|f| {
                f.create_threadsafe_function(0, |ctx: ThreadSafeCallContext<ProgressEvent>| {
                    Ok(vec![ctx.value])
                })
            })
            .transpose()?;
        Ok(Reporter {
            tsfn,
            step,
            started: Instant::now(),
            last_bytes: None,
        })
    }

    fn send(&self, kind: &str, text: Option<String>, bytes: Option<u64>, seconds: Option<f64>) {
        if let Some(f) = &self.tsfn {
            f.call(
                ProgressEvent {
                    step: self.step.into(),
                    kind: kind.into(),
                    text,
                    bytes: bytes.map(|b| b as f64),
                    seconds,
                },
                ThreadsafeFunctionCallMode::NonBlocking,
            );
        }
    }

    /// The work began.
    pub fn started(&mut self, text: &str) {
        self.started = Instant::now();
        self.send("started", Some(text.into()), None, None);
    }

    /// It entered a new phase.
    pub fn phase(&self, text: &str) {
        self.send("phase", Some(text.into()), None, None);
    }

    /// A remark.
    pub fn note(&self, text: &str) {
        self.send("note", Some(text.into()), None, None);
    }

    /// `bytes` done so far; sent at most every [`BYTES_EVERY`] unless `force`.
    pub fn bytes(&mut self, bytes: u64, force: bool) {
        if self.tsfn.is_none() {
            return;
        }
        let now = Instant::now();
        if !force && self.last_bytes.is_some_and(|t| now - t < BYTES_EVERY) {
            return;
        }
        self.last_bytes = Some(now);
        self.send("bytes", None, Some(bytes), None);
    }

    /// The work ended.
    pub fn finished(&self, text: &str) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.send("finished", Some(text.into()), None, Some(seconds));
    }
}

impl ferry::BakeProgress for Reporter {
    fn booted(&mut self, _vm: &str, _elapsed: Duration) {
        self.phase("writing the image's defaults");
    }

    fn step_output(&mut self, _stream: ferry::bake::OutputStream, data: &[u8]) {
        self.send(
            "output",
            Some(String::from_utf8_lossy(data).into_owned()),
            None,
            None,
        );
    }

    fn exporting(&mut self) {
        self.phase("exporting the root filesystem");
    }

    fn export_progress(&mut self, tar_bytes: u64, _file_bytes: u64) {
        self.bytes(tar_bytes, false);
    }

    fn note(&mut self, message: &str) {
        Reporter::note(self, message);
    }
}
