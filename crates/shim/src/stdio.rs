//! A process's stdio: the FIFOs containerd gives (or `file://` log paths),
//! pumped to and from the guest process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::ExecInput;

/// Where a process's stdio goes, as containerd names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    /// Path of the stdin FIFO; empty: no stdin.
    pub stdin: String,
    /// Path of the stdout FIFO (or `file://PATH`); empty: discarded.
    pub stdout: String,
    /// Path of the stderr FIFO; empty: discarded.
    pub stderr: String,
    /// Whether the process runs on a terminal (its output is all on stdout).
    pub terminal: bool,
}

/// How long to wait for a reader on an output FIFO: containerd's client
/// opens its end before it asks to start the process, so this only bounds
/// a client that went away.
const READER_WAIT: Duration = Duration::from_secs(2);

/// One output stream of a process. Opened at once when its reader is
/// there (an attached client), else at its first output, waiting a little
/// for a reader then (a client that left, as `ctr run -d` does, delays
/// nothing but that output). Writes to a reader that went away are
/// dropped: the process's exit must still be seen.
pub struct Sink {
    target: String,
    file: Option<File>,
    opened: bool,
}

impl Sink {
    /// A sink for `target`; nothing (output discarded) when it is empty or
    /// cannot be opened.
    pub fn open(target: &str) -> Sink {
        let file = (!target.contains("://") && !target.is_empty())
            .then(|| {
                File::options()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(target)
                    .ok()
            })
            .flatten();
        if let Some(f) = &file {
            set_blocking(f);
        }
        Sink {
            target: target.to_string(),
            opened: file.is_some(),
            file,
        }
    }

    fn file(target: &str) -> Option<File> {
        if target.is_empty() {
            None
        } else if let Some(path) = target.strip_prefix("file://") {
            File::options().create(true).append(true).open(path).ok()
        } else if target.contains("://") {
            log::warn!("stdio {target}: only FIFOs and file:// are supported; output dropped");
            None
        } else {
            open_fifo_writer(target)
        }
    }

    /// Writes `data`, dropping it (and what follows) once the reader is gone.
    pub fn write(&mut self, data: &[u8]) {
        if !self.opened {
            self.opened = true;
            self.file = Sink::file(&self.target);
        }
        if let Some(f) = &mut self.file {
            if f.write_all(data).is_err() {
                self.file = None;
            }
        }
    }
}

/// Opens a FIFO for writing without blocking on a missing reader (it is
/// waited for up to [`READER_WAIT`]), then makes writes blocking again.
fn open_fifo_writer(path: &str) -> Option<File> {
    let deadline = Instant::now() + READER_WAIT;
    loop {
        match File::options()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => {
                set_blocking(&f);
                return Some(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                log::warn!("open {path} for output: {e}; output dropped");
                return None;
            }
        }
    }
}

fn set_blocking(f: &File) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this File owns; F_GETFL/F_SETFL only
    // change its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// A process's stdin FIFO, opened (for reading, without waiting) when the
/// process is created, so the client's open for writing never waits for
/// the start and its data waits in the FIFO. Its end is the client closing
/// the FIFO after it wrote to it, or `CloseIO` ([`StdinFifo::closer`]).
pub struct StdinFifo {
    file: File,
    closed: Arc<AtomicBool>,
}

impl StdinFifo {
    /// Opens the FIFO at `path`; `None` when there is none.
    pub fn open(path: &str) -> Option<StdinFifo> {
        if path.is_empty() {
            return None;
        }
        match File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => Some(StdinFifo {
                file,
                closed: Arc::new(AtomicBool::new(false)),
            }),
            Err(e) => {
                log::warn!("open stdin {path}: {e}");
                None
            }
        }
    }

    /// The flag that says the client closed stdin (`CloseIO`).
    pub fn closer(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.closed)
    }

    /// Copies what arrives into the process until stdin ends (then the
    /// process's stdin is closed), or `ended` says the process is gone.
    /// Runs on its own thread.
    pub fn pump(self, input: ExecInput, ended: Arc<AtomicBool>) {
        use std::os::fd::AsRawFd;
        std::thread::spawn(move || {
            let mut fifo = self.file;
            let mut buf = vec![0u8; 32 << 10];
            while !ended.load(Ordering::Relaxed) {
                // Read the flag before draining: what the client wrote
                // before its CloseIO is in the FIFO by then.
                let closing = self.closed.load(Ordering::Acquire);
                let mut pfd = libc::pollfd {
                    fd: fifo.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for a descriptor this File owns.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                if pfd.revents & libc::POLLIN != 0 {
                    match fifo.read(&mut buf) {
                        Ok(n) if n > 0 => {
                            if input.write_stdin(&buf[..n]).is_err() {
                                return;
                            }
                            continue;
                        }
                        _ => {}
                    }
                }
                // POLLHUP only comes once a writer came and all went: the
                // end. Without one, an empty read means no writer yet.
                let hung_up = pfd.revents & libc::POLLHUP != 0;
                if hung_up || closing {
                    while let Ok(n) = fifo.read(&mut buf) {
                        if n == 0 || input.write_stdin(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = input.close_stdin();
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &std::path::Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn output_reaches_a_fifo_reader_and_a_missing_one_drops_it() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("out");
        mkfifo(&fifo);
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
        let mut sink = Sink::open(fifo.to_str().unwrap());
        sink.write(b"hello ");
        sink.write(b"world");
        drop(sink);
        assert_eq!(reader.join().unwrap(), b"hello world");

        // Stdin: the client's open does not wait for the process's start.
        let stdin = tmp.path().join("in");
        mkfifo(&stdin);
        let fifo = StdinFifo::open(stdin.to_str().unwrap()).unwrap();
        let closer = fifo.closer();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&stdin)
            .unwrap()
            .write_all(b"typed")
            .unwrap();
        closer.store(true, Ordering::Release);
        assert!(StdinFifo::open("").is_none());
        drop(fifo);

        let mut none = Sink::open("");
        none.write(b"dropped");
        let log = tmp.path().join("log.txt");
        let mut file = Sink::open(&format!("file://{}", log.display()));
        file.write(b"kept");
        drop(file);
        assert_eq!(std::fs::read(&log).unwrap(), b"kept");
    }
}
