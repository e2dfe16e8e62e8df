//! The control socket of a VMM process: one JSON request per line, one JSON
//! response per line: part of the contract between a runtime and its
//! `ferry-vmm` processes (see [`crate::plan`]).
//!
//! The socket is 0600 in a 0700 directory; on top of that, a VMM serves only
//! connections whose peer is its own user or root ([`peer_allowed`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::VmError;

/// A request to a VMM process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Report the VM's run state.
    Status,
    /// Stop the vCPUs.
    Pause,
    /// Restart the vCPUs.
    Resume,
    /// End the VM now (the guest is not asked).
    Stop,
    /// Write the VM into a bundle at `path` (a file, or a FIFO for streaming),
    /// then stop it unless `leave_running`.
    Snapshot {
        /// Destination.
        path: std::path::PathBuf,
        /// Keep the VM running afterwards.
        leave_running: bool,
        /// Leave out the root disk's base image.
        #[serde(default)]
        thin: bool,
        /// Store guest memory uncompressed.
        #[serde(default)]
        raw_memory: bool,
        /// Compress the prefetch set too.
        #[serde(default)]
        compact: bool,
        /// Write only what changed since this earlier snapshot of the VM.
        #[serde(default)]
        since: Option<std::path::PathBuf>,
    },
    /// Fork the VM into each of the (already created) VM directories `dirs`,
    /// all from one pause, and start them. A paused VM stays paused.
    Fork {
        /// The siblings' state directories.
        dirs: Vec<std::path::PathBuf>,
    },
    /// Start forwarding a host port into the guest now.
    Expose {
        /// The forward.
        forward: crate::forward::PortForward,
    },
    /// Stop forwarding a host port; its listener is closed.
    Unexpose {
        /// The forward, as exposed.
        forward: crate::forward::PortForward,
    },
    /// Memory use of the VMM process and the guest.
    Stats,
    /// Track which guest pages change (by the guest or by a device).
    DirtyPages {
        /// Start, read (and start over), or stop tracking.
        action: DirtyAction,
    },
    /// Migrate the VM live over the stream the runtime accepts on the Unix
    /// socket `socket`; the VM stops here once the destination runs it.
    Migrate {
        /// Where the runtime relays the stream to the destination.
        socket: std::path::PathBuf,
        /// Budget, bandwidth, token.
        options: crate::migrate::options::MigrateOptions,
    },
}

/// What a [`ControlRequest::DirtyPages`] does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DirtyAction {
    /// Start tracking; nothing before counts.
    Start,
    /// Count the pages changed since the start or the previous take.
    Take,
    /// Stop tracking.
    Stop,
}

/// A VMM process's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlResponse {
    /// Whether the request was carried out.
    pub ok: bool,
    /// `running` or `paused` after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Error code when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Error text when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Details of a completed request (e.g. snapshot sizes and timings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl ControlResponse {
    /// A success carrying the current state.
    pub fn state(state: &str) -> ControlResponse {
        ControlResponse {
            ok: true,
            state: Some(state.to_string()),
            code: None,
            message: None,
            info: None,
        }
    }

    /// A success with details.
    pub fn done(state: &str, info: serde_json::Value) -> ControlResponse {
        ControlResponse {
            info: Some(info),
            ..ControlResponse::state(state)
        }
    }

    /// A failure.
    pub fn error(code: &str, message: impl Into<String>) -> ControlResponse {
        ControlResponse {
            ok: false,
            state: None,
            code: Some(code.to_string()),
            message: Some(message.into()),
            info: None,
        }
    }
}

/// Sends one request and waits for its response.
pub fn request(
    socket: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, VmError> {
    let io = VmError::io("control socket");
    let mut stream =
        UnixStream::connect(socket).map_err(VmError::io("connect to control socket"))?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(VmError::io("send control request"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(VmError::io("read control response"))?;
    serde_json::from_str(&reply).map_err(|e| VmError::Control(format!("bad response: {e}")))
}

/// The user id of the process at the other end of `stream`, as the kernel
/// recorded it when that process connected (`SO_PEERCRED`).
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live, writable locals of the sizes passed;
    // the kernel writes at most `len` bytes into `cred`. The descriptor is
    // owned by `stream` for the whole call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(std::io::Error::other("short SO_PEERCRED answer"));
    }
    Ok(cred.uid)
}

/// This process's effective user id.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Whether a VMM running as `own` serves a peer running as `peer`: its own
/// user, or root.
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// Serves requests on `listener` until it fails, calling `handle` for each. The
/// handler runs on the serving thread, one request at a time, which keeps state
/// changes (pause, stop) strictly ordered.
pub fn serve(listener: UnixListener, mut handle: impl FnMut(ControlRequest) -> ControlResponse) {
    serve_then(listener, move |req| (handle(req), None::<fn()>));
}

/// [`serve`], where the handler may also return an action to run once its
/// response has been written: a request that ends the VMM (stop, a snapshot
/// that hands the VM off) must answer before the process goes away.
/// A connection from a peer [`peer_allowed`] refuses is closed unanswered.
pub fn serve_then<F: FnOnce()>(
    listener: UnixListener,
    mut handle: impl FnMut(ControlRequest) -> (ControlResponse, Option<F>),
) {
    let own = own_uid();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        match peer_uid(&stream) {
            Ok(uid) if peer_allowed(uid, own) => {}
            Ok(uid) => {
                tracing::warn!(
                    "control socket: refused a connection from uid {uid} (this VM belongs to uid {own})"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("control socket: refused a connection whose peer is unknown: {e}");
                continue;
            }
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(mut writer) = stream.try_clone() else {
            continue;
        };
        let mut line = String::new();
        if BufReader::new(stream).read_line(&mut line).is_err() {
            continue;
        }
        let (resp, then) = match serde_json::from_str::<ControlRequest>(&line) {
            Ok(req) => handle(req),
            Err(e) => (
                ControlResponse::error("CONTROL_BAD_REQUEST", e.to_string()),
                None,
            ),
        };
        let mut out = serde_json::to_string(&resp).expect("responses serialize");
        out.push('\n');
        let _ = writer.write_all(out.as_bytes());
        let _ = writer.flush();
        drop(writer);
        if let Some(then) = then {
            then();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_own_user_and_root_are_served() {
        let own = own_uid();
        assert!(peer_allowed(own, own));
        assert!(peer_allowed(0, own));
        let foreign = if own == 1000 { 1001 } else { 1000 };
        assert!(!peer_allowed(foreign, own));
        assert!(!peer_allowed(foreign, 1002));
        assert!(peer_allowed(0, 0));
        // The kernel's answer for a connection from this very process.
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), own);
    }

    #[test]
    fn an_action_after_the_reply_runs_once_the_client_has_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        std::thread::spawn(move || {
            serve_then(listener, move |_req| {
                let flag = flag.clone();
                // Like a VMM ending its process: slow, and after the answer.
                let stop = move || {
                    std::thread::sleep(Duration::from_millis(300));
                    flag.store(true, Ordering::SeqCst);
                };
                (ControlResponse::state("stopping"), Some(stop))
            })
        });
        let resp = request(&path, &ControlRequest::Stop, Duration::from_secs(5)).unwrap();
        assert_eq!(resp.state.as_deref(), Some("stopping"));
        assert!(!stopped.load(Ordering::SeqCst), "the answer came first");
        std::thread::sleep(Duration::from_millis(600));
        assert!(stopped.load(Ordering::SeqCst));
    }

    #[test]
    fn requests_round_trip_and_bad_ones_get_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut paused = false;
            serve(listener, move |req| match req {
                ControlRequest::Pause => {
                    paused = true;
                    ControlResponse::state("paused")
                }
                ControlRequest::Status => {
                    ControlResponse::state(if paused { "paused" } else { "running" })
                }
                _ => ControlResponse::error("NOPE", "unsupported"),
            })
        });
        let t = Duration::from_secs(5);
        assert_eq!(
            request(&path, &ControlRequest::Status, t)
                .unwrap()
                .state
                .as_deref(),
            Some("running")
        );
        request(&path, &ControlRequest::Pause, t).unwrap();
        assert_eq!(
            request(&path, &ControlRequest::Status, t)
                .unwrap()
                .state
                .as_deref(),
            Some("paused")
        );
        let r = request(&path, &ControlRequest::Stop, t).unwrap();
        assert!(!r.ok);
        assert_eq!(r.code.as_deref(), Some("NOPE"));

        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"op\":\"explode\"}\n").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        let r: ControlResponse = serde_json::from_str(&reply).unwrap();
        assert_eq!(r.code.as_deref(), Some("CONTROL_BAD_REQUEST"));
    }
}
