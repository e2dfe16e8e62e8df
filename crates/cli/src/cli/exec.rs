//! `ferry exec [OPTIONS] NAME CMD [ARGS...]`.

/// Arguments of `ferry exec`. Options go before NAME; everything after the
/// command's first word is the command's own (`ferry exec web ls -la`), and a
/// `--` before the command is accepted (`ferry exec web -- ls -la`).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep stdin open and stream it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (with -i: raw mode, every key
    /// reaches the guest, the window size follows the terminal's).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User in the guest (name, uid, name:group or uid:gid).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The VM.
    pub name: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        value_name = "CMD",
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}
