//! The byte stream between the two ends of a migration: a TCP connection,
//! or the standard input and output of a command (`--via 'ssh host ferry
//! receive --stdio'`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A `ferry receive --listen` at this address (`HOST:PORT`).
    Tcp(String),
    /// A shell command whose standard input and output reach a `ferry
    /// receive --stdio`.
    Via(String),
}

impl Target {
    /// The target of `dest` (`HOST:PORT`, or `-` / empty with `via`): a
    /// command given with `via` wins; without one, `dest` must be an address.
    pub fn from_parts(dest: &str, via: Option<String>) -> Result<Target, String> {
        match via {
            Some(cmd) if dest.is_empty() || dest == "-" => Ok(Target::Via(cmd)),
            Some(_) => {
                Err("with a command to run the protocol over, the destination is `-`".into())
            }
            None if dest.is_empty() || dest == "-" => Err(
                "give the destination as HOST:PORT, or a command to run the protocol over".into(),
            ),
            None => Ok(Target::Tcp(dest.to_string())),
        }
    }
}

/// An open link: its two directions and how to close it.
pub struct Link {
    /// From the destination.
    pub reader: Box<dyn Read + Send>,
    /// To the destination.
    pub writer: Box<dyn Write + Send>,
    closer: Box<dyn FnMut() + Send>,
}

impl Link {
    /// A link over any pair of streams (closing it drops them).
    pub fn new(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) -> Link {
        Link {
            reader,
            writer,
            closer: Box::new(|| {}),
        }
    }

    /// Opens the link to `target`.
    pub fn open(target: &Target) -> std::io::Result<Link> {
        match target {
            Target::Tcp(addr) => {
                let stream = connect(addr)?;
                stream.set_nodelay(true)?;
                let reader = stream.try_clone()?;
                let closer = stream.try_clone()?;
                Ok(Link {
                    reader: Box::new(reader),
                    writer: Box::new(stream),
                    closer: Box::new(move || {
                        let _ = closer.shutdown(std::net::Shutdown::Both);
                    }),
                })
            }
            Target::Via(command) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                let writer = child.stdin.take().expect("piped stdin");
                let reader = child.stdout.take().expect("piped stdout");
                let mut child: Option<Child> = Some(child);
                Ok(Link {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    closer: Box::new(move || {
                        if let Some(mut c) = child.take() {
                            // The receiver ends once the protocol is over;
                            // a command that lingers is ended.
                            for _ in 0..50 {
                                if matches!(c.try_wait(), Ok(Some(_))) {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }),
                })
            }
        }
    }

    /// Closes the link: a TCP connection is shut down, a command is given
    /// five seconds to end before it is killed.
    pub fn close(&mut self) {
        (self.closer)();
    }
}

/// Connects to `addr`, trying each address it resolves to.
fn connect(addr: &str) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr} resolves to no address"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_an_address_or_a_command_never_both() {
        assert_eq!(
            Target::from_parts("host-b:7070", None),
            Ok(Target::Tcp("host-b:7070".into()))
        );
        assert_eq!(
            Target::from_parts("-", Some("ssh b ferry receive --stdio".into())),
            Ok(Target::Via("ssh b ferry receive --stdio".into()))
        );
        assert!(Target::from_parts("host-b:7070", Some("cmd".into())).is_err());
        assert!(Target::from_parts("-", None).is_err());
        assert!(Target::from_parts("", None).is_err());
    }

    #[test]
    fn a_command_link_carries_bytes_both_ways_and_closes() {
        let mut link = Link::open(&Target::Via("cat".into())).unwrap();
        link.writer.write_all(b"round trip").unwrap();
        drop(std::mem::replace(
            &mut link.writer,
            Box::new(std::io::sink()),
        ));
        let mut back = String::new();
        link.reader.read_to_string(&mut back).unwrap();
        assert_eq!(back, "round trip");
        link.close();
    }
}
