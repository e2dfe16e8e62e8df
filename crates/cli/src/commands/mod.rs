//! One module per subcommand.

pub mod bake;
pub mod bench_rtt;
pub mod boot;
pub mod cp;
pub mod exec;
pub mod fork;
pub mod gc;
pub mod inspect;
pub mod install;
pub mod logs;
pub mod ls;
pub mod restore;
pub mod rm;
pub mod snapshot;
pub mod stop;
pub mod template;

/// Parses `K=V`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Parses `-p` specs here rather than in clap, so a bad one gets ferry's error code.
pub fn parse_ports(specs: &[String]) -> Result<Vec<ferry::PortForward>, ferry::Failure> {
    specs
        .iter()
        .map(|p| p.parse::<ferry::PortForward>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Into::into)
}
