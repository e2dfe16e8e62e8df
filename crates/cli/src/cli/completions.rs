//! `ferry completions`.

/// Arguments of `ferry completions`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell to complete for.
    pub shell: Shell,
}

/// Shells ferry writes completion scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    /// Bash: `source <(ferry completions bash)`.
    Bash,
    /// Zsh: write it as `_ferry` into a directory on `$fpath`.
    Zsh,
    /// Fish: write it to `~/.config/fish/completions/ferry.fish`.
    Fish,
}
