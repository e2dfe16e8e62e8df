//! One module per subcommand.

pub mod install;
