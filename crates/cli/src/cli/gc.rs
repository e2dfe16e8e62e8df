//! `ferry gc`.

/// Arguments of `ferry gc`.
#[derive(clap::Args, Debug)]
pub struct Args {}
