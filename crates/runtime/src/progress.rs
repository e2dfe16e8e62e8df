//! Progress of long work, reported to an observer ([`Progress`]); and phase
//! timings for measurements (`FERRY_TIMINGS`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// What happened in one step of long work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// The step began; the text says what it does.
    Started(&'a str),
    /// It entered a new phase (e.g. "compiling").
    Phase(&'a str),
    /// A detail of the current phase (the latest build log line): frequent.
    Detail(&'a str),
    /// A one-off remark (e.g. "cached").
    Note(&'a str),
    /// The step ended, with a summary and how long it took.
    Finished {
        /// What it produced.
        summary: &'a str,
        /// Seconds it took.
        seconds: f64,
    },
}

/// Receives progress of long work. The library never prints: it reports
/// here, and front ends decide what to show ([`Terminal`] is one).
pub trait Progress: Send + Sync {
    /// `step` names the work (e.g. "kernel"); `event` is what happened.
    fn event(&self, step: &str, event: Event<'_>);
}

/// Progress that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _step: &str, _event: Event<'_>) {}
}

/// Progress on stderr for command-line front ends: a spinner per step on a
/// terminal, plain lines otherwise (phases and summaries only, so logs stay
/// short).
#[derive(Default)]
pub struct Terminal {
    bars: std::sync::Mutex<std::collections::HashMap<String, ProgressBar>>,
}

impl Terminal {
    /// A new reporter.
    pub fn new() -> Terminal {
        Terminal::default()
    }
}

impl Progress for Terminal {
    fn event(&self, step: &str, event: Event<'_>) {
        let mut bars = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event {
            Event::Started(message) => {
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:.bold} [{elapsed}] {wide_msg}",
                        )
                        .expect("static template"),
                    );
                    bar.set_prefix(step.to_string());
                    bar.set_message(message.to_string());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bars.insert(step.to_string(), bar);
                } else {
                    eprintln!("{step}: {message}");
                }
            }
            Event::Phase(message) => match bars.get(step) {
                Some(bar) => bar.set_message(message.to_string()),
                None => eprintln!("{step}: {message}"),
            },
            Event::Detail(message) => {
                if let Some(bar) = bars.get(step) {
                    bar.set_message(message.chars().take(120).collect::<String>());
                }
            }
            Event::Note(message) => match bars.get(step) {
                Some(bar) => bar.println(format!("{step}: {message}")),
                None => eprintln!("{step}: {message}"),
            },
            Event::Finished { summary, seconds } => {
                if let Some(bar) = bars.remove(step) {
                    bar.finish_and_clear();
                }
                eprintln!("{step}: {summary} ({seconds:.1}s)");
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let bars = self
            .bars
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, bar) in bars.drain() {
            bar.finish_and_clear();
        }
    }
}

/// One long-running step, reported to a [`Progress`].
pub struct Step<'a> {
    progress: &'a dyn Progress,
    name: String,
    started: Instant,
}

impl<'a> Step<'a> {
    /// Starts a step named `name` (e.g. "kernel").
    pub fn start(progress: &'a dyn Progress, name: &str, message: &str) -> Step<'a> {
        progress.event(name, Event::Started(message));
        Step {
            progress,
            name: name.to_string(),
            started: Instant::now(),
        }
    }

    /// Updates the step's detail (e.g. the latest build log line).
    pub fn detail(&self, message: &str) {
        self.progress.event(&self.name, Event::Detail(message));
    }

    /// Announces a new phase of the step.
    pub fn phase(&self, message: &str) {
        self.progress.event(&self.name, Event::Phase(message));
    }

    /// Ends the step with a summary line.
    pub fn finish(self, summary: &str) {
        self.progress.event(
            &self.name,
            Event::Finished {
                summary,
                seconds: self.started.elapsed().as_secs_f64(),
            },
        );
    }
}

/// Phase timings printed to stderr when `FERRY_TIMINGS` is set; silent otherwise.
pub struct Phases {
    last: Option<Instant>,
}

impl Phases {
    /// Enabled when `FERRY_TIMINGS` is set in the environment.
    pub fn from_env() -> Phases {
        Phases {
            last: std::env::var_os(ferry_vmm::vm::TIMINGS_ENV).map(|_| Instant::now()),
        }
    }

    /// Prints the time since the previous mark.
    pub fn mark(&mut self, what: &str) {
        if let Some(last) = self.last {
            eprintln!(
                "timing: {what}: {:.1} ms",
                last.elapsed().as_secs_f64() * 1000.0
            );
            self.last = Some(Instant::now());
        }
    }
}
