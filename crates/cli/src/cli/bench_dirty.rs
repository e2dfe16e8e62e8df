//! `ferry bench-dirty`.

/// What `bench-dirty` asks of the VM's record of changed pages.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start tracking.
    Start,
    /// Print the pages changed since the start or the previous take.
    Take,
    /// Stop tracking.
    Stop,
}

/// Arguments of the hidden `bench-dirty` command.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// What to do.
    #[arg(value_enum)]
    pub action: Action,
}
