//! A restore reading a bundle from chunks a Node Readable pushes.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use napi::bindgen_prelude::{AsyncTask, Buffer};
use napi_derive::napi;

use crate::error::{Fail, Result};
use crate::progress::Reporter;
use crate::task::{blocking, Blocking};
use crate::vm::NativeVm;

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
