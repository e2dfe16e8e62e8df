//! Python file objects as Rust readers and writers: a restore reads its
//! bundle from one, a snapshot writes its bundle to one. Each call takes
//! the GIL for as long as the object's method runs.

use std::io::{self, Read, Write};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::Fail;

/// How an object is read.
enum ReadVia {
    /// `read(n)`: files, `socket.makefile("rb")`, pipes.
    Read,
    /// `recv(n)`: sockets.
    Recv,
}

/// A binary file object (or socket) read from Rust.
pub struct PyReader {
    obj: PyObject,
    via: ReadVia,
}

impl PyReader {
    /// Wraps `obj`, which must have `read` or `recv`.
    pub fn new(py: Python<'_>, obj: PyObject) -> PyResult<PyReader> {
        let o = obj.bind(py);
        let via = if o.hasattr("read")? {
            ReadVia::Read
        } else if o.hasattr("recv")? {
            ReadVia::Recv
        } else {
            return Err(Fail::invalid(
                "a bundle source must be a path or a binary file object (with read or recv)",
            )
            .into());
        };
        Ok(PyReader { obj, via })
    }
}

fn io_error(what: &str, e: PyErr) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Python::with_gil(|py| {
            let o = self.obj.bind(py);
            let method = match self.via {
                ReadVia::Read => "read",
                ReadVia::Recv => "recv",
            };
            let got = o
                .call_method1(method, (buf.len(),))
                .map_err(|e| io_error("reading the bundle", e))?;
            if got.is_none() {
                // A non-blocking file with nothing yet: say so as Rust would.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let bytes = got.downcast::<PyBytes>().map_err(|_| {
                io::Error::other("reading the bundle: the file object did not return bytes")
            })?;
            let data = bytes.as_bytes();
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            Ok(n)
        })
    }
}

/// How an object is written.
enum WriteVia {
    /// `write(b)`, which may take only part of it (raw files).
    Write,
    /// `sendall(b)`: sockets.
    SendAll,
}

/// A binary file object (or socket) written from Rust.
pub struct PyWriter {
    obj: PyObject,
    via: WriteVia,
}

impl PyWriter {
    /// Wraps `obj`, which must have `write` or `sendall`.
    pub fn new(py: Python<'_>, obj: PyObject) -> PyResult<PyWriter> {
        let o = obj.bind(py);
        let via = if o.hasattr("sendall")? {
            WriteVia::SendAll
        } else if o.hasattr("write")? {
            WriteVia::Write
        } else {
            return Err(Fail::invalid(
                "a snapshot destination must be a path or a binary file object (with write or sendall)",
            )
            .into());
        };
        Ok(PyWriter { obj, via })
    }
}

impl Write for PyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Python::with_gil(|py| {
            let o = self.obj.bind(py);
            let chunk = PyBytes::new(py, buf);
            match self.via {
                WriteVia::SendAll => {
                    o.call_method1("sendall", (chunk,))
                        .map_err(|e| io_error("writing the bundle", e))?;
                    Ok(buf.len())
                }
                WriteVia::Write => {
                    let n = o
                        .call_method1("write", (chunk,))
                        .map_err(|e| io_error("writing the bundle", e))?;
                    // Buffered files return the length or None; raw ones
                    // may take less.
                    Ok(if n.is_none() {
                        buf.len()
                    } else {
                        n.extract::<usize>().unwrap_or(buf.len()).min(buf.len())
                    })
                }
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Python::with_gil(|py| {
            let o = self.obj.bind(py);
            if o.hasattr("flush").unwrap_or(false) {
                o.call_method0("flush")
                    .map_err(|e| io_error("flushing the bundle", e))?;
            }
            Ok(())
        })
    }
}
