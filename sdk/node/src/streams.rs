//! Bundles through Node streams: a snapshot written to JavaScript chunk by
//! chunk, and a restore reading chunks JavaScript pushes.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use napi::bindgen_prelude::{AsyncTask, Buffer};
use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::JsFunction;
use napi_derive::napi;

use crate::error::{Fail, Result};
use crate::flow::Flow;
use crate::progress::Reporter;
use crate::task::{blocking, Blocking};
use crate::vm::{NativeVm, SnapshotReportJs};

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

/// What JavaScript pushes into a restore.
enum Msg {
    Data(Vec<u8>),
    /// The source stream failed.
    Abort(String),
}

/// Chunks from JavaScript as a [`Read`].
struct FromJs {
    rx: Receiver<Msg>,
    chunk: Vec<u8>,
    at: usize,
    bytes: u64,
    progress: Reporter,
}

impl Read for FromJs {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(Msg::Data(d)) => {
                    self.chunk = d;
                    self.at = 0;
                }
                Ok(Msg::Abort(why)) => return Err(io::Error::other(why)),
                // The sender is gone: the stream ended.
                Err(_) => {
                    self.progress.bytes(self.bytes, true);
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        self.bytes += n as u64;
        self.progress.bytes(self.bytes, false);
        Ok(n)
    }
}

/// Chunks buffered between JavaScript and the restore.
const RESTORE_QUEUE: usize = 16;

/// A restore reading from a Node Readable.
#[napi]
pub struct NativeRestoreStream {
    tx: Mutex<Option<SyncSender<Msg>>>,
    done: Arc<Mutex<Option<JoinHandle<Result<ferry::Vm>>>>>,
}

/// Starts restoring from chunks JavaScript will push.
pub fn restore(
    rt: ferry::Runtime,
    opts: ferry::RestoreOptions,
    mut progress: Reporter,
) -> NativeRestoreStream {
    let (tx, rx) = sync_channel(RESTORE_QUEUE);
    let done = std::thread::spawn(move || {
        progress.started("restore from a stream");
        let reader = FromJs {
            rx,
            chunk: Vec::new(),
            at: 0,
            bytes: 0,
            progress,
        };
        rt.restore(ferry::RestoreSource::Reader(Box::new(reader)), opts)
            .map_err(Fail::from)
    });
    NativeRestoreStream {
        tx: Mutex::new(Some(tx)),
        done: Arc::new(Mutex::new(Some(done))),
    }
}

#[napi]
impl NativeRestoreStream {
    /// Hands a chunk to the restore; false once it stopped reading (its
    /// result says why).
    #[napi]
    pub fn push(&self, chunk: Buffer) -> AsyncTask<Blocking<bool>> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let data = chunk.to_vec();
        blocking(move || Ok(tx.is_some_and(|tx| tx.send(Msg::Data(data)).is_ok())))
    }

    /// The source ended.
    #[napi]
    pub fn end(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The source failed with `why`.
    #[napi]
    pub fn abort(&self, why: String) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // A full queue: the restore is not reading; dropping the sender
            // ends its stream early, which it reports as truncated.
            let _ = tx.try_send(Msg::Abort(why));
        }
    }

    /// The restored VM, once the restore has finished.
    #[napi]
    pub fn finish(&self) -> AsyncTask<Blocking<NativeVm>> {
        let done = self.done.clone();
        blocking(move || {
            let handle = done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or_else(|| Fail::new("SDK_INTERNAL", "finish() called twice"))?;
            let vm = handle
                .join()
                .map_err(|_| Fail::new("SDK_INTERNAL", "the restore thread panicked"))??;
            Ok(NativeVm::new(vm))
        })
    }
}
