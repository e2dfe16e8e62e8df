//! `ferry inspect`.

/// Arguments of `ferry inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A VM name or a bundle file.
    pub target: String,
}
