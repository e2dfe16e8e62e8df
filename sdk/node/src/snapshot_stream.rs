//! A snapshot written to a Node Readable, chunk by chunk.

use std::io::{self, Write};
use std::sync::Arc;

use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::JsFunction;
use napi_derive::napi;

use crate::error::Fail;
use crate::flow::Flow;
use crate::progress::Reporter;

/// What a snapshot wrote.
#[napi(object)]
pub struct SnapshotReportJs {
    pub bytes: f64,
    pub memory_bytes: f64,
    pub memory_stored_bytes: f64,
    pub prefetch_pages: f64,
    pub thin: bool,
    pub paused_ms: f64,
}

impl From<ferry::SnapshotReport> for SnapshotReportJs {
    fn from(r: ferry::SnapshotReport) -> Self {
        SnapshotReportJs {
            bytes: r.bytes as f64,
            memory_bytes: r.memory_bytes as f64,
            memory_stored_bytes: r.memory_stored_bytes as f64,
            prefetch_pages: r.prefetch_pages as f64,
            thin: r.thin,
            paused_ms: r.paused_ms as f64,
        }
    }
}

/// A chunk of a snapshot stream, or its end.
#[napi(object)]
pub struct StreamEvent {
    /// "data", "end" or "error".
    pub kind: String,
    pub data: Option<Buffer>,
    pub report: Option<SnapshotReportJs>,
    /// The JSON of a failure ("error").
    pub error: Option<String>,
}

type Chunks = ThreadsafeFunction<StreamEvent, ErrorStrategy::Fatal>;

/// Chunks in flight to JavaScript before the snapshot waits.
const QUEUE: usize = 8;

/// Bytes gathered before a chunk goes to JavaScript: the snapshot writes in
/// pieces of a few KiB, and each chunk costs the event loop a callback.
const CHUNK: usize = 1 << 20;

/// Writes the bundle to JavaScript in chunks of [`CHUNK`] bytes. The last
/// one goes on `flush`, which the snapshot calls before it hands the VM
/// off, so a reader that fails on it still leaves the VM running.
struct ToJs<'a> {
    chunks: &'a Chunks,
    flow: &'a Flow,
    progress: &'a mut Reporter,
    pending: Vec<u8>,
    bytes: u64,
}

impl ToJs<'_> {
    fn send(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if !self.flow.wait() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream's reader went away",
            ));
        }
        let data = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
        self.bytes += data.len() as u64;
        self.chunks.call(
            StreamEvent {
                kind: "data".into(),
                data: Some(data.into()),
                report: None,
                error: None,
            },
            ThreadsafeFunctionCallMode::Blocking,
        );
        self.progress.bytes(self.bytes, false);
        Ok(())
    }
}

impl Write for ToJs<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A snapshot being written to a Node Readable.
#[napi]
pub struct NativeSnapshotStream {
    flow: Arc<Flow>,
}

/// Starts writing `vm`'s bundle to `on_chunk`. Called on the JS thread.
pub fn snapshot(
    vm: ferry::Vm,
    opts: ferry::SnapshotOptions,
    on_chunk: JsFunction,
    mut progress: Reporter,
) -> napi::Result<NativeSnapshotStream> {
    let chunks: Chunks = on_chunk
        .create_threadsafe_function(QUEUE, |ctx: ThreadSafeCallContext<StreamEvent>| {
            Ok(vec![ctx.value])
        })?;
    let flow = Arc::new(Flow::default());
    let thread_flow = flow.clone();
    std::thread::spawn(move || {
        progress.started(&format!("snapshot of {}", vm.name()));
        let mut out = ToJs {
            chunks: &chunks,
            flow: &thread_flow,
            progress: &mut progress,
            pending: Vec::with_capacity(CHUNK),
            bytes: 0,
        };
        let result = vm.snapshot_to_writer(&mut out, &opts);
        let bytes = out.bytes;
        let end = match result {
            Ok(report) => {
                progress.bytes(bytes, true);
                progress.finished(&format!("{bytes} bytes"));
                StreamEvent {
                    kind: "end".into(),
                    data: None,
                    report: Some(report.into()),
                    error: None,
                }
            }
            Err(e) => StreamEvent {
                kind: "error".into(),
                data: None,
                report: None,
                error: Some(Fail::from(e).into_napi().reason),
            },
        };
        chunks.call(end, ThreadsafeFunctionCallMode::Blocking);
    });
    Ok(NativeSnapshotStream { flow })
}

#[napi]
impl NativeSnapshotStream {
    /// Stops writing until [`NativeSnapshotStream::resume`].
    #[napi]
    pub fn pause(&self) {
        self.flow.pause();
    }

    /// Writes again.
    #[napi]
    pub fn resume(&self) {
        self.flow.resume();
    }

    /// The reader went away: the snapshot fails and the VM runs on.
    #[napi]
    pub fn cancel(&self) {
        self.flow.cancel();
    }
}
