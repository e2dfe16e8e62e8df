//! Progress of work that can take more than a second (image conversion,
//! boots, snapshots, restores, copies, templates): spinners and byte counts
//! on stderr while ferry works, cleared when the work ends. Shown only when
//! stderr is a terminal and the output is not JSON; otherwise nothing.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Where progress goes: the terminal, or nowhere.
#[derive(Debug, Clone, Copy)]
pub struct Display {
    shown: bool,
}

impl Display {
    /// Progress for a command run with (or without) `--json`.
    pub fn new(json: bool) -> Display {
        Display {
            shown: !json && std::io::stderr().is_terminal(),
        }
    }

    /// A spinner with `message` and the time elapsed.
    pub fn spinner(&self, message: &str) -> Bar {
        self.bar(message, "{spinner} {msg} [{elapsed}]")
    }

    /// Bytes moved out of `total`, when known, with the rate.
    pub fn bytes(&self, message: &str, total: Option<u64>) -> Bar {
        let bar = match total {
            Some(_) => self.bar(
                message,
                "{spinner} {msg} {bytes}/{total_bytes} ({bytes_per_sec}) [{elapsed}]",
            ),
            None => self.bar(
                message,
                "{spinner} {msg} {bytes} ({bytes_per_sec}) [{elapsed}]",
            ),
        };
        if let Some(total) = total {
            bar.0.set_length(total);
        }
        bar
    }

    /// The library's progress steps (e.g. an image conversion) as spinners.
    pub fn steps(&self) -> Steps {
        Steps {
            display: *self,
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, message: &str, template: &str) -> Bar {
        if !self.shown {
            return Bar(ProgressBar::hidden());
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template(template).expect("static template"));
        bar.set_message(message.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Bar(bar)
    }
}

/// One piece of progress on screen; cleared when dropped.
#[derive(Debug)]
pub struct Bar(ProgressBar);

impl Bar {
    /// Says what is being done now.
    pub fn message(&self, message: &str) {
        self.0.set_message(message.to_string());
    }

    /// Sets the bytes moved so far, and the total when it became known.
    pub fn set(&self, bytes: u64, total: Option<u64>) {
        if let Some(total) = total {
            self.0.set_length(total);
        }
        self.0.set_position(bytes);
    }

    /// Wraps a reader: what is read counts as moved, and `then` becomes the
    /// message once the reader is at its end.
    pub fn reader<R: Read>(&self, inner: R, then: &str) -> CountingReader<R> {
        CountingReader {
            inner,
            bar: self.0.clone(),
            then: then.to_string(),
        }
    }

    /// Wraps a writer: what is written counts as moved.
    pub fn writer<W: std::io::Write>(&self, inner: W) -> indicatif::ProgressBarIter<W> {
        self.0.wrap_write(inner)
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// A reader that moves a [`Bar`] along.
pub struct CountingReader<R> {
    inner: R,
    bar: ProgressBar,
    then: String,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.bar.set_message(self.then.clone());
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// The library's [`ferry::Progress`] steps, each a spinner while it runs.
pub struct Steps {
    display: Display,
    bars: Mutex<HashMap<String, Bar>>,
}

impl ferry::Progress for Steps {
    fn event(&self, step: &str, event: ferry::ProgressEvent<'_>) {
        use ferry::ProgressEvent as E;
        let mut bars = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            E::Started(message) => {
                bars.insert(step.to_string(), self.display.spinner(message));
            }
            E::Phase(message) | E::Detail(message) => {
                if let Some(bar) = bars.get(step) {
                    bar.message(message);
                }
            }
            E::Note(_) => {}
            E::Finished { .. } => {
                bars.remove(step);
            }
        }
    }
}
