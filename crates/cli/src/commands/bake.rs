//! `ferry bake`: build a rootfs tarball by running steps in a VM.

use std::io::{IsTerminal, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::bake::{step_header, BakeProgress, BakeSpec, OutputStream, Recipe, Step};
use ferry::progress::Step as Spinner;
use ferry::{Failure, Runtime};

use crate::cli::bake::Args;
use crate::output::human_bytes;
use crate::output::Output;

fn bad_arguments(message: &str) -> Failure {
    Failure {
        code: "BAKE_BAD_ARGUMENTS".into(),
        message: message.into(),
        hint: Some("ferry bake -o OUT.tar.gz [--run 'CMD']... or ferry bake -f RECIPE.toml".into()),
    }
}

/// Builds the spec from the recipe (if any) and the flags.
fn spec_from(args: Args) -> Result<BakeSpec, Failure> {
    let recipe = match &args.file {
        Some(path) => Recipe::load(path)?,
        None => Recipe::default(),
    };
    let Some(out) = args.output.clone().or(recipe.output.clone()) else {
        return Err(bad_arguments(
            "no output: pass -o OUT.tar.gz (or set `output` in the recipe)",
        ));
    };
    let mut spec = recipe.into_spec(out);
    match args.from {
        Some(p) if p.as_os_str() == "base" => spec.from = None,
        Some(p) => spec.from = Some(p),
        None => {}
    }
    spec.env.extend(args.env);
    if args.workdir.is_some() {
        spec.workdir = args.workdir;
    }
    if let Some(cmd) = args.cmd {
        spec.cmd = Some(cmd);
    } else if !args.command.is_empty() {
        spec.cmd = Some(args.command);
    }
    spec.steps.extend(
        args.copy
            .into_iter()
            .map(|(from, to)| Step::Copy { from, to }),
    );
    spec.steps.extend(args.run.into_iter().map(Step::Run));
    if args.memory.is_some() {
        spec.memory_mib = args.memory;
    }
    if args.cpus.is_some() {
        spec.cpus = args.cpus;
    }
    spec.kernel = args.kernel;
    Ok(spec)
}

/// Bakes; returns 130 if interrupted.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<u8, Failure> {
    let mut spec = spec_from(args)?;
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // A second signal while the first is being handled ends ferry at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
        let _ = signal_hook::flag::register(sig, cancel.clone());
    }
    spec.cancel = Some(cancel);
    let mut progress = CliProgress::new();
    match rt.bake(&spec, &mut progress) {
        Ok(report) => {
            drop(progress);
            let config = &report.config;
            if out.json {
                out.json(&serde_json::json!({
                        "ok": true,
                        "out": report.out,
                        "bytes": report.bytes,
                        "tar_bytes": report.tar_bytes,
                        "compression": report.compression.name(),
                        "steps": report.steps,
                        "seconds": report.elapsed.as_secs_f64(),
                        "config": {
                            "cmd": config.cmd,
                            "env": config.env,
                            "workdir": config.workdir,
                        },
                }));
            } else {
                eprintln!(
                    "baked {} ({}, {}, {} step{}, {:.1}s)",
                    report.out.display(),
                    human_bytes(report.bytes),
                    report.compression.name(),
                    report.steps,
                    if report.steps == 1 { "" } else { "s" },
                    report.elapsed.as_secs_f64()
                );
            }
            Ok(0)
        }
        Err(e) if e.code() == "BAKE_CANCELLED" => {
            drop(progress);
            out.error(&e.into());
            Ok(130)
        }
        Err(e) => Err(e.into()),
    }
}

/// Progress on stderr: spinners on a terminal, plain lines otherwise. Step output
/// is passed through as it arrives, under a `step N/M: ...` header.
struct CliProgress {
    terminal: bool,
    shown: &'static ferry::Terminal,
    spinner: Option<Spinner<'static>>,
    last_update: Instant,
    next_plain_report: u64,
}

/// Plain (non-terminal) export progress is reported every this many bytes.
const PLAIN_REPORT_BYTES: u64 = 256 << 20;

impl CliProgress {
    fn new() -> CliProgress {
        CliProgress {
            terminal: std::io::stderr().is_terminal(),
            // One per process; it lives as long as the spinners it shows.
            shown: Box::leak(Box::new(ferry::Terminal::new())),
            spinner: None,
            last_update: Instant::now(),
            next_plain_report: PLAIN_REPORT_BYTES,
        }
    }
}

impl BakeProgress for CliProgress {
    fn booting(&mut self, vm: &str, image: &str) {
        self.spinner = Some(Spinner::start(
            self.shown,
            "bake",
            &format!("booting {vm} from {image}"),
        ));
    }

    fn booted(&mut self, vm: &str, _elapsed: Duration) {
        if let Some(s) = self.spinner.take() {
            s.finish(&format!("{vm} is up"));
        }
    }

    fn step_started(&mut self, number: usize, total: usize, step: &Step) {
        let header = step_header(number, total, step);
        if self.terminal {
            eprintln!("\x1b[1m{header}\x1b[0m");
        } else {
            eprintln!("{header}");
        }
    }

    fn step_output(&mut self, _stream: OutputStream, data: &[u8]) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(data);
        let _ = err.flush();
    }

    fn step_finished(&mut self, number: usize, total: usize, elapsed: Duration) {
        eprintln!(
            "step {number}/{total}: done ({:.1}s)",
            elapsed.as_secs_f64()
        );
    }

    fn exporting(&mut self) {
        self.spinner = Some(Spinner::start(
            self.shown,
            "export",
            "archiving the root filesystem",
        ));
    }

    fn export_progress(&mut self, tar_bytes: u64, file_bytes: u64) {
        let Some(s) = &self.spinner else { return };
        if self.terminal {
            if self.last_update.elapsed() >= Duration::from_millis(100) {
                self.last_update = Instant::now();
                s.detail(&format!(
                    "{} archived, {} written",
                    human_bytes(tar_bytes),
                    human_bytes(file_bytes)
                ));
            }
        } else if tar_bytes >= self.next_plain_report {
            self.next_plain_report = tar_bytes + PLAIN_REPORT_BYTES;
            s.phase(&format!(
                "{} archived, {} written",
                human_bytes(tar_bytes),
                human_bytes(file_bytes)
            ));
        }
    }

    fn note(&mut self, message: &str) {
        eprintln!("note: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bake::parse_copy;
    use clap::Parser;
    use std::path::PathBuf;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn spec(argv: &[&str]) -> Result<BakeSpec, Failure> {
        let cli = Cli::try_parse_from(std::iter::once("bake").chain(argv.iter().copied()))
            .map_err(|e| bad_arguments(&e.to_string()))?;
        spec_from(cli.args)
    }

    #[test]
    fn flags_make_a_spec_with_copies_before_runs() {
        let s = spec(&[
            "-o",
            "x.tar.gz",
            "--run",
            "make",
            "--copy",
            "./src:/app/src",
            "-e",
            "A=1",
            "--workdir",
            "/app",
            "--memory",
            "1024",
            "--cmd",
            "node",
            "-e",
            "1",
        ])
        .unwrap();
        assert_eq!(s.out, PathBuf::from("x.tar.gz"));
        assert_eq!(
            s.steps,
            vec![
                Step::Copy {
                    from: "./src".into(),
                    to: "/app/src".into()
                },
                Step::Run("make".into())
            ]
        );
        assert_eq!(s.env["A"], "1");
        assert_eq!(s.workdir.as_deref(), Some("/app"));
        assert_eq!(s.memory_mib, Some(1024));
        // --cmd takes everything after it, flags included.
        assert_eq!(
            s.cmd,
            Some(vec!["node".to_string(), "-e".to_string(), "1".to_string()])
        );
        let s = spec(&["-o", "x.tar", "--", "sh", "-c", "echo hi"]).unwrap();
        assert_eq!(
            s.cmd,
            Some(vec![
                "sh".to_string(),
                "-c".to_string(),
                "echo hi".to_string()
            ])
        );
        assert!(spec(&["-o", "x.tar", "--from", "base"])
            .unwrap()
            .from
            .is_none());
    }

    #[test]
    fn recipe_fields_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            "output = \"r.tar.gz\"\nworkdir = \"/a\"\nenv = { A = \"1\", B = \"2\" }\n\
             cmd = [\"one\"]\n[[step]]\nrun = \"first\"\n",
        )
        .unwrap();
        let r = recipe.to_str().unwrap();
        let s = spec(&["-f", r]).unwrap();
        assert_eq!(s.out, dir.path().join("r.tar.gz"));
        assert_eq!(s.cmd, Some(vec!["one".to_string()]));
        let s = spec(&[
            "-f",
            r,
            "-o",
            "/tmp/o.tar",
            "-e",
            "B=3",
            "-w",
            "/b",
            "--run",
            "second",
            "--cmd",
            "two",
        ])
        .unwrap();
        assert_eq!(s.out, PathBuf::from("/tmp/o.tar"));
        assert_eq!((s.env["A"].as_str(), s.env["B"].as_str()), ("1", "3"));
        assert_eq!(s.workdir.as_deref(), Some("/b"));
        assert_eq!(s.cmd, Some(vec!["two".to_string()]));
        assert_eq!(
            s.steps,
            vec![Step::Run("first".into()), Step::Run("second".into())]
        );
    }

    #[test]
    fn argument_errors() {
        let code = |argv: &[&str]| spec(argv).err().map(|f| f.code);
        assert_eq!(code(&["--run", "x"]).as_deref(), Some("BAKE_BAD_ARGUMENTS"));
        // --cmd takes `--` and what follows as its own arguments.
        assert_eq!(
            spec(&["-o", "x.tar", "--cmd", "a", "--", "b"]).unwrap().cmd,
            Some(vec!["a".to_string(), "--".to_string(), "b".to_string()])
        );
        assert_eq!(
            code(&["-f", "/no/such/recipe.toml"]).as_deref(),
            Some("BAKE_RECIPE_UNREADABLE")
        );
        assert!(parse_copy("nocolon").is_err());
        assert!(parse_copy(":/x").is_err());
        assert_eq!(
            parse_copy("a:b:/x").unwrap(),
            (PathBuf::from("a:b"), "/x".to_string())
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
