//! `ferry logs`.

/// Arguments of `ferry logs`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Print only the last N lines (`all`: every line).
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_tail)]
    pub tail: Option<usize>,
}

/// A line count, or `all`.
fn parse_tail(s: &str) -> Result<usize, String> {
    match s {
        "all" => Ok(usize::MAX),
        n => n
            .parse()
            .map_err(|_| format!("expected a number of lines or `all`, got {s:?}")),
    }
}
