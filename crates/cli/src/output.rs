//! What ferry prints when a command ends: results as JSON on stdout with
//! `--json`, and errors on stderr, either as one JSON object `{code,
//! message, hint, retryable}` or as `error[CODE]: message` for people
//! (coloured on a terminal; plain when `NO_COLOR` is set or stderr is not a
//! terminal).

use std::io::Write;
use std::process::ExitCode;

use anstyle::{AnsiColor, Style};
use ferry::Failure;

use crate::exit;

/// The code of every command-line usage error (unknown flag, missing
/// argument, flags that contradict each other).
pub const USAGE: &str = "USAGE_INVALID";

/// How results and errors are printed.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Machine-readable JSON instead of text.
    pub json: bool,
}

impl Output {
    /// Prints `failure` on stderr.
    pub fn error(&self, failure: &Failure) {
        let mut err = anstream::stderr().lock();
        let _ = if self.json {
            writeln!(err, "{}", to_json(failure))
        } else {
            write!(err, "{}", human(failure))
        };
        let _ = err.flush();
    }

    /// Prints `failure` and gives ferry's own failure status (125).
    pub fn fail(&self, failure: &Failure) -> ExitCode {
        self.error(failure);
        ExitCode::from(exit::FERRY_FAILED)
    }

    /// Prints a result on stdout, one JSON document on one line.
    pub fn json(&self, value: &serde_json::Value) {
        println!("{value}");
    }
}

/// The one-line JSON object of an error.
pub fn to_json(failure: &Failure) -> serde_json::Value {
    serde_json::json!({
        "code": failure.code,
        "message": failure.message,
        "hint": failure.hint,
        "retryable": ferry::retryable(&failure.code),
    })
}

/// `error[CODE]: message` and an indented hint, styled (the stream strips
/// the styles where colour is not wanted).
pub fn human(failure: &Failure) -> String {
    let error = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
    let hint = Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()));
    let mut text = format!(
        "{error}error[{}]{error:#}: {}\n",
        failure.code, failure.message
    );
    if let Some(h) = &failure.hint {
        text.push_str(&format!(
            "  {hint}hint:{hint:#} {}\n",
            h.replace('\n', "\n    ")
        ));
    }
    text
}

/// Handles what clap could not parse: `--help` and `--version` print as
/// usual and succeed; anything else is a `USAGE_INVALID` error (exit status 125),
/// as JSON when the command line asked for `--json`.
pub fn usage(e: clap::Error, args: &[String]) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `ferry` alone: the help, as `ferry --help` prints it.
            print!("{}", e.render());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let out = Output {
        json: wants_json(args),
    };
    out.fail(&usage_failure(&e))
}

/// Whether the command line asks for JSON: `--json` anywhere before a `--`.
/// Used only when it could not be parsed.
fn wants_json(args: &[String]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// A clap error as a failure: its first paragraph is the message, the rest
/// (usage line, tips) the hint.
fn usage_failure(e: &clap::Error) -> Failure {
    let text = e.render().to_string();
    let mut paragraphs = text.split("\n\n").map(str::trim).filter(|p| !p.is_empty());
    let first = paragraphs.next().unwrap_or("invalid command line");
    let message = first
        .strip_prefix("error:")
        .unwrap_or(first)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let hint = paragraphs.collect::<Vec<_>>().join("\n");
    Failure {
        code: USAGE.into(),
        message,
        hint: (!hint.is_empty()).then_some(hint),
    }
}

/// Bytes for people: `512 B`, `3.0 MiB` (binary units up to TiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn parse_error(argv: &[&str]) -> clap::Error {
        Cli::try_parse_from(argv).expect_err("must not parse")
    }

    #[test]
    fn usage_errors_are_one_line_with_the_usage_as_hint() {
        let f = usage_failure(&parse_error(&["ferry", "exec", "web"]));
        assert_eq!(f.code, "USAGE_INVALID");
        assert!(f.message.contains("required"), "{f:?}");
        assert!(!f.message.contains('\n'));
        assert!(
            f.hint.as_deref().unwrap().contains("Usage: ferry exec"),
            "{f:?}"
        );
        let f = usage_failure(&parse_error(&["ferry", "stop", "--bogus", "x"]));
        assert!(f.message.contains("--bogus"), "{f:?}");
        assert!(!f.message.contains('\x1b'));
    }

    #[test]
    fn json_is_wanted_before_the_double_dash_only() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants_json(&args(&["ferry", "--json", "stop"])));
        assert!(wants_json(&args(&["ferry", "stop", "--json"])));
        assert!(!wants_json(&args(&[
            "ferry", "exec", "web", "--", "--json"
        ])));
        assert!(!wants_json(&args(&["--json"])));
    }

    #[test]
    fn errors_render_as_json_and_text() {
        let f = Failure {
            code: "VM_BUSY".into(),
            message: "busy".into(),
            hint: Some("wait\nthen retry".into()),
        };
        let v = to_json(&f);
        assert_eq!(v["code"], "VM_BUSY");
        assert_eq!(v["retryable"], true);
        assert_eq!(v["hint"], "wait\nthen retry");
        let plain = anstream::adapter::strip_str(&human(&f)).to_string();
        assert_eq!(
            plain,
            "error[VM_BUSY]: busy\n  hint: wait\n    then retry\n"
        );
        assert!(
            human(&f).contains('\x1b'),
            "styled before the stream strips it"
        );
        let f = Failure {
            code: "VM_NOT_FOUND".into(),
            message: "no VM x".into(),
            hint: None,
        };
        assert_eq!(to_json(&f)["retryable"], false);
        assert!(to_json(&f)["hint"].is_null());
    }
}
