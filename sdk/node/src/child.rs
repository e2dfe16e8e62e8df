//! A spawned command: its output pumped to JavaScript by a thread of its
//! own, its stdin, signals and pty size driven from JavaScript.

use std::sync::Arc;

use ferry::ChildEvent;
use ferry_protocol::ExecInput;
use napi::bindgen_prelude::{AsyncTask, Buffer};
use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::JsFunction;
use napi_derive::napi;

use crate::error::Fail;
use crate::flow::Flow;
use crate::task::{blocking, Blocking};

/// Output or the end of a spawned command.
#[napi(object)]
pub struct ChildEventJs {
    /// "stdout", "stderr", "exit" or "error".
    pub kind: String,
    pub data: Option<Buffer>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: Option<bool>,
    /// The JSON of a failure ("error").
    pub error: Option<String>,
}

impl ChildEventJs {
    fn new(kind: &str) -> ChildEventJs {
        ChildEventJs {
            kind: kind.into(),
            data: None,
            exit_code: None,
            signal: None,
            timed_out: None,
            error: None,
        }
    }
}

/// Events in flight to JavaScript before the pump waits: bounds memory when
/// the event loop is busy.
const QUEUE: usize = 16;

type Events = ThreadsafeFunction<ChildEventJs, ErrorStrategy::Fatal>;

/// Makes the threadsafe function for `on_event`. Called on the JS thread.
pub fn events(on_event: JsFunction) -> napi::Result<Events> {
    on_event.create_threadsafe_function(QUEUE, |ctx: ThreadSafeCallContext<ChildEventJs>| {
        Ok(vec![ctx.value])
    })
}

/// A running command in a guest.
#[napi]
pub struct NativeChild {
    input: ExecInput,
    flow: Arc<Flow>,
    pid: u32,
}

/// Starts the thread that sends `child`'s output to `events` and returns
/// the handle JavaScript keeps.
pub fn start(child: ferry::Child, events: Events) -> NativeChild {
    let flow = Arc::new(Flow::default());
    let handle = NativeChild {
        input: child.input(),
        flow: flow.clone(),
        pid: child.pid(),
    };
    std::thread::spawn(move || pump(child, &events, &flow));
    handle
}

fn pump(mut child: ferry::Child, events: &Events, flow: &Flow) {
    let send = |ev: ChildEventJs| {
        events.call(ev, ThreadsafeFunctionCallMode::Blocking);
    };
    loop {
        if !flow.wait() {
            // Dropping the child makes the agent end the command.
            return;
        }
        match child.next_event() {
            Ok(ChildEvent::Stdout(b)) => send(ChildEventJs {
                data: Some(b.into()),
                ..ChildEventJs::new("stdout")
            }),
            Ok(ChildEvent::Stderr(b)) => send(ChildEventJs {
                data: Some(b.into()),
                ..ChildEventJs::new("stderr")
            }),
            Ok(ChildEvent::Exit(s)) => {
                send(ChildEventJs {
                    exit_code: s.code(),
                    signal: s.signal(),
                    timed_out: Some(s.timed_out),
                    ..ChildEventJs::new("exit")
                });
                return;
            }
            Err(e) => {
                send(ChildEventJs {
                    error: Some(Fail::from(e).into_napi().reason),
                    ..ChildEventJs::new("error")
                });
                return;
            }
        }
    }
}

fn protocol(e: ferry_protocol::ClientError) -> Fail {
    Fail::from(ferry::Error::from(e))
}

#[napi]
impl NativeChild {
    /// Its process id in the guest.
    #[napi(getter)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes to its stdin.
    #[napi]
    pub fn write(&self, data: Buffer) -> AsyncTask<Blocking<()>> {
        let input = self.input.clone();
        let data = data.to_vec();
        blocking(move || input.write_stdin(&data).map_err(protocol))
    }

    /// Closes its stdin.
    #[napi]
    pub fn close_stdin(&self) -> AsyncTask<Blocking<()>> {
        let input = self.input.clone();
        blocking(move || input.close_stdin().map_err(protocol))
    }

    /// Sends it a signal.
    #[napi]
    pub fn signal(&self, signal: i32) -> AsyncTask<Blocking<()>> {
        let input = self.input.clone();
        blocking(move || input.signal(signal).map_err(protocol))
    }

    /// Resizes its pty.
    #[napi]
    pub fn resize(&self, cols: u32, rows: u32) -> AsyncTask<Blocking<()>> {
        let input = self.input.clone();
        blocking(move || {
            let dim = |v: u32| {
                u16::try_from(v).map_err(|_| Fail::invalid(format!("{v} is out of range")))
            };
            input.resize(dim(rows)?, dim(cols)?).map_err(protocol)
        })
    }

    /// Stops sending output until [`NativeChild::resume`].
    #[napi]
    pub fn pause(&self) {
        self.flow.pause();
    }

    /// Sends output again.
    #[napi]
    pub fn resume(&self) {
        self.flow.resume();
    }

    /// Stops reading its output; the command is ended.
    #[napi]
    pub fn cancel(&self) {
        self.flow.cancel();
    }
}
