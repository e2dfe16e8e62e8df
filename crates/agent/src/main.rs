//! `ferry-agent`: PID 1 of a ferry guest, or a stand-alone protocol server.
//!
//! As PID 1 it takes no arguments and follows `/ferry/config.json`. Outside
//! PID 1 (development and tests) it serves on a Unix socket or vsock port:
//!
//! ```text
//! ferry-agent serve (--unix PATH | --vsock-port PORT) --token-file FILE [--etc DIR]
//! ferry-agent --version
//! ferry-agent TOOL ARGS...      (see `ferry_agent::tools`)
//! ```

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ferry_agent::reaper::Reaper;
use ferry_agent::server::{Listener, Server};
use ferry_agent::system::LinuxSystem;
use ferry_agent::vsock::{VsockListener, VMADDR_CID_ANY};
use ferry_protocol::{console, Token};

const USAGE: &str = "usage: ferry-agent serve (--unix PATH | --vsock-port PORT) --token-file FILE [--etc DIR]\n       ferry-agent --version";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        ferry_agent::init::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!(
                "ferry-agent {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                ferry_protocol::PROTOCOL_VERSION
            );
            ExitCode::SUCCESS
        }
        Some("serve") => match serve(&args[1..]) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("ferry-agent: {e}\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some(tool) => match ferry_agent::tools::run(tool, &args[1..]) {
            Some(code) => code,
            None => {
                eprintln!("{USAGE}");
                ExitCode::from(2)
            }
        },
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &[String]) -> Result<std::convert::Infallible, String> {
    let mut unix = None;
    let mut vsock_port = None;
    let mut token_file = None;
    let mut etc = PathBuf::from("/etc");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--unix" => unix = Some(PathBuf::from(val()?)),
            "--vsock-port" => {
                vsock_port = Some(
                    val()?
                        .parse::<u32>()
                        .map_err(|e| format!("--vsock-port: {e}"))?,
                )
            }
            "--token-file" => token_file = Some(PathBuf::from(val()?)),
            "--etc" => etc = PathBuf::from(val()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let token_file = token_file.ok_or("--token-file is required")?;
    let text = std::fs::read_to_string(&token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?;
    let token = Token::from_hex(&text).map_err(|e| e.to_string())?;

    // Orphaned descendants of our children come to us to be reaped.
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("subreaper: {e}"))?;
    let reaper = Reaper::start().map_err(|e| format!("reaper: {e}"))?;
    let server =
        Arc::new(Server::new(token, reaper, Arc::new(LinuxSystem::new(None))).with_etc_dir(etc));
    let listener: Box<dyn Listener> = match (unix, vsock_port) {
        (Some(path), None) => {
            let _ = std::fs::remove_file(&path);
            Box::new(UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        (None, Some(port)) => Box::new(
            VsockListener::bind(VMADDR_CID_ANY, port)
                .map_err(|e| format!("vsock port {port}: {e}"))?,
        ),
        _ => return Err("exactly one of --unix and --vsock-port is required".into()),
    };
    eprintln!("ferry-agent: {}", console::ready_line());
    server.serve(listener.as_ref())
}
