//! Progress output for long work: a spinner on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One long-running step shown to the user.
pub struct Step {
    bar: Option<ProgressBar>,
    name: String,
    started: Instant,
}

impl Step {
    /// Starts a step named `name` (e.g. "kernel").
    pub fn start(name: &str, message: &str) -> Step {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:.bold} [{elapsed}] {wide_msg}")
                    .expect("static template"),
            );
            bar.set_prefix(name.to_string());
            bar.set_message(message.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            eprintln!("{name}: {message}");
        }
        Step {
            bar,
            name: name.to_string(),
            started: Instant::now(),
        }
    }

    /// Updates the step's detail (e.g. the latest build log line). On a plain
    /// stream only phase changes are printed, so logs stay short.
    pub fn detail(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.chars().take(120).collect::<String>());
        }
    }

    /// Announces a new phase of the step.
    pub fn phase(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => eprintln!("{}: {message}", self.name),
        }
    }

    /// Ends the step with a summary line.
    pub fn finish(self, summary: &str) {
        let line = format!(
            "{}: {summary} ({:.1}s)",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{line}");
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
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
            last: std::env::var_os("FERRY_TIMINGS").map(|_| Instant::now()),
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
