//! A spawned command: a thread of its own reads its output into bounded
//! buffers, which Python reads as files; stdin, signals and the pty size go
//! straight to the agent.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry::ChildEvent;
use ferry_protocol::{ExecInput, ExitStatus};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::calls::{blocking, secs};
use crate::error::{Fail, Result};

/// Bytes buffered per stream before the reader thread waits for Python to
/// read (as a pipe would), unless someone waits for the end.
const LIMIT: usize = 8 << 20;

/// One output stream's unread bytes.
#[derive(Default)]
struct Buffer {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already read.
    offset: usize,
    len: usize,
}

impl Buffer {
    fn push(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    /// Up to `n` bytes from the front.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n.min(self.len));
        while out.len() < n {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let rest = &front[self.offset..];
            let k = rest.len().min(n - out.len());
            out.extend_from_slice(&rest[..k]);
            self.offset += k;
            if self.offset == front.len() {
                self.chunks.pop_front();
                self.offset = 0;
            }
        }
        self.len -= out.len();
        out
    }
}

/// What the reader thread and Python share.
#[derive(Default)]
struct State {
    out: [Buffer; 2],
    exit: Option<ExitStatus>,
    error: Option<Fail>,
    /// Someone waits for the end: buffer without bound.
    draining: bool,
    /// The handle is gone: stop reading (the agent ends the command).
    cancelled: bool,
}

impl State {
    fn ended(&self) -> bool {
        self.exit.is_some() || self.error.is_some()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }
}

/// A running command in a guest.
#[pyclass(frozen, module = "ferry._native")]
pub struct Child {
    input: ExecInput,
    shared: Arc<Shared>,
    pid: u32,
}

impl Child {
    /// Starts the thread that reads `child`'s output.
    pub fn start(child: ferry::Child) -> Child {
        let shared = Arc::new(Shared::default());
        let handle = Child {
            input: child.input(),
            shared: shared.clone(),
            pid: child.pid(),
        };
        std::thread::spawn(move || pump(child, &shared));
        handle
    }
}

fn pump(mut child: ferry::Child, shared: &Shared) {
    loop {
        {
            let mut st = shared.lock();
            while !st.cancelled && !st.draining && st.out.iter().any(|b| b.len >= LIMIT) {
                st = shared.wait(st);
            }
            if st.cancelled {
                // Dropping the child makes the agent end the command.
                return;
            }
        }
        let event = child.next_event();
        let mut st = shared.lock();
        let end = match event {
            Ok(ChildEvent::Stdout(b)) => {
                st.out[0].push(b);
                false
            }
            Ok(ChildEvent::Stderr(b)) => {
                st.out[1].push(b);
                false
            }
            Ok(ChildEvent::Exit(s)) => {
                st.exit = Some(s);
                true
            }
            Err(e) => {
                st.error = Some(e.into());
                true
            }
        };
        drop(st);
        shared.changed.notify_all();
        if end {
            return;
        }
    }
}

/// How a command ended.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct Exit {
    /// Its exit code, if it exited.
    exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    /// Whether it was killed for running past its timeout.
    timed_out: bool,
}

impl From<ExitStatus> for Exit {
    fn from(s: ExitStatus) -> Exit {
        Exit {
            exit_code: s.code(),
            signal: s.signal(),
            timed_out: s.timed_out,
        }
    }
}

#[pymethods]
impl Exit {
    fn __repr__(&self) -> String {
        format!(
            "Exit(exit_code={:?}, signal={:?}, timed_out={})",
            self.exit_code, self.signal, self.timed_out
        )
    }
}

#[pymethods]
impl Child {
    /// Its process id in the guest.
    #[getter]
    fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads up to `n` bytes of stream 1 (stdout) or 2 (stderr), waiting
    /// for some; all that is left until the end when `n` is negative. Empty
    /// at the end.
    fn read<'py>(&self, py: Python<'py>, stream: usize, n: isize) -> PyResult<Bound<'py, PyBytes>> {
        let index = match stream {
            1 => 0,
            2 => 1,
            _ => return Err(Fail::invalid(format!("no stream {stream}")).into()),
        };
        let data = blocking(py, || {
            let mut st = self.shared.lock();
            if n < 0 {
                st.draining = true;
                self.shared.changed.notify_all();
                while !st.ended() {
                    st = self.shared.wait(st);
                }
                let all = st.out[index].len;
                return Ok(st.out[index].take(all));
            }
            while st.out[index].len == 0 && !st.ended() {
                st = self.shared.wait(st);
            }
            let got = st.out[index].take(n as usize);
            drop(st);
            // The reader thread may be waiting for room.
            self.shared.changed.notify_all();
            Ok(got)
        })?;
        Ok(PyBytes::new(py, &data))
    }

    /// Writes to its stdin.
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        blocking(py, || Ok(self.input.write_stdin(data)?))
    }

    /// Closes its stdin (end of file).
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || Ok(self.input.close_stdin()?))
    }

    /// Sends it a signal.
    fn signal(&self, py: Python<'_>, signal: i32) -> PyResult<()> {
        blocking(py, || Ok(self.input.signal(signal)?))
    }

    /// Resizes its pty.
    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        if rows == 0 || cols == 0 {
            return Err(Fail::invalid("a tty needs at least one row and column").into());
        }
        blocking(py, || Ok(self.input.resize(rows, cols)?))
    }

    /// Waits for it to end (at most `timeout` seconds; None after that),
    /// keeping its output readable.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Exit>> {
        let deadline = timeout
            .map(|t| secs(t, "timeout"))
            .transpose()?
            .map(|d| Instant::now() + d);
        blocking(py, || {
            let mut st = self.shared.lock();
            st.draining = true;
            self.shared.changed.notify_all();
            while !st.ended() {
                match deadline {
                    None => st = self.shared.wait(st),
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Ok(None);
                        }
                        st = self
                            .shared
                            .changed
                            .wait_timeout(st, left.min(Duration::from_secs(3600)))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            Ok(st.exit.map(Exit::from))
        })
    }

    /// How it ended, if it has; never waits.
    fn poll(&self) -> Result<Option<Exit>> {
        let st = self.shared.lock();
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        Ok(st.exit.map(Exit::from))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.shared.lock().cancelled = true;
        self.shared.changed.notify_all();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Child>()?;
    m.add_class::<Exit>()?;
    Ok(())
}
