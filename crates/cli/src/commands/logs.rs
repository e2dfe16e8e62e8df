//! `ferry logs`: the guest's serial console.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use ferry::{Failure, Runtime, Vm, VmStatus};

use crate::cli::logs::Args;
use crate::output::Output;

/// Prints the console log (its last lines with `--tail`); with `--json`,
/// one JSON object `{"vm", "line"}` per line.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let machine = rt.open(&args.name)?;
    print_console(&machine, args.follow, args.tail, out.json);
    Ok(())
}

/// Follows a VM's console until it stops.
pub fn follow(machine: &Vm) {
    print_console(machine, true, None, false);
}

fn print_console(machine: &Vm, follow: bool, tail: Option<usize>, json: bool) {
    let path = machine.dir().join("console.log");
    let mut pos = 0u64;
    let mut first = true;
    let mut sink = Sink {
        json,
        vm: machine.name().to_string(),
        partial: Vec::new(),
    };
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            let _ = f.seek(SeekFrom::Start(pos));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            pos += buf.len() as u64;
            let shown = match tail {
                Some(n) if first => &buf[tail_start(&buf, n)..],
                _ => &buf[..],
            };
            sink.write(shown);
        }
        first = false;
        if !follow || !matches!(machine.status(), VmStatus::Running { .. }) {
            sink.finish();
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the last `n` lines of `buf` start, as tail(1) counts them: a last
/// line without a newline counts as a line.
fn tail_start(buf: &[u8], n: usize) -> usize {
    if n == 0 {
        return buf.len();
    }
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

/// Console bytes to stdout, as they are or as JSON lines.
struct Sink {
    json: bool,
    vm: String,
    /// The start of a line whose end has not arrived yet (JSON only).
    partial: Vec<u8>,
}

impl Sink {
    fn write(&mut self, data: &[u8]) {
        let mut out = std::io::stdout().lock();
        if !self.json {
            let _ = out.write_all(data);
            let _ = out.flush();
            return;
        }
        self.partial.extend_from_slice(data);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.line(&mut out, &line[..end]);
        }
        let _ = out.flush();
    }

    fn finish(&mut self) {
        if self.json && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&mut std::io::stdout().lock(), &line);
        }
    }

    fn line(&self, out: &mut impl Write, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({ "vm": self.vm, "line": text })
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(s: &str, n: usize) -> &str {
        &s[tail_start(s.as_bytes(), n)..]
    }

    #[test]
    fn tail_counts_lines_as_tail_does() {
        assert_eq!(tail("a\nb\nc\nd\n", 3), "b\nc\nd\n");
        assert_eq!(tail("a\nb\nc\nd", 3), "b\nc\nd");
        assert_eq!(tail("a\nb\n", 3), "a\nb\n");
        assert_eq!(tail("a\nb\n", 0), "");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("a\n\n\n", 2), "\n\n");
        assert_eq!(tail("x\r\ny\r\n", 1), "y\r\n");
        assert_eq!(tail("a\nb\n", usize::MAX), "a\nb\n");
    }
}
