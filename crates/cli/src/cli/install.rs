//! `ferry install`.

/// Arguments of `ferry install`.
#[derive(clap::Args, Debug)]
pub struct Args {}
