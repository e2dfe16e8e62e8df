//! `ferry fork`.

/// Arguments of `ferry fork`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The running (or paused) VM to fork.
    pub name: String,
    /// Name of a new VM (repeatable: one fork, several siblings). Without it
    /// the new VMs are NAME-1 ... NAME-N.
    #[arg(long)]
    pub new_name: Vec<String>,
    /// How many new VMs (default: one, or one per --new-name).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// Return once the forks run instead of following the (first) fork's console.
    #[arg(short, long)]
    pub detach: bool,
    /// Forward a host port into the (first) new VM: [HOST_IP:]HOST_PORT:GUEST_PORT
    /// (repeatable; the source's forwards are never inherited; binds 127.0.0.1
    /// unless an address is given).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}
