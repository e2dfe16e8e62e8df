//! `ferry exec`: run a command in a running VM.

use std::io::{IsTerminal, Read, Write};

use ferry::{ChildEvent, Failure, Runtime, Vm};

use crate::terminal::RawMode;

/// Arguments of `ferry exec`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Keep stdin open and stream it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User in the guest (name, uid, name:group or uid:gid).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Options shared by `exec` and attached `boot`.
pub struct ExecOptions {
    /// Stream stdin.
    pub interactive: bool,
    /// Use a pty.
    pub tty: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Guest user.
    pub user: Option<String>,
    /// Timeout in seconds.
    pub timeout: Option<u64>,
}

/// Runs the command and returns the exit code ferry should exit with.
pub fn run(rt: &Runtime, args: Args) -> Result<i32, Failure> {
    let machine = rt.open_running(&args.name)?;
    let opts = ExecOptions {
        interactive: args.interactive,
        tty: args.tty,
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        timeout: args.timeout,
    };
    run_in(&machine, args.command, &opts)
}

/// Runs `argv` in `vm`, streaming stdio, and maps the result to an exit code:
/// the command's code, 128+N for signal N, 127 if not found, 126 if not executable.
pub fn run_in(vm: &Vm, argv: Vec<String>, opts: &ExecOptions) -> Result<i32, Failure> {
    let mut exec = ferry::ExecOptions {
        env: opts.env.clone(),
        cwd: opts.workdir.clone(),
        user: opts.user.clone(),
        timeout: opts.timeout.map(std::time::Duration::from_secs),
        stdin: opts.interactive.then(Vec::new),
        tty: None,
    };
    let raw = if opts.tty {
        exec.tty = Some(crate::terminal::size().unwrap_or((24, 80)));
        exec.env.push((
            "TERM".into(),
            std::env::var("TERM").unwrap_or("xterm".into()),
        ));
        if std::io::stdin().is_terminal() {
            RawMode::enter().ok()
        } else {
            None
        }
    } else {
        None
    };
    let mut child = match vm.spawn(&argv, &exec) {
        Ok(c) => c,
        Err(e) => {
            drop(raw);
            let code = match e.code() {
                "EXEC_NOT_FOUND" => 127,
                "EXEC_PERMISSION_DENIED" => 126,
                _ => return Err(e.into()),
            };
            eprintln!("{}", Failure::from(e));
            return Ok(code);
        }
    };
    let input = child.input();
    crate::terminal::forward_signals(input.clone(), opts.tty);
    if opts.interactive {
        let input = input.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = input.close_stdin();
        });
    }
    let status = loop {
        match child.next_event() {
            Ok(ChildEvent::Stdout(out)) => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&out);
                let _ = o.flush();
            }
            Ok(ChildEvent::Stderr(err)) => {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(&err);
                let _ = e.flush();
            }
            Ok(ChildEvent::Exit(status)) => break Ok(status),
            Err(e) => break Err(e),
        }
    };
    drop(raw);
    let status = status?;
    if status.timed_out {
        eprintln!("error[EXEC_TIMEOUT]: the command was killed after its timeout");
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}
