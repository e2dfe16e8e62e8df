//! `ferry exec`: run a command in a running VM.

use std::io::{IsTerminal, Read, Write};

use ferry::{ChildEvent, Failure, Runtime, Vm};

use crate::cli::exec::Args;
use crate::exit;
use crate::output::Output;
use crate::terminal::RawMode;

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

/// Runs the command and returns the status ferry should exit with.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<u8, Failure> {
    let machine = rt.open_running(&args.name)?;
    let opts = ExecOptions {
        interactive: args.interactive,
        tty: args.tty,
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        timeout: args.timeout,
    };
    run_in(&machine, args.command, &opts, out)
}

/// Runs `argv` in `vm`, streaming stdio, and gives the status to exit with
/// (see [`crate::exit`]): the command's own, 127 if it is not found, 126 if
/// it cannot be executed. Other failures are ferry's (`Err`).
pub fn run_in(vm: &Vm, argv: Vec<String>, opts: &ExecOptions, out: &Output) -> Result<u8, Failure> {
    let mut exec = ferry::ExecOptions {
        env: opts.env.clone(),
        cwd: opts.workdir.clone(),
        user: opts.user.clone(),
        timeout: opts.timeout.map(std::time::Duration::from_secs),
        stdin: opts.interactive.then(Vec::new),
        tty: None,
    };
    if opts.tty {
        exec.tty = Some(crate::terminal::size().unwrap_or((24, 80)));
        exec.env.push((
            "TERM".into(),
            std::env::var("TERM").unwrap_or("xterm".into()),
        ));
    }
    // As Docker's -it: keys go to the guest as typed (Ctrl-C, Ctrl-Z and
    // Ctrl-\ included, for the guest's terminal to act on). With -t alone
    // nothing is read, so the terminal stays as it is and Ctrl-C reaches
    // ferry, which forwards it as a signal.
    let raw = if opts.tty && opts.interactive && std::io::stdin().is_terminal() {
        RawMode::enter().ok()
    } else {
        None
    };
    let mut child = match vm.spawn(&argv, &exec) {
        Ok(c) => c,
        Err(e) => {
            drop(raw);
            return match exit::of_start_failure(e.code()) {
                Some(status) => {
                    out.error(&e.into());
                    Ok(status)
                }
                None => Err(e.into()),
            };
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
            Ok(ChildEvent::Stdout(data)) => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&data);
                let _ = o.flush();
            }
            Ok(ChildEvent::Stderr(data)) => {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(&data);
                let _ = e.flush();
            }
            Ok(ChildEvent::Exit(status)) => break Ok(status),
            Err(e) => break Err(e),
        }
    };
    // The terminal is restored before anything more is printed.
    drop(raw);
    let status = status?;
    if status.timed_out {
        out.error(&Failure {
            code: "EXEC_TIMEOUT".into(),
            message: format!(
                "the command was killed after its timeout of {} s",
                opts.timeout.unwrap_or(0)
            ),
            hint: Some("give it more time with --timeout SECS".into()),
        });
    }
    Ok(exit::of(&status))
}
